"""bf16 against fp32, and glibc malloc tuned against its defaults, on CPU: meta-training step, inversion step, peaks.

Backbone: timm ``vit_base_patch16_clip_224`` (CLIP ViT-B/16 at 224 px) with RANDOM weights, since nothing can be
downloaded here; speeds are those of the real architecture.

- **Matmul peak:** a plain ``(2048, 2048) @ (2048, 2048)`` matmul in fp32 and in bf16 with all of torch's threads
  (`benchmarks.common.matmul_gflops`), measured at the start and at the end of the run: the machine's practical peak.
- **Meta-training step:** exactly `benchmarks.bench_meta`'s step (`recycle.meta.episode_loss` + backward + Adam on a
  rank-4 q/v meta-LoRA, 5-way 1-shot with 15 queries = 80 images) at 0/25/50/75% masking, in fp32 and in bf16
  (`episode_loss(..., bf16=True)`, i.e. ``meta-train --precision bf16``), each in a fresh process with glibc malloc
  tuned (`recycle.runtime.tune_allocator`, as the CLI's heavy commands do); plus the 0% fp32 step with glibc's
  defaults, for the allocator's effect. One process per setting and repeat, the settings' order rotated from one
  repeat to the next; ratios are taken within a repeat and summarised as median [min, max].
- **Inversion step:** `recycle.invert.invert` on 5 classes x 5 images with the BN prior (timm ``resnet50``, random
  weights), without pruning and with the library's default schedule ``{11: 0.75}``, in fp32 and in bf16
  (``InversionConfig(bf16=True)``, i.e. ``invert --precision bf16``), interleaved in this process (malloc tuned).

Targets: bf16 step >= 2.0x faster than fp32 at 0% and at 75% masking; kept-token CPU speed-up >= 95% of
the FLOP-ideal at 25/50/75%; system time <= 5% of the CPU time at 0% in fp32 (allocator tuned).

Run from the repository root (about 25 minutes on 2 quiet cores with the defaults; ``--quick`` is a smoke run of a few
minutes that writes no file):

    python -m benchmarks.bench_precision [--quick] [--repeats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.bench_invert import load_vit, make_adapter, make_prior, time_inversion
from benchmarks.bench_meta import MASKINGS, Run, ideal
from benchmarks.common import (
    REPO,
    Summary,
    Timing,
    contention,
    environment,
    markdown_table,
    masking_label,
    matmul_gflops,
    report_header,
    rotated,
    run_worker,
    vit_block_flops,
    write_results,
)
from recycle.runtime import allocator_settings, tune_allocator

DEFAULT_OUT = REPO / "benchmarks" / "results" / "precision.md"
SPEEDUP_TARGET = 2.0
IDEAL_SHARE_TARGET = 0.95
SYSTEM_SHARE_TARGET = 0.05
INVERT_SCHEDULES = {"none": {}, "{11: 0.75}": {11: 0.75}}


@dataclass(frozen=True)
class Setting:
    masked: float
    precision: str  # "fp32" | "bf16"
    malloc: str  # "tuned" | "default"

    @property
    def label(self) -> str:
        defaults = ", glibc defaults" if self.malloc == "default" else ""
        return f"{masking_label(self.masked)}, {self.precision}{defaults}"


SETTINGS = [Setting(m, p, "tuned") for m in MASKINGS for p in ("fp32", "bf16")] + [Setting(0.0, "fp32", "default")]


def _within(num: list[Run], den: list[Run], key) -> Summary:
    """Summary over repeats of key(num run) / key(den run), pairing runs of the same repeat."""
    return Summary.of(key(a) / key(b) for a, b in zip(num, den))


def step_flops(tokens: int, dim: int, depth: int, images: int) -> float:
    """Model FLOPs of one step: the blocks' forward FLOPs (`vit_block_flops`) twice, since the backward of a frozen
    backbone computes input gradients only (one matmul per forward matmul; attention's second backward product, the
    LoRA, the patch embedding and the norms are left out, so this is a slight undercount)."""
    return 2.0 * depth * vit_block_flops(tokens, tokens, dim) * images


def meta_sections(runs: dict[Setting, list[Run]], dims: dict, peaks: dict[str, Summary], n_images: int) -> list[str]:
    fp32 = {m: runs[Setting(m, "fp32", "tuned")] for m in MASKINGS}
    bf16 = {m: runs[Setting(m, "bf16", "tuned")] for m in MASKINGS}
    step_rows, gflop_rows = [], []
    for s, rs in runs.items():
        steps = [r.step() for r in rs]
        flops = step_flops(rs[0].tokens, dims["dim"], dims["depth"], n_images)
        rate = Summary.of(flops / t.wall / 1e9 for t in steps)
        step_rows.append(
            [
                s.label,
                str(rs[0].tokens),
                Summary.of(t.wall for t in steps).format(".2f"),
                Summary.of(t.cpu for t in steps).format(".2f"),
                Summary.of(t.system for t in steps).format(".2f"),
                Summary.of(100 * t.system / t.cpu for t in steps).format(".1f"),
                Summary.of(t.minor_faults for t in steps).format(".0f"),
                Summary.of(r.peak["ru_maxrss"] / 1024 for r in rs).format(".0f"),
                Summary.of(t.others_cpu for t in steps).format(".1f"),
            ]
        )
        gflop_rows.append(
            [s.label, f"{flops / 1e9:.0f}", rate.format(".1f"), f"{100 * rate.median / peaks[s.precision].median:.0f}%"]
        )
    speed_rows, verdicts = [], []
    for m in MASKINGS:
        cpu = _within(fp32[m], bf16[m], lambda r: r.step().cpu)
        wall = _within(fp32[m], bf16[m], lambda r: r.step().wall)
        speed_rows.append([masking_label(m), wall.format(), cpu.format()])
        if m in (0.0, 0.75):
            verdicts.append(
                f"- {masking_label(m)}: bf16 is {wall.median:.2f}x faster in wall time and "
                f"{cpu.median:.2f}x in "
                f"CPU time (target >= {SPEEDUP_TARGET}x: "
                f"{'meets' if min(wall.median, cpu.median) >= SPEEDUP_TARGET else 'MISSES'})."
            )
    ideal_rows = []
    for m in MASKINGS[1:]:
        x = ideal(fp32[m][0].tokens, 1 + dims["num_patches"], dims["dim"])
        row = [masking_label(m), f"{x:.2f}"]
        for precision, by_mask in (("fp32", fp32), ("bf16", bf16)):
            cpu = _within(by_mask[0.0], by_mask[m], lambda r: r.step().cpu)
            share = cpu.median / x
            row += [cpu.format(), f"{100 * share:.0f}% ({'meets' if share >= IDEAL_SHARE_TARGET else 'MISSES'})"]
        ideal_rows.append(row)
    default, tuned = runs[Setting(0.0, "fp32", "default")], fp32[0.0]
    alloc_rows = []
    for name, rs in (("glibc defaults", default), ("tune_allocator", tuned)):
        steps = [r.step() for r in rs]
        share = Summary.of(t.system / t.cpu for t in steps).median
        alloc_rows.append(
            [
                name,
                Summary.of(t.cpu for t in steps).format(".2f"),
                Summary.of(t.system for t in steps).format(".2f"),
                f"{100 * share:.1f}% ({'meets' if share <= SYSTEM_SHARE_TARGET else 'MISSES'})",
                Summary.of(t.minor_faults for t in steps).format(".0f"),
                Summary.of(r.peak["ru_maxrss"] / 1024 for r in rs).format(".0f"),
            ]
        )
    cpu_gain = _within(default, tuned, lambda r: r.step().cpu)
    wall_gain = _within(default, tuned, lambda r: r.step().wall)
    mem = _within(tuned, default, lambda r: r.peak["ru_maxrss"])
    return [
        "## Meta-training step\n\nPer setting: median [min, max] over repeats. System share = system / CPU time. "
        "Peak RSS = `ru_maxrss` of the worker at the end (weights included).\n\n"
        + markdown_table(
            [
                "setting",
                "tokens",
                "step wall s",
                "step CPU s",
                "system s",
                "system share %",
                "minor faults",
                "peak RSS MiB",
                "others' CPU s",
            ],
            step_rows,
        )
        + "\n\n"
        + contention(t for rs in runs.values() for r in rs for s in r.steps for t in s.values()),
        "### bf16 against fp32\n\nfp32 step time / bf16 step time within each repeat (allocator tuned in both).\n\n"
        + markdown_table(["masking", "wall", "CPU"], speed_rows)
        + "\n\n"
        + "\n".join(verdicts),
        "### Kept tokens against the FLOP-ideal\n\nCPU time at 0% / CPU time of the setting within each repeat, in "
        "each precision; FLOP-ideal = forward FLOPs of the blocks with all tokens / with the kept tokens "
        f"(`vit_block_flops`). Target: >= {100 * IDEAL_SHARE_TARGET:.0f}% of the ideal.\n\n"
        + markdown_table(
            [
                "masking",
                "FLOP-ideal",
                "fp32 CPU speed-up",
                "fp32 share of ideal",
                "bf16 CPU speed-up",
                "bf16 share of ideal",
            ],
            ideal_rows,
        ),
        "### The allocator (0% masking, fp32)\n\n`recycle.runtime.tune_allocator` (`M_MMAP_MAX=0`, "
        "`M_TRIM_THRESHOLD` at its maximum) against glibc's defaults, each in its own processes. Target: system time "
        f"<= {100 * SYSTEM_SHARE_TARGET:.0f}% of the CPU time.\n\n"
        + markdown_table(
            ["malloc", "step CPU s", "system s", "system share", "minor faults", "peak RSS MiB"], alloc_rows
        )
        + f"\n\nTuning makes the step {cpu_gain.format('.2f')}x faster in CPU time and {wall_gain.format('.2f')}x in "
        f"wall time; its peak RSS is {mem.format('.2f')}x that with glibc's defaults (the heap keeps its holes).",
        "### Throughput against the peak\n\nModel FLOPs per step = 2 x the blocks' forward FLOPs x images (the "
        "backward of a frozen backbone computes input gradients only; LoRA, patch embedding, norms and attention's "
        "second backward product are left out). GFLOP/s = model FLOPs / step wall time; the share is against the "
        "plain-matmul peak of the same number format.\n\n"
        + markdown_table(["setting", "model GFLOP per step", "GFLOP/s (wall)", "share of matmul peak"], gflop_rows),
    ]


def invert_section(inv: dict[tuple[str, bool], list[Timing]], args: argparse.Namespace) -> str:
    rows = []
    for (name, bf16), ts in inv.items():
        rows.append(
            [
                name,
                "bf16" if bf16 else "fp32",
                Summary.of(t.wall for t in ts).format(".2f"),
                Summary.of(t.cpu for t in ts).format(".2f"),
                Summary.of(t.system for t in ts).format(".2f"),
                Summary.of(t.minor_faults for t in ts).format(".0f"),
            ]
        )
    ratios = []
    for name in INVERT_SCHEDULES:
        pairs = list(zip(inv[(name, False)], inv[(name, True)]))
        ratios.append(
            [
                name,
                Summary.of(a.wall / b.wall for a, b in pairs).format(),
                Summary.of(a.cpu / b.cpu for a, b in pairs).format(),
            ]
        )
    return (
        "## Inversion step\n\n"
        f"`invert` on 5 classes x {args.per_class} images with the BN prior, pruning on from the first step; "
        f"{args.repeats} repeat(s) x {args.invert_steps} timed step(s) per setting after one untimed step; per "
        "step: median [min, max].\n\n"
        + markdown_table(["schedule", "precision", "step wall s", "step CPU s", "system s", "minor faults"], rows)
        + "\n\nfp32 / bf16 within each repeat and step:\n\n"
        + markdown_table(["schedule", "wall", "CPU"], ratios)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 query per class, 1 image per class in the inversion, 1 repeat, no file",
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every setting (default 2, quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta steps per process (default 1)")
    parser.add_argument("--steps", type=int, default=1, help="timed meta steps per process (default 1)")
    parser.add_argument("--query", type=int, default=15, help="queries per class in the meta step (default 15)")
    parser.add_argument("--per-class", type=int, default=5, help="inversion images per class, 5 classes (default 5)")
    parser.add_argument("--invert-steps", type=int, default=2, help="timed inversion steps per setting (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results file (default {DEFAULT_OUT.relative_to(REPO)}; quick runs write none)",
    )
    args = parser.parse_args()
    if args.quick:
        args.query, args.per_class, args.invert_steps = 1, 1, 1
    args.repeats = args.repeats or (1 if args.quick else 2)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)

    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t_start = time.perf_counter()
    tune_allocator()
    env = environment(("timm",))
    env["glibc malloc of this process"] = ", ".join(f"{k}={v}" for k, v in allocator_settings().items()) or "defaults"
    for k, v in env.items():
        print(f"{k}: {v}")
    peak_values: dict[str, list[float]] = {"fp32": [], "bf16": []}

    def measure_peaks() -> None:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peak_values[name] += matmul_gflops(dtype)
        print("matmul GFLOP/s: " + ", ".join(f"{k} {max(v):.0f}" for k, v in peak_values.items()), flush=True)

    measure_peaks()
    n_images = 5 * (1 + args.query)
    worker_args = [
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--query",
        str(args.query),
        "--seed",
        str(args.seed),
    ]
    runs: dict[Setting, list[Run]] = {s: [] for s in SETTINGS}
    dims: dict = {}
    for rep in range(args.repeats):
        for s in rotated(SETTINGS, rep):
            print(f"[meta repeat {rep + 1}/{args.repeats}] {s.label}: fresh process", flush=True)
            data = run_worker(
                "benchmarks.bench_meta",
                [*worker_args, "--masked", str(s.masked), "--precision", s.precision, "--malloc", s.malloc],
            )
            runs[s].append(Run.from_json(data))
            dims = {k: data[k] for k in ("num_patches", "dim", "depth")}

    backbone = load_vit(args.seed)
    adapter = make_adapter(backbone, args.seed)
    prior = make_prior()
    keys = [(name, bf16) for name in INVERT_SCHEDULES for bf16 in (False, True)]
    for name, bf16 in keys:  # warm-up
        time_inversion(backbone, adapter, INVERT_SCHEDULES[name], prior, args.per_class, 1, args.seed, bf16)
    inv: dict[tuple[str, bool], list[Timing]] = {k: [] for k in keys}
    for rep in range(args.repeats):
        for name, bf16 in rotated(keys, rep):
            gc.collect()
            ts = time_inversion(
                backbone,
                adapter,
                INVERT_SCHEDULES[name],
                prior,
                args.per_class,
                args.invert_steps,
                args.seed + rep,
                bf16,
            )
            inv[(name, bf16)] += ts
            print(
                f"[invert repeat {rep + 1}/{args.repeats}] {name} {'bf16' if bf16 else 'fp32'}: "
                + ", ".join(f"{t.wall:.2f}s/{t.cpu:.2f}s cpu" for t in ts),
                flush=True,
            )
    measure_peaks()
    peaks = {k: Summary.of(v) for k, v in peak_values.items()}

    sections = [
        report_header(
            "bf16 and allocator benchmark (CPU)",
            "bench_precision.py",
            env,
            started,
            f"the whole run took {(time.perf_counter() - t_start) / 60:.1f} min",
        ),
        "## Setup\n\n" + __doc__.split("\n\n")[2] + "\n\n"
        f"Meta step: 5-way 1-shot, {args.query} queries per class = {n_images} images; {args.warmup} untimed and "
        f"{args.steps} timed step(s) per process; {args.repeats} repeat(s).",
        "## Matmul peak\n\n`(2048, 2048) @ (2048, 2048)`, all threads, 5 repeats at the start and 5 at the end of the "
        "run: GFLOP/s median [min, max].\n\n"
        + markdown_table(["number format", "GFLOP/s"], [[k, v.format(".1f")] for k, v in peaks.items()]),
        *meta_sections(runs, dims, peaks, n_images),
        invert_section(inv, args),
    ]
    text = "\n\n".join(sections) + "\n"
    print("\n" + text)
    write_results(text, out)


if __name__ == "__main__":
    main()
