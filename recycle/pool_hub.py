"""Surrogate pools on the Hugging Face Hub, as dataset repositories that `datasets` reads directly.

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
import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

from .hub import HubError, endpoint, is_repo_id, upload_files
from .io import atomic_write_bytes, dumps_strict
from .pool import (
    MAX_MANIFEST_BYTES,
    MAX_RUN_ITEMS,
    POOL_FORMAT,
    POOL_VERSION,
    Pool,
    PoolError,
    run_file,
    teacher_confidence,
)

__all__ = [
    "HubPoolLimits",
    "DATA_DIR",
    "hub_dataset_id",
    "run_metadata",
    "dataset_card",
    "pool_dataset_files",
    "push_pool",
    "fetch_pool",
    "pool_cache_dir",
    "remove_downloads",
]

_logger = logging.getLogger(__name__)

DATA_DIR = "data"
# Run folders and image files that are published and downloaded: plain names, so that paths are the same on every
# system and never hold characters that glob patterns or URLs treat specially.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_IMAGE_PATH = re.compile(r"(images|masked)/[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.png")
_PATTERNS = (DATA_DIR + "/*/manifest.json", DATA_DIR + "/*/images/*.png", DATA_DIR + "/*/masked/*.png")
MAX_CARD_RUNS = 50  # runs whose settings the dataset card lists (every run's manifest holds its own)
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


# ------------------------------------------------------------------------------------------------------ publishing
def _patch_count(manifest: dict, run: str) -> int:
    grid = manifest.get("patch_grid")
    if not (
        isinstance(grid, list)
        and len(grid) == 2
        and all(isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= 4096 for g in grid)
    ):
        raise PoolError(
            f"{run}: the manifest has no valid patch_grid (two whole numbers), so the kept patches of "
            "its unmasked images cannot be listed"
        )
    return grid[0] * grid[1]


def run_metadata(run: str, manifest: dict) -> list[dict]:
    """The ``metadata.jsonl`` rows of one run (a manifest validated by `Pool`): per image its files, class, source
    LoRA, the teacher's confidence on the whole image and on its kept patches, and the kept patch indices."""
    source = manifest["source"]
    rows = []
    patches = None
    for item in manifest["items"]:
        label = item["label"]
        masked = "masked" in item
        if not masked and patches is None:
            patches = _patch_count(manifest, run)
        logits_kept = item.get("logits_kept", item["logits"]) if masked else item["logits"]
        rows.append(
            {
                "file_name": item["image"],
                "masked_file_name": item["masked"] if masked else item["image"],
                "class": item["class"],
                "label": label,
                "source": source.get("name", ""),
                "source_fingerprint": source["fingerprint"],
                "run": run,
                "teacher_confidence": round(float(teacher_confidence([item["logits"]], [label])[0]), 6),
                "teacher_confidence_kept": round(float(teacher_confidence([logits_kept], [label])[0]), 6),
                "kept": list(item["kept"]) if masked and "kept" in item else list(range(patches or 0)),
            }
        )
    return rows


