"""Backbone names: the aliases, where a name loads from (a local folder, a Hub repository, a timm name), and which
safetensors file its weights come from, online or from the cache. Pickled weights are never chosen."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = [
    "ALIASES",
    "BackboneError",
    "backbone_source",
    "resolve_name",
    "parse_name",
    "unknown_backbone",
    "hub_weights",
    "safetensors_file",
    "cached_weights",
    "hub_repo_id",
    "CONVERT_PICKLES",
]

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
        raise unknown_backbone(name, f"It cannot be read: {str(e).rstrip('.')}.") from None
    return source, rest


def resolve_name(name: str) -> tuple[str, dict]:
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
        raise BackboneError(f"Backbone directory '{path}' has no model.safetensors.{why} {CONVERT_PICKLES}")
    return f"local-dir:{path.resolve()}", {}


CONVERT_PICKLES = (
    "To convert trusted weights: load the state dict where you trust the file, save it with "
    "safetensors.torch.save_file(state_dict, 'model.safetensors'), and put it next to config.json."
)


def hub_weights(name: str) -> Optional[tuple[str, Optional[str], Optional[str]]]:
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
            f"({cfg.url or cfg.file}), and pickled weights are never loaded. {CONVERT_PICKLES}"
        )
    return None


def safetensors_names(filename: Optional[str]) -> list[str]:
    """The safetensors files timm reads instead of `filename` (its own rule), in its order."""
    filename = filename or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return [filename]
    if filename == "pytorch_model.bin":
        return ["model.safetensors"]
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors"]
    return [filename[:-4] + ".safetensors"] if filename.endswith(".bin") else []


def safetensors_file(repo: str, revision: Optional[str], filename: Optional[str], name: str) -> str:
    """The safetensors weights file of Hub repo `repo` (downloaded into the cache), to pin timm to it.

    Raises:
        BackboneError: the repository holds no safetensors weights (only pickles).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    from .modelcheck import MAX_WEIGHTS_BYTES

    candidates = safetensors_names(filename)
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
        f"never loaded. {CONVERT_PICKLES} Then upload model.safetensors to the repository."
    )


def unknown_backbone(name: str, why: str = "") -> BackboneError:
    return BackboneError(
        f"Unknown backbone '{name}'.{' ' + why if why else ''} Use a timm model name (see "
        f"timm.list_models('*clip*')), an alias ({', '.join(ALIASES)}), 'hf-hub:ORG/REPO' or a local "
        "directory."
    )


def parse_name(name: str) -> tuple[Optional[str], str]:
    """timm's ``(source, name)`` split: ``("hf-hub", "org/repo")``, ``("local-dir", path)`` or ``(None, name)``."""
    from timm.models import parse_model_name

    try:
        return parse_model_name(name)
    except (ValueError, AssertionError) as e:
        raise unknown_backbone(name, str(e)) from None


def hub_repo(name: str) -> Optional[str]:
    """The Hub repository timm would download `name` from, or None for local or non-Hub weights."""
    import timm

    prefix, rest = parse_name(name)
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
        return hub_repo(resolve_name(name)[0])
    except BackboneError:
        return None


def cached_weights(name: str, repo: str) -> Optional[str]:
    """What timm would load for `name` from the local cache alone: a file, a ``local-dir:`` snapshot, or None."""
    import timm
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    prefix, rest = parse_name(name)
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
