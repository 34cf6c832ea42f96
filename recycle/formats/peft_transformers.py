"""PEFT LoRA adapters made on transformers models, mapped onto timm ViTs, and written back in that layout.

Read (`from_transformers_peft`):

* ``ViTForImageClassification`` / ``ViTModel`` adapters (PEFT's image-classification guide), in the "old" module
  names of transformers 4 and 5.0 (``vit.encoder.layer.{i}.attention.attention.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``) or the "new" ones of later 5.x releases
  (``vit.layers.{i}.attention.{q,k,v,o}_proj``, ``mlp.fc1``, ``mlp.fc2``), with the ``classifier`` as head
  (``modules_to_save``);
* CLIP vision adapters (``vision_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``), usually
  without a head, onto timm's CLIP.

q, k and v land on the row blocks 0:d, d:2d and 2d:3d of timm's fused ``attn.qkv``. A q/v pair of equal rank and
scale becomes recycle's ``qv`` slices; any other q/k/v combination one fused ``qkv`` LoRA (A stacked, B block
diagonal, each part's scale folded into its B), so the update is the same. The other modules map to
``attn.proj``, ``mlp.fc1`` and ``mlp.fc2``. The scale of every module, ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)
after ``rank_pattern`` and ``alpha_pattern``, is kept; the per-module overrides are re-keyed by timm's paths.

Write (`save_transformers_peft`): the inverse for a ViT, in either name layout, loadable by
``PeftModel.from_pretrained`` on ``ViTForImageClassification`` (a LoRA with a head) or ``ViTModel`` (without).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save as safetensors_bytes

from ..adapter import LoRAAdapter, LoRAFormatError, module_groups, module_scaling
from ..io import atomic_write_bytes, dumps_strict, shown
from ..lora import LoRAConfig
from ..provenance import EQUIVALENT
from .peft_config import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_peft_config,
    low_rank_pair,
    pattern_value,
    peft_scale_settings,
)

__all__ = [
    "is_transformers_adapter",
    "transformers_key_kind",
    "from_transformers_peft",
    "save_transformers_peft",
    "CLIP_BASES",
    "LAYOUTS",
]

_logger = logging.getLogger(__name__)

# transformers CLIP repositories -> the timm model holding the same weights.
CLIP_BASES = {hub: timm_name for hub, timm_name in EQUIVALENT.items() if hub.startswith("openai/clip-")}
LAYOUTS = ("new", "old")

# Module name (after "base_model.model.") -> (family, block, part). Parts: q, k, v, proj, fc1, fc2.
_PATTERNS = [
    (
        "old",
        re.compile(
            r"(?:vit\.|deit\.)?encoder\.layer\.(\d{1,4})\.(attention\.attention\.(?:query|key|value)"
            r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
        ),
    ),
    ("new", re.compile(r"(?:vit\.|deit\.)?layers\.(\d{1,4})\.(attention\.[qkvo]_proj|mlp\.fc[12])")),
    (
        "clip",
        re.compile(
            r"(?:(?:model\.)?vision_model\.)?encoder\.layers\.(\d{1,4})\.(self_attn\.(?:[qkv]|out)_proj"
            r"|mlp\.fc[12])"
        ),
    ),
]
_PARTS = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "proj",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.o_proj": "proj",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.out_proj": "proj",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
}
_TIMM_PATH = {"proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
# The names `save_transformers_peft` writes, per layout.
_WRITE_NAMES = {
    "old": (
        "encoder.layer.{i}.",
        {
            "q": "attention.attention.query",
            "k": "attention.attention.key",
            "v": "attention.attention.value",
            "proj": "attention.output.dense",
            "fc1": "intermediate.dense",
            "fc2": "output.dense",
        },
    ),
    "new": (
        "layers.{i}.",
        {
            "q": "attention.q_proj",
            "k": "attention.k_proj",
            "v": "attention.v_proj",
            "proj": "attention.o_proj",
            "fc1": "mlp.fc1",
            "fc2": "mlp.fc2",
        },
    ),
}


def _module_key(key: str) -> str:
    """A PEFT tensor key without PEFT's prefix and adapter name: the module path in the transformers model."""
    key = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
    return key.replace(".modules_to_save.default.", ".").replace(".default.", ".").replace(".modules_to_save.", ".")


def _match(module: str) -> Optional[tuple[str, int, str]]:
    for family, pattern in _PATTERNS:
        m = pattern.fullmatch(module)
        if m:
            return family, int(m.group(1)), _PARTS[m.group(2)]
    return None


def transformers_key_kind(key: str) -> Optional[str]:
    """``"lora"`` or ``"head"`` for a tensor name this reader takes (transformers ViT or CLIP module names), else
    None."""
    module = _module_key(key)
    m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", module)
    if m and _match(m.group(1)):
        return "lora"
    return "head" if module in ("classifier.weight", "classifier.bias") else None


