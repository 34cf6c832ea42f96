"""Pre-tune a LoRA zoo: K LoRAs (each with a head), each on its own seeded N-way task from an ImageFolder dataset.

This stands in for the LoRAs people have already tuned and published (the paper's 100 5-way LoRAs; the official
release lacks this stage). Each LoRA is trained with Adam (lr 1e-3) on the first 80% of every class's images and
scored on the rest. The zoo is a folder of LoRAs in the standard format plus ``zoo.json``; finished LoRAs are
skipped, so an interrupted run resumes where it stopped. Under torchrun the LoRAs are dealt to the ranks round-robin
(each is seeded by its index, so the zoo is the same for any number of ranks) and rank 0 writes ``zoo.json`` once
every LoRA is on disk.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from . import distributed
from .backbone import Backbone
from .evaluate import image_folder
from .formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAAdapter, read_adapter, save_adapter
from .images import load_image
from .io import atomic_write_bytes
from .lora import LoRAConfig, inject_lora, lora_parameters, remove_lora

__all__ = ["PretuneConfig", "sample_tasks", "augment", "tune_lora", "pretune_zoo", "load_zoo", "ZOO_MANIFEST"]

_logger = logging.getLogger(__name__)
ZOO_MANIFEST = "zoo.json"


@dataclass
class PretuneConfig:
    num_loras: int = 100
    way: int = 5
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    holdout: float = 0.2  # share of each class's images held out to score the LoRA
    flip: bool = True  # random horizontal flips
    shift: float = 0.125  # random translation, as a fraction of the image size
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.lora.items()})
        checks = [("num_loras", self.num_loras >= 1), ("way", self.way >= 2), ("steps", self.steps >= 1),
                  ("lr", 0 < self.lr <= 1), ("batch_size", self.batch_size >= 1), ("holdout", 0 <= self.holdout < 1),
                  ("shift", 0 <= self.shift < 0.5)]
        for name, ok in checks:
            if not ok:
                expected = {"lr": "a number above 0 and at most 1", "shift": "a fraction from 0 to 0.5 (excluded)",
                            "holdout": "a fraction from 0 to 1 (excluded)"}.get(name)
                raise ValueError(f"invalid pre-tuning setting {name}={getattr(self, name)!r}"
                                 + (f": expected {expected}" if expected else ""))


def sample_tasks(num_classes: int, num_loras: int, way: int, seed: int) -> list[list[int]]:
    """`num_loras` seeded N-way class subsets (sorted), each drawn independently."""
    if num_classes < way:
        raise ValueError(f"a {way}-way task needs {way} classes but the dataset has {num_classes}")
    rng = random.Random(seed)
    return [sorted(rng.sample(range(num_classes), way)) for _ in range(num_loras)]


def augment(x: torch.Tensor, flip: bool, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image random horizontal flip and translation (zero padding), ``(B, C, H, W)``."""
    b, _, h, w = x.shape
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    if shift > 0:
        ph, pw = int(h * shift), int(w * shift)
        padded = F.pad(x, (pw, pw, ph, ph))
        dy = torch.randint(0, 2 * ph + 1, (b,), generator=generator).tolist()
        dx = torch.randint(0, 2 * pw + 1, (b,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return x


def tune_lora(backbone: Backbone, x: torch.Tensor, y: torch.Tensor, config: PretuneConfig, seed: int,
              eval_x: Optional[torch.Tensor] = None, eval_y: Optional[torch.Tensor] = None
              ) -> tuple[LoRAAdapter, float]:
    """Train a fresh LoRA and head on normalised images ``x`` ``(n, 3, H, W)`` with labels ``y`` ``(n,)``.

    Returns the adapter (without class names) and the accuracy on ``(eval_x, eval_y)`` (NaN if not given).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = backbone.device
    inject_lora(backbone.model, config.lora)
    try:
        backbone.model.to(device)
        head = torch.nn.Linear(backbone.num_features, int(y.max()) + 1).to(device)
        params = lora_parameters(backbone.model) + list(head.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=config.lr)
        backbone.model.train()
        for _ in range(config.steps):
            idx = torch.randint(0, x.shape[0], (min(config.batch_size, x.shape[0]),), generator=gen)
            xb = augment(x[idx], config.flip, config.shift, gen).to(device)
            loss = F.cross_entropy(head(backbone.pre_logits(xb)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        backbone.model.eval()
        acc = float("nan")
        if eval_x is not None and len(eval_x):
            with torch.no_grad():
                preds = torch.cat([head(backbone.pre_logits(eval_x[i:i + 64].to(device))).argmax(-1).cpu()
                                   for i in range(0, len(eval_x), 64)])
            acc = (preds == eval_y).float().mean().item()
        adapter = LoRAAdapter.from_model(backbone.model, config.lora, head, backbone=backbone.name)
    finally:
        remove_lora(backbone.model)
    return adapter, acc


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
        manifest = json.loads(path.read_bytes(), parse_constant=lambda _: None,
                              parse_float=lambda text: float(text) if math.isfinite(float(text)) else None)
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e})") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it to rebuild the zoo manifest") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a JSON {type(manifest).__name__ if manifest is not None else 'null'}; a zoo "
                         "manifest is an object with a 'loras' list")
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
            raise ValueError(f"{path}: entries {seen[name] + 1} and {k + 1} of 'loras' are both named {name!r}; "
                             "each LoRA must be listed once")
        seen[name] = k
        classes = entry.get("classes", [])
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"{path}: LoRA {name!r}: 'classes' must be a list of names")
    return manifest


def _read_manifest(root: Path) -> dict:
    return read_zoo_manifest(root)


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
    return {"name": directory.name, "classes": adapter.class_names,
            "holdout_acc": _accuracy(adapter.info.get("holdout_acc")),
            "created": stamp.isoformat(timespec="seconds")}


def pretune_zoo(backbone: Backbone, data: Union[str, Path], out: Union[str, Path], config: PretuneConfig,
                progress: Optional[Callable[[int, int, dict], None]] = None) -> dict:
    """Build (or finish) a zoo of ``config.num_loras`` LoRAs under `out`; returns the zoo manifest.

    Under torchrun each rank tunes its share; rank 0 waits for the others' LoRAs and returns the whole manifest, the
    other ranks return the manifest of what they saw."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names, paths = image_folder(data)
    tasks = sample_tasks(len(names), config.num_loras, config.way, config.seed)
    manifest = _read_manifest(out)
    if manifest and manifest.get("config", {}).get("seed") != config.seed:
        raise ValueError(f"{out} holds a zoo made with seed {manifest['config'].get('seed')}; use that seed to "
                         "resume, or another folder")
    entries = {e["name"]: e for e in manifest.get("loras", [])}
    manifest = {"format": "recycle-zoo", "version": 1, "backbone": backbone.name, "data": str(data),
                "config": asdict(config), "loras": []}
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
        adapter, acc = tune_lora(backbone, x, torch.tensor(train_y), config, config.seed * 100_003 + k, vx,
                                 torch.tensor(val_y) if val_y else None)
        adapter.class_names = [names[c] for c in classes]
        adapter.info = {"made_by": "recycle pretune", "data": str(data), "task": k, "holdout_acc": acc,
                        "steps": config.steps}
        save_adapter(adapter, out / name)
        entry = {"name": name, "classes": adapter.class_names, "holdout_acc": _accuracy(acc),
                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        manifest["loras"].append(entry)
        if serial:  # with several ranks only rank 0 writes the manifest, at the end
            atomic_write_bytes(out / ZOO_MANIFEST, json.dumps(manifest, indent=1).encode())
        if progress is not None:
            progress(k + 1, len(tasks), entry)
        _logger.info("%s: %s, held-out accuracy %.3f", name, adapter.class_names, acc)
    if not distributed.is_main():
        return manifest
    if not serial:
        distributed.wait_until(lambda: sum(not _finished(out / n) for n in lora_names),
                               "waiting for the other ranks' LoRAs")
        mine = {e["name"]: e for e in manifest["loras"]}
        manifest["loras"] = [mine[n] if n in mine else entries[n] if n in entries else _entry_from_disk(out / n)
                             for n in lora_names]
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
    from .formats import LoRAFormatError

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"zoo folder '{root}' does not exist")
    manifest = read_zoo_manifest(root)
    names = [e["name"] for e in manifest.get("loras", [])] or sorted(
        d.name for d in root.iterdir() if (d / "adapter_model.safetensors").is_file())
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
