"""A LoRA zoo: a folder of LoRAs in the native format plus ``zoo.json``, and the work done on a whole zoo.

`pretune_zoo` makes one (K LoRAs, each with a head, each on its own seeded N-way task from an ImageFolder dataset;
the paper's 100 5-way LoRAs stand in for those people have published), `load_zoo` reads one, `read_zoo_manifest`
validates its manifest, and `invert_zoo` inverts every LoRA of one into a surrogate pool. Finished LoRAs and runs
are skipped, so an interrupted job resumes where it stopped. Under torchrun the LoRAs are dealt to the ranks
round-robin (each seeded by its index, so the zoo and the pool are the same for any number of ranks); rank 0 writes
``zoo.json`` once every LoRA is on disk.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from . import distributed
from .adapter import LoRAAdapter, LoRAFormatError
from .backbone import Backbone
from .episodes import image_folder
from .formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter, save_adapter
from .images import load_image
from .invert import BNPrior, InversionConfig, InversionProgress, InversionResult, invert
from .io import atomic_write_bytes
from .pool import PoolError, read_run_manifest, run_folder_name, run_settings, write_run
from .pretune import PretuneConfig, sample_tasks, tune_lora

__all__ = ["ZOO_MANIFEST", "read_zoo_manifest", "pretune_zoo", "load_zoo", "invert_zoo"]

_logger = logging.getLogger(__name__)

ZOO_MANIFEST = "zoo.json"
MAX_ZOO_MANIFEST_BYTES = 16 << 20
MAX_ZOO_LORAS = 100_000


def _zoo_name_problem(name: object) -> Optional[str]:
    """Why `name` cannot be a LoRA's folder name inside a zoo (None when it can)."""
    if not isinstance(name, str):
        return f"its name must be text, got {json.dumps(name)[:40]}"
    if not name or name in (".", "..") or len(name) > 255:
        return f"its name {name[:60]!r} is not a folder name"
    if "/" in name or "\\" in name or name.startswith("~") or Path(name).is_absolute():
        return f"its name {name[:60]!r} is a path; a zoo lists the names of folders inside it"
    if not name.isprintable():
        return f"its name {name[:60]!r} contains control characters"
    return None


def read_zoo_manifest(root: Path) -> dict:
    """The zoo manifest ``root/zoo.json``, validated (``{}`` when there is none): an object whose ``loras`` is a list
    of entries, each an object with a unique ``name`` that is a folder inside the zoo; ``config``, if present, is an
    object.

    Raises:
        ValueError: naming the file and the entry: too large, not UTF-8 or strict JSON, or of the wrong shape.
    """
    path = root / ZOO_MANIFEST
    if not path.is_file():
        return {}
    try:
        size = path.stat().st_size
        if size > MAX_ZOO_MANIFEST_BYTES:
            raise ValueError(f"{path} is {size} bytes; a zoo manifest is at most {MAX_ZOO_MANIFEST_BYTES} bytes")
        # zoos written before held-out accuracies were stored as null hold NaN there: read as null
        manifest = json.loads(
            path.read_bytes(),
            parse_constant=lambda _: None,
            parse_float=lambda text: float(text) if math.isfinite(float(text)) else None,
        )
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e})") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it to rebuild the zoo manifest") from None
    if not isinstance(manifest, dict):
        raise ValueError(
            f"{path} holds a JSON {type(manifest).__name__ if manifest is not None else 'null'}; a zoo "
            "manifest is an object with a 'loras' list"
        )
    loras = manifest.get("loras", [])
    if not isinstance(loras, list):
        raise ValueError(f"{path}: 'loras' must be a list of entries, got {json.dumps(loras)[:40]}")
    if len(loras) > MAX_ZOO_LORAS:
        raise ValueError(f"{path} lists {len(loras)} LoRAs; at most {MAX_ZOO_LORAS}")
    if not isinstance(manifest.get("config", {}), dict):
        raise ValueError(f"{path}: 'config' must be an object")
    seen: dict[str, int] = {}
    for k, entry in enumerate(loras):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {k + 1} of 'loras' must be an object, got {json.dumps(entry)[:40]}")
        if "name" not in entry:
            raise ValueError(f"{path}: entry {k + 1} of 'loras' has no 'name'")
        problem = _zoo_name_problem(entry["name"])
        if problem:
            raise ValueError(f"{path}: entry {k + 1} of 'loras': {problem}")
        name = entry["name"]
        if name in seen:
            raise ValueError(
                f"{path}: entries {seen[name] + 1} and {k + 1} of 'loras' are both named {name!r}; "
                "each LoRA must be listed once"
            )
        seen[name] = k
        classes = entry.get("classes", [])
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"{path}: LoRA {name!r}: 'classes' must be a list of names")
    return manifest


