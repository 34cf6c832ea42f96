"""Backbones: timm ViTs by name, Hub id or local directory, with their own preprocessing and embedding.

Names are anything `timm.create_model` takes (``vit_base_patch16_clip_224.openai``, ``hf-hub:org/repo``,
``local-dir:/path``), a short alias from `ALIASES`, or a path to a directory in timm's Hub layout
(``config.json`` + ``model.safetensors``).

The embedding used for prototypes is the projected CLIP embedding (timm keeps CLIP's projection as ``head``) for
CLIP models, and the pre-logits [CLS] feature for the others.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from .hub import endpoint, hub_reachable, offline_mode

__all__ = ["Backbone", "BackboneError", "ALIASES", "DEFAULT_BACKBONE", "load_backbone", "pick_device", "backbone_source"]

_logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "vit_base_patch16_clip_224.openai"
# Short names -> (timm name, extra create_model kwargs).
ALIASES: dict[str, tuple[str, dict]] = {
    "clip-b16": ("vit_base_patch16_clip_224.openai", {}),
    "clip-b32": ("vit_base_patch32_clip_224.openai", {}),
    # DINOv2 is pretrained at 518 px; 224 px (16x16 patches) keeps CPU inference practical. timm resamples the
    # position embedding when it loads the weights.
    "dinov2-s14": ("vit_small_patch14_dinov2.lvd142m", {"img_size": 224}),
}
_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


class BackboneError(RuntimeError):
    """A backbone could not be loaded. The message names the model and says what to do."""


def pick_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU.

    Raises:
        ValueError: `device` is not a device name, or names a CUDA device this machine does not have.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"'{device}' is not a device: use cpu, cuda, cuda:N or auto") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device '{device}' was requested, but no CUDA GPU is available here; use cpu or auto")
        if chosen.index is not None and chosen.index >= count:
            raise ValueError(f"device '{device}' was requested, but this machine has {count} CUDA GPU(s)")
    return chosen


def backbone_source(name: str) -> tuple[Optional[str], str]:
    """Where `name` is loaded from, decided exactly as the loader decides it: ``("local-dir", folder)``,
    ``("hf-hub", repo id)`` or ``(None, timm model name)``.

    Aliases map to their timm name; an existing folder or a path-like name (``.``, ``/``, ``~``) is a local folder;
    everything else is split by timm's own ``parse_model_name``, which lower-cases the prefix (``LOCAL-DIR:`` is
    ``local-dir:``) and reads ``hf_hub:`` as ``hf-hub:``. Path policies must decide on this answer, not on the text.

    Raises:
        BackboneError: an empty name, or one timm cannot parse (unknown ``scheme:``, a bare ``org/name``).
    """
    from timm.models import parse_model_name

    name = name.strip()
    if not name:
        raise BackboneError("No backbone given: name a timm model, an alias, 'hf-hub:ORG/REPO' or a local directory.")
    if name in ALIASES:
        return None, ALIASES[name][0]
    try:
        is_dir = Path(name).expanduser().is_dir()
    except (OSError, ValueError):  # NUL bytes, names too long for the filesystem
        is_dir = False
    if is_dir or name.startswith((".", "/", "~")):
        return "local-dir", name
    try:
        source, rest = parse_model_name(name)
    except (ValueError, AssertionError) as e:
        raise BackboneError(f"Backbone '{name}' cannot be read: {e}") from None
    return source, rest


def _resolve_name(name: str) -> tuple[str, dict]:
    """`name` -> (the canonical name timm is given, extra create_model kwargs); local folders are checked here."""
    source, rest = backbone_source(name)
    if source == "hf-hub":
        return f"hf-hub:{rest}", {}
    if source is None:
        return rest, dict(ALIASES[name.strip()][1]) if name.strip() in ALIASES else {}
    path = Path(rest).expanduser()
    if not path.is_dir():
        raise BackboneError(f"Backbone directory '{path}' does not exist.")
    if not (path / "config.json").is_file():
        raise BackboneError(f"Backbone directory '{path}' has no config.json (timm's Hub layout is expected).")
    if not (path / "model.safetensors").is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        why = f" It has {pickles}, which are pickles; pickled weights are never loaded." if pickles else ""
        raise BackboneError(f"Backbone directory '{path}' has no model.safetensors.{why} {_CONVERT}")
    return f"local-dir:{path.resolve()}", {}


_CONVERT = ("To convert trusted weights: load the state dict where you trust the file, save it with "
            "safetensors.torch.save_file(state_dict, 'model.safetensors'), and put it next to config.json.")


def _hub_weights(name: str) -> Optional[tuple[str, Optional[str], Optional[str]]]:
    """(repo, revision, weights file name timm would look for) of a Hub-hosted backbone; None for a local one.

    Raises:
        BackboneError: the pretrained weights are published only at a URL (timm would unpickle them).
    """
    import timm

    if name.startswith("local-dir:"):
        return None
    if name.startswith("hf-hub:"):
        repo, _, revision = name[len("hf-hub:"):].partition("@")
        return repo, revision or None, None
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown names are reported by create_model
        return None
    if cfg is None:
        return None
    if getattr(cfg, "hf_hub_id", None):
        repo, _, revision = cfg.hf_hub_id.partition("@")
        return repo, revision or None, getattr(cfg, "hf_hub_filename", None)
    if getattr(cfg, "url", None) or getattr(cfg, "file", None):
        raise BackboneError(f"Backbone '{name}': timm publishes its pretrained weights only as a pickle "
                            f"({cfg.url or cfg.file}), and pickled weights are never loaded. {_CONVERT}")
    return None


def _safetensors_names(filename: Optional[str]) -> list[str]:
    """The safetensors files timm reads instead of `filename` (its own rule), in its order."""
    filename = filename or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return [filename]
    if filename == "pytorch_model.bin":
        return ["model.safetensors"]
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors"]
    return [filename[:-4] + ".safetensors"] if filename.endswith(".bin") else []


def _safetensors_file(repo: str, revision: Optional[str], filename: Optional[str], name: str) -> str:
    """The safetensors weights file of Hub repo `repo` (downloaded into the cache), to pin timm to it.

    Raises:
        BackboneError: the repository holds no safetensors weights (only pickles).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    candidates = _safetensors_names(filename)
    for candidate in candidates:
        try:
            hf_hub_download(repo, candidate, revision=revision)
            return candidate
        except hf_errors.LocalEntryNotFoundError:
            raise  # offline and not cached: reported as such by the caller
        except hf_errors.EntryNotFoundError:
            continue
    raise BackboneError(f"Backbone '{name}': the Hub repository '{repo}' has no safetensors weights "
                        f"({', '.join(candidates) or 'none for ' + str(filename)}); pickled weights (.bin, .pth) are "
                        f"never loaded. {_CONVERT} Then upload model.safetensors to the repository.")