def is_transformers_adapter(tensors: dict) -> bool:
    """True when a PEFT adapter's keys name transformers ViT or CLIP modules, or its ``classifier`` (not timm's
    ``blocks.{i}`` and ``head``)."""
    return any(transformers_key_kind(key) is not None for key in tensors)


def _class_names(folder: Optional[Path], backbone, n: int, name: str, base: Optional[str]) -> Optional[list[str]]:
    """``id2label`` of the adapter's own config.json, else the backbone's (when it names `n` classes and is not known
    to be another model than the adapter's `base`), else None."""
    from ..transformers_vit import TransformersViTError, label_names, read_json

    if folder is not None and (folder / "config.json").is_file():
        try:
            names = label_names(read_json(folder / "config.json", name), n)
        except TransformersViTError as e:
            raise LoRAFormatError(str(e)) from None
        if names:
            return names
    from ..provenance import provenance_mismatch

    cfg = getattr(getattr(backbone, "model", None), "pretrained_cfg", None) or {}
    if cfg.get("source") != "transformers" or provenance_mismatch(base, backbone):
        return None
    names = cfg.get("label_names")
    return list(names) if isinstance(names, (list, tuple)) and len(names) == n else None


def _model_type(folder: Optional[Path], name: str) -> Optional[str]:
    """The ``model_type`` (``vit`` or ``deit``) of the config.json beside an adapter, or None when there is none."""
    from ..transformers_vit import TransformersViTError, read_json

    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        kind = read_json(folder / "config.json", name).get("model_type")
    except (TransformersViTError, AttributeError) as e:
        raise LoRAFormatError(str(e)) from None
    return kind if kind in ("vit", "deit") else None


