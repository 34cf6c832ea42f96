"""Command line: ``python -m recycle <command>``. Run ``python -m recycle <command> --help`` for the options."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import __version__, distributed
from .backbone import DEFAULT_BACKBONE, BackboneError
from .adapter import LoRAFormatError
from .hub import HubError
from .images import IMAGE_SUFFIXES, ImageError
from .io import atomic_write_bytes
from .pool import PoolError
from .predict import SupportError
from .runtime import PRECISIONS, resolve_precision, tune_allocator

__all__ = ["main"]

_logger = logging.getLogger("recycle")
# Errors whose message is complete for a user (invalid settings, unusable files, a diverged run): printed as one
# line without a traceback. OSError covers files that cannot be read or written (missing, a file where a folder
# is needed, no permission).
USER_ERRORS = (
    BackboneError,
    LoRAFormatError,
    HubError,
    ImageError,
    SupportError,
    PoolError,
    OSError,
    ValueError,
    FloatingPointError,
    distributed.DistributedError,
)
# Exit codes (documented in the README): argparse exits with 2 for a malformed command line.
EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# argparse reads "-1:0.75" as an option; pruning specs such as "-1:0.75" and "-2,-1:0.5" are values.
_NEGATIVE_VALUE = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d[\d,-]*:")
# Commands that train or run the backbone over many images: they get `tune_allocator` (fewer page faults).
HEAVY_COMMANDS = ("predict", "invert", "pretune", "meta-train", "eval")


def terminal_safe(text: str) -> str:
    """`text` with every unprintable character (CR, ESC of ANSI sequences, bidi controls, ...) written as its
    Python escape, so a file or class name cannot move the cursor or recolour the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float from `low` to `high` (bounds excluded where open); anything else is a usage
    error that names the option, before any work starts."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
        if not (
            math.isfinite(value)
            and (low < value if low_open else low <= value)
            and (value < high if high_open else value <= high)
        ):
            raise argparse.ArgumentTypeError(
                f"{text[:40]} is out of range: expected a number {'above' if low_open else 'at least'} {low:g} "
                f"and {'below' if high_open else 'at most'} {high:g}"
            )
        return value

    parse.__name__ = "number"
    return parse


def _add_backbone_args(p: argparse.ArgumentParser, precision: bool = True, derived: Optional[str] = None) -> None:
    """`derived`: where the command finds the backbone when --backbone is not given (the default otherwise)."""
    default = f"{derived}, else {DEFAULT_BACKBONE}" if derived else DEFAULT_BACKBONE
    p.add_argument(
        "--backbone",
        default=None if derived else DEFAULT_BACKBONE,
        help=f"timm name, alias, hf-hub:ORG/REPO, ORG/REPO of a transformers ViT, or local directory "
        f"(default: {default})",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    if precision:
        p.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="auto",
            help="backbone arithmetic: bf16 autocast or fp32; auto = bf16 where the CPU or GPU has native "
            "bf16 (default: auto)",
        )
        p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")


