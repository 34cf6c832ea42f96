"""Invert the first K LoRAs of a pilot's zoo with a given BN prior and inversion settings: the teachers' accuracy on
their own surrogates, the CPU time, a grid of every fourth image (one LoRA per row), and how hard the surrogates'
5-way 1-shot tasks are for NN against real images of the same classes (`reproduce.surrogates.task_difficulty`).

    python docs/experiments/v3-pilots/invert_pilot.py WORK PRIOR OUT K ['{"bn_weight": 0.02, "tv_weight": 0.3}']

WORK is a pilot's work folder (``mini-vit`` and ``zoo``); the settings start from the `v3-pilot` preset's, with 16
images per class.
"""
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from recycle.backbone import load_backbone  # noqa: E402
from recycle.invert import invert, load_bn_prior  # noqa: E402
from recycle.pool import run_settings, write_run  # noqa: E402
from recycle.zoo import load_zoo  # noqa: E402
from reproduce.surrogates import task_difficulty  # noqa: E402
from reproduce.pipeline import ReproConfig  # noqa: E402

logging.basicConfig(level=logging.WARNING)
torch.set_num_threads(2)
work, prior_dir, out, k = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
over = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
cfg = replace(ReproConfig.v3_pilot().invert, per_class=16, **over)
backbone = load_backbone(str(work / "mini-vit"), device="cpu")
prior = load_bn_prior(f"local-dir:{prior_dir}", backbone.device)
accs, rows = [], []
start = time.process_time()
grid_size = tuple(backbone.model.patch_embed.grid_size)
for i, (name, adapter) in enumerate(load_zoo(work / "zoo", backbone)[:k]):
    result = invert(backbone, adapter, replace(cfg, seed=i), bn_prior=prior)
    write_run(out / "pool", result, adapter, name, run_settings(cfg), grid_size, name=name)
    accs.append((result.logits.argmax(-1) == result.labels).float().mean().item())
    rows.append(result.images[::4][:20])
out.mkdir(parents=True, exist_ok=True)
grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # rows of images side by side
Image.fromarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(out / "grid.png")
res = {"settings": over, "teacher_accuracy": [round(a, 3) for a in accs], "mean": round(sum(accs) / len(accs), 4),
       "cpu_seconds": round(time.process_time() - start)}
res["nn_1shot"] = task_difficulty(backbone, out / "pool", work / "data" / "zoo", episodes=200)
(out / "result.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res), flush=True)
