"""transformers ViT and DeiT checkpoints (``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification``) as timm `VisionTransformer`s.

A folder in transformers' layout (``config.json`` with ``model_type: vit`` or ``deit``, ``model.safetensors`` and
optionally ``preprocessor_config.json``), or a Hub repository holding one, is converted without importing
transformers: the config gives the architecture, the safetensors header is checked against it before anything is
allocated, and the weights are renamed onto timm's modules.

What makes the outputs equal to transformers':

* LayerNorm eps from the config (transformers' 1e-12, not timm's 1e-6);
* q, k and v concatenated into timm's fused ``qkv`` (rows 0:d, d:2d, 2d:3d);
* the [CLS] token after the final LayerNorm feeds the head (timm's ``global_pool="token"``; the pooler, which
  ``ViTForImageClassification`` does not use, is dropped);
* the ``classifier`` is timm's ``head``;
* DeiT's distillation token is timm's register token, right after [CLS] (``reg_tokens=1``); the two heads of
  ``DeiTForImageClassificationWithTeacher`` average [CLS] and that token, which is no head on [CLS], so they are
  dropped (the backbone is used for its embedding);
* mean, std, size and resampling from the preprocessor config (transformers' defaults: 0.5, 0.5, the config's
  image size, bilinear).

Both weight-name layouts are read: the "old" ``encoder.layer.{i}.attention.attention.query`` ... (transformers 4
and 5.0; ``save_pretrained`` still writes it) and the "new" module names of later 5.x releases,
``layers.{i}.attention.q_proj`` ...
"""

from __future__ import annotations

import logging
import math
import re
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .io import loads_strict
from .modelcheck import MAX_CONFIG_BYTES

__all__ = [
    "TransformersViTError",
    "SUPPORTED_MODEL_TYPES",
    "is_transformers_config",
    "vit_from_folder",
    "load_transformers_vit",
    "timm_state_dict",
    "label_names",
    "read_json",
]

_logger = logging.getLogger(__name__)

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


def _vit_kwargs(cfg: dict, what: str) -> dict:
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


def _expected_shapes(kw: dict, num_classes: int) -> dict[str, tuple[int, ...]]:
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


def _rename(keys: list[str], depth: int, what: str) -> tuple[dict[str, tuple[str, Optional[str]]], str]:
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


def _check_header(
    shapes: dict[str, tuple[int, ...]],
    renamed: dict[str, tuple[str, Optional[str]]],
    kw: dict,
    num_classes: int,
    what: str,
) -> None:
    """Every tensor the model needs is in the file with the shape the config implies (checked on the header)."""
    expected = _expected_shapes(kw, num_classes)
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
    renamed, _ = _rename(list(tensors), depth, what)
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


def _preprocessing(folder: Path, kw: dict, what: str) -> dict:
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


