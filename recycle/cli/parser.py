"""The command line's parser: every command, its options and their checks."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from .. import __version__
from ..backbone import DEFAULT_BACKBONE
from ..runtime import INFERENCE_PRECISIONS, PRECISIONS
from . import hub, train, use

# argparse reads "-1:0.75" as an option; pruning specs such as "-1:0.75" and "-2,-1:0.5" are values.
_NEGATIVE_VALUE = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d[\d,-]*:")


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


def _add_backbone_args(
    p: argparse.ArgumentParser, precision: bool = True, derived: Optional[str] = None, inference: bool = False
) -> None:
    """`derived`: where the command finds the backbone when --backbone is not given (the default otherwise);
    `inference`: the command only embeds images, so int8 is offered too."""
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
            choices=INFERENCE_PRECISIONS if inference else PRECISIONS,
            default="auto",
            help=(
                "backbone arithmetic: int8 (CPU), bf16 autocast or fp32; auto = int8 on a CPU with int8 kernels, "
                "else bf16 where it is native, else fp32 (default: auto)"
                if inference
                else "backbone arithmetic: bf16 autocast or fp32; auto = bf16 where the CPU or GPU has native "
                "bf16 (default: auto)"
            ),
        )
        p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")


def _add_episode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--way", type=int, default=5, help="classes per episode (default: 5)")
    p.add_argument("--shot", type=int, default=1, help="support images per class (default: 1)")
    p.add_argument("--query", type=int, default=15, help="query images per class (default: 15)")


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
    _add_backbone_args(p, inference=True)
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
    p.set_defaults(func=use.predict)

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
    p.add_argument(
        "--force",
        action="store_true",
        help="invert a LoRA made for another base (named, or of another model family) on this backbone anyway",
    )
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
    p.add_argument(
        "--two-colour",
        type=_number(0, 1, high_open=True),
        metavar="MIN_CONTRAST",
        help="optimise each image as a coverage map between a random ink and paper colour whose luminances differ "
        "by at least MIN_CONTRAST, below 1 (line art in random colours; default: free pixels, the paper's)",
    )
    p.add_argument(
        "--diversity-weight",
        type=_number(0, 1000),
        default=0.0,
        help="weight of the mean cosine similarity between same-class images' teacher features, 0 to 1000: "
        "surrogates of a class that differ from each other (default: 0)",
    )
    p.add_argument("--batch-size", type=int, help="images optimised together (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=train.invert, ranks=True)

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
    p.set_defaults(func=train.pretune, ranks=True)

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
    p.set_defaults(func=train.meta_train, ranks=True)

    p = sub.add_parser(
        "eval",
        help="episodic few-shot evaluation with baselines, mean ± 95%% CI",
        description="Score NN (bare backbone), LoRAs-average + NN (with --zoo) and each --lora on "
        "the same seeded episodes of an ImageFolder split.",
    )
    _add_backbone_args(p, inference=True)
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
    p.set_defaults(func=use.evaluate, ranks=True)

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
    p.set_defaults(func=hub.gather)

    p = sub.add_parser(
        "export",
        help="write a (meta-)LoRA made on a transformers ViT as a PEFT adapter of it",
        description="Write --lora, made on a transformers ViT backbone, in that model's PEFT layout, "
        "so PeftModel.from_pretrained loads it into ViTForImageClassification (a LoRA with "
        "a head) or ViTModel (a meta-LoRA) with the same outputs.",
    )
    p.add_argument("--lora", required=True, help="LoRA or meta-LoRA: local folder or file, or Hub id ORG/NAME")
    p.add_argument("--backbone", help="the transformers ViT it was made on (default: the one the LoRA names)")
    p.add_argument(
        "--out", required=True, help="folder to write adapter_config.json, adapter_model.safetensors and README.md to"
    )
    p.add_argument(
        "--base-model",
        metavar="ORG/NAME",
        help="the Hub id of the base model, for the adapter config and the card (default: the Hub repo the "
        "backbone came from, or the one the LoRA names)",
    )
    p.add_argument(
        "--layout",
        choices=("auto", "new", "old"),
        default="auto",
        help="module names, those of the transformers that will load it: new (layers.N.attention.q_proj, "
        "later transformers 5 releases), old (encoder.layer.N.attention.attention.query, transformers "
        "4 and 5.0), or auto: those of the transformers installed here (read from its source, not "
        "imported), else old (default: auto)",
    )
    p.set_defaults(func=hub.export)

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
    p.set_defaults(func=hub.push)

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
    p.set_defaults(func=hub.push_pool)
    return parser
