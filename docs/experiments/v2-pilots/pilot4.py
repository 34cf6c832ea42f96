"""Pilot: zoo -> invert -> meta-train on one downstream style, with the v1 mini-vit and the plain glyph prior.
usage: pilot2.py WORK DATA NLORAS PERCLASS INVSTEPS METASTEPS TEMP [oracle]"""
import json, logging, sys, time
from dataclasses import replace, asdict
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch
from recycle.backbone import load_backbone
from recycle.evaluate import EvalConfig, make_validator
from recycle.invert import InversionConfig, invert, load_bn_prior, remask
from recycle.meta import MetaConfig, PoolEpisodes, FolderEpisodes, meta_train
from recycle.pool import Pool, write_run
from recycle.pretune import PretuneConfig, pretune_zoo, load_zoo
from recycle.tokens import PruningConfig
from reproduce.surrogates import task_difficulty
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
work, data = Path(sys.argv[1]), Path(sys.argv[2])
nl, pc, isteps, msteps, temp = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
torch.set_num_threads(1)
BB = sys.argv[8]; PRIOR = sys.argv[9]
bb = load_backbone(BB, device="cpu")
work.mkdir(parents=True, exist_ok=True)
t0 = time.time()
man = pretune_zoo(bb, data / "zoo", work / "zoo", PretuneConfig(num_loras=nl, way=5, steps=80, lr=1e-3, flip=False, shift=0.1))
print("zoo", [e["holdout_acc"] for e in man["loras"]], time.time() - t0, flush=True)
meta = MetaConfig(steps=msteps, way=5, shot=1, query=15, flip=False, checkpoint_every=100, val_every=100, val_episodes=100,
                  teacher_temperature=temp)
val = make_validator(bb, data / "val", EvalConfig(5, 1, 15, 100, seed=123))
if len(sys.argv) > 10:
    r = meta_train(bb, FolderEpisodes(data / "zoo", meta.spec, bb.input_size[1:]), meta, work / "oracle", validate=val)
    print("ORACLE", r, flush=True)
    sys.exit()
import os
while not os.path.exists(PRIOR + "/model.safetensors"): time.sleep(10)
time.sleep(5)
prior = load_bn_prior("local-dir:" + PRIOR, bb.device)
pool = work / "pool"
icfg = InversionConfig(per_class=pc, steps=isteps, lr=0.2, bn_weight=0.1, flip=False, pruning=PruningConfig({-1: 0.75}))
t0 = time.time()
for k, (name, ad) in enumerate(load_zoo(work / "zoo", bb)):
    if (pool / f".{name}.done").exists():
        continue
    res = invert(bb, ad, replace(icfg, seed=k), bn_prior=prior)
    write_run(pool, res, ad, f"zoo/{name}", {"pilot": 1}, tuple(bb.model.patch_embed.grid_size))
    (pool / f".{name}.done").touch()
    print(name, "agree", (res.logits.argmax(-1) == res.labels).float().mean().item(), time.time() - t0, flush=True)
print("difficulty", task_difficulty(bb, pool, data / "zoo", 100, 5, 1, 15, seed=3), flush=True)
r = meta_train(bb, PoolEpisodes(Pool(pool), meta.spec, True), replace(meta, masked=True), work / f"meta-t{temp}", validate=val)
print("RECYCLE", r, flush=True)
