"""How good are the surrogates? A figure of them beside real images, and how hard their few-shot tasks are.

`surrogate_figure` draws, for some classes of one inverted LoRA, real images of the class, its surrogate images and
their masked versions (kept patches only). `task_difficulty` scores the bare backbone (nearest prototype) on
episodes of surrogate images and on episodes of real images of the same classes, drawn alike: a pool whose
surrogate episodes are far easier than the real ones teaches meta-training little.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, ImageDraw

from recycle.backbone import Backbone
from recycle.evaluate import mean_ci
from recycle.fewshot import FewShotClassifier, prototype_logits
from recycle.formats import LoRAAdapter
from recycle.images import load_image
from recycle.pool import Pool, PoolItem
from recycle.views import ViewConfig, random_views

__all__ = ["surrogate_figure", "task_difficulty"]


def _by_class(pool: Pool, run: int) -> dict[str, list[int]]:
    """Class name -> item indices of one pool run."""
    out: dict[str, list[int]] = {}
    for i, item in enumerate(pool.runs[run]["items"]):
        out.setdefault(item["class"], []).append(i)
    return out


def _real_files(real_root: Path, name: str) -> list[Path]:
    return sorted((real_root / name).glob("*.png"))


def surrogate_figure(
    pool_root: Path, real_root: Path, out: Path, runs: int = 2, classes: int = 5, per: int = 4, scale: int = 3
) -> Path:
    """A PNG grid: one row per class of the first `runs` runs, with `per` real images, `per` surrogates and their
    `per` masked versions. Class folders of `real_root` are named as the pool's classes."""
    pool = Pool(pool_root)
    h, w = pool.runs[0]["image_size"]
    gap, header = 4, 14
    cols = 3 * per
    rows = [
        (r, name, idx)
        for r in range(min(runs, len(pool.runs)))
        for name, idx in list(_by_class(pool, r).items())[:classes]
    ]
    canvas = Image.new("RGB", (cols * (w + 1) + 2 * gap, header + len(rows) * (h + 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(("real", "surrogate", "masked surrogate")):
        draw.text((k * (per * (w + 1) + gap) + 2, 1), title, fill="black")
    masked = pool.masked_available
    for row, (r, name, idx) in enumerate(rows):
        y = header + row * (h + 1)
        real = [load_image(f).convert("RGB").resize((w, h)) for f in _real_files(real_root, name)[:per]]
        refs = [PoolItem(r, i) for i in idx[:per]]
        synth = [_to_pil(pool.load(ref)) for ref in refs]
        masks = [_to_pil(pool.load(ref, masked=True)) for ref in refs] if masked else []
        for block, images in enumerate((real, synth, masks)):
            for j, img in enumerate(images):
                canvas.paste(img, (block * (per * (w + 1) + gap) + j * (w + 1), y))
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def _to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def task_difficulty(
    backbone: Backbone,
    pool_root: Path,
    real_root: Path,
    episodes: int = 200,
    way: int = 5,
    shot: int = 1,
    query: int = 15,
    seed: int = 0,
    lora: Optional[LoRAAdapter] = None,
    views: Optional[ViewConfig] = None,
) -> dict:
    """Nearest-prototype accuracy (%, mean and 95% CI) of `backbone` (+ `lora`) on single-LoRA surrogate episodes
    and on real episodes of the same classes, drawn by the same rule: ``{"surrogate": {...}, "real": {...}}``.

    With `views`, each surrogate episode's images are random views (`recycle.views.random_views`), drawn afresh per
    episode as meta-training draws them; real episodes stay as rendered."""
    pool = Pool(pool_root)
    per = shot + query
    rng = random.Random(seed)
    candidates = []
    for r in range(len(pool.runs)):
        usable = {
            n: idx for n, idx in _by_class(pool, r).items() if len(idx) >= per and len(_real_files(real_root, n)) >= per
        }
        if len(usable) >= way:
            candidates.append((r, usable))
    if not candidates:
        raise ValueError(f"no run of '{pool_root}' has {way} classes with {per} surrogate and real images each")
    plan = []
    for _ in range(episodes):
        r, usable = rng.choice(candidates)
        names = rng.sample(sorted(usable), way)
        plan.append((r, [(n, rng.sample(usable[n], per), rng.sample(_real_files(real_root, n), per)) for n in names]))
    clf = FewShotClassifier(backbone, lora, cache_size=0)
    synth_keys = sorted({(r, i) for r, cls in plan for _, idx, _ in cls for i in idx})
    real_keys = sorted({f for _, cls in plan for _, _, files in cls for f in files})
    if views is None:
        synth_emb = dict(zip(synth_keys, clf.embed([_to_pil(pool.load(PoolItem(r, i))) for r, i in synth_keys])))
    else:
        synth_img = {(r, i): pool.load(PoolItem(r, i)) for r, i in synth_keys}
        gen = torch.Generator().manual_seed(seed)
    real_emb = dict(zip(real_keys, clf.embed([load_image(f) for f in real_keys])))
    labels_s = torch.arange(way).repeat_interleave(shot)
    labels_q = torch.arange(way).repeat_interleave(query)
    accs: dict[str, list[float]] = {"surrogate": [], "real": []}
    for r, cls in plan:
        if views is None:
            surrogate = [[synth_emb[(r, i)] for i in idx] for _, idx, _ in cls]
        else:
            images = random_views(torch.stack([synth_img[(r, i)] for _, idx, _ in cls for i in idx]), views, gen)
            flat = clf.embed([_to_pil(x) for x in images])
            surrogate = [flat[c * per : (c + 1) * per] for c in range(way)]
        for kind, emb in (
            ("surrogate", surrogate),
            ("real", [[real_emb[f] for f in files] for _, _, files in cls]),
        ):
            s = torch.stack([e for c in emb for e in c[:shot]])
            q = torch.stack([e for c in emb for e in c[shot:]])
            logits = prototype_logits(s, labels_s, q, "l2", way)
            accs[kind].append((logits.argmax(-1) == labels_q).float().mean().item())
    out = {}
    for kind, values in accs.items():
        mean, ci = mean_ci(values)
        out[kind] = {"mean": round(100 * mean, 2), "ci95": round(100 * ci, 2), "episodes": len(values)}
    return out
