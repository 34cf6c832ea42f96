"""Episodes: N-way K-shot sampling over classes given as lists of items, the loaded episode (`PoolEpisode`), and
the sources meta-training draws episodes from: a surrogate pool (`PoolEpisodes`), real images in an ImageFolder
(`FolderEpisodes`, for the oracle) and online inversion of a zoo (`ZooEpisodes`, the paper's Alg. 1)."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Hashable, Optional, Protocol, Sequence, TypeVar, Union

import numpy as np
import torch
from PIL import Image

from .adapter import LoRAAdapter
from .backbone import Backbone
from .images import list_images, load_image

if TYPE_CHECKING:
    from .pool import Pool, PoolClass

__all__ = [
    "EpisodeSpec",
    "SampledEpisode",
    "EpisodeSampler",
    "image_folder",
    "PoolEpisode",
    "EpisodeSource",
    "PoolEpisodes",
    "FolderEpisodes",
    "ZooEpisodes",
    "PoolTeachers",
]

T = TypeVar("T")


@dataclass(frozen=True)
class EpisodeSpec:
    way: int = 5
    shot: int = 1
    query: int = 15

    def __post_init__(self):
        for name in ("way", "shot", "query"):
            if getattr(self, name) < 1:
                raise ValueError(f"episode {name} must be >= 1, got {getattr(self, name)}")
        if self.way < 2:
            raise ValueError(f"an episode needs way >= 2, got {self.way}")


@dataclass
class SampledEpisode(Generic[T]):
    """Chosen classes (indices into the sampler's classes) and, per class in task order, support and query items."""

    classes: list[int]
    support: list[list[T]]
    query: list[list[T]]
    kind: str


class EpisodeSampler(Generic[T]):
    """Samples episodes from ``classes[c] = [items...]``.

    Args:
        classes: the items of each class.
        groups: optional group of each class (e.g. the LoRA it came from). ``single`` episodes take all classes from
            one group; ``cross`` episodes take classes from different groups (each from a distinct group when there
            are enough groups, and always from at least two).
    """

    def __init__(self, classes: Sequence[Sequence[T]], groups: Optional[Sequence[Hashable]] = None):
        self.classes = [list(c) for c in classes]
        self.groups = list(groups) if groups is not None else [0] * len(self.classes)
        if len(self.groups) != len(self.classes):
            raise ValueError(f"{len(self.groups)} groups given for {len(self.classes)} classes")

    def _eligible(self, spec: EpisodeSpec) -> list[int]:
        return [c for c, items in enumerate(self.classes) if len(items) >= spec.shot + spec.query]

    def can_sample(self, spec: EpisodeSpec, kind: str) -> bool:
        eligible = self._eligible(spec)
        by_group: dict[Hashable, int] = {}
        for c in eligible:
            by_group[self.groups[c]] = by_group.get(self.groups[c], 0) + 1
        if kind == "single":
            return any(n >= spec.way for n in by_group.values())
        if kind == "cross":
            return len(eligible) >= spec.way and len(by_group) >= 2
        return len(eligible) >= spec.way

    def sample(self, spec: EpisodeSpec, kind: str = "any", rng: Optional[random.Random] = None) -> SampledEpisode[T]:
        """Draw one episode. `kind` is ``single``, ``cross`` or ``any``.

        Raises:
            ValueError: not enough classes with ``shot + query`` items for this kind of episode.
        """
        rng = rng or random.Random()
        if kind not in ("single", "cross", "any"):
            raise ValueError(f"episode kind must be single, cross or any, got {kind!r}")
        if not self.can_sample(spec, kind):
            raise ValueError(
                f"cannot sample a {kind} {spec.way}-way {spec.shot}-shot episode with {spec.query} "
                f"queries: too few classes with >= {spec.shot + spec.query} images"
                + (" in one source" if kind == "single" else " across sources" if kind == "cross" else "")
            )
        eligible = self._eligible(spec)
        if kind == "single":
            by_group: dict[Hashable, list[int]] = {}
            for c in eligible:
                by_group.setdefault(self.groups[c], []).append(c)
            group = rng.choice(sorted((g for g, cs in by_group.items() if len(cs) >= spec.way), key=str))
            chosen = rng.sample(by_group[group], spec.way)
        elif kind == "cross":
            by_group = {}
            for c in eligible:
                by_group.setdefault(self.groups[c], []).append(c)
            order = sorted(by_group, key=str)
            rng.shuffle(order)
            chosen = [rng.choice(by_group[g]) for g in order[: spec.way]]  # one class from each of distinct groups
            rest = [c for c in eligible if c not in chosen]
            chosen += rng.sample(rest, spec.way - len(chosen))
        else:
            chosen = rng.sample(eligible, spec.way)
        support, query = [], []
        for c in chosen:
            items = rng.sample(self.classes[c], spec.shot + spec.query)
            support.append(items[: spec.shot])
            query.append(items[spec.shot :])
        return SampledEpisode(chosen, support, query, kind)


def image_folder(root: Union[str, Path]) -> tuple[list[str], list[list[Path]]]:
    """``root/<class>/<images>`` -> (class names, image paths per class), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder '{root}' does not exist")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise ValueError(f"'{root}' has no class folders (expected {root}/<class>/<images>)")
    return [d.name for d in dirs], [list_images(d) for d in dirs]


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
    classes: list["PoolClass"]
    teacher_logits: Optional[torch.Tensor] = None
    support_kept: Optional[list[torch.Tensor]] = None
    query_kept: Optional[list[torch.Tensor]] = None


class EpisodeSource(Protocol):
    """Where meta-training draws episodes: ``next(kind, rng)`` gives one episode of `kind` ("single": one
    teacher's classes, "cross": classes of several), or of the kind the source has when it lacks that one."""

    kinds: list[str]

    def next(self, kind: str, rng: random.Random) -> PoolEpisode: ...


class PoolEpisodes:
    """Episodes from a surrogate pool on disk."""

    def __init__(self, pool: "Pool", spec: EpisodeSpec, masked: bool):
        if masked and not pool.masked_available:
            raise ValueError("masked meta-training needs a pool inverted with token pruning (masked images)")
        self.pool, self.spec, self.masked = pool, spec, masked
        sampler = pool.sampler()
        self.kinds = [k for k in ("single", "cross") if sampler.can_sample(spec, k)]
        if not self.kinds:
            raise ValueError(
                f"the pool cannot supply {spec.way}-way {spec.shot}-shot episodes with {spec.query} "
                f"queries: it needs at least {spec.way} classes with {spec.shot + spec.query} images"
            )

    def next(self, kind: str, rng: random.Random) -> PoolEpisode:
        if kind not in self.kinds:
            kind = self.kinds[0]
        return self.pool.sample_episode(self.spec, kind, self.masked, rng)


class FolderEpisodes:
    """Episodes of real images from an ImageFolder (for an oracle meta-trained on the zoo's real data); CE loss.

    Images are decoded once and held as ``uint8`` tensors at the backbone's input size.
    """

    def __init__(self, root: Union[str, Path], spec: EpisodeSpec, input_size: tuple[int, int]):
        _, paths = image_folder(root)
        h, w = input_size
        self.images: list[list[torch.Tensor]] = []
        for files in paths:
            arrays = [np.array(load_image(f).resize((w, h), Image.BICUBIC)) for f in files]
            self.images.append([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])
        self.spec = spec
        self.sampler = EpisodeSampler([list(range(len(c))) for c in self.images])
        if not self.sampler.can_sample(spec, "any"):
            raise ValueError(
                f"'{root}' cannot supply {spec.way}-way {spec.shot}-shot episodes with {spec.query} queries"
            )
        self.kinds = ["cross"]

    def next(self, kind: str, rng: random.Random) -> PoolEpisode:
        ep = self.sampler.sample(self.spec, "any", rng)

        def stack(groups):
            imgs = [self.images[c][i] for c, g in zip(ep.classes, groups) for i in g]
            return torch.stack(imgs).float() / 255, torch.tensor([k for k, g in enumerate(groups) for _ in g])

        s, s_lab = stack(ep.support)
        q, q_lab = stack(ep.query)
        return PoolEpisode(s, s_lab, q, q_lab, "real", [])


class ZooEpisodes:
    """Episodes inverted online from a LoRA zoo (the paper's Alg. 1): each episode inverts ``shot + query`` images
    per class from one randomly chosen LoRA, on a separate copy of the backbone."""

    def __init__(
        self,
        backbone: Backbone,
        adapters: Sequence[LoRAAdapter],
        spec: EpisodeSpec,
        masked: bool,
        invert_config,
        bn_prior=None,
    ):
        from .invert import InversionConfig

        if not adapters:
            raise ValueError("the zoo is empty")
        usable = [a for a in adapters if a.num_classes >= spec.way]
        if not usable:
            raise ValueError(f"no LoRA in the zoo has a head with >= {spec.way} classes")
        self.teacher_backbone = Backbone(copy.deepcopy(backbone.model).cpu(), backbone.name).to(backbone.device)
        self.adapters, self.spec, self.masked, self.bn_prior = usable, spec, masked, bn_prior
        self.config: InversionConfig = invert_config
        self.kinds = ["single"]

    def next(self, kind: str, rng: random.Random) -> PoolEpisode:
        from .invert import invert

        adapter = rng.choice(self.adapters)
        classes = sorted(rng.sample(range(adapter.num_classes), self.spec.way))
        cfg = replace(self.config, per_class=self.spec.shot + self.spec.query, seed=rng.randrange(2**31))
        res = invert(self.teacher_backbone, adapter, cfg, classes, self.bn_prior)
        per = self.spec.shot + self.spec.query
        s_idx = [c * per + i for c in range(self.spec.way) for i in range(self.spec.shot)]
        q_idx = [c * per + i for c in range(self.spec.way) for i in range(self.spec.shot, per)]
        images = res.masked if self.masked and res.masked is not None else res.images
        logits = (res.logits_kept if self.masked and res.logits_kept is not None else res.logits)[:, classes]
        kept = [res.kept[i] for i in range(res.kept.shape[0])] if self.masked and res.kept is not None else None
        labels = torch.arange(self.spec.way)
        return PoolEpisode(
            images[s_idx],
            labels.repeat_interleave(self.spec.shot),
            images[q_idx],
            labels.repeat_interleave(self.spec.query),
            "single",
            [],
            logits[q_idx],
            [kept[i] for i in s_idx] if kept else None,
            [kept[i] for i in q_idx] if kept else None,
        )


class PoolTeachers:
    """The teachers of a pool's single-LoRA episodes, to score images the pool does not hold (random views of its
    surrogates): each pool class's source LoRA, found by fingerprint, run in eval mode on a separate copy of the
    backbone, as `ZooEpisodes` runs them."""

    def __init__(self, backbone: Backbone, adapters: Sequence[LoRAAdapter]):
        self.teacher_backbone = Backbone(copy.deepcopy(backbone.model).cpu(), backbone.name).to(backbone.device)
        self.teacher_backbone.model.eval()
        self.adapters = {a.fingerprint(): a for a in adapters}
        if not self.adapters:
            raise ValueError("no teacher LoRAs were given")

    def covers(self, pool: "Pool") -> list[str]:
        """The names of the pool's sources no teacher here is for (empty when every source has one)."""
        return sorted({s["name"] for f, s in pool.sources().items() if f not in self.adapters})

    @torch.no_grad()
    def logits(self, episode: PoolEpisode, images: torch.Tensor) -> torch.Tensor:
        """The source LoRA's logits on `images` ``(n, 3, H, W)`` in [0, 1], restricted to the episode's classes in
        task order: ``(n, way)``.

        Raises:
            ValueError: the episode's classes come from several LoRAs, or from one no teacher here is for.
        """
        sources = {c.source for c in episode.classes}
        if len(sources) != 1 or next(iter(sources)) not in self.adapters:
            raise ValueError("a teacher scores single-LoRA episodes of the LoRAs it was given")
        adapter = self.adapters[sources.pop()]
        tb = self.teacher_backbone
        with adapter.attached(tb) as head:
            out = head(tb.pre_logits(tb.normalize(images)))
        return out[:, [c.label for c in episode.classes]].float().cpu()
