"""Why does (or doesn't) meta-training beat the bare backbone? Checks on a finished `reproduce.pipeline` work folder.

    python -m reproduce.diagnose --work .cache/repro [--steps 200] [--out reproduce/results/diagnose.md]

1. **Ceiling check.** Meta-train a meta-LoRA exactly as the pipeline does (paper settings), but on the *real*
   images of the validation classes themselves, and score the same validation episodes the pipeline selects on,
   every 50 steps. This is the most favourable data any meta-training could get: if accuracy hardly moves here, no
   surrogate data can move it at this step budget, and the gap to NN is a property of the backbone and the budget,
   not of the inversion.
2. **Teacher agreement.** How often each zoo LoRA's own head labels its synthetic images as their target class, on
   all tokens and on the kept tokens at each masking ratio (from the stored pool logits).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from recycle.backbone import load_backbone
from recycle.evaluate import EvalConfig, make_validator
from recycle.formats import atomic_write_bytes
from recycle.meta import FolderEpisodes, meta_train
from recycle.pool import Pool

from .pipeline import MASKS, ReproConfig, _teacher_accuracy

_logger = logging.getLogger("reproduce")


def ceiling_check(work: Path, cfg: ReproConfig, steps: int, every: int) -> list[tuple[int, float]]:
    """[(step, validation accuracy %)] while meta-training on the validation classes' real images."""
    backbone = load_backbone(str(work / "mini-vit"), device="cpu")
    meta = cfg.meta
    validate = make_validator(backbone, work / "data" / "val",
                              EvalConfig(meta.way, meta.shot, meta.query, meta.val_episodes, seed=123))
    curve = [(0, round(100 * validate(None), 2))]

    def record(adapter):
        curve.append((min(curve[-1][0] + every, steps), round(100 * validate(adapter), 2)))
        return curve[-1][1] / 100

    source = FolderEpisodes(work / "data" / "val", meta.spec, backbone.input_size[1:])
    out = Path(tempfile.mkdtemp(prefix="ceiling-"))
    try:
        meta_train(backbone, source, replace(meta, steps=steps, val_every=every, checkpoint_every=steps), out,
                   validate=record)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return curve


def report(work: Path, steps: int, cfg: Optional[ReproConfig] = None) -> str:
    """The Markdown report; `cfg` must be the configuration the work folder was made with (default: the full one)."""
    cfg = cfg or ReproConfig()
    torch.set_num_threads(cfg.threads)
    curve = ceiling_check(work, cfg, steps, every=max(1, steps // 4))
    lines = ["# Diagnostics", "", f"Command: `python -m reproduce.diagnose --work {work} --steps {steps}`", "",
             "## Ceiling check: meta-training on the validation classes' own real images", "",
             f"5-way {cfg.meta.shot}-shot validation accuracy (%, {cfg.meta.val_episodes} fixed episodes, the "
             "pipeline's model-selection episodes); step 0 is the bare backbone (NN).", "",
             "| step | " + " | ".join(str(s) for s, _ in curve) + " |",
             "|---|" + "---|" * len(curve),
             "| val accuracy | " + " | ".join(f"{a:.2f}" for _, a in curve) + " |", "",
             "## Teacher agreement on the surrogate images", "",
             "| pool | all tokens | kept tokens |", "|---|---|---|"]
    for r in MASKS:
        full, kept = _teacher_accuracy(Pool(work / f"pool-{int(r * 100)}"))
        lines.append(f"| {int(r * 100)}% masked | {full:.3f} | {kept:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(".cache/repro"), help="a finished pipeline work folder")
    parser.add_argument("--steps", type=int, default=200, help="meta-training steps for the ceiling check")
    parser.add_argument("--out", type=Path, help="also write the report here (Markdown)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    text = report(args.work, args.steps)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
