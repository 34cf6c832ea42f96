"""A transformers ViT or DeiT ``config.json`` and ``preprocessor_config.json`` read into timm's terms: the
architecture's keyword arguments, the preprocessing, the label names; every number bounded, every file size capped."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Optional

from torch import nn

from ..io import loads_strict
from ..modelcheck import MAX_CONFIG_BYTES


SUPPORTED_MODEL_TYPES = ("vit", "deit")
# transformers' ``hidden_act`` -> what timm's Mlp runs (``nn.GELU`` is the exact erf GELU transformers' "gelu" is).
_ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
    "gelu_new": partial(nn.GELU, approximate="tanh"),
}
# PIL resampling codes, as preprocessor configs store them -> timm's interpolation names.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_MAX_CONFIG_BYTES = MAX_CONFIG_BYTES  # room for 21,843 ImageNet-22k labels in id2label


class TransformersViTError(ValueError):
    """A transformers checkpoint that cannot be converted; the message says which file and why."""


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path` (at most `modelcheck.MAX_CONFIG_BYTES`, strict JSON).

    Raises:
        TransformersViTError: missing, too large, malformed or not an object.
    """
    if not path.is_file():
        raise TransformersViTError(f"{what}: {path.name} is missing")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise TransformersViTError(
            f"{what}: {path.name} is larger than {_MAX_CONFIG_BYTES >> 20} MiB; that is not a model config"
        )
    try:
        value = loads_strict(path.read_bytes(), f"{what}: {path.name}")
    except ValueError as e:
        raise TransformersViTError(str(e)) from None
    if not isinstance(value, dict):
        raise TransformersViTError(f"{what}: {path.name} must hold a JSON object")
    return value


def is_transformers_config(cfg: dict) -> bool:
    """True for a transformers ``config.json`` (it names a ``model_type``), False for timm's (``architecture``)."""
    return isinstance(cfg, dict) and "model_type" in cfg and "architecture" not in cfg


def _int(cfg: dict, key: str, what: str, default=None, low: int = 1, high: int = 1 << 16) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TransformersViTError(
            f"{what}: config.json '{key}' must be an integer in [{low}, {high}], got {str(value)[:40]!r}"
        )
    return value


