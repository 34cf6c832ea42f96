"""Inversion and token-pruning benchmark on CPU (LoRA Recycle Tables 4 and 5, §4.3).

Backbone: timm ``vit_base_patch16_clip_224`` (CLIP ViT-B/16 at 224 px) with RANDOM weights, since nothing can be
downloaded here, frozen as `recycle.backbone.load_backbone` leaves it. LoRA: rank-4 q/v on all 12 blocks with random
A and B and a random 5-class head ``nn.Linear(768, 5)``, as a `LoRAAdapter`.

Part A, inversion step time: one iteration of `recycle.invert.invert` (roll/flip, teacher forward with pruning on from
the first step, CE + BN prior, backward to the pixels, Adam, clamp) on 5 classes x 5 images = batch 25, without
pruning and with each schedule of the paper's Table 4, each with and without the BN-statistics prior. The prior is a
timm ``resnet50`` with RANDOM weights (the library loads ImageNet weights from the Hub; the cost is the same). Steps are
timed between the progress callbacks; the callback ends the run after the last timed step, so the final labelling
passes of `invert` (not part of a step) are skipped. Part A also times one block forward+backward: timm's fused block
against `recycle.tokens.pruning_block_forward` (explicit attention) dropping nothing and dropping 75%.

Part B, kept-token forward+backward: `recycle.tokens.embed_kept` on 80 images (a 5-way 1-shot episode with 15 queries
per class) with 25%, 50% and 75% of the patches masked (kept indices random per image, same count), against
``backbone.embed`` and against ``embed_kept`` with all 196 patches kept (gather overhead). A meta-LoRA is attached and
only its parameters require grad, as in meta-training. Part B runs in fresh processes, once with glibc's malloc
defaults and once with the mmap/trim thresholds raised in the child's environment (glibc reads them at start-up).

Every repeat runs all settings interleaved, in an order rotated from one repeat to the next; ratios are taken within a
repeat and summarised as median [min, max].

Run from the repository root (about 20 minutes with the defaults; ``--quick`` is a smoke run of a few minutes that
writes no file):

    python -m benchmarks.bench_invert [--quick] [--repeats N] [--malloc-repeats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import operator
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import timm
import torch
from torch import nn

from benchmarks.common import (
    REPO,
    Mark,
    Summary,
    Timing,
    contention,
    environment,
    markdown_table,
    report_header,
    rotated,
    run_worker,
    timed,
    vit_block_flops,
    write_results,
)
from recycle.backbone import Backbone
from recycle.formats import LoRAAdapter
from recycle.invert import BNPrior, InversionConfig, InversionProgress, invert
from recycle.lora import LoRAConfig, inject_lora, lora_parameters, mark_only_lora_trainable, remove_lora
from recycle.tokens import PruningConfig, embed_kept, kept_count, pruning_block_forward

MODEL_NAME = "vit_base_patch16_clip_224"
PRIOR_NAME = "resnet50"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "invert.md"
WAYS = 5
# Table 4 of the paper: schedule -> (throughput it/s, GFLOPs) on a GPU, batch 25.
SCHEDULES: dict[str, dict[int, float]] = {
    "none": {},
    "{11: 0.75}": {11: 0.75},
    "{8: 0.75}": {8: 0.75},
    "{6: 0.75}": {6: 0.75},
    "{3, 6, 8, 11: 0.3}": {3: 0.3, 6: 0.3, 8: 0.3, 11: 0.3},
}
PRIOR_SCHEDULES = ("none", "{11: 0.75}")  # also timed with the BN prior (the second is the library's default)
PAPER_TABLE4 = {
    "none": (5.56, 50.59),
    "{11: 0.75}": (5.81, 48.51),
    "{8: 0.75}": (6.22, 39.14),
    "{6: 0.75}": (7.15, 32.89),
    "{3, 6, 8, 11: 0.3}": (6.13, 40.00),
}
# Part B variants: name -> fraction of patches masked (None: `backbone.embed`, all tokens, no gather).
TOKEN_VARIANTS: dict[str, Optional[float]] = {
    "embed (all tokens)": None,
    "embed_kept, 0% masked": 0.0,
    "embed_kept, 25% masked": 0.25,
    "embed_kept, 50% masked": 0.5,
    "embed_kept, 75% masked": 0.75,
}
PAPER_TABLE5_SPEEDUP = {0.25: 1.33, 0.5: 2.06, 0.75: 3.87}  # meta-training throughput over no masking, GPU
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
RAISED_THRESHOLD = "1073741824"
SETTLED_FAULTS = 10_000  # part B warm-up ends once a full-batch pass takes fewer minor faults (or they stop falling)
BLOCK_VARIANTS = ("timm block (fused attention)", "pruning block, ratio 0", "pruning block, ratio 0.75")


def _mean(timings: Sequence[Timing]) -> Timing:
    total = functools.reduce(operator.add, timings)
    n = len(timings)
    return Timing(
        total.wall / n,
        total.cpu / n,
        total.others_cpu / n,
        total.minor_faults // n,
        total.major_faults // n,
        total.system / n,
    )


# ------------------------------------------------------------------------------------------------------------ models
def load_vit(seed: int) -> Backbone:
    """CLIP ViT-B/16 architecture with random weights, frozen."""
    torch.manual_seed(seed)
    backbone = Backbone(timm.create_model(MODEL_NAME, pretrained=False), MODEL_NAME)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def make_adapter(backbone: Backbone, seed: int) -> LoRAAdapter:
    """A rank-4 q/v LoRA with random A and B and a random ``Linear(num_features, 5)`` head."""
    config = LoRAConfig(targets=("qv",), rank=4)
    gen = torch.Generator().manual_seed(seed)
    inject_lora(backbone.model, config)
    with torch.no_grad():
        for p in lora_parameters(backbone.model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    head = nn.Linear(backbone.num_features, WAYS)
    adapter = LoRAAdapter.from_model(backbone.model, config, head=head, backbone=MODEL_NAME)
    remove_lora(backbone.model)
    return adapter


def make_prior() -> BNPrior:
    """`BNPrior` on a ResNet-50 with random weights and timm's ImageNet normalisation (as `load_bn_prior`, unloaded)."""
    model = timm.create_model(PRIOR_NAME, pretrained=False)
    cfg = model.pretrained_cfg
    return BNPrior(model, cfg["mean"], cfg["std"])