def from_transformers_peft(
    cfg: dict, tensors: dict[str, torch.Tensor], name: str, folder: Optional[Path] = None, backbone=None
) -> LoRAAdapter:
    """A PEFT LoRA on a transformers ViT or CLIP vision tower -> `LoRAAdapter` on the equivalent timm ViT.

    Args:
        cfg: the adapter_config.json object.
        tensors: the adapter's tensors, PEFT keys (``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``).
        name: what to call it in messages.
        folder: the adapter's folder, whose config.json (if any) names the classes.
        backbone: the `Backbone` it will run on (its transformers config may name the classes).

    Raises:
        LoRAFormatError: non-LoRA or bias-training adapters, unknown modules, shapes that do not pair, mixed name
            layouts, or targets that differ between blocks.
    """
    check_peft_config(cfg, name)
    if cfg.get("fan_in_fan_out"):
        raise LoRAFormatError(f"{name}: fan_in_fan_out adapters (Conv1D layers) are not ViT adapters")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        module = _module_key(key)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", module)
        if m and _match(m.group(1)):
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif module in ("classifier.weight", "classifier.bias"):
            head[module.split(".")[1]] = t
        else:
            raise LoRAFormatError(
                f"{name}: unsupported tensor {shown(key, 100)} (a transformers ViT adapter may "
                "hold LoRA pairs on the attention and MLP layers and the classifier)"
            )
    if not pairs:
        raise LoRAFormatError(f"{name}: the adapter holds no LoRA pairs" + (" (only a classifier)" if head else ""))
    families = {_match(p)[0] for p in pairs}
    if len(families) != 1:
        raise LoRAFormatError(f"{name}: the adapter mixes module names of {sorted(families)}")
    family = families.pop()
    prefixes = {m.split(".", 1)[0] for m in pairs if m.startswith(("vit.", "deit."))}
    if len(prefixes) > 1:
        raise LoRAFormatError(f"{name}: the adapter mixes ViT and DeiT module names ({', '.join(sorted(prefixes))})")
    if family == "clip" and head:
        raise LoRAFormatError(
            f"{name}: a classifier on a CLIP adapter (CLIPForImageClassification pools the patch "
            "tokens) is not supported; CLIP LoRAs are read without a head"
        )
    use_rslora, r_default, alpha_default, rank_patterns, alpha_patterns, dropout = peft_scale_settings(cfg, name)

    # block -> part -> (A, B, scale)
    blocks: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for module, pair in pairs.items():
        a, b = low_rank_pair(pair, module, name)
        rank = a.shape[0]
        declared = pattern_value(rank_patterns, module, r_default)
        if declared != rank:
            raise LoRAFormatError(f"{name}: {module} has rank {rank} but the config says {declared}")
        alpha = float(pattern_value(alpha_patterns, module, alpha_default))
        _, block, part = _match(module)
        if part in blocks.get(block, {}):
            raise LoRAFormatError(
                f"{name}: layer {block}'s {part} module appears twice ({shown(module, 100)} and another spelling of "
                "it); an adapter holds each module once"
            )
        blocks.setdefault(block, {})[part] = (a, b, alpha / math.sqrt(rank) if use_rslora else alpha / rank)
    if not blocks:
        raise LoRAFormatError(f"{name}: the file holds no LoRA weights")
    part_sets = {frozenset(parts) for parts in blocks.values()}
    if len(part_sets) != 1:
        raise LoRAFormatError(
            f"{name}: the adapted modules differ between blocks ({sorted(map(sorted, part_sets))});"
            " LoRA Recycle needs the same targets in every adapted block"
        )
    parts = part_sets.pop()
    attn = [p for p in ("q", "k", "v") if p in parts]
    as_qv = attn == ["q", "v"] and all(
        bl["q"][0].shape[0] == bl["v"][0].shape[0] and bl["q"][2] == bl["v"][2] for bl in blocks.values()
    )

    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}  # timm path -> (rank, alpha)
    for i, bl in blocks.items():
        if attn:
            path = f"blocks.{i}.attn.qkv"
            dims = {bl[p][1].shape[0] for p in attn} | {bl[p][0].shape[1] for p in attn}
            if len(dims) != 1:
                raise LoRAFormatError(f"{name}: the q/k/v LoRAs of layer {i} have different widths")
            d = dims.pop()
            if as_qv:
                for p in ("q", "v"):
                    state[f"{path}.lora_A.{p}"], state[f"{path}.lora_B.{p}"] = bl[p][0], bl[p][1]
                rank, scale = bl["q"][0].shape[0], bl["q"][2]
            else:  # one fused pair: A stacked, B block diagonal on the q/k/v row blocks, scales folded into B
                scales = {bl[p][2] for p in attn}
                scale = scales.pop() if len(scales) == 1 else 1.0
                a = torch.cat([bl[p][0] for p in attn], dim=0)
                b = a.new_zeros(3 * d, a.shape[0])
                col = 0
                for p in attn:
                    r, row = bl[p][0].shape[0], "qkv".index(p) * d
                    b[row : row + d, col : col + r] = bl[p][1] * (bl[p][2] / scale)
                    col += r
                state[f"{path}.lora_A.all"], state[f"{path}.lora_B.all"] = a, b
                rank = a.shape[0]
            ranks[path] = (rank, scale * rank)
        for p in ("proj", "fc1", "fc2"):
            if p in parts:
                path = f"blocks.{i}.{_TIMM_PATH[p]}"
                a, b, scale = bl[p]
                state[f"{path}.lora_A.all"], state[f"{path}.lora_B.all"] = a, b
                ranks[path] = (a.shape[0], scale * a.shape[0])
    targets = tuple(
        sorted((["qv"] if as_qv else ["qkv"] if attn else []) + [p for p in ("proj", "fc1", "fc2") if p in parts])
    )
    (rank, alpha), _ = Counter(ranks.values()).most_common(1)[0]
    extra = {p: {"rank": r, "alpha": a} for p, (r, a) in ranks.items() if (r, a) != (rank, alpha)}
    try:
        config = LoRAConfig(
            targets=targets,
            rank=rank,
            alpha=None if alpha == rank else alpha,
            dropout=float(dropout),
            blocks=tuple(sorted(blocks)),
            extra=extra,
        )
    except ValueError as e:
        raise LoRAFormatError(f"{name}: {e}") from None

    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise LoRAFormatError(f"{name}: base_model_name_or_path must be a string, got {shown(base)}")
    backbone_name = CLIP_BASES.get(base, base) if family == "clip" else base
    n = int(head["weight"].shape[0]) if "weight" in head and head["weight"].ndim == 2 else 0
    if head and "weight" not in head:
        raise LoRAFormatError(f"{name}: the classifier has a bias but no weight")
    info = {
        "source": "PEFT adapter on transformers " + ("CLIP" if family == "clip" else "ViT"),
        "layout": family,
        "base_model": base,
    }
    model_type = _model_type(folder, name) or (prefixes.pop() if prefixes else None)
    if model_type is not None and family != "clip":
        info["model_type"] = model_type  # compared with the backbone's by `provenance.family_mismatch`
    _logger.info("read %s: %s layout, targets %s, %d blocks, %d classes", name, family, targets, len(blocks), n)
    names = _class_names(folder, backbone, n, name, base) if n else None
    return LoRAAdapter(
        config,
        state,
        backbone=backbone_name,
        head_weight=head.get("weight"),
        head_bias=head.get("bias"),
        class_names=names,
        info=info,
    )


def _unique(names: list[str]) -> list[str]:
    """Class names made unique for ``label2id``: a repeated name gets " (2)", " (3)", ... and a warning."""
    seen: Counter = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    if len(set(out)) < len(out):  # a suffixed name that was already taken: number every class
        out = [f"{name} ({i})" for i, name in enumerate(names)]
    if out != list(names):
        _logger.warning("the LoRA's class names repeat; the export names them uniquely: %s", shown(out, 200))
    return out


