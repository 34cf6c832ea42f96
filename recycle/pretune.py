"""Pre-tune one LoRA of a zoo: a LoRA and a head on one seeded N-way task, as people tune the LoRAs they publish.

Each LoRA is trained with Adam (lr 1e-3) on the first 80% of every class's images and scored on the rest
(`tune_lora`); `sample_tasks` draws the zoo's tasks. The zoo itself (making, loading and inverting one) is
`recycle.zoo`; the official release lacks this stage.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .backbone import Backbone
from .adapter import LoRAAdapter
from .lora import LoRAConfig, inject_lora, lora_parameters, remove_lora

__all__ = ["PretuneConfig", "sample_tasks", "augment", "tune_lora"]

_logger = logging.getLogger(__name__)


@dataclass
class PretuneConfig:
    num_loras: int = 100
    way: int = 5
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    holdout: float = 0.2  # share of each class's images held out to score the LoRA
    flip: bool = True  # random horizontal flips
    shift: float = 0.125  # random translation, as a fraction of the image size
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.lora.items()})
        checks = [
            ("num_loras", self.num_loras >= 1),
            ("way", self.way >= 2),
            ("steps", self.steps >= 1),
            ("lr", 0 < self.lr <= 1),
            ("batch_size", self.batch_size >= 1),
            ("holdout", 0 <= self.holdout < 1),
            ("shift", 0 <= self.shift < 0.5),
        ]
        for name, ok in checks:
            if not ok:
                expected = {
                    "lr": "a number above 0 and at most 1",
                    "shift": "a fraction from 0 to 0.5 (excluded)",
                    "holdout": "a fraction from 0 to 1 (excluded)",
                }.get(name)
                raise ValueError(
                    f"invalid pre-tuning setting {name}={getattr(self, name)!r}"
                    + (f": expected {expected}" if expected else "")
                )


def sample_tasks(num_classes: int, num_loras: int, way: int, seed: int) -> list[list[int]]:
    """`num_loras` seeded N-way class subsets (sorted), each drawn independently."""
    if num_classes < way:
        raise ValueError(f"a {way}-way task needs {way} classes but the dataset has {num_classes}")
    rng = random.Random(seed)
    return [sorted(rng.sample(range(num_classes), way)) for _ in range(num_loras)]


def augment(x: torch.Tensor, flip: bool, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image random horizontal flip and translation (zero padding), ``(B, C, H, W)``."""
    b, _, h, w = x.shape
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    if shift > 0:
        ph, pw = int(h * shift), int(w * shift)
        padded = F.pad(x, (pw, pw, ph, ph))
        dy = torch.randint(0, 2 * ph + 1, (b,), generator=generator).tolist()
        dx = torch.randint(0, 2 * pw + 1, (b,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    return x


def tune_lora(
    backbone: Backbone,
    x: torch.Tensor,
    y: torch.Tensor,
    config: PretuneConfig,
    seed: int,
    eval_x: Optional[torch.Tensor] = None,
    eval_y: Optional[torch.Tensor] = None,
) -> tuple[LoRAAdapter, float]:
    """Train a fresh LoRA and head on normalised images ``x`` ``(n, 3, H, W)`` with labels ``y`` ``(n,)``.

    Returns the adapter (without class names) and the accuracy on ``(eval_x, eval_y)`` (NaN if not given).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = backbone.device
    inject_lora(backbone.model, config.lora)
    try:
        backbone.model.to(device)
        head = torch.nn.Linear(backbone.num_features, int(y.max()) + 1).to(device)
        params = lora_parameters(backbone.model) + list(head.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=config.lr)
        backbone.model.train()
        for _ in range(config.steps):
            idx = torch.randint(0, x.shape[0], (min(config.batch_size, x.shape[0]),), generator=gen)
            xb = augment(x[idx], config.flip, config.shift, gen).to(device)
            loss = F.cross_entropy(head(backbone.pre_logits(xb)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        backbone.model.eval()
        acc = float("nan")
        if eval_x is not None and len(eval_x):
            with torch.no_grad():
                preds = torch.cat(
                    [
                        head(backbone.pre_logits(eval_x[i : i + 64].to(device))).argmax(-1).cpu()
                        for i in range(0, len(eval_x), 64)
                    ]
                )
            acc = (preds == eval_y).float().mean().item()
        adapter = LoRAAdapter.from_model(backbone.model, config.lora, head, backbone=backbone.name)
    finally:
        remove_lora(backbone.model)
    return adapter, acc
