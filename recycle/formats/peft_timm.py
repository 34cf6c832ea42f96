"""LoRAs in PEFT's layout on timm ViTs: recycle's native format, which PEFT loads into the same timm model.

* ``adapter_config.json``: a PEFT ``LoraConfig`` (``target_modules`` regex, ``r``, ``lora_alpha``, patterns,
  ``modules_to_save=["head"]``, ``base_model_name_or_path`` = the timm backbone).
* ``adapter_model.safetensors``: ``base_model.model.blocks.{i}.attn.qkv.lora_A.weight`` etc., plus
  ``base_model.model.head.{weight,bias}``. Its metadata header carries ``recycle``: JSON with what PEFT has no field
  for (our targets, the class names, provenance).

A q/v LoRA of rank r is stored fused on timm's ``qkv``: ``lora_A = cat(A_q, A_v)`` ``(2r, D)`` and ``lora_B`` block
diagonal ``(3D, 2r)`` with zero k rows; ``lora_alpha = 2r·s`` keeps PEFT's scaling ``alpha / r`` equal to ``s``.
Also read: PEFT adapters saved by others for timm ViTs (raw keys, or transformers' ``timm_model.`` wrapper prefix).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save as safetensors_bytes

from ..adapter import LoRAAdapter, LoRAFormatError, module_groups, module_scaling
from ..io import atomic_write_bytes, dumps_strict, shown
from ..lora import TARGETS, LoRAConfig
from .peft_config import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_peft_config,
    low_rank_pair,
    pattern_value,
    peft_scale_settings,
)

__all__ = ["FORMAT_VERSION", "save_adapter", "from_peft", "timm_key_kind"]

FORMAT_VERSION = 1
_PEFT_PREFIXES = ("base_model.model.timm_model.", "base_model.model.", "timm_model.")
_SUFFIX_TO_TARGET = {v: k for k, v in TARGETS.items() if k != "qv"}  # attn.qkv -> qkv, attn.proj -> proj, ...


def save_adapter(adapter: LoRAAdapter, directory: Union[str, Path]) -> Path:
    """Write `adapter` in PEFT's layout (atomically, file by file). Returns the directory."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    per_module: dict[str, tuple[int, float]] = {}
    for path, group in module_groups(adapter.state).items():
        names = list(group["lora_A"])
        rank = group["lora_A"][names[0]].shape[0]
        if names == ["all"]:
            a, b = group["lora_A"]["all"], group["lora_B"]["all"]
        else:  # q/v slices of qkv -> one rank-2r pair with zero k rows
            a = torch.cat([group["lora_A"][k] for k in ("q", "v")], dim=0)
            d = group["lora_B"]["q"].shape[0]
            b = a.new_zeros(3 * d, 2 * rank)
            b[:d, :rank] = group["lora_B"]["q"]
            b[2 * d :, rank:] = group["lora_B"]["v"]
        scaling = module_scaling(adapter.config, path, rank)
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
        per_module[path] = (a.shape[0], scaling * a.shape[0])
    if adapter.head_weight is not None:
        tensors["base_model.model.head.weight"] = adapter.head_weight.contiguous()
        tensors["base_model.model.head.bias"] = (
            adapter.head_bias if adapter.head_bias is not None else torch.zeros(adapter.num_classes)
        ).contiguous()
    (r, alpha), _ = Counter(per_module.values()).most_common(1)[0]
    # Keys are plain module names, which every PEFT reads: 0.13 falls back to looking the module's full name up
    # verbatim, later versions match each key as a regex at the end of the name ('.' matches itself). Escaped keys
    # (blocks\.0\.mlp...) are read by the later versions only.
    rank_pattern = {p: v[0] for p, v in per_module.items() if v[0] != r}
    alpha_pattern = {p: v[1] for p, v in per_module.items() if v[1] != alpha}
    blocks = sorted({int(p.split(".")[1]) for p in per_module})
    suffixes = sorted({p.split(".", 2)[2] for p in per_module})
    target_regex = rf"blocks\.({'|'.join(map(str, blocks))})\.({'|'.join(re.escape(s) for s in suffixes)})"
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.backbone,
        "auto_mapping": {"base_model_class": "VisionTransformer", "parent_library": "timm.models.vision_transformer"},
        "r": int(r),
        "lora_alpha": float(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": target_regex,
        "modules_to_save": ["head"] if adapter.head_weight is not None else None,
        "lora_dropout": adapter.config.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    meta = {
        "version": FORMAT_VERSION,
        "config": adapter.config.to_dict(),
        "backbone": adapter.backbone,
        "class_names": adapter.class_names,
        "head_input": "pre_logits",
        "info": adapter.info,
    }
    weights = safetensors_bytes(
        {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()},
        metadata={"format": "pt", "recycle": dumps_strict(meta)},
    )
    atomic_write_bytes(directory / ADAPTER_WEIGHTS, weights)
    atomic_write_bytes(directory / ADAPTER_CONFIG, dumps_strict(peft_config, indent=2, sort_keys=True).encode())
    return directory


def _strip_prefix(key: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


_HEAD_NAMES = ("head.weight", "head.bias", "head.fc.weight", "head.fc.bias")
_PAIR = re.compile(r"(blocks\.\d{1,4}\.[\w.]+)\.(lora_A|lora_B)\.weight")


def _key(key: str) -> str:
    return _strip_prefix(key).replace(".default.", ".").replace(".modules_to_save.", ".")


def timm_key_kind(key: str) -> Optional[str]:
    """``"lora"`` or ``"head"`` for a tensor name this reader takes (timm module paths), else None."""
    k = _key(key)
    return "lora" if _PAIR.fullmatch(k) else "head" if k in _HEAD_NAMES else None


def from_peft(cfg: dict, tensors: dict[str, torch.Tensor], meta: dict, name: str) -> LoRAAdapter:
    """An adapter from a PEFT config, its tensors and the ``recycle`` metadata (empty for others' files)."""
    check_peft_config(cfg, name)
    ours = meta.get("config") if meta.get("version") == FORMAT_VERSION else None
    if ours is not None and not isinstance(ours, dict):
        raise LoRAFormatError(f"{name}: the metadata's 'config' must be an object, got {shown(ours)}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = _key(key)
        m = _PAIR.fullmatch(k)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif k in _HEAD_NAMES:
            head[k.rsplit(".", 1)[1]] = t
        else:
            raise LoRAFormatError(
                f"{name}: unsupported tensor {shown(key, 100)} (only LoRA pairs on ViT blocks "
                "(block indices below 10000) and a head are supported)"
            )
    if not pairs:
        raise LoRAFormatError(f"{name}: the file holds no LoRA weights")
    use_rslora, r_default, alpha_default, rank_patterns, alpha_patterns, dropout = peft_scale_settings(cfg, name)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    targets: set[str] = set()
    qv = ours is not None and "qv" in ours.get("targets", ())
    for path, pair in pairs.items():
        a, b = low_rank_pair(pair, path, name)
        suffix = path.split(".", 2)[2]
        if suffix not in _SUFFIX_TO_TARGET:
            raise LoRAFormatError(f"{name}: LoRA on '{path}' is not supported (targets: {sorted(_SUFFIX_TO_TARGET)})")
        file_rank = a.shape[0]
        declared = pattern_value(rank_patterns, path, r_default)
        if declared != file_rank:
            raise LoRAFormatError(f"{name}: {path} has rank {file_rank} but the config says {declared}")
        alpha = float(pattern_value(alpha_patterns, path, alpha_default))
        scaling = alpha / math.sqrt(file_rank) if use_rslora else alpha / file_rank
        target = _SUFFIX_TO_TARGET[suffix]
        if qv and target == "qkv":
            if file_rank % 2:
                raise LoRAFormatError(f"{name}: {path} is marked q/v but has odd rank {file_rank}")
            r = file_rank // 2
            d = b.shape[0] // 3
            off = torch.cat([b[d : 2 * d].flatten(), b[:d, r:].flatten(), b[2 * d :, :r].flatten()])
            if b.shape[0] % 3 or off.abs().max() > 0:
                raise LoRAFormatError(f"{name}: {path} is marked q/v but lora_B is not block diagonal with zero k rows")
            state[f"{path}.lora_A.q"], state[f"{path}.lora_A.v"] = a[:r], a[r:]
            state[f"{path}.lora_B.q"], state[f"{path}.lora_B.v"] = b[:d, :r], b[2 * d :, r:]
            target, rank = "qv", r
        else:
            state[f"{path}.lora_A.all"], state[f"{path}.lora_B.all"] = a, b
            rank = file_rank
        targets.add(target)
        ranks[path] = (rank, scaling * rank)
    (rank, alpha), _ = Counter(ranks.values()).most_common(1)[0]
    extra = {p: {"rank": r, "alpha": a} for p, (r, a) in ranks.items() if (r, a) != (rank, alpha)}
    blocks = sorted({int(p.split(".")[1]) for p in pairs})
    if ours is not None:  # our own file: the exact config it was saved with
        try:
            config = LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ours.items()})
        except (TypeError, ValueError) as e:
            raise LoRAFormatError(f"{name}: invalid LoRA config in the file's metadata: {e}") from None
        if set(config.targets) != targets:
            raise LoRAFormatError(
                f"{name}: the file's metadata names the targets {', '.join(sorted(config.targets))}, but its tensors "
                f"are LoRAs on {', '.join(sorted(targets))}; the file is inconsistent, so it is refused"
            )
        for path, (tensor_rank, _) in sorted(ranks.items()):  # the metadata must describe the tensors it sits on
            override = config.extra.get(path) if isinstance(config.extra, dict) else None
            declared = override.get("rank", config.rank) if isinstance(override, dict) else config.rank
            if declared != tensor_rank:
                raise LoRAFormatError(
                    f"{name}: the file's metadata says rank {shown(declared)} for {path}, but its "
                    f"tensors have rank {tensor_rank}; the file is inconsistent, so it is refused"
                )
    else:
        config = LoRAConfig(
            targets=tuple(sorted(targets)),
            rank=rank,
            alpha=None if alpha == rank else alpha,
            dropout=float(dropout),
            blocks=tuple(blocks),
            extra=extra,
        )
    backbone = meta.get("backbone") or cfg.get("base_model_name_or_path")
    if backbone is not None and not isinstance(backbone, str):
        raise LoRAFormatError(f"{name}: the backbone name must be a string, got {shown(backbone)}")
    info = meta.get("info") or {}
    if not isinstance(info, dict):
        raise LoRAFormatError(f"{name}: the metadata's 'info' must be an object, got {shown(info)}")
    return LoRAAdapter(
        config,
        state,
        backbone=backbone,
        head_weight=head.get("weight"),
        head_bias=head.get("bias"),
        class_names=meta.get("class_names"),
        info=dict(info),
    )
