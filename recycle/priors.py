"""Image priors of the inversion: the BatchNorm-statistics prior (DeepInversion; the paper's Eq. 2) and the
two-colour parametrisation (each image a coverage map between one ink and one paper colour)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .backbone import BackboneError
from .io import atomic_write_bytes

__all__ = [
    "BNPrior",
    "load_bn_prior",
    "DEFAULT_BN_PRIOR",
    "LUMA",
    "ink_and_paper",
    "two_colour_images",
    "PRIOR_SETTINGS",
    "LOOK_SETTINGS",
    "save_prior_settings",
    "read_prior_settings",
]

DEFAULT_BN_PRIOR = "resnet50.tv_in1k"  # torchvision's ImageNet ResNet-50 (V1 weights), as in the paper's code


class BNPrior(nn.Module):
    """DeepInversion BatchNorm-statistics prior (Yin et al., 2020; paper Eq. 2).

    ``R_BN(x) = Σ_l ‖μ_l(x) − μ_l‖₂ + ‖σ²_l(x) − σ²_l‖₂`` over every BatchNorm2d of a frozen CNN, with the batch
    mean and (biased) variance of each BN input.

    Args:
        model: a CNN with BatchNorm2d layers (running statistics are the prior).
        mean, std: the CNN's input normalisation; inputs to `forward` are images in [0, 1].
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.bns:
            raise ValueError(f"{type(model).__name__} has no BatchNorm2d layers to use as a prior")
        self._terms: list[torch.Tensor] = []
        for bn in self.bns:
            bn.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor], _output) -> None:
        x = inputs[0].float()  # statistics in fp32 also under bf16 autocast (the prior is part of the loss)
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self._terms.append(
            torch.linalg.vector_norm(mean - module.running_mean, 2)
            + torch.linalg.vector_norm(var - module.running_var, 2)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [0, 1] -> scalar prior loss."""
        self._terms = []
        self.model((images - self.mean) / self.std)
        loss = torch.stack(self._terms).sum()
        self._terms = []
        return loss


def load_bn_prior(name: str = DEFAULT_BN_PRIOR, device: Optional[torch.device] = None) -> BNPrior:
    """An ImageNet CNN from timm (through the Hub) as a `BNPrior`."""
    from .backbone import create_timm_model

    try:
        model = create_timm_model(name, {}, pretrained=True, what="BN prior")
    except BackboneError as e:
        raise BackboneError(f"BN prior: {e}") from None
    cfg = model.pretrained_cfg
    return BNPrior(model, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))).to(
        device or "cpu"
    )


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights of R, G, B


def ink_and_paper(n: int, min_contrast: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` random (ink, paper) colour pairs, each ``(n, 3)`` in [0, 1], whose luminances differ by at least
    `min_contrast` (either may be the lighter one); rejection sampling from uniform RGB."""
    luma = torch.tensor(LUMA)
    ink, paper = torch.empty(n, 3), torch.empty(n, 3)
    todo = torch.arange(n)
    while todo.numel():
        a, b = torch.rand(todo.numel(), 3, generator=generator), torch.rand(todo.numel(), 3, generator=generator)
        ok = (a @ luma - b @ luma).abs() >= min_contrast
        ink[todo[ok]], paper[todo[ok]] = a[ok], b[ok]
        todo = todo[~ok]
    return ink, paper


def two_colour_images(coverage: torch.Tensor, ink: torch.Tensor, paper: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] ``(B, 3, H, W)`` from coverage logits ``(B, 1, H, W)`` and colours ``(B, 3)``: each pixel
    is ``s·ink + (1 − s)·paper`` with ``s = sigmoid(coverage)``."""
    s = torch.sigmoid(coverage)
    return s * ink[:, :, None, None] + (1 - s) * paper[:, :, None, None]


PRIOR_SETTINGS = "inversion.json"  # beside a shipped BN prior: the settings its backbone's zoo was inverted with
LOOK_SETTINGS = ("bn_weight", "tv_weight", "two_colour")  # the `InversionConfig` fields that set how surrogates look


def save_prior_settings(folder: Union[str, Path], settings: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """Write the `LOOK_SETTINGS` of `settings` (an `InversionConfig` as a dict; absent fields take its defaults)
    into ``folder/inversion.json``; returns what was written."""
    from .invert import InversionConfig

    look = {k: settings.get(k, getattr(InversionConfig, k)) for k in LOOK_SETTINGS}
    look = {k: None if v is None else float(v) for k, v in look.items()}  # None: an option left off
    InversionConfig(**look)  # range-checked there
    atomic_write_bytes(Path(folder) / PRIOR_SETTINGS, json.dumps(look, indent=1).encode())
    return look


def read_prior_settings(folder: Union[str, Path]) -> dict[str, Optional[float]]:
    """The `LOOK_SETTINGS` in ``folder/inversion.json``; {} when the file is absent.

    Raises:
        ValueError: the file is unreadable, not a JSON object, or holds a value `InversionConfig` refuses.
    """
    from .invert import InversionConfig

    path = Path(folder) / PRIOR_SETTINGS
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of {', '.join(LOOK_SETTINGS)}")
    look = {}
    for k in LOOK_SETTINGS:
        if k in raw:
            v = raw[k]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"{path}: {k}={v!r} is not a finite number")
            look[k] = None if v is None else float(v)
    InversionConfig(**look)  # range-checked there: its error names the setting
    return look
