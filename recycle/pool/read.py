"""Reading a pool: its runs indexed and kept up to date (`PoolIndex`), classes grouped by source LoRA, images
checked against their checksums, episodes sampled (`Pool`)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from ..episodes import EpisodeSampler, EpisodeSpec, PoolEpisode
from .manifest import MAX_MANIFEST_BYTES, MAX_RUN_ITEMS, EmptyPoolError, PoolError, read_run_manifest, run_file

_logger = logging.getLogger(__name__)


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
        run = self.run_dirs[ref.run].name
        h, w = self.runs[ref.run]["image_size"]
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only: the size is checked before decoding
            if img.size != (w, h):
                raise PoolError(
                    f"pool run '{run}': {item[key]} is {img.size[0]}x{img.size[1]} pixels, but the run's images are "
                    f"{w}x{h}; it is not this run's image"
                )
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        except PoolError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise PoolError(f"pool run '{run}': {item[key]} is not an image") from None
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
