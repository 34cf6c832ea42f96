"""What LoRA adds to a ViT and where: `LoRAConfig` (targets, rank, scale, blocks, per-module overrides), validated
when made, and the target names (`TARGETS`)."""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["LoRAConfig", "TARGETS"]

# Target name -> module path inside a timm ViT block. "qv" is the q and v row slices of the fused qkv.
TARGETS = {"qv": "attn.qkv", "qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


MAX_ALPHA = 1e6  # a larger LoRA alpha scales updates past float32's range once merged


def _is_alpha(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_ALPHA


@dataclass
class LoRAConfig:
    """Where and how to add LoRA. Defaults are the paper's (q and v of every block, rank 4, scale 1)."""

    targets: tuple[str, ...] = ("qv",)  # any of TARGETS; "qv" and "qkv" are exclusive
    rank: int = 4
    alpha: Optional[float] = None  # scaling = alpha / rank; None means alpha = rank, i.e. scaling 1.0 (the paper's)
    dropout: float = 0.0
    blocks: Optional[tuple[int, ...]] = None  # block indices to adapt; None = all
    extra: dict = field(default_factory=dict)  # per-module overrides: {module path: {"rank": r, "alpha": a}}

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ValueError("LoRAConfig.targets is empty: name at least one of " + ", ".join(TARGETS))
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {sorted(TARGETS)}")
        if "qv" in self.targets and "qkv" in self.targets:
            raise ValueError("LoRA targets 'qv' and 'qkv' overlap (both adapt attn.qkv); choose one")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"duplicate LoRA targets in {self.targets}")
        if not _is_rank(self.rank):
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not _is_alpha(self.alpha):
            raise ValueError(f"LoRA alpha must be a positive number of at most {MAX_ALPHA:g}, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.blocks is not None:
            try:
                if any(isinstance(b, bool) for b in self.blocks):
                    raise TypeError
                self.blocks = tuple(operator.index(b) for b in self.blocks)
            except TypeError:
                raise ValueError(f"LoRA block indices must be integers, got {self.blocks!r}") from None
            if any(b < 0 for b in self.blocks):
                raise ValueError(f"LoRA block indices must be >= 0, got {self.blocks}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"LoRA per-module overrides must be a mapping, got {self.extra!r}")
        for path, override in self.extra.items():
            if (
                not isinstance(override, dict)
                or set(override) - {"rank", "alpha"}
                or not _is_rank(override.get("rank", 1))
                or not _is_alpha(override.get("alpha", 1.0))
            ):
                raise ValueError(
                    f"LoRA override for {path!r} must be {{'rank': positive int, 'alpha': positive "
                    f"number}}, got {override!r}"
                )

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)