def vit_kwargs(cfg: dict, what: str) -> dict:
    """timm `VisionTransformer` arguments equal to transformers' ``ViTConfig`` `cfg` (validated)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TransformersViTError(
            f"{what}: transformers model_type {str(model_type)[:40]!r} is not supported as a backbone; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (ViTModel, ViTForImageClassification, DeiTModel, "
            "DeiTForImageClassification). Use a timm model instead."
        )
    dim = _int(cfg, "hidden_size", what, 768)
    heads = _int(cfg, "num_attention_heads", what, 12)
    if dim % heads:
        raise TransformersViTError(f"{what}: hidden_size {dim} is not divisible by num_attention_heads {heads}")
    depth = _int(cfg, "num_hidden_layers", what, 12, high=1024)
    hidden = _int(cfg, "intermediate_size", what, 3072, high=1 << 18)
    image = cfg.get("image_size", 224)
    image = tuple(image) if isinstance(image, list) and len(image) == 2 else image
    patch = _int(cfg, "patch_size", what, 16)
    sizes = image if isinstance(image, tuple) else (image, image)
    if not all(isinstance(s, int) and not isinstance(s, bool) and patch <= s <= 8192 and s % patch == 0 for s in sizes):
        raise TransformersViTError(f"{what}: image_size {str(image)[:40]} is not a multiple of patch_size {patch}")
    channels = _int(cfg, "num_channels", what, 3, high=64)
    eps = cfg.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise TransformersViTError(f"{what}: layer_norm_eps must be a number in (0, 1), got {str(eps)[:40]!r}")
    act = cfg.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise TransformersViTError(
            f"{what}: hidden_act {str(act)[:40]!r} is not supported (supported: {', '.join(_ACTIVATIONS)})"
        )
    qkv_bias = cfg.get("qkv_bias", True)
    if not isinstance(qkv_bias, bool):
        raise TransformersViTError(f"{what}: qkv_bias must be true or false")
    ratio = hidden / dim if int(dim * (hidden / dim)) == hidden else (hidden + 0.5) / dim  # timm: int(dim * ratio)
    return {
        "img_size": sizes,
        "patch_size": patch,
        "in_chans": channels,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": ratio,
        "qkv_bias": qkv_bias,
        "class_token": True,
        "reg_tokens": 1 if model_type == "deit" else 0,  # DeiT's distillation token, after [CLS]
        "global_pool": "token",
        "fc_norm": False,
        "norm_layer": partial(nn.LayerNorm, eps=float(eps)),
        "act_layer": _ACTIVATIONS[act],
        "weight_init": "skip",
    }


def _channels(value, default: tuple, n: int, what: str, field: str) -> tuple:
    """A per-channel list from a preprocessor config (one number is repeated); finite numbers only."""
    value = default if value is None else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * n
    if (
        not isinstance(value, (list, tuple))
        or len(value) != n
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise TransformersViTError(
            f"{what}: preprocessor_config.json {field} must be {n} finite numbers, got {str(value)[:40]}"
        )
    return tuple(float(v) for v in value)


def preprocessing(folder: Path, kw: dict, what: str) -> dict:
    """timm pretrained-config fields for transformers' image processor (defaults when there is none): resize to
    the model's size, scale to [0, 1], normalise."""
    n = kw["in_chans"]
    mean, std, size, interp = (0.5,) * n, (0.5,) * n, kw["img_size"], "bilinear"
    path = folder / "preprocessor_config.json"
    if path.is_file():
        pre = read_json(path, what)
        factor = pre.get("rescale_factor", 1 / 255)
        if (
            pre.get("do_rescale", True) is not True
            or isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or abs(factor * 255 - 1) > 1e-6
        ):
            raise TransformersViTError(
                f"{what}: preprocessor_config.json does not scale pixels by 1/255, which is the only scaling supported"
            )
        if pre.get("do_normalize", True):
            mean = _channels(pre.get("image_mean"), mean, n, what, "image_mean")
            std = _channels(pre.get("image_std"), std, n, what, "image_std")
            if not all(s > 0 for s in std):
                raise TransformersViTError(f"{what}: preprocessor_config.json image_std must be positive")
        else:
            mean, std = (0.0,) * n, (1.0,) * n
        # The size the model sees: the crop when the processor crops (DeiT: resize to 256, crop 224). recycle
        # resizes whole images to it, without cropping, as it does for every backbone.
        raw = pre.get("crop_size") if pre.get("do_center_crop") else pre.get("size")
        if isinstance(raw, dict) and isinstance(raw.get("height"), int) and isinstance(raw.get("width"), int):
            size = (raw["height"], raw["width"])
        elif isinstance(raw, int) and not isinstance(raw, bool):
            size = (raw, raw)
        if pre.get("do_resize", True) and tuple(size) != tuple(kw["img_size"]):
            raise TransformersViTError(
                f"{what}: preprocessor_config.json resizes to {list(size)} but the model takes {list(kw['img_size'])}"
            )
        resample = pre.get("resample", 2)
        if isinstance(resample, bool) or resample not in _RESAMPLE:
            raise TransformersViTError(
                f"{what}: preprocessor_config.json has an unknown resample {str(resample)[:20]!r}"
            )
        interp = _RESAMPLE[resample]
    return {
        "mean": mean,
        "std": std,
        "input_size": (n, *kw["img_size"]),
        "interpolation": interp,
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }


def label_names(cfg: dict, n: int) -> Optional[list[str]]:
    """Class names from a transformers config's ``id2label`` when it names all `n` classes; None when it is absent,
    incomplete, or only transformers' placeholders (``LABEL_0`` ...)."""
    id2label = cfg.get("id2label")
    if not isinstance(id2label, dict) or n <= 0:
        return None
    names = [id2label.get(str(i)) for i in range(n)]
    if not all(isinstance(x, str) and x for x in names) or len(id2label) != n:
        return None
    if names == [f"LABEL_{i}" for i in range(n)]:
        return None
    return names
