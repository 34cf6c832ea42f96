"""Random views of surrogate images at meta-training time: one inverted image becomes many plausible renderings.

Inverted surrogates of one class are near copies of one pattern, so episodes built from them are far easier than
real ones. A view changes an image the way another rendering of the same class would: a small affine and elastic
warp, thicker or thinner strokes, a blur, and new ink and paper colours. The stroke, blur and colour changes act on
a two-tone decomposition of the image (`two_tone`): a paper colour, an ink colour, a coverage map between them, and
a residual that the decomposition does not explain. Natural images decompose poorly (a large residual); their views
are then mostly the warp and the residual carried along.

All functions work on float images in [0, 1], ``(n, 3, H, W)``, and draw their randomness from a given
`torch.Generator`, so a meta-training run stays reproducible and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .priors import ink_and_paper

__all__ = ["ViewConfig", "two_tone", "random_views", "kept_pixels", "warp_grid", "change_strokes", "random_blur"]


@dataclass(frozen=True)
class ViewConfig:
    """How far a view may move from its image; every change is drawn uniformly per image, and 0 turns it off."""

    rotate: float = 0.0  # maximum rotation, degrees
    scale: tuple[float, float] = (1.0, 1.0)  # zoom range (> 1 enlarges the content)
    shift: float = 0.0  # maximum translation, fraction of the image side
    elastic: float = 0.0  # maximum smooth displacement, pixels (a random field on a 4x4 grid, upsampled)
    stroke: float = 0.0  # maximum move of the coverage toward its 3x3 dilation (thicker) or erosion (thinner)
    blur: float = 0.0  # maximum blend toward the 3x3 box-blurred coverage
    recolour: float = 0.0  # probability that a view is redrawn in new ink and paper colours
    min_contrast: float = 0.35  # the new colours' minimum luminance difference

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        checks = [
            ("rotate", 0 <= self.rotate <= 180),
            ("scale", len(self.scale) == 2 and 0.25 <= self.scale[0] <= self.scale[1] <= 4),
            ("shift", 0 <= self.shift < 0.5),
            ("elastic", 0 <= self.elastic <= 8),
            ("stroke", 0 <= self.stroke <= 1),
            ("blur", 0 <= self.blur <= 1),
            ("recolour", 0 <= self.recolour <= 1),
            ("min_contrast", 0 <= self.min_contrast < 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid view setting {name}={getattr(self, name)!r}")

    @property
    def geometric(self) -> bool:
        return self.rotate > 0 or self.scale != (1.0, 1.0) or self.shift > 0 or self.elastic > 0


def two_tone(
    x: torch.Tensor, valid: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decompose images into paper + coverage · (ink − paper) + residual.

    Args:
        x: images ``(n, 3, H, W)`` in [0, 1].
        valid: optional ``(n, 1, H, W)`` bool, the pixels the colours are estimated from (a masked image's kept
            patches); all pixels when None.

    Returns:
        paper ``(n, 3)``: the per-channel median colour; ink ``(n, 3)``: the mean of the 10% of pixels farthest from
        the paper; coverage ``(n, 1, H, W)`` in [0, 1]: each pixel's position on the paper-to-ink axis; residual
        ``(n, 3, H, W)``: what the first three leave.
    """
    n = x.shape[0]
    flat = x.flatten(2)  # (n, 3, HW)
    mask = torch.ones_like(flat[:, :1], dtype=torch.bool) if valid is None else valid.flatten(2).bool()
    # Invalid pixels become NaN, which nanmedian and the ranking below skip.
    pixels = flat.masked_fill(~mask, float("nan"))
    paper = pixels.nanmedian(dim=2).values.nan_to_num(0.5)  # (n, 3)
    dist = (pixels - paper[:, :, None]).norm(dim=1).nan_to_num(-1.0)  # (n, HW); invalid pixels rank last
    top = max(1, int(0.1 * mask.sum(dim=2).min().clamp(min=1)))
    idx = dist.topk(top, dim=1).indices  # (n, top)
    ink = flat.gather(2, idx[:, None, :].expand(n, 3, top)).mean(2)
    axis = ink - paper  # (n, 3)
    norm2 = (axis * axis).sum(1)
    usable = norm2 > 1e-4  # a near-uniform image has no ink: all of it is paper plus residual
    safe = torch.where(usable, norm2, torch.ones_like(norm2))
    coverage = ((x - paper[:, :, None, None]) * axis[:, :, None, None]).sum(1, keepdim=True) / safe[:, None, None, None]
    coverage = torch.where(usable[:, None, None, None], coverage.clamp(0, 1), torch.zeros_like(coverage))
    residual = x - (paper[:, :, None, None] + coverage * axis[:, :, None, None])
    return paper, ink, coverage, residual


