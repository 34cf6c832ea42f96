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
                  ("lr", self.lr > 0), ("batch_size", self.batch_size >= 1), ("holdout", 0 <= self.holdout < 1),
                  ("shift", 0 <= self.shift < 0.5)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid pre-tuning setting {name}={getattr(self, name)!r}")


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


def _read_manifest(root: Path) -> dict:
    path = root / ZOO_MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}); delete it to rebuild the zoo manifest") from None


def _finished(directory: Path) -> bool:
    """Whether a LoRA folder is complete (`save_adapter` writes the config last)."""
    return (directory / ADAPTER_WEIGHTS).is_file() and (directory / ADAPTER_CONFIG).is_file()


def _entry_from_disk(directory: Path) -> dict:
    """The manifest entry of a finished LoRA that the manifest does not list yet (tuned by another rank, or by a
    run killed before it updated the manifest)."""
    adapter = read_adapter(directory)
    stamp = _dt.datetime.fromtimestamp((directory / ADAPTER_CONFIG).stat().st_mtime, _dt.timezone.utc)
    return {"name": directory.name, "classes": adapter.class_names,
            "holdout_acc": round(float(adapter.info.get("holdout_acc", float("nan"))), 4),
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
        entry = {"name": name, "classes": adapter.class_names, "holdout_acc": round(acc, 4),
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
    """``[(name, adapter)]`` for every LoRA in a zoo folder (listed in ``zoo.json``, or every subfolder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"zoo folder '{root}' does not exist")
    manifest = _read_manifest(root)
    names = [e["name"] for e in manifest.get("loras", [])] or sorted(
        d.name for d in root.iterdir() if (d / "adapter_model.safetensors").is_file())
    if not names:
        raise ValueError(f"zoo '{root}' holds no LoRAs")
    return [(n, read_adapter(root / n, backbone)) for n in names]
