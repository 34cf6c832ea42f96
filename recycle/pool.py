"""Surrogate pool on disk: inverted images, their masks and teacher logits, written atomically, read safely.

Layout: one folder per inversion run, ``POOL/<run>/``, holding ``images/*.png`` (unmasked), ``masked/*.png``
(dropped patches zeroed) and ``manifest.json``: the source LoRA (name, fingerprint, class names, backbone), the
inversion settings, and per image its class, kept patch indices, teacher logits and file checksums. Masks are
explicit (kept indices), never inferred from black pixels: a kept patch can be black.

A run is built in a hidden ``.tmp-*`` folder and renamed into place in one step, so readers never see a half-written
run; the pool grows by adding runs. Runs from the same LoRA (same fingerprint) form one *source* for episodes.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from .episodes import EpisodeSampler, EpisodeSpec
from .formats import LoRAAdapter
from .io import atomic_write_bytes
from .invert import InversionResult

__all__ = ["PoolError", "PoolItem", "PoolClass", "PoolEpisode", "Pool", "write_run", "POOL_FORMAT"]

_logger = logging.getLogger(__name__)

POOL_FORMAT = "recycle-pool"
POOL_VERSION = 1


class PoolError(ValueError):
    """A pool (or one of its runs) is missing, corrupt or half-written. The message names the file."""


def _png_bytes(image: torch.Tensor) -> bytes:
    """``(3, H, W)`` in [0, 1] -> PNG bytes (8-bit, lossless, so zeroed patches stay exactly zero)."""
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "lora"


def write_run(root: Union[str, Path], result: InversionResult, adapter: LoRAAdapter, source: str,
              settings: dict, patch_grid: tuple[int, int]) -> Path:
    """Add one inversion run to the pool at `root` (created if needed); returns the run folder.

    Args:
        result: the inversion output.
        adapter: the inverted LoRA (its fingerprint groups runs into sources; its class names label the images).
        source: where the LoRA came from (path or Hub id), for people reading the manifest.
        settings: the inversion settings, recorded verbatim.
        patch_grid: ``(gh, gw)`` of the backbone, to interpret kept indices.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fingerprint = adapter.fingerprint()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    name = f"{_slug(Path(source).name if os.sep in source else source)}-{fingerprint[:8]}-{stamp}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        (tmp / "images").mkdir()
        if result.masked is not None:
            (tmp / "masked").mkdir()
        names = adapter.class_names or [str(i) for i in range(adapter.num_classes)]
        items = []
        for i in range(result.images.shape[0]):
            label = int(result.labels[i])
            entry = {"label": label, "class": names[label], "image": f"images/{i:06d}.png",
                     "logits": [round(float(v), 6) for v in result.logits[i]]}
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
            "format": POOL_FORMAT, "version": POOL_VERSION, "created": stamp,
            "source": {"name": source, "fingerprint": fingerprint, "backbone": adapter.backbone,
                       "class_names": names, "info": adapter.info},
            "settings": settings, "image_size": list(result.images.shape[2:]), "patch_grid": list(patch_grid),
            "steps_done": result.steps_done, "stopped": result.stopped, "items": items,
        }
        atomic_write_bytes(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        final = root / name
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _logger.info("pool: wrote %d images to %s", len(items), final)
    return final


@dataclass(frozen=True)
class PoolItem:
    run: int  # index into Pool.runs
    index: int  # index into that run's items


@dataclass
class PoolClass:
    source: str  # LoRA fingerprint
    label: int  # head index in that LoRA
    name: str
    items: list[PoolItem]


@dataclass
class PoolEpisode:
    """A loaded episode. Images are ``(n, 3, H, W)`` in [0, 1]; labels are task labels ``0..way-1``.

    ``teacher_logits`` (queries, restricted to the task's classes) is set for single-source episodes only, where
    one teacher knows every class. ``*_kept`` are kept patch indices when the episode is masked.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    kind: str
    classes: list[PoolClass]
    teacher_logits: Optional[torch.Tensor] = None
    support_kept: Optional[list[torch.Tensor]] = None
    query_kept: Optional[list[torch.Tensor]] = None


class Pool:
    """Read a surrogate pool: list its sources and classes, load images, sample episodes.

    Raises:
        PoolError: the folder is missing, or a run's manifest is unreadable, of another format, or lists a file
            that is missing; image checksums are verified as images are loaded.
    """

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise PoolError(f"pool folder '{self.root}' does not exist")
        self.runs: list[dict] = []
        self.run_dirs: list[Path] = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if d.name.startswith("."):
                continue  # a run still being written (or abandoned mid-write): never read as complete
            manifest = d / "manifest.json"
            if not manifest.is_file():
                raise PoolError(f"pool run '{d.name}' has no manifest.json: it is incomplete or not a pool run")
            self.runs.append(self._read_manifest(manifest))
            self.run_dirs.append(d)
        if not self.runs:
            raise PoolError(f"pool '{self.root}' has no runs yet (invert a LoRA into it first)")
        classes: dict[tuple[str, int], PoolClass] = {}
        for r, run in enumerate(self.runs):
            fp = run["source"]["fingerprint"]
            for i, item in enumerate(run["items"]):
                key = (fp, item["label"])
                if key not in classes:
                    classes[key] = PoolClass(fp, item["label"], item["class"], [])
                classes[key].items.append(PoolItem(r, i))
        self.classes = list(classes.values())

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PoolError(f"{path}: unreadable manifest ({e})") from None
        if not isinstance(m, dict) or m.get("format") != POOL_FORMAT:
            raise PoolError(f"{path}: not a surrogate-pool manifest")
        if m.get("version") != POOL_VERSION:
            raise PoolError(f"{path}: pool format version {m.get('version')} is not supported "
                            f"(this version reads {POOL_VERSION})")
        try:
            for item in m["items"]:
                for key in ("image", "masked"):
                    if key in item and not (path.parent / item[key]).is_file():
                        raise PoolError(f"{path.parent.name}: {item[key]} is listed in the manifest but missing")
                int(item["label"]), item["class"], item["logits"], item["sha256"]
            m["source"]["fingerprint"], m["source"]["class_names"]
        except (KeyError, TypeError, ValueError) as e:
            raise PoolError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
        return m

    @property
    def masked_available(self) -> bool:
        return all("masked" in item for run in self.runs for item in run["items"])

    def sources(self) -> dict[str, dict]:
        """Fingerprint -> {name, class_names, runs, images}."""
        out: dict[str, dict] = {}
        for run in self.runs:
            s = run["source"]
            entry = out.setdefault(s["fingerprint"], {"name": s["name"], "class_names": s["class_names"],
                                                      "runs": 0, "images": 0})
            entry["runs"] += 1
            entry["images"] += len(run["items"])
        return out

    def item(self, ref: PoolItem) -> dict:
        return self.runs[ref.run]["items"][ref.index]

    def load(self, ref: PoolItem, masked: bool = False) -> torch.Tensor:
        """One image ``(3, H, W)`` in [0, 1], checksum-verified."""
        item = self.item(ref)
        key = "masked" if masked else "image"
        if key not in item:
            raise PoolError(f"pool run '{self.run_dirs[ref.run].name}' has no masked images (it was inverted "
                            "without token pruning)")
        path = self.run_dirs[ref.run] / item[key]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PoolError(f"{path}: cannot read ({e})") from None
        if hashlib.sha256(data).hexdigest() != item["sha256"][key]:
            raise PoolError(f"{path}: checksum mismatch, the file is corrupt or was modified")
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def kept(self, ref: PoolItem) -> torch.Tensor:
        item = self.item(ref)
        if "kept" not in item:
            raise PoolError(f"pool run '{self.run_dirs[ref.run].name}' has no kept-token indices")
        return torch.tensor(item["kept"], dtype=torch.long)

    def sampler(self) -> EpisodeSampler[PoolItem]:
        return EpisodeSampler([c.items for c in self.classes], [c.source for c in self.classes])

    def sample_episode(self, spec: EpisodeSpec, kind: str = "single", masked: bool = False,
                       rng: Optional[random.Random] = None) -> PoolEpisode:
        """Sample and load one episode; ``single`` = one LoRA's classes, ``cross`` = classes from different LoRAs."""
        ep = self.sampler().sample(spec, kind, rng)
        classes = [self.classes[c] for c in ep.classes]

        def stack(groups: list[list[PoolItem]]):
            refs = [r for g in groups for r in g]
            labels = torch.tensor([k for k, g in enumerate(groups) for _ in g])
            images = torch.stack([self.load(r, masked) for r in refs])
            kept = [self.kept(r) for r in refs] if masked else None
            return refs, images, labels, kept

        _, s_img, s_lab, s_kept = stack(ep.support)
        q_refs, q_img, q_lab, q_kept = stack(ep.query)
        teacher = None
        if kind == "single" or len({c.source for c in classes}) == 1:
            heads = [c.label for c in classes]
            key = "logits_kept" if masked else "logits"
            teacher = torch.tensor([[self.item(r)[key][h] for h in heads] for r in q_refs])
        return PoolEpisode(s_img, s_lab, q_img, q_lab, ep.kind, classes, teacher, s_kept, q_kept)
