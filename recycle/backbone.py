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
# Short names -> (timm name, extra create_model kwargs).
ALIASES: dict[str, tuple[str, dict]] = {
    "clip-b16": ("vit_base_patch16_clip_224.openai", {}),
    "clip-b32": ("vit_base_patch32_clip_224.openai", {}),
    # DINOv2 is pretrained at 518 px; 224 px (16x16 patches) keeps CPU inference practical. timm resamples the
    # position embedding when it loads the weights.
    "dinov2-s14": ("vit_small_patch14_dinov2.lvd142m", {"img_size": 224}),
}


class BackboneError(RuntimeError):
    """A backbone could not be loaded. The message names the model and says what to do."""


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
        from .hub import is_repo_id

        if is_repo_id(name.split("@")[0]):  # a bare ORG/REPO (transformers' way of naming a Hub model)
            return "hf-hub", name
        raise _unknown(name, f"It cannot be read: {str(e).rstrip('.')}.") from None
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


_CONVERT = (
    "To convert trusted weights: load the state dict where you trust the file, save it with "
    "safetensors.torch.save_file(state_dict, 'model.safetensors'), and put it next to config.json."
)


def _hub_weights(name: str) -> Optional[tuple[str, Optional[str], Optional[str]]]:
    """(repo, revision, weights file name timm would look for) of a Hub-hosted backbone; None for a local one.

    Raises:
        BackboneError: the pretrained weights are published only at a URL (timm would unpickle them).
    """
    import timm

    if name.startswith("local-dir:"):
        return None
    if name.startswith("hf-hub:"):
        repo, _, revision = name[len("hf-hub:") :].partition("@")
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
        raise BackboneError(
            f"Backbone '{name}': timm publishes its pretrained weights only as a pickle "
            f"({cfg.url or cfg.file}), and pickled weights are never loaded. {_CONVERT}"
        )
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

    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    from .modelcheck import MAX_WEIGHTS_BYTES

    candidates = _safetensors_names(filename)
    for candidate in candidates:
        try:
            size = get_hf_file_metadata(hf_hub_url(repo, candidate, revision=revision)).size
            if size is not None and size > MAX_WEIGHTS_BYTES:  # refused before a byte of it is downloaded
                raise BackboneError(
                    f"Backbone '{name}': {candidate} of the Hub repository '{repo}' is {size:,} bytes, "
                    f"more than any model accepted here needs ({MAX_WEIGHTS_BYTES:,})"
                )
            hf_hub_download(repo, candidate, revision=revision)
            return candidate
        except hf_errors.LocalEntryNotFoundError:
            raise  # offline and not cached: reported as such by the caller
        except hf_errors.EntryNotFoundError:
            continue
    raise BackboneError(
        f"Backbone '{name}': the Hub repository '{repo}' has no safetensors weights "
        f"({', '.join(candidates) or 'none for ' + str(filename)}); pickled weights (.bin, .pth) are "
        f"never loaded. {_CONVERT} Then upload model.safetensors to the repository."
    )


def _unknown(name: str, why: str = "") -> BackboneError:
    return BackboneError(
        f"Unknown backbone '{name}'.{' ' + why if why else ''} Use a timm model name (see "
        f"timm.list_models('*clip*')), an alias ({', '.join(ALIASES)}), 'hf-hub:ORG/REPO' or a local "
        "directory."
    )


def _parse(name: str) -> tuple[Optional[str], str]:
    """timm's ``(source, name)`` split: ``("hf-hub", "org/repo")``, ``("local-dir", path)`` or ``(None, name)``."""
    from timm.models import parse_model_name

    try:
        return parse_model_name(name)
    except (ValueError, AssertionError) as e:
        raise _unknown(name, str(e)) from None


def _hub_repo(name: str) -> Optional[str]:
    """The Hub repository timm would download `name` from, or None for local or non-Hub weights."""
    import timm

    prefix, rest = _parse(name)
    if prefix == "local-dir":
        return None
    if prefix == "hf-hub":
        return rest.split("@")[0]
    if not timm.is_model(rest):
        return None
    return getattr(timm.models.get_pretrained_cfg(rest), "hf_hub_id", None) or None


def hub_repo_id(name: str) -> Optional[str]:
    """The Hub model repository a backbone name (alias, timm name, ``hf-hub:`` id) loads its weights from.

    None for a local directory and for names whose weights are not on the Hub (or that timm does not know).
    ``clip-b16`` -> ``timm/vit_base_patch16_clip_224.openai``; ``hf-hub:org/repo@rev`` -> ``org/repo``.
    """
    try:
        return _hub_repo(_resolve_name(name)[0])
    except BackboneError:
        return None


def _cached_weights(name: str, repo: str) -> Optional[str]:
    """What timm would load for `name` from the local cache alone: a file, a ``local-dir:`` snapshot, or None."""
    import timm
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    prefix, rest = _parse(name)
    if prefix == "hf-hub":  # timm reads config.json and the weights of the repo: both are in its snapshot
        revision = rest.split("@")[1] if "@" in rest else None
        try:
            folder = Path(
                snapshot_download(
                    repo, revision=revision, local_files_only=True, allow_patterns=["config.json", "*.safetensors"]
                )
            )
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
            return None
        has_weights = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
        return f"local-dir:{folder}" if has_weights else None
    wanted = getattr(timm.models.get_pretrained_cfg(rest), "hf_hub_filename", None)
    for filename in ([wanted] if wanted and wanted.endswith(".safetensors") else []) + [
        "model.safetensors",
        "open_clip_model.safetensors",
    ]:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return cached
    return None


def _check_before_build(name: str, kwargs: dict, pretrained: bool, what: str) -> None:
    """For a model timm builds from a ``config.json`` (``local-dir:`` or ``hf-hub:``): validate the config, build the
    model on the meta device (bounded size, right kind), and check the weights' safetensors header against it, all
    before timm allocates anything (`recycle.modelcheck`).

    Raises:
        BackboneError: naming the file and the field or tensor that is out of bounds or does not fit.
    """
    from huggingface_hub import hf_hub_download

    from . import modelcheck

    prefix, rest = _parse(name)
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
        meta = modelcheck.build_on_meta(name, kwargs, str(config))
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

    name, extra = _resolve_name(name)
    kwargs = {**extra, **kwargs}
    prefix, rest = _parse(name)
    if prefix is None and not timm.is_model(rest):
        raise _unknown(name)
    hub = _hub_weights(name) if pretrained else None
    try:
        if hub is not None and hub_reachable():  # pin timm to the safetensors file, so it never falls back to a pickle
            weights = _safetensors_file(*hub, name)
            kwargs["pretrained_cfg_overlay"] = {
                **kwargs.get("pretrained_cfg_overlay", {}),
                "hf_hub_filename": weights,
                "custom_load": False,
            }
        elif hub is not None:
            cached = _cached_weights(name, hub[0])
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

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> normalised batch ``(B, C, H, W)``, with timm's eval transform for this model.

        Resizes straight to the input size (timm's ``squash`` crop mode at ``crop_pct=1``, no crop), as the paper's
        evaluation does, so nothing at the border of a support image is cut away.
        """
        return torch.stack([self._transform(im.convert("RGB")) for im in images])

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
