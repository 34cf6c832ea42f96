"""Pilot: Hangul-source foundation, Han downstream (plain); ceiling check (oracle zoo->val) first."""
import json, logging, sys, time
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch
from reproduce.glyphs import SplitSpec, build
from reproduce.pipeline import ReproConfig, _stage, stage_prior, stage_pretrain
from reproduce.diagnose import meta_curve
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
work = Path(sys.argv[1]); steps = int(sys.argv[2])
cfg = ReproConfig(data=SplitSpec(pretrain=500, train_aug=8, cross=148, source_script="hangul", cross_script="kana"),
                  pretrain_steps=steps)
cfg = replace(cfg, meta=replace(cfg.meta, val_episodes=100))
torch.set_num_threads(2)
work.mkdir(parents=True, exist_ok=True)
t = {}
_stage(work, "data", lambda: build(work / "data", cfg.data), t)
_stage(work, "pretrain", lambda: stage_pretrain(cfg, work / "data", work / "mini-vit"), t)
print(json.loads((work / "pretrain.done.json").read_text()), flush=True)
c = meta_curve(work, cfg, work / "data" / "zoo", work / "data" / "val", 400, 100)
print("oracle zoo->val", c, flush=True)
_stage(work, "prior", lambda: stage_prior(cfg, work / "data", work / "prior"), t)
print(t, flush=True)
