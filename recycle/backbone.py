"""Backbones: timm ViTs by name, Hub id or local directory, with their own preprocessing and embedding.

Names are anything `timm.create_model` takes (``vit_base_patch16_clip_224.openai``, ``hf-hub:org/repo``,
``local-dir:/path``), a short alias from `ALIASES`, or a path to a directory in timm's Hub layout
(``config.json`` + ``model.safetensors``).

The embedding used for prototypes is the projected CLIP embedding (timm keeps CLIP's projection as ``head``) for
CLIP models, and the pre-logits [CLS] feature for the others.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from torch import nn

from .backbone_names import (
    ALIASES,
    BackboneError,
    backbone_source,
    cached_weights,
    hub_repo_id,
    hub_weights,
    parse_name,
    resolve_name,
    safetensors_file,
    unknown_backbone,
)
from .hub import endpoint, hub_reachable

__all__ = [
    "Backbone",
    "BackboneError",
    "ALIASES",
    "DEFAULT_BACKBONE",
    "load_backbone",
    "create_timm_model",
    "backbone_source",
    "hub_repo_id",
    "pick_device",
]

_logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "vit_base_patch16_clip_224.openai"


def pick_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU.

    Raises:
        ValueError: `device` is not a device name, cannot run a model (``meta``), or names a device this machine does
            not have.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"'{device}' is not a device: use cpu, cuda, cuda:N or auto") from None
    if chosen.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device '{device}' cannot run a model here: use cpu, cuda, cuda:N or auto")
    if chosen.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if chosen.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise ValueError(
                f"device '{device}' was requested, but this machine has no {chosen.type.upper()} device; "
                "use cpu, cuda or auto"
            )
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device '{device}' was requested, but no CUDA GPU is available here; use cpu or auto")
        if chosen.index is not None and chosen.index >= count:
            raise ValueError(f"device '{device}' was requested, but this machine has {count} CUDA GPU(s)")
    return chosen


def _check_before_build(name: str, kwargs: dict, pretrained: bool, what: str) -> None:
    """For a model timm builds from a ``config.json`` (``local-dir:`` or ``hf-hub:``): validate the config, build the
    model on the meta device (bounded size, right kind), and check the weights' safetensors header against it, all
    before timm allocates anything (`recycle.modelcheck`).

    Raises:
        BackboneError: naming the file and the field or tensor that is out of bounds or does not fit.
    """
    from huggingface_hub import hf_hub_download

    from . import modelcheck

    prefix, rest = parse_name(name)
    if prefix == "local-dir":  # the weights file timm's local-dir loader picks among safetensors files
        folder = Path(rest)
        named = [
            folder / f
            for f in ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
            if (folder / f).is_file()
        ]
        config, weights = folder / "config.json", (named or sorted(folder.glob("*.safetensors")) or [None])[0]
    elif prefix == "hf-hub":
        repo, _, revision = rest.partition("@")
        config = Path(hf_hub_download(repo, "config.json", revision=revision or None))
        filename = kwargs.get("pretrained_cfg_overlay", {}).get("hf_hub_filename") or "model.safetensors"
        weights = Path(hf_hub_download(repo, filename, revision=revision or None)) if pretrained else None
    else:
        return
    try:
        cfg = modelcheck.check_config(config, what)
        meta = modelcheck.build_on_meta(name, kwargs, str(config), what)
        modelcheck.check_model_kind(meta, what, str(config))
        if pretrained and weights is None:
            raise modelcheck.ModelCheckError(f"{config.parent} has no .safetensors weights")
        if pretrained:
            classifier = cfg.get("pretrained_cfg", {}).get("classifier") or getattr(meta, "pretrained_cfg", {}).get(
                "classifier"
            )
            modelcheck.check_weights_header(weights, meta, classifier if isinstance(classifier, str) else None)
    except modelcheck.ModelCheckError as e:
        raise BackboneError(f"{'Backbone ' if what == 'backbone' else ''}'{name}': {e}") from None


def create_timm_model(name: str, kwargs: dict, pretrained: bool, what: str = "backbone") -> nn.Module:
    """The timm model called `name` (any form `backbone_source` reads), with safetensors weights only; when the Hub
    is unreachable, from the local cache only (for this call: no global offline switch). `what` (``"backbone"`` or
    ``"BN prior"``) is the kind of model expected."""
    import timm
    from huggingface_hub import errors as hf_errors

    name, extra = resolve_name(name)
    kwargs = {**extra, **kwargs}
    prefix, rest = parse_name(name)
    if prefix is None and not timm.is_model(rest):
        raise unknown_backbone(name)
    hub = hub_weights(name) if pretrained else None
    try:
        if hub is not None and hub_reachable():  # pin timm to the safetensors file, so it never falls back to a pickle
            weights = safetensors_file(*hub, name)
            kwargs["pretrained_cfg_overlay"] = {
                **kwargs.get("pretrained_cfg_overlay", {}),
                "hf_hub_filename": weights,
                "custom_load": False,
            }
        elif hub is not None:
            cached = cached_weights(name, hub[0])
            if cached is None:
                raise BackboneError(
                    f"Cannot load backbone '{name}': the Hugging Face Hub ({endpoint()}) is unreachable and the "
                    f"weights of '{hub[0]}' are not in the local cache. Connect to the internet once to download "
                    f"them, or pass a local directory with config.json and model.safetensors (such as the shipped "
                    f"weights/ model)."
                )
            if cached.startswith("local-dir:"):
                name = cached
            else:
                kwargs = {
                    **kwargs,
                    "pretrained_cfg_overlay": {**kwargs.get("pretrained_cfg_overlay", {}), "file": cached},
                }
        _check_before_build(name, kwargs, pretrained, what)
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as e:
        raise BackboneError(f"Backbone '{name}' was not found on the Hugging Face Hub ({type(e).__name__}).") from None
    except (hf_errors.EntryNotFoundError, hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        raise BackboneError(
            f"Backbone '{name}': its config or weights could not be fetched from the Hub or the "
            f"cache ({type(e).__name__})."
        ) from None


def _data_config(model: nn.Module) -> dict:
    """timm's data config for `model`, with the input size the model runs at (not the pretrained one).

    timm reports the pretrained size, e.g. 518 px for DINOv2, even when the model was created at 224 px.
    """
    from timm.data import resolve_model_data_config

    overrides: dict = {"crop_pct": 1.0, "crop_mode": "squash"}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        overrides["input_size"] = (3, *img_size)
    return resolve_model_data_config(model, args=overrides)


def _eval_transform(data_config: dict):
    """PIL image -> normalised ``(C, H, W)`` tensor, by timm's `create_transform`."""
    from timm.data import create_transform

    return create_transform(
        **{k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")},
        is_training=False,
    )


class Backbone(nn.Module):
    """A timm ViT plus what is needed to feed it and to embed with it.

    Attributes:
        model: the timm model (LoRA layers are injected into it).
        name: the name it was loaded by.
        data_config: timm's data config (input size as the model runs, mean, std, interpolation, no crop).
        input_size: ``(C, H, W)``; mean, std, interpolation: from `data_config`.
        embedding: ``"projection"`` (CLIP: pre-logits through CLIP's projection head) or ``"pre_logits"``.
    """

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.lock = threading.RLock()  # held while a LoRA is attached to the shared model
        self.data_config = _data_config(model)
        self.input_size = tuple(self.data_config["input_size"])
        self.mean = tuple(float(m) for m in self.data_config["mean"])
        self.std = tuple(float(s) for s in self.data_config["std"])
        self.interpolation = self.data_config["interpolation"]
        self._transform = _eval_transform(self.data_config)
        is_clip = "clip" in str(model.pretrained_cfg.get("architecture", name)).lower()
        self.embedding = "projection" if is_clip and getattr(model, "num_classes", 0) > 0 else "pre_logits"

    @property
    def num_features(self) -> int:
        """Width of the pre-logits feature (the input of a classification head)."""
        return int(self.model.num_features)

    @property
    def embed_dim(self) -> int:
        """Width of the embedding used for prototypes."""
        return int(self.model.num_classes) if self.embedding == "projection" else self.num_features

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] -> the model's normalised input, on the model's device."""
        device = self.device
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (x.to(device) - mean) / std

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> normalised batch ``(B, C, H, W)``, with timm's eval transform for this model.

        Resizes straight to the input size (timm's ``squash`` crop mode at ``crop_pct=1``, no crop), as the paper's
        evaluation does, so nothing at the border of a support image is cut away.
        """
        return torch.stack([self._transform(im.convert("RGB")) for im in images])

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> pooled feature ``(B, num_features)``."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def embed_features(self, features: torch.Tensor, model: Optional[nn.Module] = None) -> torch.Tensor:
        """Output of ``forward_features`` ``(B, N, D)`` (any number of tokens) -> embedding ``(B, embed_dim)``.
        `model`: a copy of `self.model` to run instead (e.g. `recycle.quantize.int8_model`)."""
        model = self.model if model is None else model
        feats = model.forward_head(features, pre_logits=True)
        return model.head(feats) if self.embedding == "projection" else feats

    def embed(self, x: torch.Tensor, model: Optional[nn.Module] = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> embedding ``(B, embed_dim)``; `model` as in `embed_features`."""
        model = self.model if model is None else model
        return self.embed_features(model.forward_features(x), model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


def load_backbone(
    name: str = DEFAULT_BACKBONE, pretrained: bool = True, device: Optional[Union[str, torch.device]] = None, **kwargs
) -> Backbone:
    """Load a ViT backbone by timm name, alias, ``hf-hub:`` id or local directory, in eval mode.

    Raises:
        BackboneError: unknown name, missing directory or files, or Hub unreachable with nothing cached.
    """
    from .transformers_vit import load_transformers_vit

    device = pick_device(device)  # a bad device is refused before anything is loaded
    model = load_transformers_vit(name, pretrained)  # None unless `name` is a transformers checkpoint
    if model is None:
        model = create_timm_model(name, kwargs, pretrained)
    if not hasattr(model, "blocks") or not hasattr(model, "forward_head"):
        raise BackboneError(f"Backbone '{name}' is a {type(model).__name__}; LoRA Recycle needs a timm ViT.")
    backbone = Backbone(model, name)
    for p in backbone.parameters():
        p.requires_grad_(False)
    _logger.info(
        "loaded backbone %s (%s embedding, dim %d, input %s)",
        name,
        backbone.embedding,
        backbone.embed_dim,
        backbone.input_size,
    )
    return backbone.to(pick_device(device))
