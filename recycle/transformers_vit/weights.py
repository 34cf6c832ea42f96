"""A transformers ViT's weight names and shapes onto timm's modules: both name layouts, the header checked against
the architecture before anything is allocated, q, k and v fused into timm's ``qkv``."""

from __future__ import annotations

import re
from typing import Optional

import torch

from .config import TransformersViTError


# Per-block module names of the two layouts -> timm's (q, k, v are gathered into qkv).
_LAYOUTS = {
    "old": {
        "block": "encoder.layer.{i}.",
        "modules": {
            "attention.attention.query": "q",
            "attention.attention.key": "k",
            "attention.attention.value": "v",
            "attention.output.dense": "attn.proj",
            "intermediate.dense": "mlp.fc1",
            "output.dense": "mlp.fc2",
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
        },
    },
    "new": {
        "block": "layers.{i}.",
        "modules": {
            "attention.q_proj": "q",
            "attention.k_proj": "k",
            "attention.v_proj": "v",
            "attention.o_proj": "attn.proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
        },
    },
}


def expected_shapes(kw: dict, num_classes: int) -> dict[str, tuple[int, ...]]:
    """timm state-dict key -> shape for the model `kw` describes."""
    d, h = kw["embed_dim"], int(kw["embed_dim"] * kw["mlp_ratio"])  # as timm's blocks compute it
    p, c = kw["patch_size"], kw["in_chans"]
    grid = (kw["img_size"][0] // p) * (kw["img_size"][1] // p)
    prefix_tokens = 1 + kw["reg_tokens"]
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, grid + prefix_tokens, d),
        "patch_embed.proj.weight": (d, c, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if kw["reg_tokens"]:
        shapes["reg_token"] = (1, kw["reg_tokens"], d)
    for i in range(kw["depth"]):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "mlp.fc1.weight": (h, d),
                b + "mlp.fc1.bias": (h,),
                b + "mlp.fc2.weight": (d, h),
                b + "mlp.fc2.bias": (d,),
            }
        )
        if kw["qkv_bias"]:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
    if num_classes:
        shapes.update({"head.weight": (num_classes, d), "head.bias": (num_classes,)})
    return shapes


def rename_keys(keys: list[str], depth: int, what: str) -> tuple[dict[str, tuple[str, Optional[str]]], str]:
    """transformers key -> (timm key, qkv slice or None) for every key that is used; and the layout's name.

    Raises:
        TransformersViTError: neither layout is present, or the file mixes them.
    """
    prefix = next((p for p in ("vit.", "deit.") if any(k.startswith(p) for k in keys)), "")
    found = [
        name for name, lay in _LAYOUTS.items() if any(k.startswith(prefix + lay["block"].format(i=0)) for k in keys)
    ]
    if len(found) != 1:
        raise TransformersViTError(
            f"{what}: the weights are in no known ViT layout (expected '{prefix}encoder.layer.0....' or "
            f"'{prefix}layers.0....', transformers' old and new module names)"
            if not found
            else f"{what}: the weights mix transformers' old and new module names"
        )
    layout = _LAYOUTS[found[0]]
    fixed = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "embeddings.distillation_token": "reg_token",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    block = re.compile(re.escape(prefix + layout["block"]).replace(r"\{i\}", r"(\d{1,4})") + r"(.+)\.(weight|bias)")
    out: dict[str, tuple[str, Optional[str]]] = {}
    for key in keys:
        rest = key[len(prefix) :] if key.startswith(prefix) else key
        if rest in fixed:
            out[key] = (fixed[rest], None)
        elif key in ("classifier.weight", "classifier.bias"):
            out[key] = ("head." + key.split(".")[1], None)
        elif (m := block.fullmatch(key)) and m.group(2) in layout["modules"] and int(m.group(1)) < depth:
            target = layout["modules"][m.group(2)]
            if target in ("q", "k", "v"):
                out[key] = (f"blocks.{m.group(1)}.attn.qkv.{m.group(3)}", target)
            else:
                out[key] = (f"blocks.{m.group(1)}.{target}.{m.group(3)}", None)
    return out, found[0]


def check_header(
    shapes: dict[str, tuple[int, ...]],
    renamed: dict[str, tuple[str, Optional[str]]],
    kw: dict,
    num_classes: int,
    what: str,
) -> None:
    """Every tensor the model needs is in the file with the shape the config implies (checked on the header)."""
    expected = expected_shapes(kw, num_classes)
    d = kw["embed_dim"]
    have: dict[str, tuple[int, ...]] = {}
    for key, (timm_key, part) in renamed.items():
        shape = tuple(shapes[key])
        want = expected.get(timm_key)
        if part is not None and want is not None:
            want = (d, *want[1:])
        if want is None or shape != want:
            raise TransformersViTError(
                f"{what}: tensor {key} has shape {list(shape)}, but config.json implies "
                f"{list(want) if want else 'no such tensor'}"
            )
        have[timm_key + (f".{part}" if part else "")] = shape
    missing = [k for k in expected if k not in have and not (k.startswith("blocks.") and ".attn.qkv." in k)]
    for k in expected:
        if ".attn.qkv." in k:
            missing += [f"{k} ({p})" for p in "qkv" if f"{k}.{p}" not in have]
    if missing:
        raise TransformersViTError(
            f"{what}: model.safetensors lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}"
        )


def timm_state_dict(tensors: dict[str, torch.Tensor], depth: int, what: str = "weights") -> dict[str, torch.Tensor]:
    """transformers ViT weights (either layout) -> timm `VisionTransformer` state dict (q, k, v fused into qkv).

    Args:
        tensors: ``{transformers key: tensor}``; keys of other modules (pooler, mask token) are dropped.
        depth: number of blocks.
    """
    renamed, _ = rename_keys(list(tensors), depth, what)
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, (timm_key, part) in renamed.items():
        if part is None:
            out[timm_key] = tensors[key]
        else:
            parts.setdefault(timm_key, {})[part] = tensors[key]
    for timm_key, qkv in parts.items():
        out[timm_key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out