# -------------------------------------------------------------------------------------------------- FLOP-ideal model
def schedule_flops(schedule: dict[int, float], num_patches: int, dim: int, depth: int) -> int:
    """Forward FLOPs of the blocks with pruning after attention in the scheduled blocks (ratio of the patches left)."""
    patches, total = num_patches, 0
    for layer in range(depth):
        tokens_in = 1 + patches
        patches -= int(patches * schedule.get(layer, 0.0))
        total += vit_block_flops(tokens_in, 1 + patches, dim)
    return total


def kept_patches(num_patches: int, masked: float) -> int:
    return num_patches - int(num_patches * masked)


# ---------------------------------------------------------------------------------------------- part A: inversion
class _TimedStepsDone(Exception):
    """Raised by the progress callback after the last timed step: ends `invert` before its labelling passes."""


def time_inversion(
    backbone: Backbone,
    adapter: LoRAAdapter,
    schedule: dict[int, float],
    prior: Optional[BNPrior],
    per_class: int,
    steps: int,
    seed: int,
    bf16: bool = False,
) -> list[Timing]:
    """Run `steps` inversion steps with pruning on from the first step; return each step's timing.

    A step is the interval between two progress callbacks (the first one starts just before `invert` is called, so it
    also holds attaching the LoRA and drawing the initial noise, a few milliseconds).
    """
    marks = []

    def progress(p: InversionProgress) -> None:
        marks.append(Mark.now())
        if p.step == steps:
            raise _TimedStepsDone

    config = InversionConfig(
        per_class=per_class, steps=steps, pruning=PruningConfig(dict(schedule), start=0.0), seed=seed, bf16=bf16
    )
    marks.append(Mark.now())
    try:
        invert(backbone, adapter, config, bn_prior=prior, progress=progress)
    except _TimedStepsDone:
        pass
    return [a.until(b) for a, b in zip(marks, marks[1:])]