def _accuracy(value: object) -> Optional[float]:
    """A held-out accuracy as the manifest stores it: rounded, or None when there is none (NaN)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return round(value, 4) if math.isfinite(value) else None


def _finished(directory: Path) -> bool:
    """Whether a LoRA folder is complete (`save_adapter` writes the config last)."""
    return (directory / ADAPTER_WEIGHTS).is_file() and (directory / ADAPTER_CONFIG).is_file()


def _entry_from_disk(directory: Path) -> dict:
    """The manifest entry of a finished LoRA that the manifest does not list yet (tuned by another rank, or by a
    run killed before it updated the manifest)."""
    adapter = read_adapter(directory)
    stamp = _dt.datetime.fromtimestamp((directory / ADAPTER_CONFIG).stat().st_mtime, _dt.timezone.utc)
    return {
        "name": directory.name,
        "classes": adapter.class_names,
        "holdout_acc": _accuracy(adapter.info.get("holdout_acc")),
        "created": stamp.isoformat(timespec="seconds"),
    }


def pretune_zoo(
    backbone: Backbone,
    data: Union[str, Path],
    out: Union[str, Path],
    config: PretuneConfig,
    progress: Optional[Callable[[int, int, dict], None]] = None,
) -> dict:
    """Build (or finish) a zoo of ``config.num_loras`` LoRAs under `out`; returns the zoo manifest.

    Under torchrun each rank tunes its share; rank 0 waits for the others' LoRAs and returns the whole manifest, the
    other ranks return the manifest of what they saw."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names, paths = image_folder(data)
    tasks = sample_tasks(len(names), config.num_loras, config.way, config.seed)
    manifest = read_zoo_manifest(out)
    if manifest and manifest.get("config", {}).get("seed") != config.seed:
        raise ValueError(
            f"{out} holds a zoo made with seed {manifest['config'].get('seed')}; use that seed to "
            "resume, or another folder"
        )
    entries = {e["name"]: e for e in manifest.get("loras", [])}
    manifest = {
        "format": "recycle-zoo",
        "version": 1,
        "backbone": backbone.name,
        "data": str(data),
        "config": asdict(config),
        "loras": [],
    }
    lora_names = [f"lora_{k:03d}" for k in range(len(tasks))]
    serial = distributed.world_size() == 1
    for k in distributed.shard_indices(len(tasks)):
        name, classes = lora_names[k], tasks[k]
        if _finished(out / name):
            manifest["loras"].append(entries[name] if name in entries else _entry_from_disk(out / name))
            continue
        train_x, train_y, val_x, val_y = [], [], [], []
        for label, c in enumerate(classes):
            files = paths[c]
            n_val = int(len(files) * config.holdout)
            cut = len(files) - n_val
            for i, f in enumerate(files):
                (train_x if i < cut else val_x).append(load_image(f))
                (train_y if i < cut else val_y).append(label)
        x = backbone.preprocess(train_x)
        vx = backbone.preprocess(val_x) if val_x else None
        adapter, acc = tune_lora(
            backbone,
            x,
            torch.tensor(train_y),
            config,
            config.seed * 100_003 + k,
            vx,
            torch.tensor(val_y) if val_y else None,
        )
        adapter.class_names = [names[c] for c in classes]
        adapter.info = {
            "made_by": "recycle pretune",
            "data": str(data),
            "task": k,
            "holdout_acc": acc,
            "steps": config.steps,
        }
        save_adapter(adapter, out / name)
        entry = {
            "name": name,
            "classes": adapter.class_names,
            "holdout_acc": _accuracy(acc),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest["loras"].append(entry)
        if serial:  # with several ranks only rank 0 writes the manifest, at the end
            atomic_write_bytes(out / ZOO_MANIFEST, json.dumps(manifest, indent=1).encode())
        if progress is not None:
            progress(k + 1, len(tasks), entry)
        _logger.info("%s: %s, held-out accuracy %.3f", name, adapter.class_names, acc)
    if not distributed.is_main():
        return manifest
    if not serial:
        distributed.wait_until(
            lambda: sum(not _finished(out / n) for n in lora_names), "waiting for the other ranks' LoRAs"
        )
        mine = {e["name"]: e for e in manifest["loras"]}
        manifest["loras"] = [
            mine[n] if n in mine else entries[n] if n in entries else _entry_from_disk(out / n) for n in lora_names
        ]
    atomic_write_bytes(out / ZOO_MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def load_zoo(root: Union[str, Path], backbone: Optional[Backbone] = None) -> list[tuple[str, LoRAAdapter]]:
    """``[(name, adapter)]`` for every LoRA in a zoo folder (listed in ``zoo.json``, or every subfolder).

    Raises:
        FileNotFoundError: the zoo folder does not exist.
        ValueError: ``zoo.json`` is malformed (see `read_zoo_manifest`), a listed LoRA's folder is missing or resolves
            outside the zoo, or the zoo holds no LoRAs.
        LoRAFormatError: a LoRA cannot be used; the message names it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"zoo folder '{root}' does not exist")
    manifest = read_zoo_manifest(root)
    names = [e["name"] for e in manifest.get("loras", [])] or sorted(
        d.name for d in root.iterdir() if (d / ADAPTER_WEIGHTS).is_file()
    )
    if not names:
        raise ValueError(f"zoo '{root}' holds no LoRAs")
    inside = root.resolve()
    out = []
    for name in names:
        folder = root / name
        if not folder.resolve().is_relative_to(inside):
            raise ValueError(f"{root / ZOO_MANIFEST}: LoRA {name!r} resolves outside the zoo folder")
        if not folder.is_dir():
            raise ValueError(f"{root / ZOO_MANIFEST} lists LoRA {name!r}, but the zoo has no folder {folder}")
        try:
            out.append((name, read_adapter(folder, backbone)))
        except LoRAFormatError as e:
            raise LoRAFormatError(f"zoo '{root}', LoRA {name!r}: {e}") from None
    return out


def invert_zoo(
    backbone: Backbone,
    zoo: Union[str, Path],
    root: Union[str, Path],
    config: InversionConfig,
    bn_prior: Optional[BNPrior] = None,
    settings: Optional[dict] = None,
    progress: Optional[Callable[[str, InversionProgress], None]] = None,
) -> list[tuple[str, Path, Optional[InversionResult]]]:
    """Invert every LoRA of the zoo folder `zoo` into the pool at `root`: one run per LoRA, named
    ``<LoRA name>-<fingerprint[:8]>``, LoRA k seeded by ``derive_seed(config.seed, k)``.

    A run that is already in the pool with the same settings is skipped, so a killed job resumes where it stopped.
    Under torchrun the LoRAs are dealt to the ranks round-robin and each rank writes whole runs atomically; the pool
    is the same for any number of ranks.

    Args:
        settings: recorded in every run's manifest next to the inversion settings (e.g. the BN prior's name).
        progress: called with the LoRA's name and each inversion step's `InversionProgress`.

    Returns:
        ``(LoRA name, run folder, result)`` for this rank's LoRAs; result is None for a run found finished.

    Raises:
        PoolError: the pool holds a run of one of these LoRAs made with other settings.
    """
    root = Path(root)
    zoo_loras = load_zoo(zoo, backbone)
    runs: dict[str, str] = {}
    for name, adapter in zoo_loras:  # two LoRAs must never share a run folder
        run_name = run_folder_name(name, adapter)
        if run_name in runs:
            raise PoolError(
                f"zoo '{zoo}': LoRAs {runs[run_name]!r} and {name!r} would both be inverted into the pool "
                f"run '{run_name}' (the same weights, or names that are the same as folder names); "
                "remove one or rename it"
            )
        runs[run_name] = name
    grid = tuple(backbone.model.patch_embed.grid_size)
    done = []
    for k in distributed.shard_indices(len(zoo_loras)):
        name, adapter = zoo_loras[k]
        cfg = replace(config, seed=distributed.derive_seed(config.seed, k))
        record = run_settings(cfg, **(settings or {}))
        run = root / run_folder_name(name, adapter)
        if (run / "manifest.json").is_file():
            found = read_run_manifest(run / "manifest.json")["settings"]
            if found != record:
                changed = sorted(key for key in set(found) | set(record) if found.get(key) != record.get(key))
                raise PoolError(
                    f"{run} (LoRA {name!r} of the zoo) was inverted with other settings "
                    f"({', '.join(changed)} differ); use another pool folder, or the settings it was made "
                    "with"
                )
            _logger.info("pool: %s is already inverted (%s)", name, run.name)
            done.append((name, run, None))
            continue
        if run.exists():
            raise PoolError(f"{run} exists but holds no manifest.json, so it is not a finished run; remove it")
        try:
            result = invert(
                backbone,
                adapter,
                cfg,
                bn_prior=bn_prior,
                progress=None if progress is None else lambda p, n=name: progress(n, p),
            )
        except ValueError as e:  # a LoRA without a head, a teacher with non-finite outputs: name the LoRA
            raise type(e)(f"zoo '{zoo}', LoRA {name!r}: {e}") from None
        done.append((name, write_run(root, result, adapter, str(Path(zoo) / name), record, grid, run.name), result))
    return done
