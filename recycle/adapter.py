"""`LoRAAdapter`: a LoRA, its optional classification head and its provenance, independent of any file format.

The LoRA tensors use `recycle.lora.lora_state_dict`'s layout; the head is a Linear on the backbone's pre-logits
feature, i.e. exactly the ``head`` of ``timm.create_model(backbone, num_classes=N)``. `average_loras` merges a zoo
into one adapter, exactly. The on-disk formats are in `recycle.formats`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .io import shown
from .lora import (
    LoRAConfig,
    inject_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    planned_shapes,
    remove_lora,
)

__all__ = ["LoRAAdapter", "LoRAFormatError", "average_loras", "module_groups", "module_scaling"]


class LoRAFormatError(ValueError):
    """A LoRA file that cannot be used. The message says which file and why."""


@dataclass
class LoRAAdapter:
    """A LoRA, its optional classification head and everything needed to rebuild the model.

    Attributes:
        config: targets, rank, scaling and blocks.
        state: LoRA tensors in `recycle.lora.lora_state_dict` layout.
        backbone: the backbone name it was tuned on, if known.
        head_weight, head_bias: head on the pre-logits feature, ``(N, num_features)`` and ``(N,)``.
        class_names: the head's classes, in output order.
        info: free-form provenance (how it was made).
    """

    config: LoRAConfig
    state: dict[str, torch.Tensor]
    backbone: Optional[str] = None
    head_weight: Optional[torch.Tensor] = None
    head_bias: Optional[torch.Tensor] = None
    class_names: Optional[list[str]] = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        for key, t in self.tensors().items():
            if not torch.is_floating_point(t):
                raise LoRAFormatError(f"LoRA tensor {key} has dtype {t.dtype}; floating point is required")
            if t.numel() == 0:  # a zero-size tensor can declare any rank or class count while holding nothing
                raise LoRAFormatError(f"LoRA tensor {key} has shape {list(t.shape)}, with no elements")
            if not torch.isfinite(t).all():
                raise LoRAFormatError(f"LoRA tensor {key} contains NaN or Inf values")
        if self.class_names is not None and (
            not isinstance(self.class_names, (list, tuple)) or not all(isinstance(c, str) for c in self.class_names)
        ):
            raise LoRAFormatError(f"class names must be a list of strings, got {shown(self.class_names)}")
        if self.head_weight is not None:
            if self.head_weight.ndim != 2:
                raise LoRAFormatError(
                    f"the head weight has shape {list(self.head_weight.shape)}; a matrix "
                    "(classes, features) is expected"
                )
            n = self.head_weight.shape[0]
            if self.head_bias is not None and tuple(self.head_bias.shape) != (n,):
                raise LoRAFormatError(f"head bias has shape {list(self.head_bias.shape)}, expected [{n}]")
            if self.class_names is None:
                self.class_names = [f"class_{i}" for i in range(n)]
            if len(self.class_names) != n:
                raise LoRAFormatError(f"the head has {n} outputs but {len(self.class_names)} class names are given")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.state)
        if self.head_weight is not None:
            out["head.weight"] = self.head_weight
        if self.head_bias is not None:
            out["head.bias"] = self.head_bias
        return out

    @property
    def num_classes(self) -> int:
        return 0 if self.head_weight is None else int(self.head_weight.shape[0])

    def fingerprint(self) -> str:
        """A content hash: equal adapters have equal fingerprints."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for key, t in sorted(self.tensors().items()):
            h.update(key.encode())
            h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        config: LoRAConfig,
        head: Optional[nn.Linear] = None,
        class_names: Optional[list[str]] = None,
        backbone: Optional[str] = None,
        info: Optional[dict] = None,
    ) -> "LoRAAdapter":
        """Snapshot the LoRA layers of `model` (and `head`) into an adapter."""
        state = lora_state_dict(model)
        if not state:
            raise ValueError("the model carries no LoRA layers")
        hw = head.weight.detach().cpu().clone() if head is not None else None
        hb = head.bias.detach().cpu().clone() if head is not None and head.bias is not None else None
        return cls(config, state, backbone, hw, hb, list(class_names) if class_names else None, dict(info or {}))

    def inject(self, model: nn.Module) -> list[str]:
        """Add this LoRA to a timm ViT in place. Every shape and rank is checked against the backbone before
        anything is allocated. Use `remove_lora` to take it off."""
        made_for = f" (it was made for '{self.backbone}')" if self.backbone else ""
        try:
            planned = planned_shapes(model, self.config)
        except ValueError as e:
            raise LoRAFormatError(f"this LoRA does not fit the backbone{made_for}: {e}") from None
        wrong = [
            f"{k} has shape {list(self.state[k].shape)}, the backbone needs {list(v)}"
            for k, v in planned.items()
            if k in self.state and tuple(self.state[k].shape) != v
        ]
        missing, unexpected = sorted(set(planned) - set(self.state)), sorted(set(self.state) - set(planned))
        if wrong or missing or unexpected:
            detail = "; ".join(wrong[:2]) or f"missing {missing[:4]}, unexpected {unexpected[:4]}"
            raise LoRAFormatError(f"this LoRA does not fit the backbone{made_for}: {detail}")
        try:
            paths = inject_lora(model, self.config)
        except ValueError as e:
            raise LoRAFormatError(f"this LoRA does not fit the backbone: {e}") from None
        try:
            load_lora_state_dict(model, self.state)
        except ValueError as e:
            remove_lora(model)
            raise LoRAFormatError(f"this LoRA does not fit the backbone{made_for}: {e}") from None
        return paths

    @contextlib.contextmanager
    def attached(self, backbone, merged: bool = False) -> Iterator[Optional[nn.Linear]]:
        """Attach this LoRA to `backbone` (a `Backbone`) for the duration of the block; yields the head or None.

        Holds the backbone's lock, so classifiers and teachers can share one backbone safely. The model runs in
        eval mode meanwhile (a teacher is deterministic: no LoRA or backbone dropout) and gets its mode back after.
        ``merged=True`` folds the update into the base weights (inference at the bare model's speed); the original
        weights are restored exactly afterwards.
        """
        with backbone.lock:
            was_training = backbone.model.training
            backbone.model.eval()
            self.inject(backbone.model)
            try:
                if merged:
                    try:
                        merge_lora(backbone.model)
                    except ValueError as e:  # a finite LoRA whose update overflows the weights
                        raise LoRAFormatError(f"this LoRA cannot be used: {e}") from None
                head = self.build_head(backbone.num_features)
                yield head.to(backbone.device) if head is not None else None
            finally:
                remove_lora(backbone.model)
                backbone.model.train(was_training)

    def build_head(self, num_features: int) -> Optional[nn.Linear]:
        """The head as an `nn.Linear` on a ``num_features`` pre-logits feature, or None if there is none."""
        if self.head_weight is None:
            return None
        n, d = self.head_weight.shape
        if d != num_features:
            made_for = f" (it was made for '{self.backbone}')" if self.backbone else ""
            raise LoRAFormatError(f"the LoRA's head takes {d} features but the backbone gives {num_features}{made_for}")
        head = nn.Linear(d, n, bias=True)
        with torch.no_grad():
            head.weight.copy_(self.head_weight)
            head.bias.copy_(self.head_bias if self.head_bias is not None else torch.zeros(n))
        return head


