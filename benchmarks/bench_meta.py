"""Meta-training step benchmark on CPU: step time and peak memory at 0%, 25%, 50% and 75% masking (paper Table 5).

Backbone: timm ``vit_base_patch16_clip_224`` (CLIP ViT-B/16 at 224 px) with RANDOM weights, since nothing can be
downloaded here, frozen, with a fresh rank-4 q/v meta-LoRA (`recycle.lora.inject_lora`, the paper's defaults) trained
by Adam at 1e-3. One step is exactly what `recycle.meta.meta_train` does per step: `recycle.meta.episode_loss` (random
flips, ProtoNet logits, KL to the teacher's logits) + ``backward()`` + ``Adam.step()``, model in train mode.

Episode: a 5-way 1-shot task with 15 queries per class (80 images of 224 px), built directly as a
`recycle.episodes.PoolEpisode` from random [0, 1] images and random teacher logits. With masking, every image keeps the
same number of random patches (``support_kept``/``query_kept``, different per image) and its dropped patches are
zeroed, as in a masked pool; `episode_loss` then feeds only the kept tokens (`recycle.tokens.embed_kept`). At 0% the
episode carries no kept indices, so the full forward runs (``Backbone.embed``).

Steps run in fp32 unless ``--precision bf16`` (bf16 autocast, as ``meta-train --precision bf16``), and each worker
tunes glibc malloc with `recycle.runtime.tune_allocator`, as the CLI's heavy commands do, unless ``--malloc
default``; `benchmarks.bench_precision` compares both precisions and both allocator settings in one run.

Each setting runs in a fresh process (one per setting and repeat, the settings' order rotated from one repeat to the
next) that builds the model, runs untimed warm-up steps and then timed steps, and reports its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``, and ``VmHWM`` as a cross-check) and the same after the model, LoRA, optimiser
and episode were built. Ratios are taken within a repeat and summarised as median [min, max].

Run from the repository root (about 10 minutes with the defaults; ``--quick`` is a smoke run that writes no file):

    python -m benchmarks.bench_meta [--quick] [--repeats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import operator
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import timm
import torch

from benchmarks.common import (
    REPO,
    Summary,
    Timing,
    contention,
    environment,
    markdown_table,
    masking_label,
    report_header,
    run_worker,
    timed,
    vit_block_flops,
    write_results,
)
from recycle.backbone import Backbone
from recycle.lora import LoRAConfig, inject_lora, lora_parameters
from recycle.meta import episode_loss
from recycle.episodes import PoolEpisode
from recycle.runtime import tune_allocator
from recycle.tokens import keep_mask, mask_images

MODEL_NAME = "vit_base_patch16_clip_224"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "meta.md"
MASKINGS = (0.0, 0.25, 0.5, 0.75)  # fraction of the patches masked
# Table 5 of the paper (CUB, batch 100, GPU): masking -> (throughput it/s, GPU memory GB).
PAPER_TABLE5 = {0.0: (1.76, 12.86), 0.25: (2.34, 9.40), 0.5: (3.63, 6.23), 0.75: (6.83, 3.31)}
PHASES = ("episode_loss", "backward", "adam")


def _memory_kib() -> dict[str, int]:
    """Peak resident memory so far: ``ru_maxrss`` (KiB on Linux) and ``VmHWM`` / current ``VmRSS`` from /proc."""
    out = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


# ------------------------------------------------------------------------------------------------------- worker
def make_episode(
    way: int,
    shot: int,
    query: int,
    masked: float,
    num_patches: int,
    grid: tuple[int, int],
    size: tuple[int, int],
    seed: int,
) -> PoolEpisode:
    """A single-LoRA episode of random images and teacher logits; masked: random kept patches, dropped ones zeroed."""
    gen = torch.Generator().manual_seed(seed)
    n_s, n_q = way * shot, way * query
    images = torch.rand(n_s + n_q, 3, *size, generator=gen)
    kept: Optional[list[torch.Tensor]] = None
    if masked:
        keep = num_patches - int(num_patches * masked)
        idx = torch.rand(n_s + n_q, num_patches, generator=gen).argsort(dim=1)[:, :keep].sort(dim=1).values
        images = mask_images(images, keep_mask(idx, grid))
        kept = list(idx.unbind(0))
    labels = torch.arange(way)
    return PoolEpisode(
        images[:n_s],
        labels.repeat_interleave(shot),
        images[n_s:],
        labels.repeat_interleave(query),
        "single",
        [],
        torch.randn(n_q, way, generator=gen),
        None if kept is None else kept[:n_s],
        None if kept is None else kept[n_s:],
    )


def meta_worker(args: argparse.Namespace) -> dict:
    """One setting in this (fresh) process: build everything, run warm-up and timed steps, report time and memory."""
    allocator = tune_allocator() if args.malloc == "tuned" else {}
    bf16 = args.precision == "bf16"
    torch.manual_seed(args.seed)
    backbone = Backbone(timm.create_model(MODEL_NAME, pretrained=False), MODEL_NAME)
    model = backbone.model
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, LoRAConfig())
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-3)
    episode = make_episode(
        args.way,
        args.shot,
        args.query,
        args.masked,
        model.patch_embed.num_patches,
        tuple(model.patch_embed.grid_size),
        backbone.input_size[1:],
        args.seed,
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    baseline = _memory_kib()

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            saved_storages[ptr] = t.untyped_storage().nbytes()
        return t

    def step(measure_saved: bool = False) -> dict[str, Timing]:
        """One meta-training step; with `measure_saved`, record the storages autograd saves for the backward."""
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure_saved else nullcontext()
        with hooks:
            (loss, _), t_loss = timed(lambda: episode_loss(backbone, episode, "l2", True, gen, bf16=bf16))
        opt.zero_grad(set_to_none=True)
        _, t_bwd = timed(loss.backward)
        _, t_adam = timed(opt.step)
        return dict(zip(PHASES, (t_loss, t_bwd, t_adam)))

    for i in range(args.warmup):
        step(measure_saved=i == 0)
    steps = []
    for i in range(args.steps):
        phases = step(measure_saved=i == 0 and not args.warmup)
        steps.append({k: asdict(t) for k, t in phases.items()})
        total = functools.reduce(operator.add, phases.values())
        print(
            f"  [{masking_label(args.masked)}] step {i + 1}/{args.steps}: {total.wall:.2f}s wall "
            f"{total.cpu:.2f}s cpu "
            f"({total.system:.2f}s system) {total.minor_faults} faults, others {total.others_cpu:.2f}s cpu ("
            + ", ".join(f"{k} {t.wall:.2f}s" for k, t in phases.items())
            + ")",
            flush=True,
        )
    saved = sum(saved_storages.values())
    return {
        "masked": args.masked,
        "precision": args.precision,
        "allocator": allocator,
        "baseline": baseline,
        "peak": _memory_kib(),
        "steps": steps,
        "saved": saved,
        "tokens": None if episode.query_kept is None else 1 + int(episode.query_kept[0].numel()),
        "num_patches": model.patch_embed.num_patches,
        "dim": backbone.num_features,
        "depth": len(model.blocks),
    }


# ------------------------------------------------------------------------------------------------------- parent
@dataclass
class Run:
    """One setting in one repeat (one process)."""

    masked: float
    steps: list[dict[str, Timing]]
    saved: int  # bytes of activations autograd saved for the backward pass in one step
    baseline: dict[str, int]
    peak: dict[str, int]
    tokens: int

    @classmethod
    def from_json(cls, data: dict) -> "Run":
        steps = [{k: Timing(**t) for k, t in s.items()} for s in data["steps"]]
        return cls(
            data["masked"],
            steps,
            data["saved"],
            data["baseline"],
            data["peak"],
            data["tokens"] or 1 + data["num_patches"],
        )

    def step(self) -> Timing:
        """Mean timed step (all phases)."""
        total = functools.reduce(operator.add, (t for s in self.steps for t in s.values()))
        n = len(self.steps)
        return Timing(
            total.wall / n,
            total.cpu / n,
            total.others_cpu / n,
            total.minor_faults // n,
            total.major_faults // n,
            total.system / n,
        )

    def phase(self, name: str) -> float:
        return sum(s[name].wall for s in self.steps) / len(self.steps)

    @property
    def increase_mib(self) -> float:
        return (self.peak["ru_maxrss"] - self.baseline["ru_maxrss"]) / 1024


def ideal(tokens: int, full: int, dim: int) -> float:
    return vit_block_flops(full, full, dim) / vit_block_flops(tokens, tokens, dim)


def report(
    args: argparse.Namespace,
    env: dict[str, str],
    runs: dict[float, list[Run]],
    dims: tuple[int, int],
    started: str,
    elapsed: float,
) -> str:
    n_images = args.way * (args.shot + args.query)
    full_tokens, dim = dims
    base = runs[0.0]
    step_rows, ratio_rows, mem_rows, raw = [], [], [], []
    for masked, rs in runs.items():
        steps = [r.step() for r in rs]
        step_rows.append(
            [
                masking_label(masked),
                str(rs[0].tokens),
                Summary.of(t.wall for t in steps).format(".2f"),
                Summary.of(t.cpu for t in steps).format(".2f"),
                Summary.of(t.system for t in steps).format(".2f"),
                *(Summary.of(r.phase(p) for r in rs).format(".2f") for p in PHASES),
                Summary.of(n_images / t.wall for t in steps).format(".2f"),
                Summary.of(t.others_cpu for t in steps).format(".1f"),
                Summary.of(t.minor_faults for t in steps).format(".0f"),
            ]
        )
        wall = Summary.of(b.step().wall / r.step().wall for b, r in zip(base, rs))
        cpu = Summary.of(b.step().cpu / r.step().cpu for b, r in zip(base, rs))
        paper_its, paper_gb = PAPER_TABLE5[masked]
        ideal_x = ideal(rs[0].tokens, full_tokens, dim)
        ratio_rows.append(
            [
                masking_label(masked),
                wall.format(),
                cpu.format(),
                f"{ideal_x:.2f}",
                f"{100 * cpu.median / ideal_x:.0f}%",
                f"{paper_its / PAPER_TABLE5[0.0][0]:.2f}",
            ]
        )
        rel = Summary.of(100 * (r.increase_mib / b.increase_mib - 1) for b, r in zip(base, rs))
        peak_rel = Summary.of(100 * (r.peak["ru_maxrss"] / b.peak["ru_maxrss"] - 1) for b, r in zip(base, rs))
        mem_rows.append(
            [
                masking_label(masked),
                Summary.of(r.baseline["ru_maxrss"] / 1024 for r in rs).format(".0f"),
                Summary.of(r.peak["ru_maxrss"] / 1024 for r in rs).format(".0f"),
                Summary.of(r.peak["VmHWM"] / 1024 for r in rs).format(".0f"),
                Summary.of(r.increase_mib for r in rs).format(".0f"),
                f"{rel.median:+.0f}% [{rel.min:+.0f}%, {rel.max:+.0f}%]",
                f"{peak_rel.median:+.0f}%",
                f"{rs[0].saved / 2**20:.0f}",
                f"{100 * (rs[0].saved / base[0].saved - 1):+.0f}%",
                f"{100 * (paper_gb / PAPER_TABLE5[0.0][1] - 1):+.0f}%",
            ]
        )
        for rep, r in enumerate(rs):
            for i, s in enumerate(r.steps):
                for phase, t in s.items():
                    raw.append(
                        [
                            str(rep + 1),
                            masking_label(masked),
                            str(i + 1),
                            phase,
                            f"{t.wall:.3f}",
                            f"{t.cpu:.3f}",
                            f"{t.others_cpu:.2f}",
                            str(t.minor_faults),
                        ]
                    )
            raw.append(
                [
                    str(rep + 1),
                    masking_label(masked),
                    "-",
                    "memory (KiB)",
                    f"ru_maxrss {r.baseline['ru_maxrss']} -> {r.peak['ru_maxrss']}",
                    f"VmHWM {r.baseline['VmHWM']} -> {r.peak['VmHWM']}",
                    "-",
                    "-",
                ]
            )
    sections = [
        report_header(
            "Meta-training step benchmark (CPU)",
            "bench_meta.py",
            env,
            started,
            f"the whole run took {elapsed / 60:.1f} min",
        ),
        "## Setup\n\n"
        f"- Backbone: timm `{MODEL_NAME}` built with `pretrained=False` (RANDOM weights, seed {args.seed}), frozen, "
        "in `recycle.backbone.Backbone`; a fresh rank-4 q/v meta-LoRA on all 12 blocks, Adam at 1e-3.\n"
        f"- Episode: {args.way}-way {args.shot}-shot, {args.query} queries per class = {n_images} images of 224 px, "
        "random pixels and teacher logits, as a `PoolEpisode` of kind `single` (KL loss); masked settings carry random "
        "kept patches (same count per image) and zeroed dropped patches.\n"
        "- Step = `episode_loss` (random flips, ProtoNet, KL) + `backward()` + `Adam.step()`, model in train mode, "
        f"as in `meta_train`, in {args.precision}"
        + (" (bf16 autocast, `recycle.runtime.mixed_precision`)" if args.precision == "bf16" else "")
        + "; glibc "
        "malloc "
        + (
            "tuned by `recycle.runtime.tune_allocator` (as the CLI's heavy commands do)"
            if args.malloc == "tuned"
            else "with its defaults"
        )
        + ".\n"
        f"- One fresh process per setting and repeat: {args.warmup} untimed warm-up step(s), then {args.steps} timed "
        f"step(s); {args.repeats} repeat(s), the settings' order rotated each repeat.\n"
        "- Wall = `time.perf_counter`; CPU = `time.process_time` (all threads); others' CPU = CPU time the rest of "
        "the machine used meanwhile (`/proc/stat`); faults = minor page faults.",
        "## Step time\n\n"
        "Per setting: median [min, max] over repeats (each the mean of its timed steps).\n\n"
        + markdown_table(
            [
                "setting",
                "tokens",
                "step wall s",
                "step CPU s",
                "of which system s",
                "episode_loss s",
                "backward s",
                "Adam s",
                "images/s (wall)",
                "others' CPU s",
                "minor faults",
            ],
            step_rows,
        )
        + "\n\n"
        + contention(t for rs in runs.values() for r in rs for s in r.steps for t in s.values()),
        "## Speed-up over 0%\n\n"
        "Step time at 0% / step time of the setting, within each repeat. FLOP-ideal: forward FLOPs of the 12 blocks "
        "(`vit_block_flops`, attention quadratic in tokens) with all tokens / with the kept tokens, as in DESIGN.md. "
        "Paper: Table 5 throughput over its 0% row (GPU, batch 100).\n\n"
        + markdown_table(["setting", "wall", "CPU", "FLOP-ideal", "CPU speed-up / ideal", "paper"], ratio_rows),
        "## Peak memory\n\n"
        "Resident memory of the process in MiB. Baseline = `ru_maxrss` once the model, meta-LoRA, optimiser and "
        "episode are built (the weights dominate it); peak = `ru_maxrss` after all steps (`VmHWM` agrees unless the "
        "parent's memory leaked into `ru_maxrss` across `exec`); increase = peak - baseline, i.e. what the steps "
        "themselves need. Changes are relative to 0% within each repeat. Saved for backward = MiB of the distinct "
        "tensor storages autograd saved in one step (`saved_tensors_hooks`, parameters excluded; first repeat): "
        "the activation memory itself, free of allocator effects. The paper's column is its GPU memory, weights "
        "included.\n\n"
        + markdown_table(
            [
                "setting",
                "baseline",
                "peak",
                "peak (VmHWM)",
                "increase",
                "increase vs 0%",
                "peak vs 0%",
                "saved for backward",
                "saved vs 0%",
                "paper GPU memory vs 0%",
            ],
            mem_rows,
        ),
        interpretation(runs, full_tokens, dim),
        "## Raw measurements\n\n"
        + markdown_table(
            ["repeat", "setting", "step", "phase", "wall s", "CPU s", "others' CPU s", "minor faults"], raw
        ),
    ]
    return "\n\n".join(sections) + "\n"


def interpretation(runs: dict[float, list[Run]], full_tokens: int, dim: int) -> str:
    """Bullet points computed from the measurements above."""
    base = runs[0.0]
    lines = []
    for masked, rs in runs.items():
        if not masked:
            continue
        cpu = Summary.of(b.step().cpu / r.step().cpu for b, r in zip(base, rs)).median
        wall = Summary.of(b.step().wall / r.step().wall for b, r in zip(base, rs)).median
        mem = Summary.of(r.increase_mib / b.increase_mib for b, r in zip(base, rs)).median
        saved = rs[0].saved / base[0].saved
        paper_its, paper_gb = PAPER_TABLE5[masked]
        lines.append(
            f"- **{masking_label(masked)}** ({rs[0].tokens} of {full_tokens} tokens, "
            f"{100 * rs[0].tokens / full_tokens:.0f}%): step {cpu:.2f}x faster in CPU time and {wall:.2f}x "
            f"in wall time (FLOP-ideal {ideal(rs[0].tokens, full_tokens, dim):.2f}x, paper "
            f"{paper_its / PAPER_TABLE5[0.0][0]:.2f}x); the steps' resident memory is {100 * mem:.0f}% and "
            f"the activations saved for backward are {100 * saved:.0f}% of those at 0% (paper: "
            f"{100 * paper_gb / PAPER_TABLE5[0.0][1]:.0f}% of its GPU memory, weights included)."
        )
    points = [
        (float(vit_block_flops(rs[0].tokens, rs[0].tokens, dim)), Summary.of(r.step().cpu for r in rs).median)
        for rs in runs.values()
    ]
    mx, my = (sum(v) / len(points) for v in zip(*points))
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    fixed, full = my - slope * mx, my + slope * (max(x for x, _ in points) - mx)
    phases = {p: Summary.of(r.phase(p) for r in base).median for p in PHASES}
    lines.append(
        f"- A least-squares fit of the step CPU time as a + b x block FLOPs puts a = {fixed:.2f} s of the "
        f"{full:.2f} s fitted 0% step outside the part that shrinks with the tokens (patch embedding of "
        "every patch, flips and normalisation of the full images, per-op overheads)"
        + (
            "; it weighs most when few tokens are left"
            if fixed > 0
            else "; a negative a means the time falls faster than the FLOPs"
        )
        + ". At 0% the step splits into "
        + ", ".join(f"{p} {t:.2f} s" for p, t in phases.items())
        + " (wall)."
    )
    return "## Interpretation\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 query per class, 1 repeat, no file")
    parser.add_argument("--repeats", type=int, default=None, help="processes per setting (default 2, quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process (default 1)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per process (default 1)")
    parser.add_argument("--way", type=int, default=5, help="classes per episode (default 5)")
    parser.add_argument("--shot", type=int, default=1, help="support images per class (default 1)")
    parser.add_argument("--query", type=int, default=15, help="queries per class (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, images and flips (default 0)")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="backbone arithmetic of every step (default fp32; bench_precision compares the two)",
    )
    parser.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="glibc malloc in the workers: recycle.runtime.tune_allocator, as the CLI's heavy commands "
        "do, or glibc's defaults (default tuned)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results file (default {DEFAULT_OUT.relative_to(REPO)}; quick runs write none)",
    )
    parser.add_argument("--masked", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.query = 1
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.result_file is not None:
        args.result_file.write_text(json.dumps(meta_worker(args)))
        return
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)

    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t_start = time.perf_counter()
    env = environment(("timm",))
    for k, v in env.items():
        print(f"{k}: {v}")
    worker_args = [
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--way",
        str(args.way),
        "--shot",
        str(args.shot),
        "--query",
        str(args.query),
        "--seed",
        str(args.seed),
        "--precision",
        args.precision,
        "--malloc",
        args.malloc,
    ]
    runs: dict[float, list[Run]] = {m: [] for m in MASKINGS}
    dims = (0, 0)
    for rep in range(args.repeats):
        k = rep % len(MASKINGS)
        for masked in MASKINGS[k:] + MASKINGS[:k]:
            print(f"[repeat {rep + 1}/{args.repeats}] {masking_label(masked)}: fresh process", flush=True)
            data = run_worker("benchmarks.bench_meta", [*worker_args, "--masked", str(masked)])
            runs[masked].append(Run.from_json(data))
            dims = (1 + data["num_patches"], data["dim"])
            r = runs[masked][-1]
            print(
                f"  peak ru_maxrss {r.peak['ru_maxrss'] / 1024:.0f} MiB (baseline "
                f"{r.baseline['ru_maxrss'] / 1024:.0f} MiB, VmHWM {r.peak['VmHWM'] / 1024:.0f} MiB)",
                flush=True,
            )
    text = report(args, env, runs, dims, started, time.perf_counter() - t_start)
    print("\n" + text)
    write_results(text, out)


if __name__ == "__main__":
    main()
