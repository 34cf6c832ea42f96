"""LoRA on timm Linear modules: layers, injection, merge/unmerge/bake, trainability and state dicts (the settings:
`recycle.lora_config`).

LoRA (Hu et al., 2021) adds a low-rank update to a frozen Linear: ``y = W x + s · B A x`` with A Kaiming-uniform and
B zero, so injection leaves outputs unchanged. LoRA Recycle adapts the q and v projections of every block (rank 4,
``s = 1``). timm fuses q, k and v into one ``attn.qkv`` Linear, so a q/v LoRA is a set of *row slices* of that layer,
each with its own A and B. In memory the slices stay separate; `LoRALinear.fused` gives the equivalent single
rank-``2r`` pair with zero k rows, which is also the PEFT on-disk form.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .lora_config import TARGETS, LoRAConfig

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "TARGETS",
    "inject_lora",
    "remove_lora",
    "merge_lora",
    "unmerge_lora",
    "bake_lora",
    "lora_layers",
    "lora_state_dict",
    "load_lora_state_dict",
    "mark_only_lora_trainable",
    "lora_parameters",
    "lora_suspended",
    "planned_shapes",
]

_logger = logging.getLogger(__name__)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus low-rank updates on row slices of its output.

    Args:
        base_layer: the Linear to adapt; it is kept as ``self.base_layer``.
        rank: rank of each slice's update.
        scaling: multiplier ``s`` of the update.
        slices: name -> (start, end) output rows. ``{"all": (0, out)}`` is plain LoRA.
        dropout: dropout on the LoRA input path.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        scaling: float,
        slices: Optional[dict[str, tuple[int, int]]] = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRA can only wrap nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.rank = rank
        self.scaling = float(scaling)
        self.slices = dict(slices or {"all": (0, base_layer.out_features)})
        self.merged = False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        self.lora_A = nn.ParameterDict(
            {
                k: nn.Parameter(torch.empty(rank, base_layer.in_features, dtype=w.dtype, device=w.device))
                for k in self.slices
            }
        )
        self.lora_B = nn.ParameterDict(
            {
                k: nn.Parameter(torch.zeros(e - s, rank, dtype=w.dtype, device=w.device))
                for k, (s, e) in self.slices.items()
            }
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.lora_B.values():
            nn.init.zeros_(b)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # timm reads `.weight` of some Linears (e.g. dtype checks)
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The update as one pair: A ``(k·r, in)`` and B ``(out, k·r)``, zero outside the slices."""
        names = list(self.slices)
        if names == ["all"]:
            return self.lora_A["all"], self.lora_B["all"]
        a = torch.cat([self.lora_A[k] for k in names], dim=0)
        b = self.lora_B[names[0]].new_zeros(self.out_features, self.rank * len(names))
        for i, k in enumerate(names):
            s, e = self.slices[k]
            b[s:e, i * self.rank : (i + 1) * self.rank] = self.lora_B[k]
        return a, b

    def delta_weight(self) -> torch.Tensor:
        """``s · B A``, shape ``(out, in)``."""
        a, b = self.fused()
        return (b @ a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self._merged_weight.to(x.dtype), self.base_layer.bias)
        y = self.base_layer(x)
        a, b = self.fused()
        return y + F.linear(F.linear(self.dropout(x), a.to(x.dtype)), b.to(x.dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Compute ``W + s·B A`` once and use it until `unmerge` (inference at the bare layer's speed).

        The base weight itself is never written, so a backbone shared by several LoRAs is never altered.
        """
        if self.merged:
            return
        a, b = self.fused()
        w = self.base_layer.weight
        merged = torch.addmm(w, b.to(w.dtype), a.to(w.dtype), alpha=self.scaling)
        if not torch.isfinite(merged).all():
            raise ValueError("refusing to merge LoRA: the merged weight would contain NaN or Inf")
        self._merged_weight = merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        del self._merged_weight
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, slices={self.slices}, merged={self.merged}"


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(_get(model, parent) if parent else model, child, module)


def target_paths(model: nn.Module, config: LoRAConfig) -> dict[str, str]:
    """Module path -> target name for every module `config` selects in `model`."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks`: LoRA targets are defined for timm ViTs")
    wanted = range(len(blocks)) if config.blocks is None else config.blocks
    bad = [b for b in wanted if b >= len(blocks)]
    if bad:
        raise ValueError(f"LoRA block indices {bad} are out of range: the model has {len(blocks)} blocks")
    out = {}
    for i in wanted:
        for t in config.targets:
            path = f"blocks.{i}.{TARGETS[t]}"
            try:
                _get(model, path)
            except AttributeError:
                continue
            out[path] = t
    if not out:
        raise ValueError(f"LoRA targets {list(config.targets)} matched no module in {type(model).__name__}")
    return out


def _slices_for(target: str, layer: nn.Linear) -> dict[str, tuple[int, int]]:
    if target != "qv":
        return {"all": (0, layer.out_features)}
    if layer.out_features % 3:
        raise ValueError(f"cannot split a qkv layer with {layer.out_features} outputs into q, k and v")
    d = layer.out_features // 3
    return {"q": (0, d), "v": (2 * d, 3 * d)}


def wrap_module(
    model: nn.Module,
    path: str,
    rank: int,
    scaling: float,
    slices: Optional[dict[str, tuple[int, int]]] = None,
    dropout: float = 0.0,
) -> LoRALinear:
    """Replace the Linear at `path` by a `LoRALinear` and return it."""
    base = _get(model, path)
    if isinstance(base, LoRALinear):
        raise ValueError(f"{path} already carries a LoRA; call remove_lora() first")
    if not isinstance(base, nn.Linear):
        raise ValueError(f"{path} is a {type(base).__name__}, not a Linear: LoRA cannot be added there")
    layer = LoRALinear(base, rank, scaling, slices, dropout)
    layer.train(base.training)  # the host's mode: a model in eval mode gets a LoRA without dropout
    _set(model, path, layer)
    return layer


def _module_rank(config: LoRAConfig, path: str) -> tuple[int, Optional[float]]:
    override = config.extra.get(path, {})
    return override.get("rank", config.rank), override.get("alpha", config.alpha)


def planned_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, int]]:
    """The `lora_state_dict` keys and shapes that `inject_lora(model, config)` would create, computed without
    allocating anything.

    Raises:
        ValueError: nothing matched, a target is not a Linear, or a rank exceeds ``min(in, out)`` of its slice (such
            an update has no more directions than a full-rank one; refusing it bounds what a config can allocate).
    """
    shapes: dict[str, tuple[int, int]] = {}
    for path, target in target_paths(model, config).items():
        layer = _get(model, path)
        layer = layer.base_layer if isinstance(layer, LoRALinear) else layer
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{path} is a {type(layer).__name__}, not a Linear: LoRA cannot be added there")
        rank, _ = _module_rank(config, path)
        for name, (s, e) in _slices_for(target, layer).items():
            if rank > min(layer.in_features, e - s):
                raise ValueError(
                    f"rank {rank} on {path} exceeds min(in, out) = {min(layer.in_features, e - s)} of that layer"
                )
            shapes[f"{path}.lora_A.{name}"] = (rank, layer.in_features)
            shapes[f"{path}.lora_B.{name}"] = (e - s, rank)
    return shapes


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Add fresh LoRA layers (A Kaiming, B zero) to `model` in place. Returns the adapted module paths.

    Every rank is checked against its layer (`planned_shapes`) before anything is allocated.

    Raises:
        ValueError: nothing matched, a module is already adapted, a target is not a Linear, or a rank exceeds
            ``min(in, out)``.
    """
    planned_shapes(model, config)
    paths = target_paths(model, config)
    for path, target in paths.items():
        rank, alpha = _module_rank(config, path)
        scaling = 1.0 if alpha is None else alpha / rank
        wrap_module(model, path, rank, scaling, _slices_for(target, _get(model, path)), config.dropout)
    _logger.debug("injected LoRA into %d modules", len(paths))
    return list(paths)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def remove_lora(model: nn.Module) -> list[str]:
    """Put the original Linears back (undoing any merge). Returns the restored paths."""
    removed = []
    for name, layer in list(lora_layers(model)):
        layer.unmerge()
        _set(model, name, layer.base_layer)
        removed.append(name)
    return removed


@contextlib.contextmanager
def lora_suspended(model: nn.Module) -> Iterator[None]:
    """Take every LoRA layer off `model` for the duration of the block, then put the same layers back."""
    layers = dict(lora_layers(model))
    for name, layer in layers.items():
        _set(model, name, layer.base_layer)
    try:
        yield
    finally:
        for name, layer in layers.items():
            _set(model, name, layer)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into a merged weight (faster inference; `unmerge_lora` undoes it)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


@torch.no_grad()
def bake_lora(model: nn.Module) -> list[str]:
    """Replace every LoRA layer of `model` by a plain `nn.Linear` holding ``W + s·B A`` for good (for a private copy
    of a model: quantisation or export). Returns the baked paths.

    Raises:
        ValueError: a merged weight would hold NaN or Inf.
    """
    baked = []
    for name, layer in list(lora_layers(model)):
        layer.merge()
        base = layer.base_layer
        plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        plain = plain.to(device=base.weight.device, dtype=base.weight.dtype)
        plain.weight.copy_(layer._merged_weight)
        if base.bias is not None:
            plain.bias.copy_(base.bias)
        plain.requires_grad_(False)
        _set(model, name, plain)
        baked.append(name)
    return baked


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, layer in lora_layers(model) for d in (layer.lora_A, layer.lora_B) for p in d.values()]


def mark_only_lora_trainable(model: nn.Module, *extra: nn.Module) -> int:
    """Freeze everything but the LoRA parameters (and all parameters of `extra` modules, e.g. a head).

    Returns the number of trainable parameters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = lora_parameters(model) + [p for m in extra for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed ``{path}.lora_A.{slice}`` / ``{path}.lora_B.{slice}`` (detached, on CPU)."""
    out = {}
    for name, layer in lora_layers(model):
        for kind, params in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            for k, p in params.items():
                out[f"{name}.{kind}.{k}"] = p.detach().cpu().clone()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors from `lora_state_dict` format into the model's LoRA layers, checking names and shapes."""
    own = {
        f"{name}.{kind}.{k}": p
        for name, layer in lora_layers(model)
        for kind, params in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B))
        for k, p in params.items()
    }
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA state does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, p in own.items():
        t = state[key]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"LoRA tensor {key} has shape {list(t.shape)}, the model expects {list(p.shape)}")
        p.copy_(t.to(p.dtype))
