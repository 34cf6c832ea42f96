"""ZeroGPU: on a Hugging Face Space with ZeroGPU hardware, run the app's GPU work under `spaces.GPU`.

ZeroGPU lends a GPU per call of a function decorated with ``@spaces.GPU``, for a duration the function asks for,
and runs the call in a forked worker process. The app wraps two handlers: few-shot prediction
(`FewShot.classify`, which keeps only caches between calls) and the computation of an inversion
(`Inversion.compute`, which takes and yields plain values; the session state stays in the server process). Each asks
for a duration that fits its request, within bounds.

The `spaces` package decides that the hardware is ZeroGPU from the environment variable ``SPACES_ZERO_GPU`` (``1``,
``t`` or ``true``, any case), which the Space sets; this module reads it the same way. Without it, or without the
`spaces` package, nothing is wrapped: locally and on CPU or dedicated-GPU Spaces the handlers are the plain ones.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, TypeVar

_logger = logging.getLogger("recycle.app")

F = TypeVar("F", bound=Callable[..., Any])

ENV = "SPACES_ZERO_GPU"

# Durations asked of ZeroGPU, in seconds. A shorter request waits less in ZeroGPU's queue and costs less of the
# visitor's quota; a request that runs past its duration is stopped. These are estimates for ViT-B/16 at 224 px:
# inversion costs about one forward and backward pass of the ViT and the BN-prior ResNet-50 per image and step.
PREDICT_SECONDS = (10.0, 60.0)  # bounds
PREDICT_BASE, PREDICT_PER_IMAGE = 10.0, 0.05
INVERT_SECONDS = (30.0, 300.0)  # bounds
INVERT_BASE, INVERT_PER_IMAGE_STEP = 20.0, 0.0025


def zero_gpu() -> bool:
    """Whether the Space says its hardware is ZeroGPU (``SPACES_ZERO_GPU``, read as the `spaces` package reads it)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "t", "true")


def _bounded(seconds: float, bounds: tuple[float, float]) -> int:
    return int(round(min(max(seconds, bounds[0]), bounds[1])))


def predict_seconds(images: int) -> int:
    """The GPU time to ask for a few-shot request of `images` support and query images."""
    return _bounded(PREDICT_BASE + PREDICT_PER_IMAGE * max(images, 0), PREDICT_SECONDS)


def invert_seconds(steps: int, images: int) -> int:
    """The GPU time to ask for an inversion of `images` images over `steps` steps."""
    return _bounded(INVERT_BASE + INVERT_PER_IMAGE_STEP * max(steps, 0) * max(images, 0), INVERT_SECONDS)


def _count(value: Any) -> int:
    return len(value) if isinstance(value, (list, tuple)) else 0


def classify_duration(backbone: Any = None, lora: Any = None, queries: Any = None, **slots: Any) -> int:
    """`predict_seconds` for a call of `FewShot.classify` (same arguments). Never raises: the handler itself
    refuses bad input."""
    images = _count(queries) + sum(_count(v) for k, v in slots.items() if k.endswith("_images"))
    return predict_seconds(images)


def compute_duration(
    name: Any = None, adapter: Any = None, targets: Any = None, config: Any = None, *rest: Any, **kwargs: Any
) -> int:
    """`invert_seconds` for a call of `Inversion.compute` (same arguments). Never raises."""
    steps, per_class = getattr(config, "steps", 0), getattr(config, "per_class", 0)
    if not (isinstance(steps, int) and isinstance(per_class, int)):
        return invert_seconds(0, 0)
    return invert_seconds(steps, per_class * _count(targets))


def gpu(fn: F, duration: Callable[..., int]) -> F:
    """`fn` under ``spaces.GPU(duration=duration)`` on ZeroGPU hardware; `fn` itself anywhere else, or when the
    `spaces` package cannot be imported (logged)."""
    if not zero_gpu():
        return fn
    try:
        import spaces
    except Exception as e:  # noqa: BLE001 - missing, or failing to start: the app still runs, on the CPU
        _logger.warning(
            "%s is set but the spaces package cannot be used (%s: %s); running without ZeroGPU",
            ENV,
            type(e).__name__,
            e,
        )
        return fn
    return spaces.GPU(fn, duration=duration)


def wrap_handlers(fewshot: Any, inversion: Any) -> bool:
    """Replace ``fewshot.classify`` and ``inversion.compute`` by their ZeroGPU versions where ZeroGPU is on.

    Call it before the handlers are wired to events. Returns whether they were wrapped.
    """
    if not zero_gpu():
        return False
    classify: Optional[Callable] = gpu(fewshot.classify, classify_duration)
    if getattr(classify, "__func__", None) is type(fewshot).classify:  # `spaces` could not be imported
        return False
    fewshot.classify = classify
    inversion.compute = gpu(inversion.compute, compute_duration)
    _logger.info("ZeroGPU: prediction and inversion run under spaces.GPU")
    return True
