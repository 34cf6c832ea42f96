"""Pilot 6: a colour-augmented BN prior (source classes only, random ink/paper colours) against the plain one.
Inverts the first N zoo LoRAs of /root/repro2 with the new prior, then meta-trains (unmasked, T=0.5) on the new
pool and on the same LoRAs' runs of the v2 pool, scored on validation. usage: pilot6.py N METASTEPS"""
import json, logging, os, sys, time
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch
import timm
from timm.models import save_for_hf
from recycle.backbone import load_backbone
from recycle.invert import invert, load_bn_prior, remask
from recycle.meta import PoolEpisodes, meta_train
from recycle.pool import Pool, write_run
from recycle.pretune import load_zoo
from reproduce.pipeline import ReproConfig, _load_split, _train_classifier, _validator
from reproduce.surrogates import task_difficulty, surrogate_figure
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
torch.set_num_threads(2)
N, MSTEPS = int(sys.argv[1]), int(sys.argv[2])
R, W = Path("/root/repro2"), Path("/root/p6")
cfg = ReproConfig()

def tint(x, gen, min_contrast=0.35):
    """uint8 plain glyphs (N,3,H,W) -> random ink/paper colours per image (luminance contrast >= min_contrast)."""
    n = x.shape[0]
    luma = torch.tensor([0.299, 0.587, 0.114])
    ink, paper = torch.empty(n, 3), torch.empty(n, 3)
    todo = torch.arange(n)
    while todo.numel():
        a, b = torch.rand(todo.numel(), 3, generator=gen), torch.rand(todo.numel(), 3, generator=gen)
        ok = ((a @ luma) - (b @ luma)).abs() >= min_contrast
        ink[todo[ok]], paper[todo[ok]] = a[ok], b[ok]
        todo = todo[~ok]
    alpha = 1 - x.float().mean(1, keepdim=True) / 255
    out = alpha * ink[:, :, None, None] + (1 - alpha) * paper[:, :, None, None]
    return (out * 255).round().clamp(0, 255).to(torch.uint8)

prior_dir = W / "prior"
if not (prior_dir / "model.safetensors").exists():
    x, y = _load_split(R / "data" / "pretrain", 32)
    gen = torch.Generator().manual_seed(7)
    x = torch.cat([x, tint(x, gen), tint(x, gen)]); y = torch.cat([y, y, y])
    torch.manual_seed(1)
    args = dict(layers=[1, 1, 1, 1], num_classes=int(y.max()) + 1)
    model = timm.create_model("resnet18", pretrained=False, **args)
    mean = torch.tensor((0.5, 0.5, 0.5)).view(1, 3, 1, 1)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 32, 32)}
    acc = _train_classifier(model, x, y, cfg.prior_steps, cfg.pretrain_batch, 2e-3, mean, mean, seed=1)
    save_for_hf(model, str(prior_dir), safe_serialization=True, model_args=args)
    print("PRIOR acc", acc, flush=True)
bb = load_backbone(str(R / "mini-vit"), device="cpu")
prior = load_bn_prior(f"local-dir:{prior_dir}", bb.device)
pool = W / "pool"
t0 = time.time()
names = []
for k, (name, ad) in enumerate(load_zoo(R / "zoo", bb)):
    if k >= N:
        break
    names.append(name)
    if (pool / f".{name}.done").exists():
        continue
    res = invert(bb, ad, replace(cfg.invert, seed=k), bn_prior=prior)
    kept, masked, logits = remask(bb, ad, res.images, {3: 0.75})
    write_run(pool, replace(res, kept=kept, masked=masked, logits_kept=logits), ad, f"zoo/{name}", {"pilot": 6}, (8, 8))
    (pool / f".{name}.done").touch()
    print(name, "agree", (res.logits.argmax(-1) == res.labels).float().mean().item(), time.time() - t0, flush=True)
old = W / "oldpool"
old.mkdir(exist_ok=True)
for d in sorted((R / "pool-75").iterdir()):
    if d.is_dir() and any(d.name.startswith(n) for n in names) and not (old / d.name).exists():
        (old / d.name).symlink_to(d)
surrogate_figure(pool, R / "data" / "zoo", W / "surrogates.png")
print("difficulty new", task_difficulty(bb, pool, R / "data" / "zoo", 100, 5, 1, 15, seed=3), flush=True)
print("difficulty old", task_difficulty(bb, old, R / "data" / "zoo", 100, 5, 1, 15, seed=3), flush=True)
val = _validator(cfg, bb, R / "data")
meta = replace(cfg.meta, steps=MSTEPS, val_every=100, checkpoint_every=MSTEPS, teacher_temperature=0.5, masked=False)
for tag, p in (("new", pool), ("old", old)):
    r = meta_train(bb, PoolEpisodes(Pool(p), meta.spec, False), meta, W / f"meta-{tag}", resume=True, validate=val)
    curve = [(j["step"], j["val_acc"]) for j in map(json.loads, (W / f"meta-{tag}" / "log.jsonl").read_text().splitlines()) if "val_acc" in j]
    print("META", tag, curve, flush=True)