def average_loras(adapters: Sequence[LoRAAdapter]) -> LoRAAdapter:
    """Uniform merge ``ΔW = (1/n) Σ s_i B_i A_i``, exactly, as one LoRA of rank ``Σ r_i`` (A stacked, B/n side by
    side). All adapters must have the same targets; heads are dropped."""
    if not adapters:
        raise ValueError("no LoRAs to average")
    first = adapters[0]
    keys = set(first.state)
    for a in adapters[1:]:
        if set(a.state) != keys:
            raise ValueError("LoRAs with different targets cannot be averaged")
    if any(a.config.extra or a.config.rank != first.config.rank for a in adapters):
        raise ValueError("only LoRAs of one rank without per-module overrides can be averaged")
    n = len(adapters)
    state = {}
    for key in sorted(keys):
        if ".lora_A." in key:
            state[key] = torch.cat([a.state[key] for a in adapters], dim=0)
        else:
            state[key] = torch.cat([a.state[key] * a.config.scaling / n for a in adapters], dim=1)
    config = LoRAConfig(
        targets=first.config.targets, rank=first.config.rank * n, alpha=None, blocks=first.config.blocks
    )
    return LoRAAdapter(config, state, first.backbone, info={"averaged": n})


def module_groups(state: dict[str, torch.Tensor]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """``{path: {"lora_A": {slice: t}, "lora_B": {slice: t}}}`` from a lora_state_dict."""
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in state.items():
        path, kind, slice_name = key.rsplit(".", 2)
        groups.setdefault(path, {"lora_A": {}, "lora_B": {}})[kind][slice_name] = t
    return groups


def module_scaling(config: LoRAConfig, path: str, rank: int) -> float:
    """The scale ``alpha / rank`` of the LoRA on module `path`, after `config`'s per-module overrides."""
    override = config.extra.get(path, {})
    alpha = override.get("alpha", config.alpha)
    return 1.0 if alpha is None else float(alpha) / rank
