"""Checks of a timm model folder (``config.json`` + ``model.safetensors``) before anything is allocated.

A backbone or BN-prior folder, local or from the Hub, is untrusted input: its ``config.json`` decides how large a
model timm builds, and its weights file declares tensor shapes in a JSON header. `check_config` validates every
number of the config against fixed bounds (`LIMITS`), `build_on_meta` builds the model on the ``meta`` device (no
memory for weights) and bounds its parameter count, and `check_weights_header` reads only the safetensors header and
checks its names, shapes and sizes against that model and the file's real size. Only then is the real model built and
the weights read.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .io import loads_strict
from .safetensors_header import HeaderError, check_entries, parse_header

__all__ = [
    "ModelCheckError",
    "LIMITS",
    "MAX_PARAMS",
    "MAX_WEIGHTS_BYTES",
    "MAX_TOKENS",
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "check_config",
    "build_on_meta",
    "check_weights_header",
    "check_model_kind",
]

# The largest model accepted: 1.1 billion parameters (ViT-g/14 has 1.0 billion), 4.4 GB in float32.
MAX_PARAMS = 1_100_000_000
# The largest weights file downloaded: the largest model in float64, plus room for a classifier of another size.
MAX_WEIGHTS_BYTES = 8 * MAX_PARAMS + (64 << 20)
# The most patch tokens a ViT may have (a 2048 px image in 16 px patches).
MAX_TOKENS = 16_384
# Hub configs can list 21,843 ImageNet-22k labels with descriptions.
MAX_CONFIG_BYTES = 8 << 20
_LABEL_FIELDS = ("label_names", "label_descriptions", "labels")
# safetensors' own limit is 100 MB; timm models need well under 1 MB.
MAX_HEADER_BYTES = 16 << 20
# Bounds of the numbers in a config's ``model_args``: field -> (kind, lowest, highest).
LIMITS: dict[str, tuple[type, float, float]] = {
    "img_size": (int, 1, 4096),
    "patch_size": (int, 1, 1024),
    "in_chans": (int, 1, 16),
    "num_classes": (int, 0, 100_000),
    "embed_dim": (int, 1, 8192),
    "depth": (int, 1, 128),
    "num_heads": (int, 1, 256),
    "mlp_ratio": (float, 0.0625, 16),
    "reg_tokens": (int, 0, 256),
    "num_reg_tokens": (int, 0, 256),
    "layers": (int, 1, 128),
    "width": (int, 1, 8192),
    "stem_width": (int, 1, 8192),
    "base_width": (int, 1, 8192),
    "cardinality": (int, 1, 1024),
    "output_stride": (int, 1, 64),
    "num_features": (int, 0, 65536),
    "embed_len": (int, 1, MAX_TOKENS + 256),
}
# Any other number in a config: finite and within these bounds; lists and nesting are bounded too.
_OTHER_INT, _OTHER_FLOAT, _MAX_LIST, _MAX_NESTING, _MAX_TEXT = 100_000, 1e6, 64, 4, 10_000


class ModelCheckError(ValueError):
    """A model folder's config or weights are unusable. The message names the file and the field."""


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(value: object, field: str, where: str, depth: int = 0) -> None:
    """Any config value: bounded nesting, list length, text length; finite and bounded numbers."""
    if depth > _MAX_NESTING:
        raise ModelCheckError(f"{where}: '{field}' is nested too deeply")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > _OTHER_INT:
            raise ModelCheckError(f"{where}: '{field}' is {value}, out of range (at most {_OTHER_INT} in size)")
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > _OTHER_FLOAT:
            raise ModelCheckError(f"{where}: '{field}' is {value}, out of range")
    elif isinstance(value, str):
        if len(value) > _MAX_TEXT:
            raise ModelCheckError(f"{where}: '{field}' is a text of {len(value)} characters (at most {_MAX_TEXT})")
    elif isinstance(value, (list, tuple)):
        if len(value) > _MAX_LIST:
            raise ModelCheckError(f"{where}: '{field}' lists {len(value)} values (at most {_MAX_LIST})")
        for v in value:
            _check_value(v, field, where, depth + 1)
    elif isinstance(value, dict):
        if len(value) > _MAX_LIST:
            raise ModelCheckError(f"{where}: '{field}' has {len(value)} entries (at most {_MAX_LIST})")
        for k, v in value.items():
            _check_value(v, f"{field}.{k}", where, depth + 1)
    else:
        raise ModelCheckError(f"{where}: '{field}' has an unsupported value {value!r:.80}")


