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
import errno
import hashlib
import io
import logging
import os
import random
import re
import shutil
import stat
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from .episodes import EpisodeSampler, EpisodeSpec, PoolEpisode
from .adapter import LoRAAdapter
from .invert import InversionConfig, InversionResult
from .io import atomic_write_bytes, dumps_strict, loads_strict

__all__ = [
    "PoolError",
    "EmptyPoolError",
    "PoolItem",
    "PoolClass",
    "Pool",
    "PoolIndex",
    "write_run",
    "read_run_manifest",
    "run_folder_name",
    "run_settings",
    "run_file",
    "zip_run",
    "teacher_confidence",
    "POOL_FORMAT",
    "MAX_MANIFEST_BYTES",
    "MAX_RUN_ITEMS",
]

_logger = logging.getLogger(__name__)

POOL_FORMAT = "recycle-pool"
POOL_VERSION = 1
# A run's manifest is read only up to these sizes (a run of 1000 classes x 10 images with 1000 logits each is about
# 200 MB); callers serving untrusted requests pass smaller bounds.
MAX_MANIFEST_BYTES = 256 << 20
MAX_RUN_ITEMS = 100_000


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
        for item in m["items"]:
            _expect(isinstance(item, dict), "item")
            label = item["label"]
            _expect("logits" in item, "logits")
            _expect(isinstance(label, int) and 0 <= label < len(class_names), f"label {label!r}")
            _expect(isinstance(item["class"], str) and isinstance(item["sha256"], dict), "class or sha256")
            for key in ("logits", "logits_kept"):
                if key in item:
                    _expect(_numbers(item[key], float) and len(item[key]) == len(class_names), key)
            if "kept" in item:
                _expect(_numbers(item["kept"], int), "kept")
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


def _run_folders(root: Path) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, (mtime_ns, size, inode) of its manifest)`` of every finished run folder under `root`, by name.

    Raises:
        PoolError: `root` is missing or unreadable, or a run folder has no manifest.
    """
    if not root.is_dir():
        raise EmptyPoolError(f"pool folder '{root}' does not exist")
    found = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir():
                    continue  # a run still being written (or abandoned mid-write): never read as complete
                try:
                    st = os.stat(os.path.join(entry.path, "manifest.json"))
                except FileNotFoundError:
                    st = None
                if st is None or not stat.S_ISREG(st.st_mode):
                    raise PoolError(f"pool run '{entry.name}' has no manifest.json: it is incomplete or not a pool run")
                found.append((entry.name, (st.st_mtime_ns, st.st_size, st.st_ino)))
    except OSError as e:
        raise PoolError(f"pool folder '{root}' cannot be read: {e.strerror or e}") from None
    return sorted(found)


class PoolIndex:
    """A pool folder's runs, read once and then kept up to date: each call lists the folder and re-reads only the
    manifests that are new or changed (by modification time, size and inode), so browsing a large pool costs one
    directory listing and one `stat` per run instead of re-reading and re-checking every manifest.

    Args:
        root: the pool folder.
        max_manifest_bytes, max_items: bounds of each run's manifest (see `Pool`).
        max_runs: if given, only the first `max_runs` runs (by folder name) are read; `total_runs` says how many
            the folder holds.
    """

    def __init__(
        self,
        root: Union[str, Path],
        max_manifest_bytes: int = MAX_MANIFEST_BYTES,
        max_items: int = MAX_RUN_ITEMS,
        max_runs: Optional[int] = None,
    ):
        self.root = Path(root)
        self.max_manifest_bytes, self.max_items, self.max_runs = max_manifest_bytes, max_items, max_runs
        self.total_runs = 0
        self._manifests: dict[str, tuple[tuple[int, int, int], dict]] = {}
        self._pool: Optional[Pool] = None
        self._lock = threading.Lock()
        self.reads = 0  # manifests read so far (for tests and logs)

    def pool(self) -> Pool:
        """The pool as it is on disk now.

        Raises:
            PoolError: as `Pool` does (missing folder, no runs, a bad manifest, which is read again next time).
        """
        with self._lock:
            listing = _run_folders(self.root)
            self.total_runs = len(listing)
            if self.max_runs is not None:
                listing = listing[: self.max_runs]
            manifests: dict[str, tuple[tuple[int, int, int], dict]] = {}
            changed = len(listing) != len(self._manifests)
            for name, key in listing:
                known = self._manifests.get(name)
                if known is not None and known[0] == key:
                    manifests[name] = known
                    continue
                path = self.root / name / "manifest.json"
                manifests[name] = (key, read_run_manifest(path, self.max_manifest_bytes, self.max_items))
                self.reads += 1
                changed = True
            if changed or self._pool is None:
                self._pool = Pool.from_manifests(
                    self.root, [self.root / n for n in manifests], [m for _, m in manifests.values()]
                )
            self._manifests = manifests
            return self._pool


class Pool:
    """Read a surrogate pool: list its sources and classes, load images, sample episodes.

    Raises:
        PoolError: the folder is missing, or a run's manifest is unreadable, of another format, or lists a file
            that is missing; image checksums are verified as images are loaded.
    """

    def __init__(
        self, root: Union[str, Path], max_manifest_bytes: int = MAX_MANIFEST_BYTES, max_items: int = MAX_RUN_ITEMS
    ):
        self.root = Path(root)
        self.run_dirs = [self.root / name for name, _ in _run_folders(self.root)]
        self.runs = [read_run_manifest(d / "manifest.json", max_manifest_bytes, max_items) for d in self.run_dirs]
        self._index()

    @classmethod
    def from_manifests(cls, root: Union[str, Path], run_dirs: list[Path], runs: list[dict]) -> "Pool":
        """A pool of manifests already read (and validated) by `read_run_manifest`, e.g. kept by a `PoolIndex`."""
        pool = cls.__new__(cls)
        pool.root, pool.run_dirs, pool.runs = Path(root), list(run_dirs), list(runs)
        pool._index()
        return pool

    def _index(self) -> None:
        if not self.runs:
            raise EmptyPoolError(f"pool '{self.root}' has no runs yet (invert a LoRA into it first)")
        classes: dict[tuple[str, int], PoolClass] = {}
        for r, run in enumerate(self.runs):
            fp = run["source"]["fingerprint"]
            for i, item in enumerate(run["items"]):
                key = (fp, item["label"])
                if key not in classes:
                    classes[key] = PoolClass(fp, item["label"], item["class"], [])
                classes[key].items.append(PoolItem(r, i))
        self.classes = list(classes.values())

    @property
    def masked_available(self) -> bool:
        return all("masked" in item for run in self.runs for item in run["items"])

    def sources(self) -> dict[str, dict]:
        """Fingerprint -> {name, class_names, runs, images}."""
        out: dict[str, dict] = {}
        for run in self.runs:
            s = run["source"]
            entry = out.setdefault(
                s["fingerprint"], {"name": s["name"], "class_names": s["class_names"], "runs": 0, "images": 0}
            )
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
            raise PoolError(
                f"pool run '{self.run_dirs[ref.run].name}' has no masked images (it was inverted without token pruning)"
            )
        path = run_file(self.run_dirs[ref.run], item[key])
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

    def sample_episode(
        self, spec: EpisodeSpec, kind: str = "single", masked: bool = False, rng: Optional[random.Random] = None
    ) -> PoolEpisode:
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
