"""The miniature's foundation model, pretrained without the downstream's labels, as CLIP and DINO are.

A small timm ViT learns by contrast (SimCLR's NT-Xent): two random views of each source image (an affine warp, then
random ink and paper colours, either polarity, as ``glyphs.recolour`` draws them) must embed closer to each other
than to every other view in the batch. The objective is instance discrimination, not the downstream's "same
character in another font", which leaves room for meta-learning; the colour views make the features cover the
downstream's tinted look. The projection head is dropped after pretraining; the [CLS] feature is the embedding.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from recycle.views import change_strokes, random_blur, warp_grid

from .glyphs import recolour

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContrastConfig:
    """Contrastive pretraining settings: AdamW with warm-up and cosine decay, `batch` images (two views each)."""

    steps: int = 1500
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    temperature: float = 0.2  # NT-Xent's softmax temperature
    colour: float = 0.8  # probability that a view is recoloured; the rest stay plain (dark ink on light paper)
    min_contrast: float = 0.35  # the recoloured views' minimum ink/paper luminance difference
    rotate: float = 15.0  # maximum rotation, degrees
    scale: tuple[float, float] = (0.8, 1.15)
    shift: float = 0.1  # maximum translation, fraction of the image side
    # Font-like changes, applied to the glyph before recolouring; 0 turns each off.
    stroke: float = 0.0  # maximum change of stroke weight: ink moves this far toward its 3x3 dilation or erosion
    elastic: float = 0.0  # maximum smooth displacement, pixels (a random field on a 4x4 grid, upsampled)
    blur: float = 0.0  # maximum blend toward the 3x3 box-blurred glyph
    proj_dim: int = 64
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(self.scale))
        checks = [
            ("steps", self.steps >= 1),
            ("batch", self.batch >= 2),
            ("lr", 0 < self.lr < 1),
            ("weight_decay", 0 <= self.weight_decay < 1),
            ("temperature", 0 < self.temperature <= 10),
            ("colour", 0 <= self.colour <= 1),
            ("min_contrast", 0 <= self.min_contrast < 1),
            ("rotate", 0 <= self.rotate <= 180),
            ("shift", 0 <= self.shift < 0.5),
            ("stroke", 0 <= self.stroke <= 1),
            ("elastic", 0 <= self.elastic <= 8),
            ("blur", 0 <= self.blur <= 1),
            ("scale", len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 4),
            ("proj_dim", self.proj_dim >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid contrastive pretraining setting {name}={getattr(self, name)!r}")


def views(x: torch.Tensor, config: ContrastConfig, generator: torch.Generator) -> torch.Tensor:
    """Random views of plain glyphs: uint8 ``(B, 3, H, W)`` -> uint8 ``(B, 3, H, W)``.

    Each image is rotated, scaled, shifted and elastically warped (border pixels extend the paper), its strokes
    thickened or thinned and blurred, then with probability ``config.colour`` drawn in random ink and paper colours.
    """
    b, _, h, w = x.shape
    gray = x.float().mean(1, keepdim=True) / 255
    grid = warp_grid(b, (h, w), config.rotate, config.scale, config.shift, config.elastic, generator)
    gray = F.grid_sample(gray, grid, padding_mode="border", align_corners=False)
    if config.stroke > 0:  # on the ink, 1 - gray
        gray = 1 - change_strokes(1 - gray, config.stroke, generator)
    if config.blur > 0:
        gray = random_blur(gray, config.blur, generator)
    plain = (gray * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    coloured = recolour(plain, generator, config.min_contrast)
    pick = (torch.rand(b, generator=generator) < config.colour).view(-1, 1, 1, 1)
    return torch.where(pick, coloured, plain)


def nt_xent(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's loss over ``z`` ``(2B, D)``, where rows ``i`` and ``i + B`` are views of one image.

    Returns (the mean loss, the share of rows whose nearest other row is their positive).
    """
    n = z.shape[0] // 2
    z = F.normalize(z, dim=-1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target), (sim.argmax(-1) == target).float().mean()


def pretrain_contrastive(
    model: torch.nn.Module,
    x: torch.Tensor,
    config: ContrastConfig,
    mean: torch.Tensor,
    std: torch.Tensor,
    every: int = 0,
    callback: Optional[Callable[[int], None]] = None,
) -> dict:
    """Pretrain `model` (a timm ViT with ``num_classes=0``) in place on uint8 images ``x`` ``(N, 3, H, W)``.

    `mean` and `std` ``(1, 3, 1, 1)`` normalise the views. Returns the last 100 steps' mean loss and positive-match
    accuracy. With `callback` and `every` > 0, ``callback(step)`` runs after every `every` steps, with `model` in
    eval mode (training resumes after it).
    """
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    width = model.num_features
    proj = torch.nn.Sequential(
        torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, config.proj_dim)
    )
    params = list(model.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warm = max(1, config.steps // 20)
    losses, accs = [], []
    model.train()
    for step in range(config.steps):
        lr_now = config.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for g in opt.param_groups:
            g["lr"] = lr_now
        idx = torch.randint(0, x.shape[0], (config.batch,), generator=gen)
        both = torch.cat([views(x[idx], config, gen), views(x[idx], config, gen)])
        loss, acc = nt_xent(proj(model((both.float() / 255 - mean) / std)), config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append(acc.item())
        if (step + 1) % 100 == 0:
            _logger.info(
                "  step %d/%d loss %.3f positive-match %.3f",
                step + 1,
                config.steps,
                sum(losses[-100:]) / 100,
                sum(accs[-100:]) / 100,
            )
        if callback is not None and every > 0 and (step + 1) % every == 0:
            model.eval()
            callback(step + 1)
            model.train()
    model.eval()
    tail = slice(-min(100, len(losses)), None)
    return {
        "loss": round(sum(losses[tail]) / len(losses[tail]), 4),
        "positive_match": round(sum(accs[tail]) / len(accs[tail]), 4),
    }