def vit_from_folder(folder: Path, name: str, hub_id: Optional[str] = None, pretrained: bool = True) -> nn.Module:
    """The timm `VisionTransformer` equal to the transformers ViT saved in `folder`.

    Args:
        folder: ``config.json``, ``model.safetensors`` and optionally ``preprocessor_config.json``.
        name: what to call it in messages.
        hub_id: the Hub repository it came from (recorded as ``pretrained_cfg["hf_hub_id"]``, its provenance).
        pretrained: load the weights (False: the architecture only, randomly initialised).

    Raises:
        TransformersViTError: unsupported model type, bad config, pickles only, or weights that do not fit.
    """
    from safetensors import SafetensorError, safe_open
    from timm.models.vision_transformer import VisionTransformer

    cfg = read_json(folder / "config.json", name)
    kw = _vit_kwargs(cfg, name)
    weights = folder / "model.safetensors"
    state = None
    num_classes = 0
    if pretrained:
        if not weights.is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            raise TransformersViTError(
                f"{name}: there is no model.safetensors"
                + (f"; {pickles} are pickles, which are never loaded" if pickles else "")
                + ". To convert trusted weights: ViTModel.from_pretrained(...).save_pretrained(folder) writes "
                "model.safetensors."
            )
        try:
            with safe_open(str(weights), framework="pt") as f:
                keys = list(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                renamed, layout = _rename(keys, kw["depth"], name)
                head = shapes.get("classifier.weight")
                num_classes = head[0] if head and len(head) == 2 else 0
                _check_header(shapes, renamed, kw, num_classes, name)
                state = timm_state_dict({k: f.get_tensor(k) for k in renamed}, kw["depth"], name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise TransformersViTError(
                f"{name}: model.safetensors cannot be read (corrupt or truncated?): {e}"
            ) from None
        bad = [k for k, t in state.items() if not torch.is_floating_point(t) or not torch.isfinite(t).all()]
        if bad:
            raise TransformersViTError(f"{name}: tensor {bad[0]} is not floating point or holds NaN/Inf values")
        _logger.info("converting %s (transformers ViT, %s names, %d blocks)", name, layout, kw["depth"])
    elif "ForImageClassification" in str(cfg.get("architectures", "")) and isinstance(cfg.get("id2label"), dict):
        num_classes = min(len(cfg["id2label"]), 1 << 16)
    model = VisionTransformer(num_classes=num_classes, **kw)
    if state is not None:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    names = label_names(cfg, num_classes)
    model.pretrained_cfg = model.default_cfg = {
        **_preprocessing(folder, kw, name),
        "architecture": "vit_transformers",
        "num_classes": num_classes,
        "hf_hub_id": hub_id,
        "model_type": cfg["model_type"],
        "label_names": names,
        "source": "transformers",
    }
    return model


def _hub_folder(repo: str, revision: Optional[str], name: str) -> Optional[Path]:
    """The cached snapshot of Hub repo `repo` when it is in transformers' layout (config, preprocessor config and
    safetensors weights downloaded), else None (not a transformers repo, or the Hub and the cache have no config).

    Raises:
        TransformersViTError: a transformers repository without safetensors weights.
    """
    from .hub import HubError, download_repo_files

    try:
        folder = download_repo_files(repo, ["config.json"], revision)
    except HubError:
        return None  # the timm loader reports unknown repos and an unreachable Hub in its own words
    try:
        cfg = read_json(folder / "config.json", name)
    except TransformersViTError:
        return None
    if not is_transformers_config(cfg):
        return None
    try:
        folder = download_repo_files(repo, ["config.json", "preprocessor_config.json", "model.safetensors"], revision)
    except HubError as e:
        raise TransformersViTError(f"{name}: {e}") from None
    if not (folder / "model.safetensors").is_file():
        raise TransformersViTError(
            f"{name}: the Hub repository '{repo}' has no model.safetensors; pickled weights (.bin) are never "
            "loaded. To convert trusted weights: ViTModel.from_pretrained(...).save_pretrained(folder) writes "
            "model.safetensors; upload it to the repository or pass the folder."
        )
    return folder


def load_transformers_vit(name: str, pretrained: bool = True) -> Optional[nn.Module]:
    """The timm ViT for backbone `name` when it names a transformers checkpoint (a local folder whose config.json
    has a ``model_type``, or a Hub repo, ``hf-hub:ORG/REPO[@REV]`` or plain ``ORG/REPO``, holding one); None for
    every other name (timm loads those).

    Raises:
        BackboneError: a transformers checkpoint that cannot be used (the message says why).
    """
    from .backbone import BackboneError, backbone_source

    source, rest = backbone_source(name)
    try:
        if source == "local-dir":
            folder = Path(rest).expanduser()
            if not (folder / "config.json").is_file():
                return None
            try:
                config = read_json(folder / "config.json", name)
            except TransformersViTError:  # not a readable JSON object: the timm path's checks name the problem
                return None
            if not is_transformers_config(config):
                return None
            return vit_from_folder(folder, name, None, pretrained)
        if source == "hf-hub":
            repo, _, revision = rest.partition("@")
            folder = _hub_folder(repo, revision or None, name)
            if folder is None:
                return None
            return vit_from_folder(folder, name, repo, pretrained)
    except TransformersViTError as e:
        raise BackboneError(f"Backbone {e}") from None
    return None
