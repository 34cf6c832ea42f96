"""N-way K-shot episode sampling over classes given as lists of items (a pool, or an ImageFolder split)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Generic, Hashable, Optional, Sequence, TypeVar

__all__ = ["EpisodeSpec", "SampledEpisode", "EpisodeSampler"]

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
            raise ValueError(f"cannot sample a {kind} {spec.way}-way {spec.shot}-shot episode with {spec.query} "
                             f"queries: too few classes with >= {spec.shot + spec.query} images"
                             + (" in one source" if kind == "single" else " across sources" if kind == "cross" else ""))
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
            chosen = [rng.choice(by_group[g]) for g in order[:spec.way]]  # one class from each of distinct groups
            rest = [c for c in eligible if c not in chosen]
            chosen += rng.sample(rest, spec.way - len(chosen))
        else:
            chosen = rng.sample(eligible, spec.way)
        support, query = [], []
        for c in chosen:
            items = rng.sample(self.classes[c], spec.shot + spec.query)
            support.append(items[:spec.shot])
            query.append(items[spec.shot:])
        return SampledEpisode(chosen, support, query, kind)
