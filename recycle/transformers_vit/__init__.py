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

`config` reads the configs, `weights` renames and checks the weights; this module builds the model from a folder or
a Hub repository.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import (
    SUPPORTED_MODEL_TYPES,
    TransformersViTError,
    is_transformers_config,
    label_names,
    preprocessing,
    read_json,
    vit_kwargs,
)
from .weights import check_header, rename_keys, timm_state_dict

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
    kw = vit_kwargs(cfg, name)
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
                renamed, layout = rename_keys(keys, kw["depth"], name)
                head = shapes.get("classifier.weight")
                num_classes = head[0] if head and len(head) == 2 else 0
                check_header(shapes, renamed, kw, num_classes, name)
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
        **preprocessing(folder, kw, name),
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
    from ..hub import HubError, download_repo_files

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
    from ..backbone import BackboneError, backbone_source

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
