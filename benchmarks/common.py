"""Helpers shared by the benchmarks: timing (wall, CPU, page faults), summaries, environment and markdown.

Wall-clock ratios on these 2-core machines are distorted by page faults and by other tenants, so every measurement
records process CPU time (all threads) and the page faults taken alongside the wall time.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, TypeVar

import torch

from recycle.runtime import cpu_bf16_flags

__all__ = [
    "REPO",
    "Timing",
    "Summary",
    "timed",
    "environment",
    "command_line",
    "markdown_table",
    "rotated",
    "masking_label",
    "vit_block_flops",
    "run_worker",
    "Mark",
    "contention",
    "matmul_gflops",
]

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


@dataclass(frozen=True)
class Timing:
    """One measured call.

    Attributes:
        wall: seconds of `time.perf_counter`.
        cpu: CPU seconds of this process, all threads (`time.process_time`).
        others_cpu: CPU seconds the rest of the machine used meanwhile (busy time in ``/proc/stat``, steal included,
            minus `cpu`); a contention gauge: on 2 cores anything near `wall` means one core was taken.
        minor_faults, major_faults: page faults of this process.
        system: the part of `cpu` spent in the kernel (``ru_stime``), on these machines mostly page faults.
    """

    wall: float
    cpu: float
    others_cpu: float
    minor_faults: int
    major_faults: int
    system: float = 0.0

    def __add__(self, other: "Timing") -> "Timing":
        return Timing(
            self.wall + other.wall,
            self.cpu + other.cpu,
            self.others_cpu + other.others_cpu,
            self.minor_faults + other.minor_faults,
            self.major_faults + other.major_faults,
            self.system + other.system,
        )


def _machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot (NaN where ``/proc/stat`` is missing)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], T]) -> tuple[T, Timing]:
    """Call `fn` once and return its result with a `Timing`."""
    r0, b0 = resource.getrusage(resource.RUSAGE_SELF), _machine_busy_seconds()
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    w1, c1 = time.perf_counter(), time.process_time()
    r1, b1 = resource.getrusage(resource.RUSAGE_SELF), _machine_busy_seconds()
    return out, Timing(
        w1 - w0,
        c1 - c0,
        max(0.0, b1 - b0 - (c1 - c0)),
        r1.ru_minflt - r0.ru_minflt,
        r1.ru_majflt - r0.ru_majflt,
        r1.ru_stime - r0.ru_stime,
    )


@dataclass(frozen=True)
class Summary:
    """Median, min and max of repeated measurements."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> "Summary":
        v = list(values)
        return cls(statistics.median(v), min(v), max(v))

    def format(self, spec: str = ".3f") -> str:
        return f"{self.median:{spec}} [{self.min:{spec}}, {self.max:{spec}}]"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


_SIMD_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "vnni", "asimd", "sve", "bf16", "i8mm")


def cpu_simd_flags() -> str:
    """The CPU's vector and matrix instruction sets from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return " ".join(sorted(f for f in value.split() if f.startswith(_SIMD_PREFIXES))) or "none"
    return "unknown"


def environment(packages: Sequence[str] = ()) -> dict[str, str]:
    """What a reader needs to compare results: machine, threads, library versions, allocator settings, commit."""
    dirty = [line[2:].strip() for line in _git("status", "--porcelain", "--", "recycle").splitlines()]
    env = {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable",
        "torch CPU capability": torch.backends.cpu.get_cpu_capability(),
        "CPU native bf16 (/proc/cpuinfo)": ", ".join(cpu_bf16_flags()) or "none",
        "CPU SIMD flags (/proc/cpuinfo)": cpu_simd_flags(),
        "torch quantized engine": torch.backends.quantized.engine,
        "torch threads (intra / inter-op)": f"{torch.get_num_threads()} / {torch.get_num_interop_threads()}",
        "python": f"{platform.python_version()} ({platform.platform()})",
        "torch": torch.__version__,
        **{name: metadata.version(name) for name in packages},
        "malloc / thread env": ", ".join(
            f"{k}={v}"
            for k, v in sorted(os.environ.items())
            if k.startswith(("MALLOC_", "OMP_", "MKL_", "LD_PRELOAD", "ONEDNN_", "DNNL_", "ATEN_CPU_"))
        )
        or "defaults",
        "git commit": (_git("rev-parse", "--short", "HEAD") or "unknown")
        + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else ""),
    }
    return env


def command_line() -> str:
    """The command that started this process, as it would be typed from the repository root."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", os.path.relpath(sys.argv[0], REPO)]
    return shlex.join(head + sys.argv[1:])


