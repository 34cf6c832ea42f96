"""Meta-training settings (`MetaConfig`, validated when made) and the learning-rate schedule (`cyclic_lr`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .episodes import EpisodeSpec
from .lora_config import LoRAConfig
from .runtime import check_bf16_flag
from .views import ViewConfig

__all__ = ["MetaConfig", "cyclic_lr", "MAX_META_LR", "MAX_TEACHER_TEMPERATURE"]


# Upper bounds of the float settings (comparisons with NaN fail, so NaN and infinity are refused too).
MAX_META_LR = 1.0
MAX_TEACHER_TEMPERATURE = 100.0
_EXPECTED = {
    "lr": f"a number above 0 and at most {MAX_META_LR:g}",
    "teacher_temperature": f"a number above 0 and at most {MAX_TEACHER_TEMPERATURE:g}",
    "cross_fraction": "a fraction from 0 to 1",
    "min_lr": "a number from 0 to lr",
}


@dataclass
class MetaConfig:
    """Meta-training settings; defaults follow the paper (5-way 1-shot, 15 queries, Adam 1e-3, 25+75 cycle)."""

    steps: int = 1000
    way: int = 5
    shot: int = 1
    query: int = 15
    masked: bool = False  # feed masked pool images as their kept tokens only
    cross_fraction: float = 0.5  # share of cross-LoRA (CE) episodes; the rest are single-LoRA (KL) episodes
    # KL target = softmax(teacher_logits / teacher_temperature). Soft teacher heads against sharp −‖q − c‖₂ student
    # logits make KL fall only by pulling the classes together; T < 1 sharpens the target (choose T on validation).
    teacher_temperature: float = 1.0
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 25
    cycle: int = 100  # warm-up + cosine steps per cycle
    flip: bool = True  # random horizontal flip of each image
    distance: str = "l2"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    checkpoint_every: int = 50
    val_every: int = 0  # 0 = no validation
    val_episodes: int = 100
    seed: int = 0
    episode_batch: int = 1  # episodes per optimiser step (loss averaged); split across ranks under torchrun
    bf16: bool = False  # the backbone's forward and backward under bf16 autocast (`recycle.runtime.mixed_precision`)
    # A random view of every support and query image (`recycle.views`): warps, stroke weight, blur, new colours, so
    # that one surrogate stands for many renderings of its class. The teacher's stored logits stay the target of a
    # single-LoRA episode (a view keeps the class, as a flip does). None: the images as inverted.
    views: Optional[ViewConfig] = None
    # With views: the single-LoRA episodes' KL target is the source LoRA's output on each query's view
    # (`recycle.episodes.PoolTeachers`, which meta_train then needs) instead of the logits stored for the surrogate.
    teacher_on_views: bool = False

    def __post_init__(self):
        check_bf16_flag(self.bf16)
        if isinstance(self.views, dict):
            self.views = ViewConfig(**self.views)
        if self.views is not None and not isinstance(self.views, ViewConfig):
            raise ValueError(f"invalid meta-training setting views={self.views!r}: expected a ViewConfig or None")
        if self.teacher_on_views not in (True, False) or (self.teacher_on_views and self.views is None):
            raise ValueError(
                f"invalid meta-training setting teacher_on_views={self.teacher_on_views!r}: expected True (with views) "
                "or False"
            )
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.lora.items()})
        checks = [
            ("steps", self.steps >= 1),
            ("cross_fraction", 0.0 <= self.cross_fraction <= 1.0),
            ("teacher_temperature", 0 < self.teacher_temperature <= MAX_TEACHER_TEMPERATURE),
            ("lr", 0 < self.lr <= MAX_META_LR),
            ("min_lr", 0 <= self.min_lr <= self.lr),
            ("warmup", 0 <= self.warmup < self.cycle),
            ("cycle", self.cycle >= 1),
            ("checkpoint_every", self.checkpoint_every >= 1),
            ("val_every", self.val_every >= 0),
            ("val_episodes", self.val_episodes >= 1),
            ("distance", self.distance in ("l2", "sqeuclidean")),
            ("episode_batch", self.episode_batch >= 1),
            ("seed", isinstance(self.seed, int) and 0 <= self.seed < 2**63),
        ]
        for name, ok in checks:
            if not ok:
                expected = _EXPECTED.get(name)
                raise ValueError(
                    f"invalid meta-training setting {name}={getattr(self, name)!r}"
                    + (f": expected {expected}" if expected else "")
                )
        self.spec  # validates way/shot/query

    @property
    def spec(self) -> EpisodeSpec:
        return EpisodeSpec(self.way, self.shot, self.query)


def cyclic_lr(step: int, lr: float = 1e-3, min_lr: float = 1e-5, warmup: int = 25, cycle: int = 100) -> float:
    """Learning rate at `step`: linear warm-up min_lr → lr over `warmup` steps, then cosine back to min_lr, repeating
    every `cycle` steps."""
    t = step % cycle
    if t < warmup:
        return min_lr + (lr - min_lr) * t / warmup
    progress = (t - warmup) / max(1, cycle - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
