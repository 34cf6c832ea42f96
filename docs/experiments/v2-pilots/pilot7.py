"""Pilot 7: stronger teachers. Re-tunes the first N zoo tasks of /root/repro2 for STEPS steps (v2: 200), inverts them
with v2's plain glyph prior and inversion settings, then meta-trains (unmasked, T=0.5) on the new pool, scored on
validation as pilot 6 scored the same 8 LoRAs' v2 surrogates. usage: pilot7.py N STEPS METASTEPS"""
import json, logging, sys, time
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch
from recycle.backbone import load_backbone
from recycle.formats import read_adapter as load_adapter
from recycle.invert import invert, load_bn_prior, remask
from recycle.meta import PoolEpisodes, meta_train
from recycle.pool import Pool, write_run
from recycle.pretune import load_zoo, pretune_zoo
from reproduce.pipeline import ReproConfig, _validator
from reproduce.surrogates import task_difficulty, surrogate_figure
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
torch.set_num_threads(2)
N, STEPS, MSTEPS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
R, W = Path("/root/repro2"), Path("/root/p7")
cfg = ReproConfig()
bb = load_backbone(str(R / "mini-vit"), device="cpu")
t0 = time.time()
zcfg = replace(cfg.zoo, num_loras=N, steps=STEPS)
man = pretune_zoo(bb, R / "data" / "zoo", W / "zoo", zcfg)
old = [load_adapter(R / "zoo" / f"lora_{k:03d}").info["holdout_acc"] for k in range(N)]
new = [e["holdout_acc"] for e in man["loras"]]
print("ZOO held-out: v2 (200 steps)", [round(a, 3) for a in old], sum(old) / N, flush=True)
print(f"ZOO held-out: {STEPS} steps", new, sum(new) / N, "seconds", round(time.time() - t0), flush=True)
prior = load_bn_prior(f"local-dir:{R / 'prior'}", bb.device)
pool = W / "pool"
for k, (name, ad) in enumerate(load_zoo(W / "zoo", bb)):
    if (pool / f".{name}.done").exists():
        continue
    res = invert(bb, ad, replace(cfg.invert, seed=k), bn_prior=prior)
    kept, masked, logits = remask(bb, ad, res.images, {3: 0.75})
    write_run(pool, replace(res, kept=kept, masked=masked, logits_kept=logits), ad, f"zoo/{name}", {"pilot": 7}, (8, 8))
    (pool / f".{name}.done").touch()
    print(name, "agree", (res.logits.argmax(-1) == res.labels).float().mean().item(), round(time.time() - t0), flush=True)
surrogate_figure(pool, R / "data" / "zoo", W / "surrogates.png")
print("difficulty new", task_difficulty(bb, pool, R / "data" / "zoo", 100, 5, 1, 15, seed=3), flush=True)
val = _validator(cfg, bb, R / "data")
meta = replace(cfg.meta, steps=MSTEPS, val_every=100, checkpoint_every=MSTEPS, teacher_temperature=0.5, masked=False)
r = meta_train(bb, PoolEpisodes(Pool(pool), meta.spec, False), meta, W / "meta", resume=True, validate=val)
curve = [(j["step"], j["val_acc"]) for j in map(json.loads, (W / "meta" / "log.jsonl").read_text().splitlines()) if "val_acc" in j]
print("META new", curve, "seconds", round(time.time() - t0), flush=True)
