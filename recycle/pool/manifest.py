"""A run's manifest: the pool format's name, version and bounds, the pool's errors, and the checks every reader uses."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from ..io import loads_strict


POOL_FORMAT = "recycle-pool"
POOL_VERSION = 1
# A run's manifest is read only up to these sizes (a run of 1000 classes x 10 images with 1000 logits each is about
# 200 MB); callers serving untrusted requests pass smaller bounds.
MAX_MANIFEST_BYTES = 256 << 20
MAX_RUN_ITEMS = 100_000
MAX_IMAGE_SIDE = 1024  # a run's images are the backbone's input size: every decode is bounded by it
MAX_PATCHES = 16_384  # the patch grid a run's kept indices refer to
_FLOAT32_MAX = 3.4028234663852886e38


class PoolError(ValueError):
    """A pool (or one of its runs) is missing, corrupt or half-written. The message names the file."""


class EmptyPoolError(PoolError):
    """There is no pool yet at that place: the folder does not exist, or it holds no runs."""


def teacher_confidence(logits: Union[torch.Tensor, list], labels: Union[torch.Tensor, list]) -> torch.Tensor:
    """The teacher's confidence in each image's own class: ``softmax(logits)[i, labels[i]]``.

    Args:
        logits: ``(N, C)`` teacher logits (a tensor, or the nested lists a manifest holds).
        labels: ``(N,)`` class indices.

    Returns:
        ``(N,)`` float32 probabilities.
    """
    logits = torch.as_tensor(logits).float()
    labels = torch.as_tensor(labels).long().view(-1, 1)
    return logits.softmax(-1).gather(1, labels).flatten()


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"invalid {what}")


def _numbers(values: object, kind: type) -> bool:
    """A non-empty list of ints (``kind=int``) or of ints and floats (``kind=float``); never bools."""
    kinds = (int,) if kind is int else (int, float)
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, kinds) and not isinstance(v, bool) for v in values)
    )


def _finite32(values: list) -> bool:
    """Every number is finite in float32 (a manifest's 1e39 would become infinity when loaded)."""
    return all(abs(v) <= _FLOAT32_MAX for v in values)


def _pair(value: object, high: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= high for v in value)
    )


def run_file(run_dir: Path, name: object) -> Path:
    """The file a manifest names, which must be a relative path that resolves inside its run folder."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise PoolError(f"{run_dir.name}: the manifest names {str(name)[:80]!r}, which is not a file inside the run")
    path = (run_dir / name).resolve()
    if not path.is_relative_to(run_dir.resolve()):
        raise PoolError(f"{run_dir.name}: the manifest names {name[:80]!r}, which resolves outside the run folder")
    return path


def read_run_manifest(path: Path, max_bytes: int = MAX_MANIFEST_BYTES, max_items: int = MAX_RUN_ITEMS) -> dict:
    """A run's ``manifest.json``, validated: bounded in size and items, of this format and version, every listed
    image inside the run folder and present.

    Raises:
        PoolError: naming the manifest and what is wrong with it.
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise PoolError(f"{path}: the manifest is {size:,} bytes, more than the {max_bytes:,} accepted")
        m = loads_strict(path.read_bytes(), "the manifest")
    except (OSError, ValueError) as e:
        if isinstance(e, PoolError):
            raise
        raise PoolError(f"{path}: unreadable manifest ({e})") from None
    if isinstance(m, dict) and isinstance(m.get("items"), list) and len(m["items"]) > max_items:
        raise PoolError(
            f"{path}: the manifest lists {len(m['items']):,} images, more than the {max_items:,} accepted in one run"
        )
    if not isinstance(m, dict) or m.get("format") != POOL_FORMAT:
        raise PoolError(f"{path}: not a surrogate-pool manifest")
    if m.get("version") != POOL_VERSION:
        raise PoolError(
            f"{path}: pool format version {m.get('version')} is not supported (this version reads {POOL_VERSION})"
        )
    try:
        source = m["source"]
        fingerprint, class_names = source["fingerprint"], source["class_names"]
        _expect(isinstance(fingerprint, str) and isinstance(source.get("name", ""), str), "source")
        _expect(isinstance(class_names, list) and all(isinstance(c, str) for c in class_names), "class_names")
        _expect(isinstance(m["items"], list), "items")
        _expect(
            _pair(m.get("image_size"), MAX_IMAGE_SIDE),
            f"image_size {str(m.get('image_size'))[:40]} (two sides of 1 to {MAX_IMAGE_SIDE} pixels)",
        )
        grid = m.get("patch_grid")
        _expect(
            grid is None or (_pair(grid, MAX_PATCHES) and grid[0] * grid[1] <= MAX_PATCHES),
            f"patch_grid {str(grid)[:40]}",
        )
        patches = grid[0] * grid[1] if grid is not None else None
        for item in m["items"]:
            _expect(isinstance(item, dict), "item")
            label = item["label"]
            _expect("logits" in item, "logits")
            _expect(isinstance(label, int) and 0 <= label < len(class_names), f"label {label!r}")
            _expect(isinstance(item["class"], str) and isinstance(item["sha256"], dict), "class or sha256")
            for key in ("logits", "logits_kept"):
                if key in item:
                    _expect(_numbers(item[key], float) and len(item[key]) == len(class_names), key)
                    _expect(_finite32(item[key]), f"{key} (a teacher logit beyond float32's range)")
            if "kept" in item:
                kept = item["kept"]
                _expect(_numbers(kept, int), "kept")
                _expect(patches is not None, "kept (the manifest has no patch_grid to check them against)")
                _expect(
                    len(set(kept)) == len(kept) and min(kept) >= 0 and max(kept) < patches,
                    f"kept (patch indices must be distinct and below the {grid[0]}x{grid[1]} grid's {patches})",
                )
            for key in ("image", "masked"):
                if key in item:
                    if not run_file(path.parent, item[key]).is_file():
                        raise PoolError(f"{path.parent.name}: {item[key]} is listed in the manifest but missing")
                    _expect(isinstance(item["sha256"].get(key), str), f"sha256 of {key}")
    except PoolError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise PoolError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    return m
