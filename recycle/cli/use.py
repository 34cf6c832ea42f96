"""The commands that use a backbone and LoRAs on images: ``predict`` and ``eval``."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from .. import distributed
from ..images import IMAGE_SUFFIXES
from ..io import atomic_write_bytes
from ..predict import SupportError
from ..runtime import resolve_inference_precision
from ..io import terminal_safe

_logger = logging.getLogger("recycle")


def predict(args: argparse.Namespace) -> int:
    from ..backbone import load_backbone
    from ..fewshot import FewShotClassifier
    from ..formats import load_lora
    from ..predict import classify, read_support_folder

    support = read_support_folder(args.support)
    query_root = Path(args.query)
    if not query_root.is_dir():
        raise SupportError(f"query folder '{query_root}' does not exist")
    queries = sorted(p for p in query_root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    backbone = load_backbone(args.backbone, device=args.device)
    lora = load_lora(args.lora, backbone) if args.lora else None
    precision, _ = resolve_inference_precision(args.precision, backbone.device)
    clf = FewShotClassifier(
        backbone,
        lora,
        distance=args.distance,
        batch_size=args.batch_size,
        bf16=precision == "bf16",
        int8=precision == "int8",
    )
    preds = classify(clf, support, [(str(p.relative_to(query_root)), p) for p in queries])
    files = [terminal_safe(p.file) for p in preds]
    width = max([len(f) for f in files] + [4])
    print(f"{'file':<{width}}  {'label':<20}  prob    all")
    for p, file in zip(preds, files):
        others = "  ".join(f"{terminal_safe(c)}={v:.2f}" for c, v in p.probs.items())
        print(f"{file:<{width}}  {terminal_safe(p.label):<20}  {p.probs[p.label]:.3f}   {others}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps([p.to_dict() for p in preds], indent=2, ensure_ascii=False).encode())
        _logger.info("wrote %s", args.json)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from ..backbone import load_backbone
    from ..adapter import average_loras
    from ..evaluate import EvalConfig, evaluate, results_markdown, write_report
    from ..formats import load_lora
    from ..zoo import load_zoo

    config = EvalConfig(args.way, args.shot, args.query, args.episodes, args.seed, args.distance)
    backbone = load_backbone(args.backbone, device=args.device)
    precision, _ = resolve_inference_precision(args.precision, backbone.device)
    config = replace(config, bf16=precision == "bf16", int8=precision == "int8")
    methods = {"NN": None}
    if args.zoo:
        methods["LoRAs-average + NN"] = average_loras([a for _, a in load_zoo(args.zoo, backbone)])
    for spec in args.lora or []:
        name, _, source = spec.rpartition("=")
        methods[name or source] = load_lora(source, backbone)
    report = evaluate(backbone, args.data, methods, config, progress=lambda m: _logger.info("evaluating %s", m))
    markdown = results_markdown(report)
    print(markdown)
    if args.json and distributed.is_main():
        write_report(report, args.json)
    if args.markdown and distributed.is_main():
        atomic_write_bytes(args.markdown, markdown.encode())
    return 0