def _check_bounded(value: object, field: str, where: str) -> None:
    """A `LIMITS` field: a number (or a short list of numbers) of the right kind within its bounds."""
    kind, low, high = LIMITS[field]
    values = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and not 1 <= len(value) <= 8:
        raise ModelCheckError(f"{where}: '{field}' must be a number or a list of 1 to 8 numbers, not {value!r:.80}")
    for v in values:
        ok_kind = isinstance(v, int) and not isinstance(v, bool) if kind is int else _number(v)
        if not ok_kind:
            raise ModelCheckError(
                f"{where}: '{field}' must be {'an integer' if kind is int else 'a number'}, not {v!r:.80}"
            )
        if not (math.isfinite(v) and low <= v <= high):
            raise ModelCheckError(f"{where}: '{field}' is {v}, outside the accepted range {low:g} to {high:g}")


def _check_preprocessing(cfg: dict, where: str) -> None:
    """The preprocessing fields of a pretrained config: mean and std of finite numbers (std > 0), input size."""
    for key in ("mean", "std"):
        if key not in cfg:
            continue
        v = cfg[key]
        if not (isinstance(v, (list, tuple)) and 1 <= len(v) <= 16 and all(_number(x) for x in v)):
            raise ModelCheckError(f"{where}: '{key}' must be a list of numbers, one per channel, not {v!r:.80}")
        if not all(math.isfinite(x) and abs(x) <= 1e3 for x in v) or (key == "std" and min(v) <= 0):
            raise ModelCheckError(
                f"{where}: '{key}' is {v!r:.80}; it must hold finite numbers" + (" above 0" if key == "std" else "")
            )
    if "input_size" in cfg:
        v = cfg["input_size"]
        if not (
            isinstance(v, (list, tuple))
            and len(v) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 4096 for x in v)
        ):
            raise ModelCheckError(
                f"{where}: 'input_size' must be [channels, height, width] of integers from 1 to 4096, not {v!r:.80}"
            )
    if "num_classes" in cfg:
        _check_bounded(cfg["num_classes"], "num_classes", where)
    for key in ("interpolation", "crop_mode", "classifier", "first_conv"):
        if key in cfg and not isinstance(cfg[key], (str, list, type(None))):
            raise ModelCheckError(f"{where}: '{key}' must be a text, not {cfg[key]!r:.80}")