def _is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str)
               for f in ("model.safetensors", "open_clip_model.safetensors"))


def _create(name: str, kwargs: dict, pretrained: bool) -> nn.Module:
    """The timm model called `name` (any form `backbone_source` reads), with safetensors weights only."""
    import timm
    from huggingface_hub import errors as hf_errors

    name, extra = _resolve_name(name)
    kwargs = {**extra, **kwargs}
    hub = _hub_weights(name) if pretrained else None
    offline = hub is not None and not hub_reachable()
    if offline and not _is_cached(hub[0]):
        raise BackboneError(
            f"Cannot load backbone '{name}': the Hugging Face Hub ({endpoint()}) is unreachable and the weights of "
            f"'{hub[0]}' are not in the local cache. Connect to the internet once to download them, or pass a local "
            f"directory with config.json and model.safetensors (such as the shipped weights/ model).")
    try:
        with offline_mode() if offline else contextlib.nullcontext():
            if hub is not None:  # pin timm to the safetensors file, so it can never fall back to a pickle
                weights = _safetensors_file(*hub, name)
                kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}),
                                                    "hf_hub_filename": weights, "custom_load": False}
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise BackboneError(f"Unknown backbone '{name}'. Use a timm model name (see timm.list_models('*clip*')), "
                                f"an alias ({', '.join(ALIASES)}), 'hf-hub:ORG/REPO' or a local directory.") from None
        raise
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as e:
        raise BackboneError(f"Backbone '{name}' was not found on the Hugging Face Hub ({type(e).__name__}).") from None
    except (hf_errors.EntryNotFoundError, hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        raise BackboneError(f"Backbone '{name}': its config or weights could not be fetched from the Hub or the "
                            f"cache ({type(e).__name__}).") from None


class Backbone(nn.Module):
    """A timm ViT plus what is needed to feed it and to embed with it.

    Attributes:
        model: the timm model (LoRA layers are injected into it).
        name: the name it was loaded by.
        input_size: ``(C, H, W)`` from the pretrained config.
        mean, std, interpolation: preprocessing from the pretrained config.
        embedding: ``"projection"`` (CLIP: pre-logits through CLIP's projection head) or ``"pre_logits"``.
    """

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.lock = threading.RLock()  # held while a LoRA is attached to the shared model
        cfg = dict(model.pretrained_cfg)
        self.input_size = tuple(cfg.get("input_size", (3, 224, 224)))
        if getattr(model, "patch_embed", None) is not None and hasattr(model.patch_embed, "img_size"):
            self.input_size = (self.input_size[0], *model.patch_embed.img_size)
        self.mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
        self.interpolation = cfg.get("interpolation", "bicubic")
        is_clip = "clip" in str(cfg.get("architecture", name)).lower()
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

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> normalised batch ``(B, C, H, W)``.

        Resizes straight to the input size (no crop), as the paper's evaluation does, so nothing at the border of
        a support image is cut away.
        """
        _, h, w = self.input_size
        resample = _INTERP.get(self.interpolation, Image.BICUBIC)
        arr = np.stack([np.asarray(im.convert("RGB").resize((w, h), resample), dtype=np.float32) for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> pooled feature ``(B, num_features)``."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Output of ``forward_features`` ``(B, N, D)`` (any number of tokens) -> embedding ``(B, embed_dim)``."""
        feats = self.model.forward_head(features, pre_logits=True)
        return self.model.head(feats) if self.embedding == "projection" else feats

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> embedding ``(B, embed_dim)``."""
        return self.embed_features(self.model.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


def load_backbone(name: str = DEFAULT_BACKBONE, pretrained: bool = True,
                  device: Optional[Union[str, torch.device]] = None, **kwargs) -> Backbone:
    """Load a ViT backbone by timm name, alias, ``hf-hub:`` id or local directory, in eval mode.

    Raises:
        BackboneError: unknown name, missing directory or files, or Hub unreachable with nothing cached.
    """
    model = _create(name, kwargs, pretrained)
    if not hasattr(model, "blocks") or not hasattr(model, "forward_head"):
        raise BackboneError(f"Backbone '{name}' is a {type(model).__name__}; LoRA Recycle needs a timm ViT.")
    backbone = Backbone(model, name)
    for p in backbone.parameters():
        p.requires_grad_(False)
    _logger.info("loaded backbone %s (%s embedding, dim %d, input %s)", name, backbone.embedding,
                 backbone.embed_dim, backbone.input_size)
    return backbone.to(pick_device(device))
