"""Publishing a local surrogate pool as a Hub dataset (the layout: `recycle.pool.hub`): per-image metadata, the
dataset card, the files, and the upload."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Union

from ..hub import HubError, endpoint, is_repo_id, upload_files
from ..io import dumps_strict
from . import POOL_FORMAT, POOL_VERSION, Pool, PoolError, run_file, teacher_confidence
from .hub import IMAGE_PATH, RUN_NAME, DATA_DIR

__all__ = ["run_metadata", "dataset_card", "pool_dataset_files", "push_pool", "MAX_CARD_RUNS"]

_logger = logging.getLogger(__name__)

MAX_CARD_RUNS = 50  # runs whose settings the dataset card lists (every run's manifest holds its own)


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
        if not RUN_NAME.fullmatch(name):
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
                if not IMAGE_PATH.fullmatch(item[key]):
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
    files["README.md"] = dataset_card(pool, wanted, repo_id).encode()  # the pushed runs only
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