def report_header(title: str, script: str, env: Mapping[str, str], started: str, duration: str) -> str:
    """The opening of every results file: title, provenance, the command, when it ran, the environment table.

    `duration` completes "Started <started>; ...", e.g. "the whole run took 3.2 min".
    """
    return "\n\n".join(
        [
            f"# {title}",
            f"Produced by `benchmarks/{script}`; do not edit by hand.",
            f"Command (from the repository root):\n\n```\n{command_line()}\n```\n\nStarted {started}; {duration}.",
            "## Environment\n\n" + markdown_table(["", ""], env.items()),
        ]
    )


def rotated(items: Sequence, rep: int) -> list:
    """`items` rotated by `rep` places: each repeat starts the interleaved variants at a different one."""
    k = rep % len(items)
    return list(items[k:]) + list(items[:k])


def masking_label(masked: float) -> str:
    """How a setting's share of masked tokens reads in tables: "75% masked", or "0% (all tokens)"."""
    return f"{int(100 * masked)}% masked" if masked else "0% (all tokens)"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; numbers are expected pre-formatted as strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def vit_block_flops(attn_tokens: int, mlp_tokens: int, dim: int) -> int:
    """Forward FLOPs (2 per multiply-add) of one ViT block: the qkv and output projections and the two attention
    products over `attn_tokens` tokens, and the MLP (hidden width 4·dim) over `mlp_tokens` tokens (fewer than
    `attn_tokens` when the block prunes tokens after attention). LayerNorms, softmax, GELU, biases and LoRA are left
    out; with 197 tokens this model gives the FLOP-ideal speed-ups of `/work/shared/DESIGN.md`."""
    return 8 * attn_tokens * dim**2 + 4 * attn_tokens**2 * dim + 16 * mlp_tokens * dim**2


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> list[float]:
    """GFLOP/s of a plain ``(n, n) @ (n, n)`` matmul in `dtype` on the CPU with all of torch's threads, one value per
    repeat (wall time; 2·n³ FLOPs each): the machine's practical peak for that number format."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    a @ b  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        out.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return out


def run_worker(module: str, args: Sequence[str], env: Optional[Mapping[str, Optional[str]]] = None) -> dict:
    """Run ``python -m module *args --result-file FILE`` in a fresh process and return the JSON object it wrote.

    The child inherits this process's environment changed by `env` (a value of None removes the variable), e.g. to
    try allocator settings, which glibc reads only at process start. Its output goes to this process's stdout.
    """
    child_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        subprocess.run(
            [sys.executable, "-m", module, *args, "--result-file", str(result)], cwd=REPO, env=child_env, check=True
        )
        return json.loads(result.read_text())


@dataclass(frozen=True)
class Mark:
    """A point in time, for `Timing`s of intervals that are not one call (e.g. between two progress callbacks)."""

    wall: float
    cpu: float
    busy: float
    minor_faults: int
    major_faults: int
    system: float

    @classmethod
    def now(cls) -> "Mark":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            time.perf_counter(),
            time.process_time(),
            _machine_busy_seconds(),
            usage.ru_minflt,
            usage.ru_majflt,
            usage.ru_stime,
        )

    def until(self, later: "Mark") -> Timing:
        """The `Timing` of the interval from this mark to `later`."""
        cpu = later.cpu - self.cpu
        return Timing(
            later.wall - self.wall,
            cpu,
            max(0.0, later.busy - self.busy - cpu),
            later.minor_faults - self.minor_faults,
            later.major_faults - self.major_faults,
            later.system - self.system,
        )


def contention(timings: Iterable[Timing]) -> str:
    """A sentence on how much of the machine other processes took during `timings` (summed)."""
    ts = list(timings)
    return contention_of(sum(t.others_cpu for t in ts), sum(t.wall for t in ts))


def contention_of(others: float, wall: float, column: bool = True) -> str:
    """`contention`'s sentence from the summed CPU seconds of other processes and the summed wall time (`column`:
    the table has an "others' CPU" column to point to)."""
    return (
        f"During the timed calls other processes used {others:.0f} CPU-s in {wall:.0f} s of wall time, i.e. "
        f"{100 * others / (wall * os.cpu_count()):.0f}% of the machine's {os.cpu_count()} CPUs"
        + (' (column "others\' CPU")' if column else "")
        + "; wall-clock ratios are only as good as that share is small and even across settings."
    )


def write_results(text: str, out: Optional[Path]) -> None:
    """Write a results file (creating its folder), if `out` is given."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
