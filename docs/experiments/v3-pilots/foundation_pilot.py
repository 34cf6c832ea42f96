"""A foundation pilot: render a source, pretrain the ViT by contrast, and score NN on the validation classes (300
5-way 1-shot episodes, seed 99, as the structure check) every EVERY steps.

    python docs/experiments/v3-pilots/foundation_pilot.py WORK '{"data": {"pretrain": 3000, "train_aug": 1},
        "contrast": {"steps": 3000}}' 500

The overrides are fields of the `v3-pilot` preset's `data` (`SplitSpec`), `contrast` (`ContrastConfig`) and `vit`;
"init": a saved foundation folder to continue training from (its `vit` settings must match).
Each scored model is kept as WORK/vit-STEP; the scores go to WORK/found.json.
"""
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import timm  # noqa: E402
import torch  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

from recycle.backbone import load_backbone  # noqa: E402
from recycle.evaluate import EvalConfig, evaluate  # noqa: E402
from reproduce.foundation import pretrain_contrastive  # noqa: E402
from reproduce.glyphs import build  # noqa: E402
from reproduce.pipeline import ReproConfig, _load_split  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
torch.set_num_threads(2)
work, over, every = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
cfg = ReproConfig.v3_pilot()
spec = replace(cfg.data, **over.get("data", {}))
contrast = replace(cfg.contrast, **over.get("contrast", {}))
vit = {**cfg.vit, **over.get("vit", {})}
data = work / "data"
print("DATA", build(data, spec)["splits"], flush=True)
x, _ = _load_split(data / "pretrain", spec.size)
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **vit)
if over.get("init"):
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(Path(over["init"]) / "model.safetensors")))
mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
log = []


def score(step: int) -> None:
    folder = work / f"vit-{step}"
    save_for_hf(model, str(folder), safe_serialization=True, model_args={**vit, "num_classes": 0})
    backbone = load_backbone(str(folder), device="cpu")
    r = evaluate(backbone, data / "val", {"NN": None}, EvalConfig(5, 1, 15, 300, seed=99))["results"]["NN"]
    log.append({"step": step, "nn": r["mean"], "ci95": r["ci95"], "cpu_seconds": round(time.process_time())})
    print("NN", json.dumps(log[-1]), flush=True)
    (work / "found.json").write_text(json.dumps({"overrides": over, "images": int(x.shape[0]), "log": log}, indent=1))


print(json.dumps(pretrain_contrastive(model, x, contrast, mean, std, every=every, callback=score)))
