"""Data-parallel throughput on CPU: 1 process x 2 threads against 2 processes x 1 thread (``torchrun``, gloo).

Both settings run the real commands on the same 2 cores: ``python -m recycle COMMAND`` with ``OMP_NUM_THREADS=2``,
and ``python -m torch.distributed.run --nproc-per-node 2 -m recycle COMMAND`` with ``OMP_NUM_THREADS=1``.

* **Zoo inversion** (``invert --zoo``): a zoo of rank-4 q/v LoRAs with random A, B and 5-class heads
  (`benchmarks.bench_invert.make_adapter`), each inverted into a fresh pool (``--per-class`` images per class,
  ``--invert-steps`` steps, pruning 75% in the last block after 25% of the steps, no BN prior). The fixed cost (Python
  and torch start-up, rendezvous, loading the backbone and the zoo) is measured by running the same command again
  on the finished pool, where every LoRA is skipped; work = wall - fixed cost. Throughput: inversion steps (LoRAs x
  steps) per second of work.
* **Meta-training** (``meta-train --pool --episode-batch B``): a pool of random images with random teacher logits,
  one source per zoo LoRA. The step time is read from rank 0's ``log.jsonl`` (seconds since training started) as
  the mean over the steps after the first; throughput: episodes per second.

Backbone: timm ``vit_base_patch16_clip_224`` (CLIP ViT-B/16 at 224 px) with RANDOM weights, saved to a temporary
folder (nothing can be downloaded here); ``--quick`` uses a tiny ViT instead. Every repeat runs both settings, in an
order rotated from one repeat to the next; ratios are taken within a repeat. Each row records the CPU time of the
whole process tree (`resource.RUSAGE_CHILDREN`) and what the rest of the machine used meanwhile.

Run from the repository root (roughly 20 minutes with the defaults on 2 quiet cores, estimated from the step times
in ``results/invert.md`` and ``results/meta.md``; ``--quick`` is a smoke run of about 2 minutes that writes no file):

    python -m benchmarks.bench_distributed [--quick] [--repeats N] [--loras N] [--invert-steps N] [--meta-steps N]
        [--query N] [--episode-batch B] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import timm
import torch
from timm.models import save_for_hf

from benchmarks.bench_invert import WAYS, make_adapter
from benchmarks.common import REPO, Mark, Summary, environment, markdown_table, report_header, write_results
from recycle.backbone import load_backbone
from recycle.formats import save_adapter
from recycle.invert import InversionResult
from recycle.pool import write_run

DEFAULT_OUT = REPO / "benchmarks" / "results" / "distributed.md"
MODEL_NAME = "vit_base_patch16_clip_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
SETTINGS = ((1, 2), (2, 1))  # (processes, threads per process)


def _label(setting: tuple[int, int]) -> str:
    procs, threads = setting
    return f"{procs} process{'es' if procs > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"


@dataclass(frozen=True)
class Measured:
    """One command: wall seconds, CPU seconds of its whole process tree, CPU seconds the rest of the machine used."""

    wall: float
    cpu: float
    others_cpu: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(setting: tuple[int, int], args: Sequence[str]) -> Measured:
    """Run ``recycle`` `args` in `setting` (processes, threads) and measure it; raises if the command fails."""
    procs, threads = setting
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    head = (
        [sys.executable, "-m", "recycle"]
        if procs == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(procs),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "-m",
            "recycle",
        ]
    )
    before, children = Mark.now(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([*head, *args], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    after, children_after = Mark.now(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (children_after.ru_utime + children_after.ru_stime) - (children.ru_utime + children.ru_stime)
    return Measured(after.wall - before.wall, cpu, max(0.0, after.busy - before.busy - cpu - (after.cpu - before.cpu)))


def prepare(root: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """A random-weight backbone folder, a zoo of random LoRAs, and a pool of random images for meta-training."""
    torch.manual_seed(args.seed)
    model = timm.create_model(MODEL_NAME, pretrained=False, **(TINY if args.quick else {}))
    save_for_hf(model, root / "backbone", safe_serialization=True)
    backbone = load_backbone(str(root / "backbone"), device="cpu")
    zoo, pool = root / "zoo", root / "meta-pool"
    per_class = 1 + args.query
    gen = torch.Generator().manual_seed(args.seed)
    _, h, w = backbone.input_size
    for k in range(args.loras):
        adapter = make_adapter(backbone, args.seed + k)
        adapter.class_names = [f"lora{k}-class{c}" for c in range(WAYS)]
        save_adapter(adapter, zoo / f"lora_{k:03d}")
        labels = torch.arange(WAYS).repeat_interleave(per_class)
        result = InversionResult(
            torch.rand(len(labels), 3, h, w, generator=gen), labels, torch.randn(len(labels), WAYS, generator=gen)
        )
        write_run(
            pool, result, adapter, f"zoo/lora_{k:03d}", {"random": True}, tuple(backbone.model.patch_embed.grid_size)
        )
    return root / "backbone", zoo, pool


def mean_step_seconds(log: Path) -> float:
    """Mean step time after the first step, from the ``time`` column of a meta-training log."""
    times = [json.loads(line)["time"] for line in log.read_text().splitlines()]
    return (times[-1] - times[0]) / (len(times) - 1)


def measure(args: argparse.Namespace, root: Path, backbone: Path, zoo: Path, pool: Path) -> list[dict]:
    base = ["--backbone", str(backbone), "--device", "cpu"]
    rows = []
    for rep in range(args.repeats):
        order = SETTINGS[rep % 2 :] + SETTINGS[: rep % 2]
        for setting in order:
            tag = f"r{rep}-{setting[0]}x{setting[1]}"
            invert = [
                "invert",
                *base,
                "--zoo",
                str(zoo),
                "--out",
                str(root / f"pool-{tag}"),
                "--per-class",
                str(args.per_class),
                "--steps",
                str(args.invert_steps),
                "--bn-prior",
                "none",
                "--quiet",
            ]
            print(f"[repeat {rep + 1}/{args.repeats}] {_label(setting)}: invert --zoo", flush=True)
            work = run_command(setting, invert)
            fixed = run_command(setting, invert)  # everything is done now: only the fixed cost is left
            rows.append(
                {
                    "repeat": rep + 1,
                    "setting": setting,
                    "task": "invert",
                    "run": work,
                    "fixed": fixed,
                    "units": args.loras * args.invert_steps,
                }
            )
            meta = [
                "meta-train",
                *base,
                "--pool",
                str(pool),
                "--out",
                str(root / f"meta-{tag}"),
                "--steps",
                str(args.meta_steps),
                "--way",
                str(WAYS),
                "--shot",
                "1",
                "--query",
                str(args.query),
                "--episode-batch",
                str(args.episode_batch),
                "--checkpoint-every",
                str(args.meta_steps),
                "--quiet",
            ]
            print(f"[repeat {rep + 1}/{args.repeats}] {_label(setting)}: meta-train", flush=True)
            run = run_command(setting, meta)
            rows.append(
                {
                    "repeat": rep + 1,
                    "setting": setting,
                    "task": "meta-train",
                    "run": run,
                    "step": mean_step_seconds(root / f"meta-{tag}" / "log.jsonl"),
                    "episodes": args.episode_batch,
                }
            )
    return rows


def throughput(row: dict) -> float:
    """Inversion steps per second of work, or meta-training episodes per second."""
    if row["task"] == "invert":
        return row["units"] / max(1e-9, row["run"].wall - row["fixed"].wall)
    return row["episodes"] / row["step"]


def report(args: argparse.Namespace, env: dict[str, str], rows: list[dict], started: str, seconds: float) -> str:
    raw = markdown_table(
        [
            "task",
            "repeat",
            "setting",
            "wall s",
            "CPU s (process tree)",
            "others' CPU s",
            "fixed cost s",
            "meta step s",
            "throughput",
        ],
        [
            [
                r["task"],
                r["repeat"],
                _label(r["setting"]),
                f"{r['run'].wall:.2f}",
                f"{r['run'].cpu:.2f}",
                f"{r['run'].others_cpu:.1f}",
                f"{r['fixed'].wall:.2f}" if "fixed" in r else "-",
                f"{r['step']:.3f}" if "step" in r else "-",
                f"{throughput(r):.3f} {'steps/s' if r['task'] == 'invert' else 'episodes/s'}",
            ]
            for r in rows
        ],
    )
    summary = []
    for task, unit in (("invert", "inversion steps/s"), ("meta-train", "episodes/s")):
        per = {s: [throughput(r) for r in rows if r["task"] == task and r["setting"] == s] for s in SETTINGS}
        ratios = [b / a for a, b in zip(per[SETTINGS[0]], per[SETTINGS[1]])]
        summary.append(
            [
                task,
                unit,
                Summary.of(per[SETTINGS[0]]).format(),
                Summary.of(per[SETTINGS[1]]).format(),
                Summary.of(ratios).format(),
            ]
        )
    others = sum(r["run"].others_cpu for r in rows)
    wall = sum(r["run"].wall for r in rows)
    model = "a tiny ViT (img 32, patch 8, dim 64, depth 2)" if args.quick else f"`{MODEL_NAME}` with random weights"
    return "\n\n".join(
        [
            report_header(
                "Data-parallel throughput on CPU: 1 process x 2 threads vs 2 processes x 1 thread",
                "bench_distributed.py",
                env,
                started,
                f"the whole run took {seconds / 60:.1f} min",
            ),
            f"## Setup\n\nBackbone: {model}. Zoo inversion: {args.loras} LoRAs, 5 classes x {args.per_class} images "
            f"each, {args.invert_steps} steps, pruning 75% in the last block, no BN prior. Meta-training: 5-way 1-shot "
            f"episodes with {args.query} queries per class, {args.episode_batch} episodes per step, {args.meta_steps} "
            f"steps. {args.repeats} repeat(s), settings interleaved.",
            "## Throughput\n\nMedian [min, max] over repeats; ratio = 2 processes x 1 thread over 1 process x 2 "
            "threads within a repeat (above 1: the ranks are faster).\n\n"
            + markdown_table(["task", "unit", _label(SETTINGS[0]), _label(SETTINGS[1]), "ratio"], summary),
            f"During the runs other processes used {others:.0f} CPU-s in {wall:.0f} s of wall time, i.e. "
            f"{100 * others / (wall * os.cpu_count()):.0f}% of the machine's {os.cpu_count()} CPUs; the ratios "
            "are only as good as that share is small.",
            "## Raw measurements\n\n" + raw,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny ViT, 1 repeat, few steps, no file")
    parser.add_argument("--repeats", type=int, default=None, help="runs per setting (default 2, quick 1)")
    parser.add_argument("--loras", type=int, default=4, help="LoRAs in the zoo (default 4)")
    parser.add_argument("--per-class", type=int, default=2, help="inverted images per class (default 2)")
    parser.add_argument("--invert-steps", type=int, default=4, help="inversion steps per LoRA (default 4)")
    parser.add_argument("--meta-steps", type=int, default=4, help="meta-training steps (default 4; >= 2)")
    parser.add_argument("--query", type=int, default=5, help="queries per class in an episode (default 5)")
    parser.add_argument("--episode-batch", type=int, default=2, help="episodes per step, even (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results file (default {DEFAULT_OUT.relative_to(REPO)}; quick runs write none)",
    )
    args = parser.parse_args()
    if args.meta_steps < 2 or args.episode_batch % 2:
        parser.error("--meta-steps must be >= 2 and --episode-batch even (2 ranks share it)")
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.quick:
        args.loras, args.invert_steps, args.meta_steps = 2, 2, 2
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t_start = time.perf_counter()
    env = environment(("timm",))
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(tmp), *prepare(Path(tmp), args))
    text = report(args, env, rows, started, time.perf_counter() - t_start)
    print("\n" + text)
    write_results(text, out)


if __name__ == "__main__":
    main()