def time_blocks(
    backbone: Backbone, adapter: LoRAAdapter, batch: int, repeats: int, seed: int
) -> dict[str, list[Timing]]:
    """Forward+backward (to the input tokens) of the last block on 197 random tokens, LoRA attached: timm's block
    against the pruning block keeping every patch and keeping 25% of them."""
    model = backbone.model
    block = model.blocks[-1]
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, 1 + model.patch_embed.num_patches, backbone.num_features, generator=gen)
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        BLOCK_VARIANTS[0]: block,
        BLOCK_VARIANTS[1]: lambda t: pruning_block_forward(block, t, 0.0, 1)[0],
        BLOCK_VARIANTS[2]: lambda t: pruning_block_forward(block, t, 0.75, 1)[0],
    }

    def run(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        x = tokens.clone().requires_grad_(True)
        fn(x).square().mean().backward()

    out: dict[str, list[Timing]] = {name: [] for name in BLOCK_VARIANTS}
    with adapter.attached(backbone):
        for fn in variants.values():  # warm-up
            run(fn)
        for rep in range(repeats):
            for name in rotated(BLOCK_VARIANTS, rep):
                out[name].append(timed(functools.partial(run, variants[name]))[1])
    return out


@dataclass
class InversionRuns:
    """Part A measurements: step timings per (schedule, prior) and repeat, and the block micro-benchmark."""

    steps: dict[tuple[str, bool], list[list[Timing]]]
    blocks: dict[str, list[Timing]]

    def step_mean(self, key: tuple[str, bool], rep: int) -> Timing:
        return _mean(self.steps[key][rep])


def run_inversion(args: argparse.Namespace, backbone: Backbone, adapter: LoRAAdapter, prior: BNPrior) -> InversionRuns:
    configs = [(name, False) for name in SCHEDULES] + [(name, True) for name in PRIOR_SCHEDULES]
    print("part A warm-up: one step without pruning with the prior, one with the four-layer schedule", flush=True)
    time_inversion(backbone, adapter, {}, prior, args.per_class, 1, args.seed)
    time_inversion(backbone, adapter, SCHEDULES["{3, 6, 8, 11: 0.3}"], None, args.per_class, 1, args.seed)
    steps: dict[tuple[str, bool], list[list[Timing]]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        for name, with_prior in rotated(configs, rep):
            gc.collect()
            ts = time_inversion(
                backbone,
                adapter,
                SCHEDULES[name],
                prior if with_prior else None,
                args.per_class,
                args.steps,
                args.seed + rep,
            )
            steps[(name, with_prior)].append(ts)
            print(
                f"[A repeat {rep + 1}/{args.repeats}] {name:20s} prior={'yes' if with_prior else 'no ':3s} steps "
                + ", ".join(f"{t.wall:.2f}s/{t.cpu:.2f}s cpu" for t in ts),
                flush=True,
            )
    print("part A: block forward+backward", flush=True)
    blocks = time_blocks(backbone, adapter, WAYS * args.per_class, args.block_repeats, args.seed)
    for name, ts in blocks.items():
        print(f"  {name:30s} " + ", ".join(f"{t.wall:.3f}s" for t in ts), flush=True)
    return InversionRuns(steps, blocks)


# ------------------------------------------------------------------------------------------ part B: kept tokens
def random_kept(n: int, num_patches: int, keep: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, keep)`` ascending patch indices, a different random subset per image."""
    return torch.rand(n, num_patches, generator=gen).argsort(dim=1)[:, :keep].sort(dim=1).values


def tokens_worker(args: argparse.Namespace) -> dict:
    """Part B in this process: forward and backward timings of every variant, plus the patch-embedding cost."""
    backbone = load_vit(args.seed)
    model = backbone.model
    inject_lora(model, LoRAConfig(targets=("qv",), rank=4))
    params = lora_parameters(model)
    mark_only_lora_trainable(model)
    model.train()
    num_patches = model.patch_embed.num_patches
    gen = torch.Generator().manual_seed(args.seed)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    images = (torch.rand(args.images, 3, *backbone.input_size[1:], generator=gen) - mean) / std
    kept = {
        name: None if masked is None else random_kept(args.images, num_patches, kept_patches(num_patches, masked), gen)
        for name, masked in TOKEN_VARIANTS.items()
    }

    def forward_backward(x: torch.Tensor, k: Optional[torch.Tensor]) -> tuple[Timing, Timing]:
        loss, t_fwd = timed(lambda: (backbone.embed(x) if k is None else embed_kept(backbone, x, k)).square().mean())
        _, t_bwd = timed(loss.backward)
        for p in params:
            p.grad = None
        return t_fwd, t_bwd

    print(
        f"[B {args.env_label}] warm-up: full batch through `embed` until the page faults settle, then "
        f"{args.warmup_images} images per variant",
        flush=True,
    )
    warmup_faults: list[int] = []
    for _ in range(args.warmup_passes):
        warmup_faults.append(functools.reduce(operator.add, forward_backward(images, None)).minor_faults)
        print(f"  warm-up pass {len(warmup_faults)}: {warmup_faults[-1]} minor faults", flush=True)
        if warmup_faults[-1] < SETTLED_FAULTS or (len(warmup_faults) > 1 and warmup_faults[-1] > warmup_faults[-2] / 2):
            break
    for k in kept.values():
        forward_backward(images[: args.warmup_images], None if k is None else k[: args.warmup_images])
    runs: dict[str, list[dict]] = {name: [] for name in TOKEN_VARIANTS}
    patch_embed: list[Timing] = []
    for rep in range(args.repeats):
        for name in rotated(list(TOKEN_VARIANTS), rep):
            gc.collect()
            t_fwd, t_bwd = forward_backward(images, kept[name])
            runs[name].append({"forward": asdict(t_fwd), "backward": asdict(t_bwd)})
            total = t_fwd + t_bwd
            print(
                f"[B {args.env_label} repeat {rep + 1}/{args.repeats}] {name:24s} fwd {t_fwd.wall:6.2f}s "
                f"bwd {t_bwd.wall:6.2f}s total {total.wall:6.2f}s wall {total.cpu:6.2f}s cpu ({total.system:.2f}s "
                f"system) {total.minor_faults} faults, others {total.others_cpu:.2f}s cpu",
                flush=True,
            )
        with torch.no_grad():
            patch_embed.append(timed(lambda: model.patch_embed(images))[1])
    return {
        "env": {k: os.environ.get(k) for k in MALLOC_VARS},
        "images": args.images,
        "num_patches": num_patches,
        "dim": backbone.num_features,
        "depth": len(model.blocks),
        "runs": runs,
        "warmup_faults": warmup_faults,
        "patch_embed": [asdict(t) for t in patch_embed],
    }


@dataclass
class TokenRuns:
    """Part B measurements of one child process."""

    label: str
    env: dict[str, Optional[str]]
    num_patches: int
    dim: int
    depth: int
    forward: dict[str, list[Timing]]
    backward: dict[str, list[Timing]]
    patch_embed: list[Timing]
    warmup_faults: list[int]  # minor faults of each full-batch warm-up pass

    @classmethod
    def from_json(cls, label: str, data: dict) -> "TokenRuns":
        fwd = {n: [Timing(**r["forward"]) for r in rs] for n, rs in data["runs"].items()}
        bwd = {n: [Timing(**r["backward"]) for r in rs] for n, rs in data["runs"].items()}
        return cls(
            label,
            data["env"],
            data["num_patches"],
            data["dim"],
            data["depth"],
            fwd,
            bwd,
            [Timing(**t) for t in data["patch_embed"]],
            data["warmup_faults"],
        )

    def total(self, name: str) -> list[Timing]:
        return [f + b for f, b in zip(self.forward[name], self.backward[name])]


def run_tokens(args: argparse.Namespace) -> list[TokenRuns]:
    envs = (
        ("glibc defaults", {k: None for k in MALLOC_VARS}, args.repeats),
        (f"thresholds raised to {RAISED_THRESHOLD}", {k: RAISED_THRESHOLD for k in MALLOC_VARS}, args.malloc_repeats),
    )
    out = []
    for label, env, repeats in envs:
        if repeats < 1:
            continue
        child_args = [
            "--worker",
            "tokens",
            "--env-label",
            label,
            "--images",
            str(args.images),
            "--repeats",
            str(repeats),
            "--warmup-images",
            str(args.warmup_images),
            "--warmup-passes",
            str(args.warmup_passes),
            "--seed",
            str(args.seed),
        ]
        out.append(TokenRuns.from_json(label, run_worker("benchmarks.bench_invert", child_args, env)))
    return out


# ------------------------------------------------------------------------------------------------------- report
def _percent(s: Summary) -> str:
    return f"{100 * s.median:.0f}% [{100 * s.min:.0f}%, {100 * s.max:.0f}%]"


def _ratio(num: Sequence[Timing], den: Sequence[Timing]) -> tuple[Summary, Summary]:
    """Within-repeat ratios num / den of wall and of CPU time."""
    return (Summary.of(a.wall / b.wall for a, b in zip(num, den)), Summary.of(a.cpu / b.cpu for a, b in zip(num, den)))


def inversion_sections(
    runs: InversionRuns, args: argparse.Namespace, depth: int, dim: int, num_patches: int
) -> list[str]:
    repeats = range(args.repeats)
    batch = WAYS * args.per_class
    mean = {key: [runs.step_mean(key, r) for r in repeats] for key in runs.steps}
    flops = {name: schedule_flops(s, num_patches, dim, depth) for name, s in SCHEDULES.items()}
    step_rows = []
    for (name, with_prior), ts in runs.steps.items():
        flat = [t for rep in ts for t in rep]
        step_rows.append(
            [
                name,
                "yes" if with_prior else "no",
                str(kept_count(num_patches, SCHEDULES[name])),
                Summary.of(t.wall for t in flat).format(".2f"),
                Summary.of(t.cpu for t in flat).format(".2f"),
                Summary.of(t.system for t in flat).format(".2f"),
                Summary.of(batch / t.wall for t in flat).format(".2f"),
                Summary.of(t.others_cpu for t in flat).format(".1f"),
                Summary.of(t.minor_faults for t in flat).format(".0f"),
            ]
        )
    ratio_rows, prior_rows = [], []
    prior_cpu = [a.cpu - b.cpu for a, b in zip(mean[("none", True)], mean[("none", False)])]
    for name in SCHEDULES:
        paper_its, paper_gflops = PAPER_TABLE4[name]
        wall, cpu = _ratio(mean[("none", False)], mean[(name, False)])
        measured = _ratio(mean[("none", True)], mean[(name, True)])[1].format() if name in PRIOR_SCHEDULES else "-"
        derived = Summary.of(
            (a.cpu + p) / (b.cpu + p) for a, b, p in zip(mean[("none", False)], mean[(name, False)], prior_cpu)
        )
        ratio_rows.append(
            [
                name,
                wall.format(),
                cpu.format(),
                measured,
                derived.format(),
                f"{flops['none'] / flops[name]:.3f}",
                f"{100 * (1 - flops[name] / flops['none']):.0f}%",
                f"{paper_its / PAPER_TABLE4['none'][0]:.3f}",
                f"{100 * (1 - paper_gflops / PAPER_TABLE4['none'][1]):.0f}%",
            ]
        )
    for name in PRIOR_SCHEDULES:
        with_p, without_p = mean[(name, True)], mean[(name, False)]
        prior_rows.append(
            [
                name,
                Summary.of(a.wall - b.wall for a, b in zip(with_p, without_p)).format(".2f"),
                Summary.of(a.cpu - b.cpu for a, b in zip(with_p, without_p)).format(".2f"),
                _percent(Summary.of((a.cpu - b.cpu) / a.cpu for a, b in zip(with_p, without_p))),
            ]
        )
    base = runs.blocks[BLOCK_VARIANTS[0]]
    block_rows = []
    for name in BLOCK_VARIANTS:
        ts = runs.blocks[name]
        wall, cpu = _ratio(ts, base)
        block_rows.append(
            [
                name,
                Summary.of(t.wall for t in ts).format(),
                Summary.of(t.cpu for t in ts).format(),
                wall.format(),
                cpu.format(),
            ]
        )
    return [
        f"## A. Inversion step time (batch {batch})\n\n"
        f"{WAYS} classes x {args.per_class} images = batch {batch}; {args.repeats} repeat(s) of every setting, "
        f"{args.steps} timed step(s) each, after two untimed warm-up steps. Pruning is on from the first "
        "step (`PruningConfig(schedule, start=0.0)`). Per step: median [min, max] over all timed steps.\n\n"
        + markdown_table(
            [
                "schedule",
                "BN prior",
                "patches kept",
                "step wall s",
                "step CPU s",
                "of which system s",
                "images/s (wall)",
                "others' CPU s",
                "minor faults",
            ],
            step_rows,
        )
        + "\n\n"
        + contention(t for reps in runs.steps.values() for ts in reps for t in ts),
        "### Speed-up over no pruning\n\n"
        "Step time of `none` / step time of the schedule, within each repeat. With the prior: measured for "
        + " and ".join(f"`{n}`" for n in PRIOR_SCHEDULES)
        + "; derived for every schedule as (none + P) / (schedule + "
        "P) from the CPU times without the prior and the prior's CPU time P measured without pruning (the prior sees "
        "the full image, so P does not depend on the schedule). FLOP-ideal: forward FLOPs of the ViT blocks "
        "(`vit_block_flops`; no prior, no patch embedding) without / with the schedule. Paper: its Table 4 "
        "throughput over its no-pruning row (GPU, with its prior).\n\n"
        + markdown_table(
            [
                "schedule",
                "no prior: wall",
                "no prior: CPU",
                "with prior: CPU, measured",
                "with prior: CPU, derived",
                "FLOP-ideal",
                "FLOPs saved (ours)",
                "paper throughput",
                "FLOPs saved (paper)",
            ],
            ratio_rows,
        ),
        "### BN-statistics prior (ResNet-50, random weights)\n\n"
        "Prior time = step with the prior - step without it, within each repeat; share = that / step with the "
        "prior (CPU).\n\n"
        + markdown_table(["schedule", "prior wall s", "prior CPU s", "share of the step (CPU)"], prior_rows),
        f"### One block, forward+backward (batch {batch}, 197 tokens, LoRA attached)\n\n"
        f"The last block on random tokens, {args.block_repeats} repeats after a warm-up. Ratios over timm's block "
        "within each repeat.\n\n"
        + markdown_table(["variant", "wall s", "CPU s", "wall / timm block", "CPU / timm block"], block_rows),
    ]


def token_ideal(runs: TokenRuns, masked: Optional[float]) -> float:
    """FLOP-ideal speed-up of the blocks from feeding only the kept tokens (1 for all tokens)."""
    if not masked:
        return 1.0
    full = vit_block_flops(1 + runs.num_patches, 1 + runs.num_patches, runs.dim)
    keep = 1 + kept_patches(runs.num_patches, masked)
    return full / vit_block_flops(keep, keep, runs.dim)


def fixed_cost_fit(runs: TokenRuns) -> tuple[float, float]:
    """Least-squares fit of the median `embed_kept` CPU time = a + b x block FLOPs over the masking levels.

    Returns ``a`` (the part that does not shrink with the tokens) and the fitted time with all tokens.
    """
    points = []
    for name, masked in TOKEN_VARIANTS.items():
        if masked is not None:
            keep = 1 + kept_patches(runs.num_patches, masked)
            points.append(
                (float(vit_block_flops(keep, keep, runs.dim)), Summary.of(t.cpu for t in runs.total(name)).median)
            )
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    a = my - b * mx
    return a, a + b * max(x for x, _ in points)


def token_sections(all_runs: list[TokenRuns], n_images: int) -> list[str]:
    sections = []
    for runs in all_runs:
        env = ", ".join(f"{k}={v}" for k, v in runs.env.items() if v is not None) or "unset"
        n_rep = len(runs.forward[next(iter(TOKEN_VARIANTS))])
        rows, speed_rows = [], []
        base_embed, base_kept = runs.total("embed (all tokens)"), runs.total("embed_kept, 0% masked")
        for name, masked in TOKEN_VARIANTS.items():
            total = runs.total(name)
            keep = "197 (no gather)" if masked is None else str(1 + kept_patches(runs.num_patches, masked))
            rows.append(
                [
                    name,
                    keep,
                    Summary.of(t.wall for t in runs.forward[name]).format(".2f"),
                    Summary.of(t.wall for t in runs.backward[name]).format(".2f"),
                    Summary.of(t.wall for t in total).format(".2f"),
                    Summary.of(t.cpu for t in total).format(".2f"),
                    Summary.of(t.system for t in total).format(".2f"),
                    Summary.of(t.cpu / t.wall for t in total).format(".2f"),
                    Summary.of(t.others_cpu for t in total).format(".1f"),
                    Summary.of(t.minor_faults for t in total).format(".0f"),
                ]
            )
            w_e, c_e = _ratio(base_embed, total)
            w_k, c_k = _ratio(base_kept, total)
            ideal = token_ideal(runs, masked)
            paper = f"{PAPER_TABLE5_SPEEDUP[masked]:.2f}" if masked in PAPER_TABLE5_SPEEDUP else "-"
            speed_rows.append(
                [
                    name,
                    w_e.format(),
                    c_e.format(),
                    w_k.format(),
                    c_k.format(),
                    f"{ideal:.2f}",
                    f"{100 * c_e.median / ideal:.0f}%",
                    paper,
                ]
            )
        pe = Summary.of(t.wall for t in runs.patch_embed)
        fit = fixed_cost_fit(runs)
        sections.append(
            f"### Malloc: {runs.label} ({env})\n\n"
            f"{n_rep} repeat(s) in a fresh process. Warm-up: full-batch `embed` passes until the page faults stop "
            f"falling or drop below {SETTLED_FAULTS} (faults per pass: "
            + ", ".join(str(f) for f in runs.warmup_faults)
            + "), then every variant on a few images. Times in "
            "seconds, median [min, max] over repeats; tokens = [CLS] + kept patches per image.\n\n"
            + markdown_table(
                [
                    "variant",
                    "tokens",
                    "forward wall",
                    "backward wall",
                    "fwd+bwd wall",
                    "fwd+bwd CPU",
                    "of which system",
                    "CPU / wall",
                    "others' CPU",
                    "minor faults",
                ],
                rows,
            )
            + "\n\n"
            + contention(t for name in TOKEN_VARIANTS for t in runs.total(name))
            + "\n\nSpeed-up = time of the reference / time of the variant, within each repeat. FLOP-ideal: "
            "`vit_block_flops` over the 12 blocks (attention quadratic in tokens), as in DESIGN.md. "
            "Paper: Table 5 meta-training throughput over no masking (GPU, batch 100).\n\n"
            + markdown_table(
                [
                    "variant",
                    "vs embed: wall",
                    "vs embed: CPU",
                    "vs embed_kept 0%: wall",
                    "vs embed_kept 0%: CPU",
                    "FLOP-ideal",
                    "CPU speed-up / ideal",
                    "paper",
                ],
                speed_rows,
            )
            + f"\n\nFixed costs: the patch embedding of all {runs.num_patches} patches of the {n_images} images "
            f"(forward only; nothing needs its gradient) takes {pe.format('.3f')} s wall. A least-squares fit of the "
            f"`embed_kept` CPU times (medians) as a + b x block FLOPs gives a = {fit[0]:.2f} s, i.e. "
            f"{100 * fit[0] / fit[1]:.0f}% of the fitted all-token time {fit[1]:.2f} s does not shrink with the "
            "tokens."
        )
    if len(all_runs) == 2:
        a, b = all_runs
        rows = []
        for name in TOKEN_VARIANTS:
            ta, tb = a.total(name), b.total(name)
            rows.append(
                [
                    name,
                    f"{Summary.of(t.wall for t in ta).median:.2f}",
                    f"{Summary.of(t.wall for t in tb).median:.2f}",
                    f"{Summary.of(t.wall for t in ta).median / Summary.of(t.wall for t in tb).median:.2f}",
                    f"{Summary.of(t.cpu for t in ta).median / Summary.of(t.cpu for t in tb).median:.2f}",
                    f"{Summary.of(t.minor_faults for t in ta).median:.0f}",
                    f"{Summary.of(t.minor_faults for t in tb).median:.0f}",
                ]
            )
        sections.append(
            "### Malloc settings compared\n\n"
            f"Medians of the two processes above ({a.label} / {b.label}); they ran one after the other, not "
            "interleaved, so treat small differences as noise.\n\n"
            + markdown_table(
                [
                    "variant",
                    f"wall s, {a.label}",
                    f"wall s, {b.label}",
                    "wall ratio",
                    "CPU ratio",
                    f"faults, {a.label}",
                    f"faults, {b.label}",
                ],
                rows,
            )
        )
    return sections


def interpretation(
    inv: InversionRuns, tokens: list[TokenRuns], args: argparse.Namespace, depth: int, dim: int, num_patches: int
) -> str:
    """Bullet points computed from the measurements above (CPU-time medians)."""
    reps = range(args.repeats)
    mean = {key: [inv.step_mean(key, r) for r in reps] for key in inv.steps}
    flops = {name: schedule_flops(s, num_patches, dim, depth) for name, s in SCHEDULES.items()}
    pruning = [name for name in SCHEDULES if name != "none"]
    speed = {name: _ratio(mean[("none", False)], mean[(name, False)])[1].median for name in SCHEDULES}
    prior_cpu = [a.cpu - b.cpu for a, b in zip(mean[("none", True)], mean[("none", False)])]
    speed_p = {
        name: Summary.of(
            (a.cpu + p) / (b.cpu + p) for a, b, p in zip(mean[("none", False)], mean[(name, False)], prior_cpu)
        ).median
        for name in SCHEDULES
    }
    prior_share = Summary.of((a.cpu - b.cpu) / a.cpu for a, b in zip(mean[("none", True)], mean[("none", False)]))
    ideal = {name: flops["none"] / flops[name] for name in SCHEDULES}
    paper_its, paper_flops = ({n: v[i] for n, v in PAPER_TABLE4.items()} for i in (0, 1))
    block = {name: Summary.of(t.cpu for t in ts).median for name, ts in inv.blocks.items()}
    explicit = _ratio(inv.blocks[BLOCK_VARIANTS[1]], inv.blocks[BLOCK_VARIANTS[0]])[1].median
    step_none = Summary.of(t.cpu for t in mean[("none", False)]).median
    saving = block[BLOCK_VARIANTS[0]] - block[BLOCK_VARIANTS[2]]
    lines = [
        "- **Inversion with pruning (no prior), CPU time:** "
        + ", ".join(f"`{n}` {speed[n]:.2f}x (FLOP-ideal {ideal[n]:.2f}x)" for n in pruning)
        + ". The paper's GPU throughput gains, against its own FLOP ratios: "
        + ", ".join(
            f"{paper_its[n] / paper_its['none']:.2f}x of {paper_flops['none'] / paper_flops[n]:.2f}x" for n in pruning
        )
        + ".",
        f"- **Why layer 11 gains little:** pruning there only shortens the last block's MLP (FLOP-ideal "
        f"{ideal['{11: 0.75}']:.3f}x). The block timing isolates it: timm's fused block takes "
        f"{block[BLOCK_VARIANTS[0]]:.3f} s CPU (forward+backward, batch {WAYS * args.per_class}); the pruning block, "
        f"which recomputes attention explicitly to read the [CLS] row, takes {explicit:.2f}x that with nothing "
        f"dropped and {block[BLOCK_VARIANTS[2]]:.3f} s when it drops 75% after attention: a saving of "
        f"{saving:.3f} s, {100 * saving / step_none:.1f}% of an unpruned step ({step_none:.2f} s). Pruning earlier "
        "also shortens every later block; the explicit attention is paid once per pruning layer.",
        "- **Page faults:** system (kernel) CPU per step without the prior: "
        + ", ".join(
            f"`{n}` {Summary.of(t.system for t in mean[(n, False)]).median:.2f} s of "
            f"{Summary.of(t.cpu for t in mean[(n, False)]).median:.2f} s"
            for n in SCHEDULES
        )
        + ". With glibc's defaults every allocation over 32 MB is mapped afresh and faulted in; pruned activations "
        "are smaller, so the kernel time changes with the schedule in a way the FLOP model does not count.",
        "- **FLOPs:** our model reproduces the paper's FLOP savings for the single-layer schedules ("
        + ", ".join(f"{100 * (1 - flops[n] / flops['none']):.0f}%" for n in pruning[:3])
        + " vs its 4%, 23%, 35%) but gives "
        f"{100 * (1 - flops['{3, 6, 8, 11: 0.3}'] / flops['none']):.0f}% for the four-layer schedule, where the "
        "paper reports 21%.",
        f"- **BN prior:** the ResNet-50 (random weights, same cost as trained ones) takes {_percent(prior_share)} of "
        "an unpruned step's CPU time. It sees the full image, so pruning cannot shrink it; with it the speed-ups "
        "become " + ", ".join(f"`{n}` {speed_p[n]:.2f}x" for n in pruning) + " (derived).",
    ]
    for runs in tokens:
        base = runs.total("embed (all tokens)")
        gather = _ratio(runs.total("embed_kept, 0% masked"), base)[1].median
        parts = []
        for name, masked in TOKEN_VARIANTS.items():
            if masked:
                x = _ratio(base, runs.total(name))[1].median
                parts.append(
                    f"{int(100 * masked)}% masked {x:.2f}x ({100 * x / token_ideal(runs, masked):.0f}% of "
                    f"{token_ideal(runs, masked):.2f}x)"
                )
        fixed, full = fixed_cost_fit(runs)
        system_full = Summary.of(t.system for t in base).median
        cpu_full = Summary.of(t.cpu for t in base).median
        lines.append(
            f"- **Kept tokens, {runs.label}, CPU time over `embed`:** "
            + "; ".join(parts)
            + f". `embed_kept` with every patch kept costs {gather:.2f}x `embed` (index copy, gather, concatenation). "
            + (
                f"About {fixed:.2f} s of the {full:.2f} s fitted all-token time does not shrink with the tokens "
                "(patch embedding of every patch, the head, per-op overheads); it weighs most when few tokens are left."
                if fixed > 0
                else f"The fit of CPU time against block FLOPs has a negative intercept "
                f"({fixed:.2f} s of {full:.2f} s): the time falls faster than the FLOPs, so no fixed cost is "
                "visible at this batch size."
            )
            + f" System (kernel) time is {system_full:.2f} s of the {cpu_full:.2f} s CPU of the all-token "
            "forward+backward."
        )
    if len(tokens) == 2:
        a, b = tokens
        for name in ("embed (all tokens)", "embed_kept, 75% masked"):
            wa, wb = (Summary.of(t.wall for t in r.total(name)).median for r in (a, b))
            ca, cb = (Summary.of(t.cpu for t in r.total(name)).median for r in (a, b))
            sa, sb = (Summary.of(t.system for t in r.total(name)).median for r in (a, b))
            lines.append(
                f"- **Malloc, {name}:** {wa:.2f} s wall / {ca:.2f} s CPU ({sa:.2f} s system) with glibc "
                f"defaults vs {wb:.2f} s / {cb:.2f} s ({sb:.2f} s system) with the thresholds raised."
            )
    return "## Interpretation\n\n" + "\n".join(lines)


def raw_rows(inv: InversionRuns, tokens: list[TokenRuns]) -> list[list[str]]:
    rows = []
    for (name, with_prior), reps in inv.steps.items():
        for r, ts in enumerate(reps):
            for i, t in enumerate(ts):
                rows.append(
                    [
                        "A",
                        str(r + 1),
                        f"{name}, prior {'yes' if with_prior else 'no'}",
                        f"step {i + 1}",
                        f"{t.wall:.3f}",
                        f"{t.cpu:.3f}",
                        f"{t.others_cpu:.2f}",
                        str(t.minor_faults),
                    ]
                )
    for name, ts in inv.blocks.items():
        for r, t in enumerate(ts):
            rows.append(
                [
                    "A block",
                    str(r + 1),
                    name,
                    "fwd+bwd",
                    f"{t.wall:.3f}",
                    f"{t.cpu:.3f}",
                    f"{t.others_cpu:.2f}",
                    str(t.minor_faults),
                ]
            )
    for runs in tokens:
        for name in TOKEN_VARIANTS:
            for r, (f, b) in enumerate(zip(runs.forward[name], runs.backward[name])):
                for phase, t in (("forward", f), ("backward", b)):
                    rows.append(
                        [
                            f"B, {runs.label}",
                            str(r + 1),
                            name,
                            phase,
                            f"{t.wall:.3f}",
                            f"{t.cpu:.3f}",
                            f"{t.others_cpu:.2f}",
                            str(t.minor_faults),
                        ]
                    )
    return rows


def report(
    args: argparse.Namespace,
    env: dict[str, str],
    inv: InversionRuns,
    tokens: list[TokenRuns],
    backbone: Backbone,
    started: str,
    elapsed: float,
) -> str:
    model = backbone.model
    depth, dim, num_patches = len(model.blocks), backbone.num_features, model.patch_embed.num_patches
    sections = [
        report_header(
            "Inversion and token-pruning benchmark (CPU)",
            "bench_invert.py",
            env,
            started,
            f"the whole run took {elapsed / 60:.1f} min",
        ),
        "## Setup\n\n"
        f"- Backbone: timm `{MODEL_NAME}` built with `pretrained=False` (RANDOM weights, seed {args.seed}), frozen, "
        "wrapped in `recycle.backbone.Backbone`; 224 px, 196 patches + [CLS].\n"
        "- Teacher: rank-4 q/v LoRA on all 12 blocks with random A and B (N(0, 0.02)) and a random "
        f"`Linear({dim}, {WAYS})` head, as a `LoRAAdapter` (`invert` attaches it for each call).\n"
        f"- BN prior: timm `{PRIOR_NAME}` with `pretrained=False` (RANDOM weights; the library normally loads "
        "`resnet50.tv_in1k` from the Hub) in `recycle.invert.BNPrior`, weight 0.01. Random weights change the loss "
        "values, not the cost.\n"
        "- Part A times the real `recycle.invert.invert` loop; part B calls `recycle.tokens.embed_kept` / "
        "`Backbone.embed` directly with a trainable meta-LoRA (`mark_only_lora_trainable`), model in train mode, "
        "loss = mean of the squared embeddings, `backward()`, gradients cleared outside the timing.\n"
        "- Wall = `time.perf_counter`; CPU = `time.process_time` (all threads); others' CPU = CPU time the rest of "
        "the machine used meanwhile (`/proc/stat`); faults = minor page faults.",
        *inversion_sections(inv, args, depth, dim, num_patches),
        f"## B. Kept-token forward+backward ({args.images} images)\n\n"
        "The default, 80 images, is a 5-way 1-shot episode with 15 queries per class. Kept patches are random per "
        "image, the same number for every image (one group in `embed_kept`).",
        *token_sections(tokens, args.images),
        interpretation(inv, tokens, args, depth, dim, num_patches),
        "## Raw measurements\n\n"
        + markdown_table(
            ["part", "repeat", "setting", "phase", "wall s", "CPU s", "others' CPU s", "minor faults"],
            raw_rows(inv, tokens),
        ),
    ]
    return "\n\n".join(sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 image per class in part A, 8 images in part B, 1 repeat, no file",
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every setting (default 2, quick 1)")
    parser.add_argument(
        "--malloc-repeats",
        type=int,
        default=None,
        help="part B repeats with raised malloc thresholds (default 1; 0 skips that run)",
    )
    parser.add_argument("--steps", type=int, default=1, help="timed inversion steps per setting and repeat (default 1)")
    parser.add_argument("--per-class", type=int, default=5, help="part A images per class, 5 classes (default 5)")
    parser.add_argument("--images", type=int, default=80, help="part B images (default 80)")
    parser.add_argument("--block-repeats", type=int, default=5, help="repeats of the block timing (default 5)")
    parser.add_argument("--warmup-images", type=int, default=4, help="part B warm-up batch per variant (default 4)")
    parser.add_argument(
        "--warmup-passes",
        type=int,
        default=4,
        help="most full-batch warm-up passes in part B (default 4; fewer once the faults settle)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, LoRA and inputs (default 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results file (default {DEFAULT_OUT.relative_to(REPO)}; quick runs write none)",
    )
    parser.add_argument("--worker", choices=["tokens"], help=argparse.SUPPRESS)
    parser.add_argument("--env-label", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.per_class, args.images, args.block_repeats = 1, 8, 2
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.malloc_repeats = 1 if args.malloc_repeats is None else args.malloc_repeats
    if args.worker == "tokens":
        args.result_file.write_text(json.dumps(tokens_worker(args)))
        return
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)

    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t_start = time.perf_counter()
    backbone = load_vit(args.seed)
    adapter = make_adapter(backbone, args.seed)
    prior = make_prior()
    env = environment(("timm",))
    for k, v in env.items():
        print(f"{k}: {v}")
    inv = run_inversion(args, backbone, adapter, prior)
    del prior
    gc.collect()
    tokens = run_tokens(args)
    text = report(args, env, inv, tokens, backbone, started, time.perf_counter() - t_start)
    print("\n" + text)
    write_results(text, out)


if __name__ == "__main__":
    main()
