"""Process-level speed settings: bf16 mixed precision, the choice of inference precision, and the C allocator.

* **bf16.** `mixed_precision` runs a frozen backbone's matmuls and attention in bfloat16 under `torch.autocast`;
  trainable parameters (LoRA, pixels), optimiser state and losses stay in float32. On CPUs without native bf16
  instructions bf16 is emulated and slower, so ``"auto"`` (`resolve_precision`) picks it only where the hardware has
  it (`native_bf16`).
* **Inference precision.** Prediction and evaluation may also run in int8 (`recycle.quantize`);
  `resolve_inference_precision` chooses among fp32, bf16 and int8 once, from the device and the CPU's instruction sets.
* **Allocator.** glibc's malloc maps every allocation above 32 MiB afresh and unmaps it on free, so a ViT training
  step on a batch of 224 px images takes millions of page faults (a third of its CPU time in the kernel).
  `tune_allocator` turns that off for the heavy commands; it is never applied on import.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "INFERENCE_PRECISIONS",
    "int8_supported",
    "resolve_inference_precision",
    "native_bf16",
    "cpu_bf16_flags",
    "resolve_precision",
    "check_bf16_flag",
    "mixed_precision",
    "tune_allocator",
    "allocator_settings",
    "malloc_choice",
    "MALLOC_CHOICES",
]

_logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")  # training and inversion
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")  # prediction and evaluation
# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 / AMX-BF16, Arm BF16 ("Features" line).
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator_settings: Optional[dict[str, int]] = None


@lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native bf16 instruction sets this CPU advertises in ``/proc/cpuinfo`` (empty where there are none or the
    file is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return tuple(f for f in _BF16_FLAGS if f in flags)


def native_bf16(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether `device` computes in bfloat16 natively (CUDA: ``torch.cuda.is_bf16_supported``; CPU: the
    instruction sets of `cpu_bf16_flags`, or a torch CPU capability that names bf16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability().upper()
        return bool(cpu_bf16_flags()) or "BF16" in capability or "AMX" in capability
    return False


def int8_supported() -> bool:
    """Whether this CPU has PyTorch's int8 kernels (`recycle.quantize`): x86 with AVX2 or better, or 64-bit ARM."""
    engines = set(torch.backends.quantized.supported_engines) - {"none"}
    capability = torch.backends.cpu.get_cpu_capability().upper()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        return bool(engines & {"x86", "fbgemm", "onednn"}) and ("AVX2" in capability or "AVX512" in capability)
    if machine in ("aarch64", "arm64"):
        return "qnnpack" in engines
    return False


def resolve_inference_precision(precision: str, device: Union[str, torch.device]) -> tuple[str, str]:
    """``"auto"`` / ``"fp32"`` / ``"bf16"`` / ``"int8"`` for inference (few-shot prediction, evaluation) on `device`
    -> ``(choice, why)``: ``"fp32"``, ``"bf16"`` or ``"int8"``, and the reason in a few words.

    ``auto`` takes int8 on a CPU with int8 kernels (`benchmarks/bench_int8.py` measures the three), else bf16 where
    it is native, else fp32. Asked-for int8 where it cannot run is refused; asked-for bf16 without native support
    runs, with a warning that it is emulated.

    Raises:
        ValueError: an unknown precision, or int8 off the CPU or on a CPU without int8 kernels.
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {INFERENCE_PRECISIONS}")
    device = torch.device(device)
    cpu, native = device.type == "cpu", native_bf16(device)
    if precision == "int8" and not cpu:
        raise ValueError(f"precision int8 runs on the CPU, not on {device}: choose fp32, bf16 or auto")
    if precision == "int8" and not int8_supported():
        raise ValueError(
            f"precision int8: this CPU ({torch.backends.cpu.get_cpu_capability()}, {platform.machine()}) has no "
            "int8 kernels; choose fp32 or auto"
        )
    if precision != "auto":
        if precision == "bf16" and not native:
            _logger.warning("bf16 on %s without native bf16 support is emulated and likely slower than fp32", device)
        return precision, "as asked"
    if cpu and int8_supported():
        choice, why = "int8", f"auto: int8 kernels ({torch.backends.cpu.get_cpu_capability()})"
    elif native:
        choice, why = "bf16", "auto: native bf16"
    else:
        choice, why = "fp32", "auto: no int8 kernels, no native bf16" if cpu else "auto: no native bf16"
    _logger.info("precision %s on %s (%s)", choice, device, why)
    return choice, why


def resolve_precision(precision: str, device: Union[str, torch.device]) -> bool:
    """``"auto"`` / ``"fp32"`` / ``"bf16"`` -> whether to run in bf16 on `device` (auto: where it is native)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    native = native_bf16(device)
    if precision == "auto":
        _logger.info("precision auto: %s on %s", "bf16" if native else "fp32 (no native bf16)", device)
        return native
    if precision == "bf16" and not native:
        _logger.warning("bf16 on %s without native bf16 support is emulated and likely slower than fp32", device)
    return precision == "bf16"