def warp_grid(
    n: int,
    size: tuple[int, int],
    rotate: float,
    scale: tuple[float, float],
    shift: float,
    elastic: float,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """A random sampling grid ``(n, H, W, 2)`` for `F.grid_sample`: a rotation of up to `rotate` degrees, a zoom in
    `scale`, a shift of up to `shift` of the side, then a smooth elastic field of up to `elastic` pixels."""
    h, w = size
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotate)
    lo, hi = scale
    zoom = lo + (hi - lo) * torch.rand(n, generator=generator)
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * 2 * shift  # grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    if elastic > 0:
        field = (torch.rand(n, 2, 4, 4, generator=generator) * 2 - 1) * (2 * elastic / w)
        grid = grid + F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    return grid


def change_strokes(coverage: torch.Tensor, stroke: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Ink coverage ``(n, 1, H, W)`` moved by a random amount of up to `stroke` toward its 3x3 dilation (thicker
    strokes) or erosion (thinner), per image."""
    n = coverage.shape[0]
    amount = ((torch.rand(n, generator=generator) * 2 - 1) * stroke).view(-1, 1, 1, 1).to(coverage.device)
    dilated = F.max_pool2d(coverage, 3, 1, 1)
    eroded = -F.max_pool2d(-coverage, 3, 1, 1)
    return coverage + amount.clamp(min=0) * (dilated - coverage) + (-amount).clamp(min=0) * (eroded - coverage)


def random_blur(x: torch.Tensor, blur: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Maps ``(n, 1, H, W)`` blended by a random amount of up to `blur` toward their 3x3 box blur, per image."""
    amount = (torch.rand(x.shape[0], generator=generator) * blur).view(-1, 1, 1, 1).to(x.device)
    return x + amount * (F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1) - x)


def random_views(
    x: torch.Tensor,
    config: ViewConfig,
    generator: Optional[torch.Generator] = None,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One random view of each image: ``(n, 3, H, W)`` in [0, 1] -> ``(n, 3, H, W)`` in [0, 1].

    With `valid` (``(n, 1, H, W)`` bool: a masked image's kept patches), the colours are estimated from the valid
    pixels and the warp is skipped, so that no pixel moves across a patch boundary into or out of the kept set.
    """
    n, _, h, w = x.shape
    device = x.device
    paper, ink, coverage, residual = two_tone(x.float(), valid)
    if config.geometric and valid is None:
        c = config
        grid = warp_grid(n, (h, w), c.rotate, c.scale, c.shift, c.elastic, generator).to(device)
        both = F.grid_sample(torch.cat([coverage, residual], 1), grid, padding_mode="border", align_corners=False)
        coverage, residual = both[:, :1], both[:, 1:]
    if config.stroke > 0:
        coverage = change_strokes(coverage, config.stroke, generator)
    if config.blur > 0:
        coverage = random_blur(coverage, config.blur, generator)
    kept_colours = paper[:, :, None, None] + coverage * (ink - paper)[:, :, None, None] + residual
    if config.recolour > 0:
        new_ink, new_paper = (c.to(device) for c in ink_and_paper(n, config.min_contrast, generator))
        redrawn = new_paper[:, :, None, None] + coverage * (new_ink - new_paper)[:, :, None, None]
        pick = (torch.rand(n, generator=generator) < config.recolour).view(-1, 1, 1, 1).to(device)
        out = torch.where(pick, redrawn, kept_colours)
    else:
        out = kept_colours
    if valid is not None:
        out = torch.where(valid, out, x)
    return out.clamp(0, 1).to(x.dtype)


def kept_pixels(kept: list[torch.Tensor], grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Pixel masks ``(n, 1, H, W)`` of the kept patches: `kept` holds each image's kept patch indices (row-major over
    the `grid` of patches)."""
    gh, gw = grid
    h, w = size
    masks = torch.zeros(len(kept), gh * gw, dtype=torch.bool)
    for i, k in enumerate(kept):
        masks[i, k.long()] = True
    masks = masks.view(-1, 1, gh, gw).float()
    return F.interpolate(masks, size=(h, w), mode="nearest").bool()
