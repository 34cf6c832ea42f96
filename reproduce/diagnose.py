"""Why does (or doesn't) meta-training beat the bare backbone? Checks on a finished `reproduce.pipeline` work folder.

    python -m reproduce.diagnose --work .cache/repro [--preset v3] [--steps 200] [--out reproduce/results/diagnose.md]

1. **Ceiling check.** The pipeline's oracle: a meta-LoRA trained exactly as the recycled ones (same schedule), but
   on the *real* images of the zoo classes, scored on the validation episodes the pipeline selects on (read from
   its log; step 0 is the bare backbone, NN). Meta-training on surrogates of those classes cannot be expected to
   beat it: if it hardly moves above NN, the regime has no room to gain.
2. **An unseen domain.** The same, on real images of half the Hangul classes (a script the backbone was not
   pretrained on), scored on the other half: does meta-training help where there is a domain to adapt to?
3. **Teacher agreement.** How often each zoo LoRA's own head labels its synthetic images as their target class, on
   all tokens and on the kept tokens at each masking ratio (the invert stage's summary of the pools).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from recycle.backbone import load_backbone
from recycle.evaluate import EvalConfig, make_validator
from recycle.io import atomic_write_bytes
from recycle.episodes import FolderEpisodes
from recycle.meta import meta_train

from .pipeline import MASKS, PRESETS, ReproConfig, val_curve


def meta_curve(work: Path, cfg: ReproConfig, train: Path, val: Path, steps: int, every: int) -> list[tuple[int, float]]:
    """[(step, accuracy %)] on fixed episodes of `val` while meta-training (the pipeline's recipe) on the real images
    of `train`; step 0 is the bare backbone."""
    backbone = load_backbone(str(work / "mini-vit"), device="cpu")
    meta = cfg.meta
    validate = make_validator(backbone, val, EvalConfig(meta.way, meta.shot, meta.query, meta.val_episodes, seed=123))
    curve: list[tuple[int, float]] = []

    def record(adapter):  # meta_train validates at step 0 (the bare backbone), then every `every` steps
        curve.append((min(len(curve) * every, steps), round(100 * validate(adapter), 2)))
        return curve[-1][1] / 100

    source = FolderEpisodes(train, meta.spec, backbone.input_size[1:])
    out = Path(tempfile.mkdtemp(prefix="diagnose-"))
    try:
        meta_train(
            backbone, source, replace(meta, steps=steps, val_every=every, checkpoint_every=steps), out, validate=record
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return curve


def _split_classes(root: Path, tmp: Path) -> tuple[Path, Path]:
    """Two disjoint halves of `root`'s classes, as folders of symlinks under `tmp`."""
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    halves = (tmp / "first", tmp / "second")
    for half, members in zip(halves, (classes[: len(classes) // 2], classes[len(classes) // 2 :])):
        half.mkdir()
        for c in members:
            (half / c.name).symlink_to(c.resolve(), target_is_directory=True)
    return halves


def _curve_table(curve: list[tuple[int, float]], label: str) -> list[str]:
    return [
        "| step | " + " | ".join(str(s) for s, _ in curve) + " |",
        "|---|" + "---|" * len(curve),
        f"| {label} | " + " | ".join(f"{a:.2f}" for _, a in curve) + " |",
    ]


def report(work: Path, steps: int, cfg: Optional[ReproConfig] = None) -> str:
    """The Markdown report; `cfg` must be the configuration the work folder was made with (default: the v3 preset)."""
    cfg = cfg or ReproConfig.v3()
    source = " and ".join(s.capitalize() for s in (cfg.data.source_script, *cfg.data.source_extra))
    torch.set_num_threads(cfg.threads)
    every = max(1, steps // 4)
    data = work / "data"
    oracle = [(step, round(100 * acc, 2)) for step, acc in val_curve(work / "meta-oracle")]
    with tempfile.TemporaryDirectory(prefix="diagnose-") as tmp:
        seen, unseen = _split_classes(data / "cross", Path(tmp))
        if min(len(list(seen.iterdir())), len(list(unseen.iterdir()))) < cfg.meta.way:
            raise ValueError(f"the cross-domain split needs at least {2 * cfg.meta.way} classes for the domain check")
        domain = meta_curve(work, cfg, seen, unseen, steps, every)
    episodes = f"5-way {cfg.meta.shot}-shot, {cfg.meta.query} queries, {cfg.meta.val_episodes} fixed episodes"
    lines = [
        "# Diagnostics",
        "",
        f"Command: `python -m reproduce.diagnose --work {work} --preset {cfg.name} --steps {steps}`",
        "",
        "## 1. Ceiling check: the oracle, meta-trained on the zoo classes' real images",
        "",
        f"Validation accuracy (%, {episodes}: the pipeline's model-selection episodes) during the pipeline's "
        f"`meta-oracle` stage; step 0 is the bare backbone (NN). Best: {max(a for _, a in oracle):.2f}, "
        f"{max(a for _, a in oracle) - oracle[0][1]:+.2f} points over NN.",
        "",
        *_curve_table(oracle, "val accuracy"),
        "",
        "## 2. A domain the backbone has not seen: Hangul",
        "",
        f"The same meta-training ({steps} steps) on the real images of the first half of the Hangul classes (the "
        f"backbone was pretrained on {source}, never on Hangul), scored on the other half ({episodes}).",
        "",
        *_curve_table(domain, "held-out Hangul accuracy"),
        "",
        "## 3. Teacher agreement on the surrogate images",
        "",
        "| pool | all tokens | kept tokens |",
        "|---|---|---|",
    ]
    inverted = json.loads((work / "invert.done.json").read_text())  # the invert stage's summary of the pools
    for r in MASKS:
        lines.append(
            f"| {int(r * 100)}% masked | {inverted['teacher_accuracy']:.3f} | "
            f"{inverted['teacher_accuracy_kept_tokens'][str(r)]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(".cache/repro"), help="a finished pipeline work folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="v3", help="the work folder's preset")
    parser.add_argument("--steps", type=int, default=200, help="meta-training steps for the domain check")
    parser.add_argument("--out", type=Path, help="also write the report here (Markdown)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    text = report(args.work, args.steps, PRESETS[args.preset]())
    print(text)
    if args.out:
        atomic_write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