def check_bf16_flag(value: object) -> None:
    """Config validation: a ``bf16`` setting must be a real bool (a string such as "false" would be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"invalid setting bf16={value!r}: expected True or False")


@contextlib.contextmanager
def mixed_precision(model: nn.Module, device: Union[str, torch.device], enabled: bool) -> Iterator[None]:
    """Run `model` under bf16 autocast for the duration of the block (nothing changes when not `enabled`).

    Matmuls, convolutions and attention run in bf16; parameters stay float32 (a trainable LoRA gets fp32 gradients
    and fp32 optimiser state). Outputs may be bf16: cast them with ``.float()`` before a loss. On the CPU, timm's
    attention is switched to its explicit form (``fused_attn = False``; the model's own setting is restored
    afterwards), because torch's fused CPU attention is slower in bf16 than two batched matmuls, backward
    especially. Callers must hold the model exclusively (e.g. ``Backbone.lock``) while the block runs.
    """
    if not enabled:
        yield
        return
    device = torch.device(device)
    switched = [m for m in model.modules() if getattr(m, "fused_attn", None) is True] if device.type == "cpu" else []
    for m in switched:
        m.fused_attn = False
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        for m in switched:
            m.fused_attn = True


MALLOC_CHOICES = ("tuned", "default")


def malloc_choice() -> str:
    """``RECYCLE_MALLOC``: ``tuned`` (also when unset or empty) or ``default`` (glibc's own settings), in any case.

    Raises:
        ValueError: any other value, naming the variable and the values it takes.
    """
    raw = os.environ.get("RECYCLE_MALLOC", "")
    value = raw.strip().lower() or "tuned"
    if value not in MALLOC_CHOICES:
        raise ValueError(
            f"RECYCLE_MALLOC={raw[:40]!r} is not a setting: use 'tuned' (the default) to tune glibc "
            "malloc, or 'default' to keep glibc's defaults"
        )
    return value


def tune_allocator() -> dict[str, int]:
    """Keep freed memory in the process instead of unmapping it (glibc malloc only): ``M_MMAP_MAX = 0`` serves every
    allocation from the heap, and ``M_TRIM_THRESHOLD`` at its maximum never returns the heap's top to the system.

    On a ViT-B/16 meta-training step (80 images, fp32) this removed the page faults (2.7 M a step, a fifth of the
    CPU time) and cut the step's CPU time by about 20%; the price is resident memory: the heap never shrinks, and
    its holes made the peak about 40% higher (pilot runs with 2 and 4 blocks). Call it once where a heavy command
    starts; set ``RECYCLE_MALLOC=default`` to skip it. Idempotent.

    Raises:
        ValueError: ``RECYCLE_MALLOC`` has a value other than ``tuned`` or ``default`` (see `malloc_choice`).

    Returns:
        The mallopt settings applied (empty when skipped or not on glibc).
    """
    global _allocator_settings
    choice = malloc_choice()  # a bad value is refused before anything is set, on every call
    if _allocator_settings is not None:
        return _allocator_settings
    _allocator_settings = {}
    if choice == "default":
        _logger.info("allocator: glibc defaults kept (RECYCLE_MALLOC=default)")
        return _allocator_settings
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _logger.debug("allocator: not glibc, left alone")
        return _allocator_settings
    libc = ctypes.CDLL(None)
    wanted = {"M_MMAP_MAX": (_M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 2**31 - 1)}
    for name, (param, value) in wanted.items():
        if libc.mallopt(param, value) == 1:
            _allocator_settings[name] = value
        else:
            _logger.warning("allocator: mallopt(%s, %d) failed", name, value)
    _logger.info(
        "allocator: glibc malloc tuned (%s): no mmap'd chunks, no trimming",
        ", ".join(f"{k}={v}" for k, v in _allocator_settings.items()),
    )
    return _allocator_settings


def allocator_settings() -> dict[str, int]:
    """The mallopt settings `tune_allocator` applied in this process (empty if it was not called or did nothing)."""
    return dict(_allocator_settings or {})