def check_config(path: Path, what: str = "backbone") -> dict:
    """Read and validate a timm ``config.json``; returns it.

    Raises:
        ModelCheckError: naming `path` and the field: too large, not JSON, not an object, a transformers config, no
            or an unknown architecture, a model argument out of bounds, or unusable preprocessing numbers.
    """
    import timm

    where = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelCheckError(f"{where} is {size} bytes; a model config is at most {MAX_CONFIG_BYTES} bytes")
        cfg = loads_strict(path.read_bytes(), where)
    except OSError as e:
        raise ModelCheckError(f"{where} cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise ModelCheckError(str(e)) from None
    if not isinstance(cfg, dict):
        raise ModelCheckError(f"{where} holds a JSON {type(cfg).__name__}; a timm model config is a JSON object")
    if "architecture" not in cfg:
        if "model_type" in cfg or "architectures" in cfg:
            raise ModelCheckError(
                f"{where} is a transformers config (model_type {str(cfg.get('model_type'))!r:.40}), "
                f"not a timm one: a {what} folder needs timm's config.json with an 'architecture'"
            )
        raise ModelCheckError(f"{where} has no 'architecture' field (a timm model name)")
    arch = cfg["architecture"]
    if not isinstance(arch, str) or not arch:
        raise ModelCheckError(f"{where}: 'architecture' must be a timm model name, not {arch!r:.80}")
    if not timm.is_model(arch):
        raise ModelCheckError(f"{where}: 'architecture' is {arch[:80]!r}, which timm does not know")
    pretrained = cfg.get("pretrained_cfg", {k: v for k, v in cfg.items() if k not in ("architecture", "num_features")})
    model_args = cfg.get("model_args", {})
    for key, value in (("pretrained_cfg", pretrained), ("model_args", model_args)):
        if not isinstance(value, dict):
            raise ModelCheckError(f"{where}: '{key}' must be a JSON object, not {value!r:.80}")
    for key, value in model_args.items():
        if key in LIMITS:
            _check_bounded(value, key, where)
        else:
            _check_value(value, key, where)
    for key in ("num_classes", "num_features"):
        if key in cfg and cfg[key] is not None:
            _check_bounded(cfg[key], key, where)
    for key, value in pretrained.items():
        if key in _LABEL_FIELDS:  # long lists or maps of texts, bounded by the file's size
            texts = list(value.values()) if isinstance(value, dict) else value
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ModelCheckError(f"{where}: 'pretrained_cfg.{key}' must hold texts")
            continue
        _check_value(value, f"pretrained_cfg.{key}", where)
    _check_preprocessing(pretrained, where)
    sizes = [model_args.get("img_size"), model_args.get("patch_size")]
    if all(isinstance(s, int) for s in sizes) and (sizes[0] // sizes[1]) ** 2 > MAX_TOKENS:
        raise ModelCheckError(
            f"{where}: img_size {sizes[0]} in patches of {sizes[1]} gives "
            f"{(sizes[0] // sizes[1]) ** 2} tokens, more than the {MAX_TOKENS} accepted"
        )
    return cfg


def build_on_meta(name: str, kwargs: dict, where: str, what: Optional[str] = None) -> nn.Module:
    """The timm model `name` built on the ``meta`` device (shapes only, no memory), with its size bounded.

    Raises:
        ModelCheckError: timm cannot build it from this config, or it has more than `MAX_PARAMS` parameters or
            more than `MAX_TOKENS` tokens.
    """
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever timm raises on these arguments, the config is at fault
        if what is not None and kwargs:  # e.g. a ResNet given a ViT's arguments: say what kind of model it is
            try:
                with torch.device("meta"):
                    plain = timm.create_model(name, pretrained=False)
            except Exception:  # noqa: BLE001 - not buildable at all: the message below says so
                plain = None
            if plain is not None:
                check_model_kind(plain, what, where)
        raise ModelCheckError(
            f"{where}: timm cannot build this model from its config ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMS:
        raise ModelCheckError(
            f"{where}: the config describes a model of {count:,} parameters, more than the {MAX_PARAMS:,} accepted"
        )
    tokens = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if isinstance(tokens, int) and tokens > MAX_TOKENS:
        raise ModelCheckError(f"{where}: the model would take {tokens} tokens per image, more than {MAX_TOKENS}")
    return model


def check_model_kind(model: nn.Module, what: str, where: str) -> None:
    """A backbone must be a timm ViT (blocks and a head); a BN prior must have BatchNorm layers."""
    if what == "backbone" and not (hasattr(model, "blocks") and hasattr(model, "forward_head")):
        raise ModelCheckError(
            f"{where} describes a {type(model).__name__}; LoRA Recycle needs a timm ViT as the backbone"
        )
    if what == "BN prior" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ModelCheckError(
            f"{where} describes a {type(model).__name__}, which has no BatchNorm layers; the BN "
            "prior needs a CNN such as resnet50"
        )


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of `path` (its JSON, bounded in size) and the size of its data section."""
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelCheckError(f"{where} is empty or truncated ({size} bytes): not a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise ModelCheckError(
                    f"{where}: its safetensors header declares {length} bytes, more than the "
                    f"{MAX_HEADER_BYTES} accepted"
                )
            if 8 + length > size:
                raise ModelCheckError(f"{where} is truncated: its header needs {8 + length} bytes, the file has {size}")
            text = f.read(length)
    except OSError as e:
        raise ModelCheckError(f"{where} cannot be read ({e.strerror or e})") from None
    try:
        return parse_header(text, where), size - 8 - length
    except HeaderError as e:
        raise ModelCheckError(str(e)) from None


def check_weights_header(path: Path, model: nn.Module, classifier: Optional[str] = None) -> None:
    """Check a safetensors file's header against `model` (built on the meta device), reading only the header.

    Every tensor must be one the model has, with its shape; the model must miss none; the declared offsets must
    tile the data section exactly (a truncated or padded file is refused). Two differences timm itself adapts
    are allowed: the position embedding's token count (resampled) and the classifier (`classifier`, a module name:
    dropped when the number of classes differs).

    Raises:
        ModelCheckError: naming the file and the first tensor that does not fit.
    """
    where = str(path)
    header, data_size = _read_header(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # the model's tensors in float64, plus room for a classifier of another size: what reading the file may cost
    most = 8 * sum(math.prod(shape) for shape in expected.values()) + (64 << 20)
    if data_size > most:
        raise ModelCheckError(
            f"{where} holds {data_size:,} bytes of tensors, more than the model its config.json "
            f"describes can use ({most:,})"
        )
    try:
        entries = check_entries(header, data_size, where)
    except HeaderError as e:
        raise ModelCheckError(str(e)) from None
    for name, (shape, _) in entries.items():
        in_classifier = bool(classifier) and (name == classifier or name.startswith(classifier + "."))
        if name not in expected:
            if in_classifier:
                continue
            raise ModelCheckError(f"{where}: tensor {name[:120]!r} is not part of the model its config.json describes")
        want = expected[name]
        resampled = (
            name.endswith("pos_embed")
            and len(shape) == len(want)
            and shape[-1:] == want[-1:]
            and math.prod(shape) <= (MAX_TOKENS + 256) * shape[-1]
        )
        if shape != want and not resampled and not in_classifier:
            raise ModelCheckError(
                f"{where}: tensor {name[:120]!r} has shape {list(shape)}, but the model its "
                f"config.json describes needs {list(want)}"
            )
    missing = [
        k
        for k in expected
        if k not in header and not (classifier and (k == classifier or k.startswith(classifier + ".")))
    ]
    if missing:
        raise ModelCheckError(
            f"{where} lacks {len(missing)} tensor(s) of the model its config.json describes, e.g. {missing[0][:120]!r}"
        )
