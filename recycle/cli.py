"""Command line: ``python -m recycle <command>``. Run ``python -m recycle <command> --help`` for the options."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .backbone import DEFAULT_BACKBONE, BackboneError
from .formats import LoRAFormatError, atomic_write_bytes
from .hub import HubError
from .images import IMAGE_SUFFIXES, ImageError
from .pool import PoolError
from .predict import SupportError

__all__ = ["main"]

_logger = logging.getLogger("recycle")
# Errors whose message is complete for a user (including invalid settings): printed without a traceback.
USER_ERRORS = (BackboneError, LoRAFormatError, HubError, ImageError, SupportError, PoolError, FileNotFoundError,
               ValueError)


def _add_backbone_args(p: argparse.ArgumentParser, bf16: bool = True) -> None:
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help=f"timm name, alias, hf-hub:ORG/REPO or local directory (default: {DEFAULT_BACKBONE})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    if bf16:
        p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster on recent CPUs and GPUs)")


def _cmd_predict(args: argparse.Namespace) -> int:
    from .backbone import load_backbone
    from .fewshot import FewShotClassifier
    from .formats import load_lora
    from .predict import classify, read_support_folder

    support = read_support_folder(args.support)
    query_root = Path(args.query)
    if not query_root.is_dir():
        raise SupportError(f"query folder '{query_root}' does not exist")
    queries = sorted(p for p in query_root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    backbone = load_backbone(args.backbone, device=args.device)
    lora = load_lora(args.lora, backbone) if args.lora else None
    clf = FewShotClassifier(backbone, lora, distance=args.distance, batch_size=args.batch_size, bf16=args.bf16)
    preds = classify(clf, support, [(str(p.relative_to(query_root)), p) for p in queries])
    width = max([len(p.file) for p in preds] + [4])
    print(f"{'file':<{width}}  {'label':<20}  prob    all")
    for p in preds:
        others = "  ".join(f"{c}={v:.2f}" for c, v in p.probs.items())
        print(f"{p.file:<{width}}  {p.label:<20}  {p.probs[p.label]:.3f}   {others}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps([p.to_dict() for p in preds], indent=2, ensure_ascii=False).encode())
        _logger.info("wrote %s", args.json)
    return 0


def _cmd_invert(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tqdm import tqdm

    from .backbone import load_backbone
    from .formats import load_lora
    from .invert import InversionConfig, invert, load_bn_prior
    from .pool import write_run
    from .tokens import PruningConfig

    prune = {} if args.prune in (["none"], ["0"]) else (args.prune or PruningConfig().schedule)
    config = InversionConfig(per_class=args.per_class, steps=args.steps, lr=args.lr, bn_weight=args.bn_weight,
                             pruning=PruningConfig(prune, start=args.prune_start), batch_size=args.batch_size,
                             seed=args.seed)
    backbone = load_backbone(args.backbone, device=args.device)
    adapter = load_lora(args.lora, backbone)
    prior = None if args.bn_prior.lower() == "none" else load_bn_prior(args.bn_prior, backbone.device)
    n_classes = len(args.classes) if args.classes else adapter.num_classes
    n_batches = -(-n_classes * config.per_class // (config.batch_size or n_classes * config.per_class))
    with tqdm(total=config.steps * n_batches, desc="inverting", unit="step", disable=args.quiet) as bar:
        def progress(p):
            bar.update(1)
            bar.set_postfix(loss=f"{p.loss:.3f}", acc=f"{p.accuracy:.2f}", pruning=p.pruning, refresh=False)
        result = invert(backbone, adapter, config, args.classes, prior, progress=progress)
    settings = {**asdict(config), "bn_prior": args.bn_prior, "backbone": args.backbone}
    run = write_run(args.out, result, adapter, args.lora, settings, tuple(backbone.model.patch_embed.grid_size))
    acc = (result.logits.argmax(-1) == result.labels).float().mean().item()
    print(f"wrote {result.images.shape[0]} images to {run} (teacher accuracy {acc:.1%})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recycle", description="LoRA Recycle: tuning-free few-shot "
                                     "learning from recycled LoRAs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="classify query images from a few labelled support images, without tuning",
                       description="Classify every image under --query by its distance to the class prototypes "
                                   "of --support (one subfolder per class).")
    _add_backbone_args(p)
    p.add_argument("--lora", help="LoRA / meta-LoRA: local folder or file, or Hub id ORG/NAME")
    p.add_argument("--support", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--query", required=True, help="folder of query images (searched recursively)")
    p.add_argument("--json", help="also write the predictions to this JSON file")
    p.add_argument("--distance", default="l2", choices=("l2", "sqeuclidean", "cosine"))
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("invert", help="synthesise surrogate images from a LoRA and its head into a pool",
                       description="LoRA inversion with attention-guided token pruning; the images, their masks "
                                   "and the teacher's logits are added to the pool folder --out.")
    _add_backbone_args(p, bf16=False)
    p.add_argument("--lora", required=True, help="LoRA with a head: local folder or file, or Hub id ORG/NAME")
    p.add_argument("--out", required=True, help="pool folder (created or grown)")
    p.add_argument("--classes", nargs="+", help="class names or head indices (default: all)")
    p.add_argument("--per-class", type=int, default=10, help="images per class (default: 10)")
    p.add_argument("--steps", type=int, default=2000, help="optimisation steps (default: 2000, the paper's)")
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--prune", nargs="+", metavar="LAYER:RATIO",
                   help="pruning schedule, e.g. 11:0.75 or 3,6,8,11:0.3; 'none' to disable (default: -1:0.75, "
                        "the last block)")
    p.add_argument("--prune-start", type=float, default=0.25, help="fraction of steps before pruning starts")
    p.add_argument("--bn-prior", default="resnet50.tv_in1k",
                   help="timm CNN whose BatchNorm statistics regularise the images, or 'none'")
    p.add_argument("--bn-weight", type=float, default=0.01, help="weight of the BN prior (default: 0.01)")
    p.add_argument("--batch-size", type=int, help="images optimised together (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_invert)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
