"""Surrogate pools on the Hugging Face Hub, as dataset repositories that `datasets` reads directly: the layout, and
browsing (bounded downloads); publishing is `recycle.pool.hub_publish`.

Layout of a pool dataset (the ``imagefolder`` layout with metadata files, one per run):

```
README.md                         dataset card: YAML metadata (configs: data_dir data) and the runs' settings
data/<run>/manifest.json          the run's manifest, as in a local pool (`recycle.pool`)
data/<run>/metadata.jsonl         one line per image: file_name, masked_file_name, class, label, source,
                                  source_fingerprint, run, teacher_confidence, teacher_confidence_kept, kept
data/<run>/images/NNNNNN.png      the surrogate images
data/<run>/masked/NNNNNN.png      their masked versions (only the kept patches)
```

``datasets.load_dataset("imagefolder", data_dir=...)`` (or ``load_dataset("ORG/NAME")``) reads every
``metadata.jsonl`` relative to its own folder and turns ``file_name`` into the ``image`` column and
``masked_file_name`` into the ``masked`` column. Every metadata file has the same columns: an image of a run inverted
without token pruning is its own masked version, with every patch kept. ``data/`` is a pool folder as
`recycle.pool.Pool` reads it, so a downloaded pool dataset is browsed, checked and sampled exactly as a local pool.

Downloads are bounded before anything is fetched, from the repository's file listing (sizes included): only
``data/<run>/manifest.json`` and ``data/<run>/{images,masked}/*.png`` are downloaded, at most so many runs, files
and bytes, each manifest at most so large. What is downloaded is then read by `recycle.pool.Pool` with its rules:
strict JSON, bounded manifests, files only inside their run, missing files refused, checksums verified.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..hub import HubError, endpoint, is_repo_id
from ..io import atomic_write_bytes
from . import (
    MAX_MANIFEST_BYTES,
    MAX_RUN_ITEMS,
    PoolError,
)

__all__ = ["HubPoolLimits", "DATA_DIR", "hub_dataset_id", "fetch_pool", "pool_cache_dir", "remove_downloads"]

_logger = logging.getLogger(__name__)

DATA_DIR = "data"
# Run folders and image files that are published and downloaded: plain names, so that paths are the same on every
# system and never hold characters that glob patterns or URLs treat specially.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
IMAGE_PATH = re.compile(r"(images|masked)/[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.png")
_PATTERNS = (DATA_DIR + "/*/manifest.json", DATA_DIR + "/*/images/*.png", DATA_DIR + "/*/masked/*.png")
_DATASET_PREFIXES = ("hf://datasets/", "https://huggingface.co/datasets/", "datasets/")


@dataclass(frozen=True)
class HubPoolLimits:
    """What one download of a pool dataset may fetch: runs (the first, by name), files, bytes in all, and bytes and
    images of one manifest."""

    max_runs: int = 100_000
    max_files: int = 1_000_000
    max_bytes: int = 64 << 30
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    max_items: int = MAX_RUN_ITEMS

    def __post_init__(self) -> None:
        for name in ("max_runs", "max_files", "max_bytes", "max_manifest_bytes", "max_items"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HubPoolLimits.{name} must be a whole number of at least 1, got {value!r}")


def hub_dataset_id(text: str) -> Optional[str]:
    """The repo id in a Hub dataset reference (``datasets/ORG/NAME``, ``hf://datasets/ORG/NAME`` or the dataset's
    URL), or None when `text` is not one.

    Raises:
        HubError: it starts like a dataset reference but holds no valid ``ORG/NAME``.
    """
    text = text.strip()
    prefix = next((p for p in _DATASET_PREFIXES if text.startswith(p)), None)
    if prefix is None:
        return None
    repo_id = text[len(prefix) :].strip("/")
    if not is_repo_id(repo_id):
        raise HubError(f"'{text[:120]}' is not a Hub dataset: write datasets/ORG/NAME")
    return repo_id


# ------------------------------------------------------------------------------------------------------- browsing
def pool_cache_dir() -> Path:
    """Where downloaded pool datasets are kept: ``RECYCLE_HUB_POOLS``, else ``recycle-pools`` next to the Hub cache."""
    from huggingface_hub import constants

    configured = os.environ.get("RECYCLE_HUB_POOLS", "").strip()
    return Path(configured) if configured else Path(constants.HF_HUB_CACHE).parent / "recycle-pools"


def _listing(repo_id: str, revision: Optional[str]) -> tuple[str, dict[str, Optional[int]]]:
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    try:
        info = HfApi(endpoint=endpoint()).dataset_info(repo_id, revision=revision, files_metadata=True)
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"Hub dataset '{repo_id}' does not exist, or it is private") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"Hub dataset '{repo_id}' has no revision '{revision}'") from None
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"Hub request for dataset '{repo_id}' failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - network failures come from several libraries
        if "connect" in type(e).__name__.lower() or isinstance(e, (ConnectionError, OSError)):
            raise HubError(f"cannot reach the Hugging Face Hub at {endpoint()} to read dataset '{repo_id}'") from None
        raise
    return str(info.sha), {s.rfilename: s.size for s in (info.siblings or [])}


def fetch_pool(
    repo_id: str,
    limits: HubPoolLimits = HubPoolLimits(),
    revision: Optional[str] = None,
    cache_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """Download the pool dataset `repo_id` within `limits`; returns its pool folder (``data/`` of a local copy,
    kept per commit under `cache_dir`, default `pool_cache_dir`). Read it with `recycle.pool.Pool` or `PoolIndex`
    and the same bounds.

    Raises:
        HubError: malformed id, unknown dataset or revision, unreachable Hub.
        PoolError: the dataset holds no pool runs, or more than `limits` allow.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    if not is_repo_id(repo_id):
        raise HubError(f"'{repo_id}' is not a Hub dataset id of the form ORG/NAME")
    sha, sizes = _listing(repo_id, revision)
    if len(sizes) > 4 * limits.max_files:
        raise PoolError(
            f"Hub dataset '{repo_id}' lists {len(sizes):,} files, more than a pool of at most "
            f"{limits.max_files:,} files can hold"
        )
    runs = sorted(
        {
            p.split("/")[1]
            for p in sizes
            if fnmatch.fnmatch(p, _PATTERNS[0]) and p.count("/") == 2 and RUN_NAME.fullmatch(p.split("/")[1])
        }
    )
    if not runs:
        raise PoolError(f"Hub dataset '{repo_id}' holds no pool runs ({DATA_DIR}/<run>/manifest.json)")
    if len(runs) > limits.max_runs:  # refused here, since a pattern per run would make every match quadratic
        raise PoolError(
            f"Hub dataset '{repo_id}' holds {len(runs):,} pool runs, more than the {limits.max_runs:,} accepted"
        )
    # The same matching as snapshot_download's allow_patterns, so these are the files it will fetch.
    wanted = {p: s for p, s in sizes.items() if any(fnmatch.fnmatch(p, pattern) for pattern in _PATTERNS)}
    if len(wanted) > limits.max_files:
        raise PoolError(
            f"Hub dataset '{repo_id}' has {len(wanted):,} pool files, more than the {limits.max_files:,} accepted"
        )
    for path, size in wanted.items():
        if size is None:
            raise PoolError(f"Hub dataset '{repo_id}': the Hub did not say how large {path} is")
        if path.endswith("/manifest.json") and size > limits.max_manifest_bytes:
            raise PoolError(
                f"Hub dataset '{repo_id}': {path} is {size:,} bytes, more than the "
                f"{limits.max_manifest_bytes:,} accepted for a manifest"
            )
    total = sum(s for s in wanted.values() if s is not None)
    if total > limits.max_bytes:
        raise PoolError(
            f"Hub dataset '{repo_id}' has {total:,} bytes of pool files, more than the {limits.max_bytes:,} accepted"
        )
    folder = Path(cache_dir) if cache_dir is not None else pool_cache_dir()
    target = folder / repo_id.replace("/", "--") / sha
    done = target / ".complete"
    if not done.is_file():
        try:
            snapshot_download(
                repo_id, repo_type="dataset", revision=sha, allow_patterns=list(_PATTERNS), local_dir=str(target)
            )
        except hf_errors.HfHubHTTPError as e:
            raise HubError(f"download of dataset '{repo_id}' failed: {e}") from None
        except Exception as e:  # noqa: BLE001 - network failures come from several libraries
            if "connect" in type(e).__name__.lower() or isinstance(e, (ConnectionError, OSError)):
                raise HubError(
                    f"cannot reach the Hugging Face Hub at {endpoint()} to download dataset '{repo_id}'"
                ) from None
            raise
        atomic_write_bytes(done, sha.encode())
    _logger.info("pool dataset %s at %s: %s", repo_id, sha[:12], target)
    return target / DATA_DIR


def remove_downloads(
    repo_id: str, keep: Optional[Union[str, Path]] = None, cache_dir: Optional[Union[str, Path]] = None
) -> int:
    """Delete the downloaded commits of the pool dataset `repo_id` (all, or all but the one whose pool folder is
    `keep`, as `fetch_pool` returned it); returns how many were deleted. Only folders inside the dataset's own
    folder of the cache are removed, never what a link points to."""
    folder = (Path(cache_dir) if cache_dir is not None else pool_cache_dir()) / repo_id.replace("/", "--")
    if not is_repo_id(repo_id) or folder.is_symlink() or not folder.is_dir():
        return 0
    kept = Path(keep).parent if keep is not None else None
    removed = 0
    for commit in folder.iterdir():
        if commit.is_dir() and not commit.is_symlink() and (kept is None or commit != kept):
            shutil.rmtree(commit, ignore_errors=True)
            removed += 1
    return removed
