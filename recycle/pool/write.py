"""Writing a run into the pool: built in a hidden ``.tmp-*`` folder and renamed into place in one step; zipping one."""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch
from PIL import Image

from ..adapter import LoRAAdapter
from ..invert import InversionConfig, InversionResult
from ..io import atomic_write_bytes, dumps_strict, loads_strict
from .manifest import POOL_FORMAT, POOL_VERSION, PoolError

_logger = logging.getLogger(__name__)


def _png_bytes(image: torch.Tensor) -> bytes:
    """``(3, H, W)`` in [0, 1] -> PNG bytes (8-bit, lossless, so zeroed patches stay exactly zero)."""
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "lora"


def run_folder_name(name: str, adapter: LoRAAdapter) -> str:
    """The pool folder of a zoo LoRA's run: ``<name>-<fingerprint[:8]>``, `name` made safe as a folder name."""
    return f"{_slug(name)}-{adapter.fingerprint()[:8]}"


def run_settings(config: InversionConfig, **extra) -> dict:
    """The settings record of an inversion run, as its manifest stores it (and a resumed run is compared against):
    the inversion settings, the pruning schedule keyed by block as text without blocks that prune nothing, and
    `extra` (the backbone, the BN prior, the classes)."""
    record = {**asdict(config), **extra}
    record["pruning"]["schedule"] = {str(k): v for k, v in config.pruning.schedule.items() if v > 0}
    return loads_strict(dumps_strict(record), "inversion settings")


def write_run(
    root: Union[str, Path],
    result: InversionResult,
    adapter: LoRAAdapter,
    source: str,
    settings: dict,
    patch_grid: tuple[int, int],
    name: Optional[str] = None,
) -> Path:
    """Add one inversion run to the pool at `root` (created if needed); returns the run folder.

    Args:
        result: the inversion output.
        adapter: the inverted LoRA (its fingerprint groups runs into sources; its class names label the images).
        source: where the LoRA came from (path or Hub id), for people reading the manifest.
        settings: the inversion settings, recorded verbatim.
        patch_grid: ``(gh, gw)`` of the backbone, to interpret kept indices.
        name: the run folder's name (default: source, fingerprint and a time stamp); it must not exist yet.
    """
    for key in ("images", "logits", "masked", "logits_kept"):
        t = getattr(result, key)
        if t is not None and not torch.isfinite(t).all():
            raise PoolError(f"refusing to add the run to the pool: its {key} contain NaN or Inf")
    root = Path(root)
    if root.is_symlink() and not root.exists():
        raise PoolError(f"pool folder '{root}' is a symbolic link to '{os.readlink(root)}', which does not exist")
    if root.exists() and not root.is_dir():
        raise PoolError(f"pool folder '{root}' is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        return _write_run(root, result, adapter, source, settings, patch_grid, name)
    except OSError as e:  # no permission, a read-only or full disk, a special filesystem such as /proc
        raise PoolError(
            f"cannot write the run into the pool folder '{root}': {e.strerror or e}"
            + (" (the disk is full)" if getattr(e, "errno", None) == errno.ENOSPC else "")
        ) from None


def pool_size(root: Union[str, Path]) -> int:
    """Bytes of the regular files under the pool folder `root` (0 when it does not exist); links are not followed."""
    total, stack = 0, [Path(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # missing, or not a folder
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def zip_run(run_dir: Path, zip_path: Path) -> Path:
    """A run folder as one zip file whose entries sit under the run's name; returns `zip_path`."""
    import zipfile

    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(Path(run_dir).rglob("*")):
            if f.is_file():
                zf.write(f, f"{run_dir.name}/{f.relative_to(run_dir)}")
    return zip_path


def _write_run(
    root: Path,
    result: InversionResult,
    adapter: LoRAAdapter,
    source: str,
    settings: dict,
    patch_grid: tuple[int, int],
    name: Optional[str],
) -> Path:
    fingerprint = adapter.fingerprint()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    name = name or f"{_slug(Path(source).name if os.sep in source else source)}-{fingerprint[:8]}-{stamp}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        (tmp / "images").mkdir()
        if result.masked is not None:
            (tmp / "masked").mkdir()
        names = adapter.class_names or [str(i) for i in range(adapter.num_classes)]
        items = []
        for i in range(result.images.shape[0]):
            label = int(result.labels[i])
            entry = {
                "label": label,
                "class": names[label],
                "image": f"images/{i:06d}.png",
                "logits": [round(float(v), 6) for v in result.logits[i]],
            }
            data = _png_bytes(result.images[i])
            (tmp / entry["image"]).write_bytes(data)
            entry["sha256"] = {"image": hashlib.sha256(data).hexdigest()}
            if result.masked is not None:
                entry["masked"] = f"masked/{i:06d}.png"
                data = _png_bytes(result.masked[i])
                (tmp / entry["masked"]).write_bytes(data)
                entry["sha256"]["masked"] = hashlib.sha256(data).hexdigest()
                entry["kept"] = [int(k) for k in result.kept[i]]
                entry["logits_kept"] = [round(float(v), 6) for v in result.logits_kept[i]]
            items.append(entry)
        manifest = {
            "format": POOL_FORMAT,
            "version": POOL_VERSION,
            "created": stamp,
            "source": {
                "name": source,
                "fingerprint": fingerprint,
                "backbone": adapter.backbone,
                "class_names": names,
                "info": adapter.info,
            },
            "settings": settings,
            "image_size": list(result.images.shape[2:]),
            "patch_grid": list(patch_grid),
            "steps_done": result.steps_done,
            "stopped": result.stopped,
            "items": items,
        }
        try:
            text = dumps_strict(manifest, indent=1)
        except ValueError as e:  # e.g. NaN in the settings: never written, since it is not JSON
            raise PoolError(f"refusing to write a manifest with a non-finite number ({e})") from None
        atomic_write_bytes(tmp / "manifest.json", text.encode())
        final = root / name
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _logger.info("pool: wrote %d images to %s", len(items), final)
    return final
