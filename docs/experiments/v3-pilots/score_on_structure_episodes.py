"""Score a pilot's exported meta-LoRA on the structure check's validation episodes (300, seed 99), beside NN.

    python docs/experiments/v3-pilots/score_on_structure_episodes.py WORK > WORK/meta-recycle-on-structure-episodes.json
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch  # noqa: E402

from recycle.backbone import load_backbone  # noqa: E402
from recycle.evaluate import EvalConfig, evaluate  # noqa: E402
from recycle.formats import read_adapter  # noqa: E402

work = Path(sys.argv[1])
torch.set_num_threads(2)
backbone = load_backbone(str(work / "mini-vit"), device="cpu")
methods = {"NN": None, "LoRA Recycle (unmasked, 10 LoRAs)": read_adapter(work / "meta-recycle" / "meta-lora")}
report = evaluate(backbone, work / "data" / "val", methods, EvalConfig(5, 1, 15, 300, seed=99))
print(json.dumps({k: (v["mean"], v["ci95"]) for k, v in report["results"].items()}))