def _add_episode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--way", type=int, default=5, help="classes per episode (default: 5)")
    p.add_argument("--shot", type=int, default=1, help="support images per class (default: 1)")
    p.add_argument("--query", type=int, default=15, help="query images per class (default: 15)")


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
    clf = FewShotClassifier(
        backbone,
        lora,
        distance=args.distance,
        batch_size=args.batch_size,
        bf16=resolve_precision(args.precision, backbone.device),
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


def _backbone_of(lora: str) -> str:
    """The backbone LoRA `lora` names (read without a backbone), or the default when it names none."""
    from .formats import load_lora

    try:
        made_for = load_lora(lora).backbone
    except LoRAFormatError:  # e.g. an official file, whose head needs the backbone: the real load says what is wrong
        made_for = None
    if made_for:
        _logger.info("using the backbone the LoRA was made for: %s", made_for)
        return made_for
    _logger.info("the LoRA names no backbone; using %s", DEFAULT_BACKBONE)
    return DEFAULT_BACKBONE


def _zoo_backbone(zoo: str) -> str:
    """The backbone a zoo's zoo.json names (a zoo gathered from the Hub names its base), else the default."""
    from .io import loads_strict

    path = Path(zoo) / "zoo.json"
    try:
        named = loads_strict(path.read_bytes(), str(path)).get("backbone") if path.is_file() else None
    except (ValueError, AttributeError):
        named = None
    return named if isinstance(named, str) and named else DEFAULT_BACKBONE


def _cmd_zoo(args: argparse.Namespace) -> int:
    from .hub_loras import describe, gather_zoo

    if args.limit < 1:
        raise ValueError("--limit must be at least 1")
    manifest = gather_zoo(
        args.hub, args.out, limit=args.limit, search=args.search, progress=lambda lora: print(describe([lora]))
    )
    print(
        f"zoo {args.out}: {len(manifest['loras'])} LoRAs from the Hub for {args.hub}; invert them with "
        f"`recycle invert --zoo {args.out} --out POOL` (the backbone is read from zoo.json)"
    )
    return 0


def _warn_provenance(adapter, backbone) -> None:
    from .provenance import provenance_mismatch

    mismatch = provenance_mismatch(adapter.backbone, backbone)
    if mismatch:
        _logger.warning("the LoRA fits the backbone in shape, but %s; its outputs will mean nothing there", mismatch)


def _cmd_invert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .backbone import load_backbone
    from .formats import load_lora
    from .invert import InversionConfig, invert, load_bn_prior
    from .pool import run_settings, write_run
    from .tokens import PruningConfig

    prune = {} if args.prune in (["none"], ["0"]) else (args.prune or PruningConfig().schedule)
    config = InversionConfig(
        per_class=args.per_class,
        steps=args.steps,
        lr=args.lr,
        bn_weight=args.bn_weight,
        pruning=PruningConfig(prune, start=args.prune_start),
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if args.zoo and args.classes:
        raise ValueError("--classes picks classes of one LoRA; with --zoo every class of every LoRA is inverted")
    if not args.zoo and distributed.world_size() > 1:
        raise ValueError(
            "invert --lora inverts one LoRA in one process; to use several ranks, invert a whole zoo with --zoo"
        )
    if args.backbone is None:
        args.backbone = _backbone_of(args.lora) if args.lora else _zoo_backbone(args.zoo)
    backbone = load_backbone(args.backbone, device=args.device)
    config = replace(config, bf16=resolve_precision(args.precision, backbone.device))
    adapter = None if args.zoo else load_lora(args.lora, backbone)
    if adapter is not None:
        _warn_provenance(adapter, backbone)
    try:
        prior = None if args.bn_prior.lower() == "none" else load_bn_prior(args.bn_prior, backbone.device)
    except BackboneError as e:
        raise BackboneError(f"{e} Use --bn-prior none to invert without it.") from None
    settings = {"bn_prior": args.bn_prior, "backbone": args.backbone}
    if args.zoo:
        return _invert_zoo(args, backbone, config, prior, settings)
    n_images = (len(args.classes) if args.classes else adapter.num_classes) * config.per_class
    n_batches = -(-n_images // (config.batch_size or n_images or 1))  # a LoRA without a head: invert() says so
    with tqdm(total=config.steps * n_batches, desc="inverting", unit="step", disable=args.quiet) as bar:

        def progress(p):
            bar.update(1)
            bar.set_postfix(loss=f"{p.loss:.3f}", acc=f"{p.accuracy:.2f}", pruning=p.pruning, refresh=False)

        result = invert(backbone, adapter, config, args.classes, prior, progress=progress)
    run = write_run(
        args.out,
        result,
        adapter,
        args.lora,
        run_settings(config, **settings),
        tuple(backbone.model.patch_embed.grid_size),
    )
    acc = (result.logits.argmax(-1) == result.labels).float().mean().item()
    print(f"wrote {result.images.shape[0]} images to {run} (teacher accuracy {acc:.1%})")
    return 0


def _invert_zoo(args: argparse.Namespace, backbone, config, prior, settings: dict) -> int:
    """``invert --zoo``: every LoRA of the zoo into the pool, dealt to the ranks under torchrun."""
    from tqdm import tqdm

    from .zoo import invert_zoo

    with tqdm(desc="inverting the zoo", unit="step", disable=args.quiet) as bar:

        def progress(name, p):
            bar.update(1)
            bar.set_postfix(lora=name, loss=f"{p.loss:.3f}", acc=f"{p.accuracy:.2f}", refresh=False)

        runs = invert_zoo(backbone, args.zoo, args.out, config, prior, settings, progress=progress)
    made = [r for r in runs if r[2] is not None]
    print(
        f"{args.out}: inverted {len(made)} LoRAs, {len(runs) - len(made)} already done"
        + (f" (rank {distributed.rank()} of {distributed.world_size()})" if distributed.world_size() > 1 else "")
    )
    return 0


def _cmd_pretune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .backbone import load_backbone
    from .lora import LoRAConfig
    from .pretune import PretuneConfig
    from .zoo import pretune_zoo

    config = PretuneConfig(
        num_loras=args.num_loras,
        way=args.way,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        flip=not args.no_flip,
        shift=args.shift,
        lora=LoRAConfig(rank=args.rank),
        seed=args.seed,
    )
    backbone = load_backbone(args.backbone, device=args.device)
    with tqdm(total=config.num_loras, desc="pre-tuning", unit="LoRA", disable=args.quiet) as bar:
        manifest = pretune_zoo(
            backbone, args.data, args.out, config, lambda done, total, entry: bar.update(done - bar.n)
        )
    accs = [
        e["holdout_acc"]
        for e in manifest["loras"]
        if isinstance(e.get("holdout_acc"), (int, float)) and e["holdout_acc"] == e["holdout_acc"]
    ]
    mean = f", mean held-out accuracy {sum(accs) / len(accs):.1%}" if accs else ""
    print(f"zoo {args.out}: {len(manifest['loras'])} LoRAs{mean}")
    return 0


def _cmd_meta_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .backbone import load_backbone
    from .evaluate import EvalConfig, make_validator
    from .card import write_model_card
    from .lora import LoRAConfig
    from .episodes import PoolEpisodes, ZooEpisodes
    from .meta import MetaConfig, meta_train
    from .pool import Pool

    config = MetaConfig(
        steps=args.steps,
        way=args.way,
        shot=args.shot,
        query=args.query,
        masked=args.masked,
        cross_fraction=args.cross_fraction,
        teacher_temperature=args.teacher_temperature,
        lr=args.lr,
        lora=LoRAConfig(rank=args.rank),
        checkpoint_every=args.checkpoint_every,
        val_every=args.val_every if args.val else 0,
        val_episodes=args.val_episodes,
        seed=args.seed,
        episode_batch=args.episode_batch,
    )
    if args.backbone is None:
        args.backbone = _zoo_backbone(args.zoo) if args.zoo else DEFAULT_BACKBONE
    out = Path(args.out)
    if args.resume and not (out / "checkpoint.safetensors").is_file() and not (out / "log.jsonl").is_file():
        raise ValueError(
            f"--resume: nothing to resume in {out}: it holds no checkpoint.safetensors and no log.jsonl "
            "(no run was started there); check --out, or leave out --resume to start a new run"
        )
    backbone = load_backbone(args.backbone, device=args.device)
    config = replace(config, bf16=resolve_precision(args.precision, backbone.device))
    if args.pool:
        source = PoolEpisodes(Pool(args.pool), config.spec, config.masked)
        origin = {"pool": args.pool}
    else:
        from .invert import InversionConfig, load_bn_prior
        from .zoo import load_zoo
        from .tokens import PruningConfig

        adapters = [a for _, a in load_zoo(args.zoo, backbone)]
        prune = PruningConfig({-1: args.mask_ratio} if args.masked else {})
        prior = None if args.bn_prior.lower() == "none" else load_bn_prior(args.bn_prior, backbone.device)
        source = ZooEpisodes(
            backbone,
            adapters,
            config.spec,
            config.masked,
            InversionConfig(steps=args.invert_steps, pruning=prune, bf16=config.bf16),
            prior,
        )
        origin = {"zoo": args.zoo, "online_inversion_steps": args.invert_steps}
    validate = None
    if args.val:
        validate = make_validator(
            backbone,
            args.val,
            EvalConfig(config.way, config.shot, config.query, config.val_episodes, seed=args.seed, bf16=config.bf16),
        )
    command = "python -m recycle " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0] else None
    with tqdm(total=config.steps, desc="meta-training", unit="step", disable=args.quiet) as bar:

        def progress(record: dict) -> None:
            bar.update(record["step"] - bar.n)
            bar.set_postfix(loss=f"{record['loss']:.3f}", kind=record["kind"], refresh=False)

        result = meta_train(
            backbone,
            source,
            config,
            args.out,
            resume=args.resume,
            validate=validate,
            progress=progress,
            info={**origin, "backbone": args.backbone, "command": command},
        )
    if distributed.is_main():
        write_model_card(Path(args.out) / "meta-lora", result.adapter, command=command)
    tail = result.losses[-10:]
    msg = f"meta-LoRA written to {Path(args.out) / 'meta-lora'}"
    if tail:
        msg += f" (mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f})"
    if result.best_step == 0:
        msg += (
            f"; no step beat the bare backbone on validation ({result.best_val:.1%}), so the meta-LoRA is the identity"
        )
    elif result.best_val is not None:
        msg += f"; best validation accuracy {result.best_val:.1%} at step {result.best_step}"
        if result.baseline_val is not None:
            msg += f" (bare backbone {result.baseline_val:.1%})"
    print(msg)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .backbone import load_backbone
    from .adapter import average_loras
    from .evaluate import EvalConfig, evaluate, results_markdown, write_report
    from .formats import load_lora
    from .zoo import load_zoo

    config = EvalConfig(args.way, args.shot, args.query, args.episodes, args.seed, args.distance)
    backbone = load_backbone(args.backbone, device=args.device)
    config = replace(config, bf16=resolve_precision(args.precision, backbone.device))
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


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    if args.token:
        _logger.warning(
            "--token exposes the token in the shell history and the process list; set HF_TOKEN or run "
            "`hf auth login` instead"
        )
    url = push_folder(args.dir, args.repo, token=args.token, private=args.private)
    print(f"pushed {args.dir} to {url}")
    return 0


def _installed_vit_layout() -> str:
    """ "new" when the transformers installed here names ViT modules ``layers.N.attention.q_proj``, else "old" (also
    when it is not installed). Decided on the text of its ViT module, without importing transformers."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        spec = None
    source = Path(spec.origin).parent / "models" / "vit" / "modeling_vit.py" if spec and spec.origin else None
    try:
        return "new" if source is not None and "self.q_proj" in source.read_text("utf-8") else "old"
    except OSError:
        return "old"


def _cmd_export(args: argparse.Namespace) -> int:
    from .backbone import load_backbone
    from .formats import load_lora
    from .formats import save_transformers_peft

    if args.backbone is None:
        args.backbone = _backbone_of(args.lora)
    backbone = load_backbone(args.backbone, device="cpu")
    cfg = backbone.model.pretrained_cfg
    if cfg.get("source") != "transformers":
        raise ValueError(
            f"backbone '{args.backbone}' is a timm model, and recycle's LoRA files already are PEFT's "
            "layout for it; export writes LoRAs made on a transformers ViT (a folder or Hub repo in "
            "transformers' layout)"
        )
    adapter = load_lora(args.lora, backbone)
    with adapter.attached(backbone):  # refuses, with the reason, a LoRA that does not fit this backbone
        adapter.build_head(backbone.num_features)
    _warn_provenance(adapter, backbone)
    base = cfg.get("hf_hub_id") or adapter.info.get("base_model") or args.backbone
    layout = _installed_vit_layout() if args.layout == "auto" else args.layout
    model_type = cfg.get("model_type", "vit")
    out = save_transformers_peft(adapter, args.out, layout=layout, base_model=base, model_type=model_type)
    kind = ("DeiT" if model_type == "deit" else "ViT") + (
        "ForImageClassification" if adapter.head_weight is not None else "Model"
    )
    print(
        f"wrote {out} ({layout} module names): load it with PeftModel.from_pretrained({kind}.from_pretrained("
        f"'{base}'), '{out}')"
    )
    return 0


def _cmd_push_pool(args: argparse.Namespace) -> int:
    from .pool_hub import push_pool

    if args.token:
        _logger.warning(
            "--token exposes the token in the shell history and the process list; set HF_TOKEN or run "
            "`hf auth login` instead"
        )
    url = push_pool(args.pool, args.repo, token=args.token, private=args.private, runs=args.run or None)
    print(f"pushed pool {args.pool} to {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    prog = "recycle" if Path(sys.argv[0]).name == "recycle" else "python -m recycle"  # console script or -m
    parser = argparse.ArgumentParser(
        prog=prog, description="LoRA Recycle: tuning-free few-shot learning from recycled LoRAs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "predict",
        help="classify query images from a few labelled support images, without tuning",
        description="Classify every image under --query by its distance to the class prototypes "
        "of --support (one subfolder per class).",
    )
    _add_backbone_args(p)
    p.add_argument("--lora", help="LoRA / meta-LoRA: local folder or file, or Hub id ORG/NAME")
    p.add_argument("--support", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--query", required=True, help="folder of query images (searched recursively)")
    p.add_argument("--json", help="also write the predictions to this JSON file")
    p.add_argument(
        "--distance",
        default="l2",
        choices=("l2", "sqeuclidean", "cosine"),
        help="query-to-prototype distance (default: l2, the paper's)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "invert",
        help="synthesise surrogate images from a LoRA and its head into a pool",
        description="LoRA inversion with attention-guided token pruning; the images, their masks "
        "and the teacher's logits are added to the pool folder --out.",
    )
    p._negative_number_matcher = _NEGATIVE_VALUE  # so that "--prune -1:0.75" works, not only "--prune=-1:0.75"
    _add_backbone_args(
        p, derived="the backbone the --lora names (its base_model_name_or_path) or --zoo's zoo.json names"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lora", help="LoRA with a head: local folder or file, or Hub id ORG/NAME")
    src.add_argument(
        "--zoo",
        help="zoo folder (from pretune): invert every LoRA, one run each, skipping those "
        "already in the pool; shared by the ranks under torchrun",
    )
    p.add_argument("--out", required=True, help="pool folder (created or grown)")
    p.add_argument("--classes", nargs="+", help="class names or head indices (default: all)")
    p.add_argument("--per-class", type=int, default=10, help="images per class (default: 10)")
    p.add_argument("--steps", type=int, default=2000, help="optimisation steps (default: 2000, the paper's)")
    p.add_argument(
        "--lr",
        type=_number(0, 10, low_open=True),
        default=0.25,
        help="Adam learning rate on the pixels, above 0 and at most 10 (default: 0.25)",
    )
    p.add_argument(
        "--prune",
        nargs="+",
        metavar="LAYER:RATIO",
        help="pruning schedule, e.g. 11:0.75 or 3,6,8,11:0.3; 'none' to disable (default: -1:0.75, the last block)",
    )
    p.add_argument(
        "--prune-start",
        type=_number(0, 1),
        default=0.25,
        help="fraction of steps before pruning starts, 0 to 1 (default: 0.25)",
    )
    p.add_argument(
        "--bn-prior",
        default="resnet50.tv_in1k",
        help="timm CNN whose BatchNorm statistics regularise the images, or 'none'",
    )
    p.add_argument(
        "--bn-weight", type=_number(0, 1000), default=0.01, help="weight of the BN prior, 0 to 1000 (default: 0.01)"
    )
    p.add_argument("--batch-size", type=int, help="images optimised together (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_invert, ranks=True)

    p = sub.add_parser(
        "pretune",
        help="tune a zoo of LoRAs (with heads) on N-way tasks from an ImageFolder",
        description="Sample --num-loras seeded N-way tasks from --data (one folder per class) and "
        "tune a LoRA and a head on each; finished LoRAs are skipped on a re-run.",
    )
    _add_backbone_args(p, precision=False)
    p.add_argument("--data", required=True, help="ImageFolder: one subfolder of images per class")
    p.add_argument("--out", required=True, help="zoo folder")
    p.add_argument("--num-loras", type=int, required=True, help="LoRAs in the zoo, one N-way task each")
    p.add_argument("--way", type=int, default=5, help="classes per LoRA (default: 5)")
    p.add_argument("--steps", type=int, default=100, help="Adam steps per LoRA")
    p.add_argument(
        "--lr",
        type=_number(0, 1, low_open=True),
        default=1e-3,
        help="Adam learning rate, above 0 and at most 1 (default: 1e-3)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default: 32)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank of q and v (default: 4)")
    p.add_argument(
        "--shift",
        type=_number(0, 0.5, high_open=True),
        default=0.125,
        help="random translation, a fraction of the size below 0.5 (default: 0.125)",
    )
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips (e.g. for text)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the tasks and the tuning (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretune, ranks=True)

    p = sub.add_parser(
        "meta-train",
        help="distil one meta-LoRA from a surrogate pool or a LoRA zoo",
        description="ProtoNet meta-training of a meta-LoRA on surrogate episodes: KL to the "
        "teacher for single-LoRA episodes, CE for cross-LoRA ones.",
    )
    _add_backbone_args(p, derived="with --zoo, the backbone its zoo.json names")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pool", help="surrogate pool folder (from invert)")
    src.add_argument("--zoo", help="LoRA zoo folder: invert episodes online (slow; the paper's Alg. 1)")
    p.add_argument("--out", required=True, help="output folder (checkpoint, log.jsonl, meta-lora/)")
    p.add_argument("--steps", type=int, required=True, help="meta-training steps (episodes)")
    _add_episode_args(p)
    p.add_argument("--masked", action="store_true", help="train on masked images, feeding kept tokens only")
    p.add_argument(
        "--cross-fraction",
        type=_number(0, 1),
        default=0.5,
        help="share of cross-LoRA (CE) episodes, 0 to 1 (default: 0.5)",
    )
    p.add_argument(
        "--teacher-temperature",
        type=_number(0, 100, low_open=True),
        default=1.0,
        help="KL target softmax(teacher logits / T); T < 1 sharpens soft teacher heads (choose on --val)",
    )
    p.add_argument(
        "--lr",
        type=_number(0, 1, low_open=True),
        default=1e-3,
        help="Adam learning rate, above 0 and at most 1 (default: 1e-3)",
    )
    p.add_argument("--rank", type=int, default=4, help="meta-LoRA rank of q and v (default: 4)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default: 50)")
    p.add_argument(
        "--episode-batch",
        type=int,
        default=1,
        help="episodes per optimiser step, loss averaged (default: 1); under torchrun split evenly "
        "over the ranks, so it must be a multiple of their number",
    )
    p.add_argument("--val", help="real ImageFolder validation split for model selection (never the test split)")
    p.add_argument("--val-every", type=int, default=100, help="with --val: steps between validations (default: 100)")
    p.add_argument("--val-episodes", type=int, default=100, help="with --val: episodes per validation (default: 100)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--invert-steps", type=int, default=200, help="with --zoo: inversion steps per episode")
    p.add_argument(
        "--mask-ratio",
        type=_number(0, 1, high_open=True),
        default=0.75,
        help="with --zoo --masked: fraction of the tokens dropped, below 1 (default: 0.75)",
    )
    p.add_argument("--bn-prior", default="none", help="with --zoo: BN prior for online inversion")
    p.add_argument("--seed", type=int, default=0, help="random seed of the episodes (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_meta_train, ranks=True)

    p = sub.add_parser(
        "eval",
        help="episodic few-shot evaluation with baselines, mean ± 95%% CI",
        description="Score NN (bare backbone), LoRAs-average + NN (with --zoo) and each --lora on "
        "the same seeded episodes of an ImageFolder split.",
    )
    _add_backbone_args(p)
    p.add_argument("--data", required=True, help="ImageFolder test split (classes unseen by the LoRAs)")
    p.add_argument("--lora", nargs="+", metavar="[NAME=]SOURCE", help="LoRAs to score, e.g. recycle=out/meta-lora")
    p.add_argument("--zoo", help="zoo folder, for the LoRAs-average + NN baseline")
    _add_episode_args(p)
    p.add_argument("--episodes", type=int, default=600, help="episodes per method (default: 600, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the episodes (default: 0)")
    p.add_argument(
        "--distance",
        default="l2",
        choices=("l2", "sqeuclidean", "cosine"),
        help="query-to-prototype distance (default: l2, the paper's)",
    )
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--markdown", help="write the results table as Markdown")
    p.set_defaults(func=_cmd_eval, ranks=True)

    p = sub.add_parser(
        "zoo",
        help="gather the Hub's LoRAs (with heads) for a backbone into a zoo folder",
        description="List the Hub's PEFT LoRAs for --hub (tagged base_model:adapter:BASE, plus a name "
        "search for older adapters), vet each from its config and safetensors header "
        "without downloading weights, and download the usable ones into --out with a "
        "zoo.json (repo, revision and classes of each). Safetensors only.",
    )
    p.add_argument(
        "--hub", required=True, metavar="BASE", help="the backbone's Hub id, e.g. google/vit-base-patch16-224-in21k"
    )
    p.add_argument("--out", required=True, help="zoo folder (created or grown)")
    p.add_argument("--limit", type=int, default=20, help="the most candidates to vet (default: 20)")
    p.add_argument("--search", help="text to search repo names for (default: the name part of BASE)")
    p.set_defaults(func=_cmd_zoo)

    p = sub.add_parser(
        "export",
        help="write a (meta-)LoRA made on a transformers ViT as a PEFT adapter of it",
        description="Write --lora, made on a transformers ViT backbone, in that model's PEFT layout, "
        "so PeftModel.from_pretrained loads it into ViTForImageClassification (a LoRA with "
        "a head) or ViTModel (a meta-LoRA) with the same outputs.",
    )
    p.add_argument("--lora", required=True, help="LoRA or meta-LoRA: local folder or file, or Hub id ORG/NAME")
    p.add_argument("--backbone", help="the transformers ViT it was made on (default: the one the LoRA names)")
    p.add_argument("--out", required=True, help="folder to write adapter_config.json and adapter_model.safetensors to")
    p.add_argument(
        "--layout",
        choices=("auto", "new", "old"),
        default="auto",
        help="module names, those of the transformers that will load it: new (layers.N.attention.q_proj, "
        "later transformers 5 releases), old (encoder.layer.N.attention.attention.query, transformers "
        "4 and 5.0), or auto: those of the transformers installed here (read from its source, not "
        "imported), else old (default: auto)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "push",
        help="upload a LoRA folder (e.g. a meta-LoRA with its card) to the Hub",
        description="Create the Hub model repository --repo if needed and upload the folder's "
        ".safetensors, .json and .md files (pickles are refused). The Hub checks the "
        "model card's metadata; meta-train writes a card it accepts. Authenticate with "
        "the HF_TOKEN environment variable or `hf auth login`.",
    )
    p.add_argument("--dir", required=True, help="folder to upload (adapter files and README.md)")
    p.add_argument("--repo", required=True, help="Hub repository ORG/NAME (created if missing)")
    p.add_argument(
        "--token",
        help="Hub token; prefer the HF_TOKEN environment variable or `hf auth login`, since a "
        "token on the command line lands in the shell history and the process list",
    )
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser(
        "push-pool",
        help="publish a surrogate pool as a Hub dataset that `datasets` reads",
        description="Create the Hub dataset --repo if needed and upload the pool in one commit, as an "
        "imagefolder dataset: data/<run>/ holds each run's manifest, images, masked images "
        "and a metadata.jsonl (class, source LoRA, teacher confidence, kept patches, "
        "masked-image path per image); README.md is a dataset card with the settings. "
        "Images are checked against their manifests' checksums first. Authenticate with "
        "the HF_TOKEN environment variable or `hf auth login`.",
    )
    p.add_argument("--pool", required=True, help="the pool folder")
    p.add_argument("--repo", required=True, help="Hub dataset ORG/NAME (created if missing)")
    p.add_argument(
        "--run",
        action="append",
        metavar="RUN",
        help="push only this run folder of the pool (repeatable; default: every run)",
    )
    p.add_argument("--token", help="Hub token; prefer the HF_TOKEN environment variable or `hf auth login`")
    p.add_argument("--private", action="store_true", help="create the dataset as private")
    p.set_defaults(func=_cmd_push_pool)
    return parser


def _run_on_ranks(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command that can use several ranks: join the process group when launched by torchrun (one device per
    rank), keep the output of ranks other than 0 quiet, and leave the group after a successful run."""
    args.device = distributed.setup(args.device)
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1:
        try:
            return func(args)
        finally:
            distributed.teardown()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(levelname)s [rank {rank}/{world}] %(message)s"))
    if rank:
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
        if hasattr(args, "quiet"):
            args.quiet = True
    try:
        with contextlib.ExitStack() as stack:
            if rank:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            code = func(args)
    except BaseException as e:  # noqa: BLE001 - every failure ends this rank, and with it the job
        # No teardown and no normal interpreter exit: a collective another rank left pending would block the one and
        # abort the other. Say what failed and leave now; the launcher (or the peers' timeouts) ends the other ranks.
        if not isinstance(e, USER_ERRORS + (KeyboardInterrupt,)):
            traceback.print_exc()
        print(f"rank {rank} of {world} failed: {type(e).__name__}: {terminal_safe(str(e))}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else EXIT_USER_ERROR)  # a bug: 1, traceback
    distributed.teardown()
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if args.command in HEAVY_COMMANDS:
            tune_allocator()
        if getattr(args, "ranks", False):
            return _run_on_ranks(func, args)
        return func(args)
    except USER_ERRORS as e:
        print("error: " + terminal_safe(" ".join(str(e).split())), file=sys.stderr)  # one line, no escapes
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