def save_transformers_peft(
    adapter: LoRAAdapter,
    directory: Union[str, Path],
    layout: str = "new",
    base_model: Optional[str] = None,
    model_type: str = "vit",
) -> Path:
    """Write `adapter` (made on a timm ViT converted from a transformers ViT) as a PEFT adapter of that transformers
    model, atomically file by file. Returns the directory.

    With a head the adapter is for ``ViTForImageClassification`` (module names under ``vit.``, or ``deit.`` for
    `model_type` ``deit``, the head as ``classifier`` in ``modules_to_save``); without, for ``ViTModel``
    (``DeiTModel``). ``layout`` picks the module names, those of
    the transformers that will load it: ``new`` (``layers.{i}.attention.q_proj`` ..., later transformers 5 releases)
    or ``old`` (``encoder.layer.{i}.attention.attention.query`` ..., transformers 4 and 5.0). A fused ``qkv`` LoRA
    is written as q, k and v LoRAs sharing its A (a part whose B is zero is left out); each module keeps its scale
    through ``rank_pattern`` and ``alpha_pattern``. Each part keeps only the rank its B uses: q/k/v read from separate
    LoRAs come back at their own ranks, a meta-LoRA trained on the fused qkv at its full rank.

    Raises:
        ValueError: an unknown layout.
    """
    if layout not in _WRITE_NAMES:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    block_fmt, names = _WRITE_NAMES[layout]
    if model_type not in ("vit", "deit"):
        raise ValueError(f"unknown model_type {model_type!r}; choose vit or deit")
    prefix = f"{model_type}." if adapter.head_weight is not None else ""
    tensors: dict[str, torch.Tensor] = {}
    per_module: dict[str, tuple[int, float]] = {}

    def put(module: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.clone()  # rows of a shared A: one copy each
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.clone()
        per_module[module] = (int(a.shape[0]), scaling * a.shape[0])

    for path, group in module_groups(adapter.state).items():
        m = re.fullmatch(r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)", path)
        if m is None:
            raise ValueError(f"cannot write a LoRA on {path} in transformers' layout")
        block = prefix + block_fmt.format(i=m.group(1))
        rank = next(iter(group["lora_A"].values())).shape[0]
        scaling = module_scaling(adapter.config, path, rank)
        if m.group(2) == "attn.qkv":
            if "all" in group["lora_A"]:
                a, b = group["lora_A"]["all"], group["lora_B"]["all"]
                d = b.shape[0] // 3
                for i, p in enumerate("qkv"):
                    part = b[i * d : (i + 1) * d]
                    used = part.abs().amax(dim=0) > 0  # the rank this part's update uses: B·A = B[:, used]·A[used]
                    if used.any():
                        put(block + names[p], a[used], part[:, used], scaling)
            else:
                for p in ("q", "v"):
                    put(block + names[p], group["lora_A"][p], group["lora_B"][p], scaling)
        else:
            part = {"attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}[m.group(2)]
            put(block + names[part], group["lora_A"]["all"], group["lora_B"]["all"], scaling)
    if adapter.head_weight is not None:
        tensors["base_model.model.classifier.weight"] = adapter.head_weight.contiguous()
        tensors["base_model.model.classifier.bias"] = (
            adapter.head_bias if adapter.head_bias is not None else torch.zeros(adapter.num_classes)
        ).contiguous()
    if not per_module:
        raise ValueError("the adapter holds no LoRA weights")
    (r, alpha), _ = Counter(per_module.values()).most_common(1)[0]
    # Full module names as pattern keys: PEFT matches each key at the end of a module name.
    rank_pattern = {k: v[0] for k, v in per_module.items() if v[0] != r}
    alpha_pattern = {k: v[1] for k, v in per_module.items() if v[1] != alpha}
    target = "|".join(re.escape(k) for k in sorted(per_module))
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": int(r),
        "lora_alpha": float(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": f"({target})",
        "modules_to_save": ["classifier"] if adapter.head_weight is not None else None,
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
    metadata = {"format": "pt"}
    weights = safetensors_bytes(
        {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}, metadata=metadata
    )
    directory = Path(directory)
    atomic_write_bytes(directory / ADAPTER_WEIGHTS, weights)
    atomic_write_bytes(directory / ADAPTER_CONFIG, dumps_strict(peft_config, indent=2, sort_keys=True).encode())
    if adapter.class_names and adapter.head_weight is not None:
        labels = {str(i): c for i, c in enumerate(_unique(adapter.class_names))}
        atomic_write_bytes(
            directory / "config.json",
            dumps_strict({"id2label": labels, "label2id": {c: int(i) for i, c in labels.items()}}, indent=2).encode(),
        )
    return directory
