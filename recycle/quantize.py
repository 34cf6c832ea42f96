"""int8 inference for the few-shot path: a private copy of a backbone's model with a LoRA baked into its weights
(exactly: ``W + s·B A``, before any rounding) and every Linear layer computing in int8.

Weights are quantised per output channel once; activations per batch as they arrive ("dynamic" quantisation, with
PyTorch's x86 (fbgemm/oneDNN) or ARM (qnnpack) int8 kernels). Attention scores, softmax, LayerNorm, GELU and the patch
embedding stay in float32. Quantised copies are cached per backbone and LoRA (`int8_model`), so a LoRA is merged and
quantised once, not per request. Inference only: nothing here trains.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from .adapter import LoRAAdapter
from .backbone import Backbone
from .lora import bake_lora
from .runtime import int8_supported, mixed_precision, native_bf16, resolve_inference_precision

__all__ = ["quantize_int8", "int8_model", "clear_int8_cache", "choose_precision", "INT8_CACHE_SIZE"]

_logger = logging.getLogger(__name__)

INT8_CACHE_SIZE = 4  # quantised copies kept per backbone (the bare model and a few LoRAs)
_cache: "weakref.WeakKeyDictionary[Backbone, OrderedDict[str, nn.Module]]" = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


@contextlib.contextmanager
def _quiet_ao() -> "contextlib.AbstractContextManager[None]":
    """`torch.ao.quantization` warns on import and use that it is deprecated; its dynamic Linear kernels beat torchao's
    eager int8 in a first check on a ViT-B/16 (`benchmarks/bench_int8.py` compares them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated.*")
        yield


MAX_INT8_MAGNITUDE = 1e6  # no trained ViT holds a weight this large; int8's dynamic scales overflow far beyond it


def quantize_int8(model: nn.Module) -> nn.Module:
    """`model` (modified in place and returned) with its LoRA layers baked in and every `nn.Linear` in int8
    (weights per output channel, activations per batch). Give it a private copy: the result runs on the CPU only.

    Raises:
        RuntimeError: this CPU or PyTorch build has no int8 kernels.
        ValueError: the weights, or a LoRA's merged weights, hold NaN or Inf.
    """
    if not int8_supported():
        raise RuntimeError(
            f"int8 inference needs PyTorch's int8 kernels (x86 with AVX2, or ARM); this CPU offers "
            f"{torch.backends.cpu.get_cpu_capability()} on {platform.machine()}: use fp32"
        )
    bake_lora(model)
    model = model.cpu().float().eval()
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError("the model holds NaN or Inf weights, which int8 cannot represent")
    largest = max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
    if largest > MAX_INT8_MAGNITUDE:  # its activations would overflow int8's run-time scales
        raise ValueError(
            f"the model holds weights up to {largest:.3g} in magnitude (int8: at most {MAX_INT8_MAGNITUDE:g})"
        )
    with _quiet_ao():
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def int8_model(backbone: Backbone, lora: Optional[LoRAAdapter] = None) -> nn.Module:
    """The int8 copy of `backbone`'s model with `lora` baked in, made once and cached (`INT8_CACHE_SIZE` per
    backbone, least recently used first out). Pass it to ``backbone.embed(x, model=...)``.

    Raises:
        ValueError: the backbone is not on the CPU.
        RuntimeError, LoRAFormatError: as `quantize_int8` and `LoRAAdapter.attached`.
    """
    if backbone.device.type != "cpu":
        raise ValueError(f"int8 inference runs on the CPU; this backbone is on {backbone.device}")
    key = lora.fingerprint() if lora is not None else "-"
    with _cache_lock:
        table = _cache.setdefault(backbone, OrderedDict())
        if key in table:
            table.move_to_end(key)
            return table[key]
    with lora.attached(backbone, merged=True) if lora is not None else backbone.lock:
        private = copy.deepcopy(backbone.model)
    quantised = quantize_int8(private)
    with _cache_lock:
        table = _cache.setdefault(backbone, OrderedDict())
        table[key] = quantised
        while len(table) > INT8_CACHE_SIZE:
            table.popitem(last=False)
    _logger.info("int8 copy of %s%s made", backbone.name, f" with LoRA {key}" if lora is not None else "")
    return quantised


def clear_int8_cache(backbone: Optional[Backbone] = None) -> None:
    """Drop the cached int8 copies of `backbone` (of every backbone when None)."""
    with _cache_lock:
        if backbone is None:
            _cache.clear()
        else:
            _cache.pop(backbone, None)


CALIBRATION_IMAGES = 4
INSTANT_S = 0.05  # a calibration batch faster than this in fp32 stays in fp32: nothing to gain, predictions kept
MIN_SPEEDUP = 1.2  # another precision must beat fp32 by this much to be chosen
MIN_COSINE = 0.99  # and keep every calibration embedding this close to fp32's


def _calibration_batch(backbone: Backbone, n: int) -> torch.Tensor:
    """`n` smooth seeded test patterns ``(n, C, H, W)`` at the backbone's input size, normalised as it expects."""
    gen = torch.Generator().manual_seed(0)
    c, h, w = backbone.input_size
    coarse = torch.rand(n, c, 8, 8, generator=gen)
    x = nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    mean = torch.tensor(backbone.mean).view(1, -1, 1, 1)
    std = torch.tensor(backbone.std).view(1, -1, 1, 1)
    return (x - mean) / std


def choose_precision(backbone: Backbone, images: int = CALIBRATION_IMAGES) -> tuple[str, str]:
    """``auto`` for inference on a CPU backbone, by a short calibration: embed a few test patterns in fp32, in bf16
    (where it is native) and in int8 (where the CPU has int8 kernels), and take the fastest whose embeddings all keep
    a cosine similarity of at least `MIN_COSINE` to fp32's and that beats fp32 by `MIN_SPEEDUP`. Returns
    ``(choice, why)``. Off the CPU: `recycle.runtime.resolve_inference_precision`'s flag-based choice."""
    if backbone.device.type != "cpu":
        return resolve_inference_precision("auto", backbone.device)
    x = _calibration_batch(backbone, images)

    def run(precision: str) -> tuple[float, torch.Tensor]:
        model = int8_model(backbone) if precision == "int8" else None
        with torch.inference_mode(), backbone.lock, mixed_precision(backbone.model, "cpu", precision == "bf16"):
            backbone.embed(x, model=model)  # warm-up
            start = time.perf_counter()
            out = backbone.embed(x, model=model).float()
            return time.perf_counter() - start, out

    base_s, base = run("fp32")
    if base_s < INSTANT_S:
        return "fp32", f"auto: fp32 is instant here ({1000 * base_s:.0f} ms per {images} images)"
    best, best_s, why = "fp32", base_s, "auto: nothing beat fp32 here with embeddings kept"
    for precision in [p for p, ok in (("bf16", native_bf16("cpu")), ("int8", int8_supported())) if ok]:
        try:
            seconds, out = run(precision)
        except ValueError as e:  # int8 refuses weights it cannot represent: fp32 then reports them
            _logger.info("calibration %s: unavailable (%s)", precision, e)
            continue
        cosine = nn.functional.cosine_similarity(out, base).min().item()
        _logger.info("calibration %s: %.3f s vs fp32 %.3f s, min cosine %.4f", precision, seconds, base_s, cosine)
        if cosine >= MIN_COSINE and base_s / seconds >= MIN_SPEEDUP and seconds < best_s:
            best, best_s = precision, seconds
            why = f"auto: {base_s / seconds:.1f}× faster than fp32 here, embeddings kept (cosine ≥ {cosine:.3f})"
    if best != "int8":
        clear_int8_cache(backbone)
    _logger.info("precision for %s: %s (%s)", backbone.name, best, why)
    return best, why
