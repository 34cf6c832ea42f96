"""Reading a LoRA in any supported format from a folder, a file or the Hub: the format is told from the files
(`read_adapter`), after the checks in `recycle.formats.safety`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

from ..adapter import LoRAAdapter, LoRAFormatError
from ..io import loads_strict, shown
from .official import from_official, is_official
from .peft_config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_config
from .peft_timm import from_peft
from .peft_transformers import from_transformers_peft, is_transformers_adapter
from .safety import PICKLE_SUFFIXES, check_weights_file, read_safetensors, refuse_pickles

__all__ = ["read_adapter", "load_lora", "stage_lora_files"]


def read_adapter(path: Union[str, Path], backbone=None, name: Optional[str] = None) -> LoRAAdapter:
    """Read a LoRA from a local folder (PEFT layout) or a ``.safetensors`` file (PEFT keys or official format).

    Args:
        path: folder or file.
        backbone: the `Backbone` it will be used with; required to map an official file's head.
        name: what to call it in error messages (default: the file or folder name), e.g. a Hub id for a download.

    Raises:
        LoRAFormatError: missing, pickled, corrupt, non-LoRA or unsupported files, or non-finite values.
    """
    path = Path(path)
    label = name or path.name
    if not path.exists():
        raise LoRAFormatError(f"LoRA path '{path}' does not exist")
    if path.is_file():
        check_weights_file(path)
    if path.is_dir():
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            singles = sorted(path.glob("*.safetensors"))
            if len(singles) == 1 and not (path / ADAPTER_CONFIG).is_file():
                return read_adapter(singles[0], backbone, name)
            refuse_pickles(path, name or str(path))
        tensors, metadata = read_safetensors(weights)
        config_file = path / ADAPTER_CONFIG
        if not config_file.is_file():
            raise LoRAFormatError(f"'{path}' has {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}")
        cfg = read_peft_config(config_file)
    else:
        tensors, metadata = read_safetensors(path)
        cfg = None
    try:
        meta = loads_strict(metadata.get("recycle", "{}"), f"{label}: the 'recycle' metadata")
    except ValueError as e:
        raise LoRAFormatError(str(e)) from None
    if not isinstance(meta, dict):
        raise LoRAFormatError(f"{label}: the 'recycle' metadata must be a JSON object, got {shown(meta)}")
    if is_official(tensors):
        return from_official(tensors, label, backbone)
    if cfg is None:
        raise LoRAFormatError(f"{label}: a PEFT LoRA needs its {ADAPTER_CONFIG} next to it (put both in one folder)")
    if is_transformers_adapter(tensors):  # made on a transformers ViT or CLIP: mapped onto the timm ViT
        adapter = from_transformers_peft(cfg, tensors, label, path if path.is_dir() else None, backbone)
    else:
        adapter = from_peft(cfg, tensors, meta, label)
    if adapter.backbone is None and path.is_dir():
        adapter.backbone = _card_base_model(path / "README.md")
    return adapter


def _card_base_model(card: Path) -> Optional[str]:
    """The ``base_model`` of a model card's metadata (the first, if several), or None."""
    from huggingface_hub.repocard import metadata_load

    if not card.is_file() or card.stat().st_size > 1 << 20:
        return None
    try:
        base = (metadata_load(card) or {}).get("base_model")
    except Exception:  # noqa: BLE001 - malformed YAML: the card just names no base
        return None
    base = base[0] if isinstance(base, list) and base else base
    return base if isinstance(base, str) and base.strip() else None


def load_lora(source: Union[str, Path], backbone=None, hub_only: bool = False) -> LoRAAdapter:
    """Load a LoRA from a local folder or file, or download it from the Hub by ``ORG/NAME`` id.

    Only ``*.json``, ``*.safetensors`` and ``*.md`` files are downloaded: pickles never leave the Hub.

    Args:
        hub_only: never read `source` from disk, even where a local folder of that name exists: it must be a Hub id
            (for servers whose users may not name local files).

    Raises:
        LoRAFormatError: unusable files (see `read_adapter`).
        HubError: malformed or unknown Hub id, or Hub unreachable with nothing cached.
    """
    from ..hub import HubError, download_repo_files, is_repo_id

    if not hub_only:
        try:
            local = Path(source).expanduser()
            exists = local.exists()
        except (OSError, ValueError):  # NUL bytes, names too long for the filesystem: not a usable path
            exists = False
        if exists:
            return read_adapter(local, backbone)
    source = str(source).strip()
    if not is_repo_id(source):
        raise HubError(
            f"'{source}' is not a Hub id of the form ORG/NAME"
            if hub_only
            else f"'{source}' is neither an existing local path nor a Hub id of the form ORG/NAME"
        )
    folder = download_repo_files(source, ["*.json", "*.safetensors", "*.md"])
    if not any(folder.glob("*.safetensors")):
        raise LoRAFormatError(
            f"Hub repository '{source}' has no .safetensors LoRA weights (pickled .bin/.pt "
            "weights are never downloaded or loaded)"
        )
    return read_adapter(folder, backbone, source)


def stage_lora_files(files: Sequence[Union[str, Path]], folder: Path, max_files: int = 4) -> Path:
    """The files of one LoRA, as uploaded or named one by one -> a path `read_adapter` understands: `folder`, holding
    them as a PEFT adapter, or the single official ``.safetensors`` file.

    Raises:
        LoRAFormatError: no weights, pickles, more than one weights file, or files of another kind.
    """
    paths = [Path(f) for f in files]
    if len(paths) > max_files:
        raise LoRAFormatError(
            f"{len(paths)} files uploaded; a LoRA is at most adapter_config.json plus adapter_model.safetensors"
        )
    pickles = [p.name for p in paths if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise LoRAFormatError(
            f"{', '.join(pickles)}: pickled weights are never loaded, because unpickling can run "
            "arbitrary code. Upload a .safetensors file."
        )
    weights = [p for p in paths if p.suffix.lower() == ".safetensors"]
    configs = [p for p in paths if p.suffix.lower() == ".json"]
    other = [p.name for p in paths if p not in weights and p not in configs]
    if other:
        raise LoRAFormatError(
            f"{', '.join(other)}: not a LoRA file; upload adapter_config.json and "
            "adapter_model.safetensors, or one official .safetensors file"
        )
    if not weights:
        raise LoRAFormatError("no weights uploaded: add adapter_model.safetensors (or an official .safetensors file)")
    if len(weights) > 1 or len(configs) > 1:
        raise LoRAFormatError(
            f"upload one LoRA at a time: got {len(weights)} .safetensors and {len(configs)} .json files"
        )
    if not configs:
        return weights[0]
    shutil.copyfile(configs[0], folder / ADAPTER_CONFIG)
    shutil.copyfile(weights[0], folder / ADAPTER_WEIGHTS)
    return folder
