"""Pilot 9: more images per zoo class. Renders the v2 zoo classes with AUG augmentations per font (v2: 4, i.e. 32
images per class), then tunes the first N zoo tasks on them exactly as v2 did (200 steps, on /root/repro2's
foundation) and compares their held-out accuracy with v2's LoRAs of the same tasks. usage: pilot9.py AUG N"""
import json, logging, sys, time
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch
from recycle.backbone import load_backbone
from recycle.formats import read_adapter
from recycle.pretune import pretune_zoo
from reproduce.glyphs import SplitSpec, build
from reproduce.pipeline import ReproConfig
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
AUG, N = int(sys.argv[1]), int(sys.argv[2])
R, W = Path("/root/repro2"), Path("/root/p9")
cfg = ReproConfig()
torch.set_num_threads(1)  # beside pilot 8
t0 = time.time()
spec = SplitSpec(**{**json.loads((R / "data" / "splits.json").read_text())["spec"], "train_aug": AUG})
build(W / "data", spec, only=("zoo",))
print("DATA", AUG * 8, "images per class", round(time.time() - t0), flush=True)
bb = load_backbone(str(R / "mini-vit"), device="cpu")
man = pretune_zoo(bb, W / "data" / "zoo", W / "zoo", replace(cfg.zoo, num_loras=N))
old = [read_adapter(R / "zoo" / f"lora_{k:03d}").info["holdout_acc"] for k in range(N)]
new = [e["holdout_acc"] for e in man["loras"]]
print("ZOO classes same as v2:", [e["classes"] for e in man["loras"]] == [read_adapter(R / "zoo" / f"lora_{k:03d}").class_names for k in range(N)])
print("ZOO held-out: v2 (32 images per class)", [round(a, 3) for a in old], round(sum(old) / N, 4), flush=True)
print(f"ZOO held-out: {AUG * 8} images per class", [round(a, 3) for a in new], round(sum(new) / N, 4),
      "seconds", round(time.time() - t0), flush=True)
