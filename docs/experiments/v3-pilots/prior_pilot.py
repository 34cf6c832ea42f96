"""Train the BN-prior CNN of a pilot's source alone, to see whether it converges (its training accuracy by step).

    python docs/experiments/v3-pilots/prior_pilot.py DATA OUT STEPS RECOLOURED_COPIES

DATA is a work folder's ``data`` (rendered by the pipeline); OUT receives the prior in timm's layout.
"""
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from reproduce.pipeline import ReproConfig, stage_prior  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
data, out, steps, recolour = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = replace(ReproConfig.v3_pilot(), prior_steps=steps, prior_recolour=recolour)
print(json.dumps(stage_prior(cfg, data, out)))
