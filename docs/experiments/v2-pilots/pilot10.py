"""Pilot 10: a foundation on a broader source. Renders v2's pretraining classes with AUG augmentations per font (v2:
4, i.e. 32 images per class), pretrains v2's recipe on them for STEPS steps, and scores it on the tinted validation
classes as pilot 8 scored its foundations: NN, and the oracle (OSTEPS steps on the v2 zoo's real images, the same
config). usage: pilot10.py AUG STEPS OSTEPS"""
import json, logging, sys, time
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch
from recycle.backbone import load_backbone
from recycle.meta import FolderEpisodes, meta_train
from reproduce.glyphs import SplitSpec, build
from reproduce.pipeline import ReproConfig, _validator, stage_pretrain, val_curve
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
AUG, STEPS, OSTEPS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
R, W = Path("/root/repro2"), Path("/root/p10")
cfg = ReproConfig()
torch.set_num_threads(cfg.threads)
t0 = time.time()
spec = SplitSpec(**{**json.loads((R / "data" / "splits.json").read_text())["spec"], "train_aug": AUG})
build(W / "data", spec, only=("pretrain",))
print("DATA", AUG * 8, "images per class", round(time.time() - t0), flush=True)
if not (W / "pretrain.json").exists():
    summary = stage_pretrain(replace(cfg, pretrain_steps=STEPS), W / "data", W / "mini-vit")
    (W / "pretrain.json").write_text(json.dumps({**summary, "seconds": round(time.time() - t0)}))
print("PRETRAIN", AUG * 8, STEPS, (W / "pretrain.json").read_text(), flush=True)
bb = load_backbone(str(W / "mini-vit"), device="cpu")
meta = replace(cfg.meta, steps=OSTEPS, val_every=max(1, OSTEPS // 4), checkpoint_every=OSTEPS)
meta_train(bb, FolderEpisodes(R / "data" / "zoo", meta.spec, bb.input_size[1:]), meta, W / "oracle", resume=True,
           validate=_validator(cfg, bb, R / "data"))
print("ORACLE broad", val_curve(W / "oracle"), round(time.time() - t0), flush=True)
