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
from .predict import SupportError

__all__ = ["main"]

_logger = logging.getLogger("recycle")
# Errors whose message is complete for a user: printed without a traceback.
USER_ERRORS = (BackboneError, LoRAFormatError, HubError, ImageError, SupportError, FileNotFoundError)


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help=f"timm name, alias, hf-hub:ORG/REPO or local directory (default: {DEFAULT_BACKBONE})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
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