def dataset_card(pool: Pool, runs: list[int], repo_id: str) -> str:
    """The dataset card (README.md) of a pool dataset: YAML metadata the Hub and `datasets` read, how to load it, the
    columns, and the settings of its runs."""
    from huggingface_hub import DatasetCardData

    images = sum(len(pool.runs[r]["items"]) for r in runs)
    sources = len({pool.runs[r]["source"]["fingerprint"] for r in runs})
    size = next(
        label
        for bound, label in (
            (1_000, "n<1K"),
            (10_000, "1K<n<10K"),
            (100_000, "10K<n<100K"),
            (1_000_000, "100K<n<1M"),
            (float("inf"), "n>1M"),
        )
        if images < bound
    )
    data = DatasetCardData(
        pretty_name="LoRA Recycle surrogate pool",
        task_categories=["image-classification"],
        size_categories=[size],
        tags=["lora-recycle", "model-inversion", "synthetic", "surrogate-images"],
        configs=[{"config_name": "default", "data_dir": DATA_DIR}],
        lora_recycle={
            "format": POOL_FORMAT,
            "version": POOL_VERSION,
            "runs": len(runs),
            "images": images,
            "sources": sources,
        },
    )
    settings = []
    for r in runs[:MAX_CARD_RUNS]:
        run = pool.runs[r]
        summary = {
            "source": run["source"].get("name", ""),
            "fingerprint": run["source"]["fingerprint"],
            "backbone": run["source"].get("backbone"),
            "images": len(run["items"]),
            "steps_done": run.get("steps_done"),
            "stopped": run.get("stopped"),
            "settings": run.get("settings"),
        }
        # json.dumps puts every value on lines that start with a space or a bracket, so no line can close the fence
        settings.append(f"### {pool.run_dirs[r].name}\n\n```json\n{dumps_strict(summary, indent=1)}\n```\n")
    more = (
        f"\nThe card lists the settings of the first {MAX_CARD_RUNS} runs; every run's `manifest.json` holds its own.\n"
        if len(runs) > MAX_CARD_RUNS
        else ""
    )
    body = f"""
# LoRA Recycle surrogate pool

Surrogate images inverted from LoRAs with [LoRA Recycle](https://arxiv.org/abs/2412.02220): {images} images from
{sources} LoRA(s) in {len(runs)} inversion run(s). Each image was optimised until the LoRA's classification head was
confident it shows its class; its masked version keeps only the patches the [CLS] token attended to most.

```python
from datasets import load_dataset
pool = load_dataset("{repo_id}", split="train")  # columns below; `image` and `masked` are images
```

Browse it in the LoRA Recycle app (pool tab: `datasets/{repo_id}`), or download `data/` as a pool folder for
`recycle meta-train --pool`.

| column | meaning |
|---|---|
| `image` | the surrogate image (`file_name` in `data/<run>/metadata.jsonl`) |
| `masked` | the image with the dropped patches zeroed (`masked_file_name`); an image inverted without pruning \
is its own masked version |
| `class`, `label` | its class name, and the class's index in the source LoRA's head |
| `source`, `source_fingerprint` | the LoRA it was inverted from, and the fingerprint of its weights |
| `run` | the inversion run (`data/<run>/`, whose `manifest.json` holds the settings and the teacher's logits) |
| `teacher_confidence` | the source LoRA's probability for the image's class |
| `teacher_confidence_kept` | the same on the kept patches only |
| `kept` | indices of the kept patches (row-major over the patch grid) |

## Settings

{"".join(settings)}{more}"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file, never through a symbolic link."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError as e:
        raise PoolError(f"cannot read {path} ({e.strerror or e}); symbolic links are never published") from None


def pool_dataset_files(
    pool_root: Union[str, Path], repo_id: str, runs: Optional[Iterable[str]] = None
) -> dict[str, bytes]:
    """``{path in the dataset repo: content}`` of the pool at `pool_root` (or of its runs named in `runs`), plus the
    dataset card, which describes the whole local pool. Images are checksum-verified against their manifests as
    they are read.

    Raises:
        PoolError: the pool is missing or invalid, a run or file name is not publishable, a named run is missing, or
            an image does not match its checksum.
    """
    pool = Pool(pool_root)
    names = [d.name for d in pool.run_dirs]
    wanted = list(range(len(names))) if runs is None else []
    if runs is not None:
        for name in runs:
            if name not in names:
                raise PoolError(f"pool '{pool_root}' has no run '{name}'")
            wanted.append(names.index(name))
    files: dict[str, bytes] = {}
    for r in wanted:
        run_dir, manifest, name = pool.run_dirs[r], pool.runs[r], names[r]
        if not _RUN_NAME.fullmatch(name):
            raise PoolError(
                f"run folder '{name[:80]}' cannot be published: use letters, digits, '.', '_' and '-' "
                "only (at most 200)"
            )
        base = f"{DATA_DIR}/{name}"
        files[f"{base}/manifest.json"] = _read_regular(run_dir / "manifest.json")
        for item in manifest["items"]:
            for key in ("image", "masked"):
                if key not in item:
                    continue
                if not _IMAGE_PATH.fullmatch(item[key]):
                    raise PoolError(
                        f"{name}: image '{item[key][:80]}' cannot be published: images must be "
                        "images/NAME.png or masked/NAME.png"
                    )
                data = _read_regular(run_file(run_dir, item[key]))
                if hashlib.sha256(data).hexdigest() != item["sha256"][key]:
                    raise PoolError(f"{run_dir / item[key]}: checksum mismatch, the file is corrupt or was modified")
                files[f"{base}/{item[key]}"] = data
        lines = "".join(dumps_strict(row) + "\n" for row in run_metadata(name, manifest))
        files[f"{base}/metadata.jsonl"] = lines.encode()
    files["README.md"] = dataset_card(pool, list(range(len(names))), repo_id).encode()  # the whole local pool
    return files


def push_pool(
    pool_root: Union[str, Path],
    repo_id: str,
    token: Optional[str] = None,
    private: bool = False,
    runs: Optional[Iterable[str]] = None,
) -> str:
    """Publish the pool at `pool_root` (or its runs named in `runs`) as the Hub dataset `repo_id`, created if
    needed, in one commit; returns the dataset's URL. Runs already in the dataset and not pushed stay as they are.

    Raises:
        HubError: malformed id, or the upload failed (the message says why).
        PoolError: as `pool_dataset_files`.
    """
    if not is_repo_id(repo_id):
        raise HubError(f"'{repo_id}' is not a Hub id of the form ORG/NAME")
    files = pool_dataset_files(pool_root, repo_id, runs)
    upload_files(
        repo_id,
        files,
        f"Add {len(files) - 1} pool files (LoRA Recycle)",
        repo_type="dataset",
        token=token,
        private=private,
    )
    _logger.info("pushed %d files of pool %s to dataset %s", len(files), pool_root, repo_id)
    return f"{endpoint()}/datasets/{repo_id}"


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
            if fnmatch.fnmatch(p, _PATTERNS[0]) and p.count("/") == 2 and _RUN_NAME.fullmatch(p.split("/")[1])
        }
    )
    if not runs:
        raise PoolError(f"Hub dataset '{repo_id}' holds no pool runs ({DATA_DIR}/<run>/manifest.json)")
    patterns = (
        list(_PATTERNS)
        if len(runs) <= limits.max_runs
        else [
            f"{DATA_DIR}/{run}/{tail}"
            for run in runs[: limits.max_runs]
            for tail in ("manifest.json", "images/*.png", "masked/*.png")
        ]
    )
    # The same matching as snapshot_download's allow_patterns, so these are the files it will fetch.
    wanted = {p: s for p, s in sizes.items() if any(fnmatch.fnmatch(p, pattern) for pattern in patterns)}
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
                repo_id, repo_type="dataset", revision=sha, allow_patterns=patterns, local_dir=str(target)
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
