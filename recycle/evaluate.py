"""Episodic evaluation on a real ImageFolder split: mean accuracy ± 1.96·std/√n over seeded episodes.

Every method is scored on the same episodes. Each image is embedded once per method and episodes are scored from
the cached embeddings, so 600 episodes cost one pass over the images they use. Methods:

* ``NN``: the bare backbone (ProtoNet on frozen features);
* ``LoRAs-average + NN``: a uniform merge of a zoo's LoRAs (`recycle.adapter.average_loras`);
* any given LoRA, e.g. a meta-LoRA.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import distributed
from .backbone import Backbone
from .episodes import EpisodeSampler, EpisodeSpec, SampledEpisode, image_folder
from .fewshot import FewShotClassifier, prototype_logits
from .adapter import LoRAAdapter
from .images import load_image
from .runtime import check_bf16_flag

__all__ = ["EvalConfig", "sample_episodes", "mean_ci", "evaluate", "make_validator", "results_markdown", "write_report"]

_logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    way: int = 5
    shot: int = 1
    query: int = 15
    episodes: int = 600
    seed: int = 0
    distance: str = "l2"
    batch_size: int = 64
    bf16: bool = False
    int8: bool = False  # an int8 copy of the backbone per method (CPU; `recycle.quantize`)

    def __post_init__(self):
        EpisodeSpec(self.way, self.shot, self.query)
        check_bf16_flag(self.bf16)
        if not isinstance(self.int8, bool):
            raise ValueError(f"invalid setting int8={self.int8!r}: expected True or False")
        if self.bf16 and self.int8:
            raise ValueError("choose one of bf16 and int8, not both")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")

    @property
    def spec(self) -> EpisodeSpec:
        return EpisodeSpec(self.way, self.shot, self.query)


def sample_episodes(items: Sequence[Sequence], spec: EpisodeSpec, episodes: int, seed: int) -> list[SampledEpisode]:
    """`episodes` seeded episodes over ``items[class] = [...]`` (identical for every method)."""
    sampler = EpisodeSampler(items)
    rng = random.Random(seed)
    return [sampler.sample(spec, "any", rng) for _ in range(episodes)]


def mean_ci(accuracies: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% half-width ``1.96·std/√n`` (population std, as in the paper's code and SimpleShot)."""
    a = np.asarray(accuracies, dtype=np.float64)
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(len(a)))


def _episode_accuracy(emb: torch.Tensor, ep: SampledEpisode, distance: str) -> float:
    s_idx = [i for group in ep.support for i in group]
    q_idx = [i for group in ep.query for i in group]
    s_lab = torch.tensor([k for k, g in enumerate(ep.support) for _ in g])
    q_lab = torch.tensor([k for k, g in enumerate(ep.query) for _ in g])
    logits = prototype_logits(emb[s_idx], s_lab, emb[q_idx], distance, len(ep.support))
    return (logits.argmax(-1) == q_lab).float().mean().item()


def evaluate(
    backbone: Backbone,
    data: Union[str, Path],
    methods: dict[str, Optional[LoRAAdapter]],
    config: EvalConfig = EvalConfig(),
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Score every method on the same seeded episodes from the ImageFolder `data`.

    The images the episodes use are embedded in fixed batches of ``config.batch_size``. Under torchrun the batches
    and then the episodes are dealt to the ranks and gathered back in order, so every rank returns the same report
    as one process would.

    Returns:
        ``{"config": ..., "data": ..., "classes": n, "results": {method: {"mean": %, "ci95": %, "episodes": n}}}``.
    """
    names, paths = image_folder(data)
    flat = [p for ps in paths for p in ps]
    offsets = np.cumsum([0] + [len(ps) for ps in paths])
    items = [list(range(offsets[c], offsets[c + 1])) for c in range(len(paths))]
    episodes = sample_episodes(items, config.spec, config.episodes, config.seed)
    used = sorted({i for ep in episodes for g in ep.support + ep.query for i in g})
    batches = [used[i : i + config.batch_size] for i in range(0, len(used), config.batch_size)]
    my_batches = distributed.shard_indices(len(batches))
    images = {i: load_image(flat[i]) for b in my_batches for i in batches[b]}
    results = {}
    for method, adapter in methods.items():
        if progress is not None:
            progress(method)
        clf = FewShotClassifier(
            backbone, adapter, config.distance, config.batch_size, config.bf16, cache_size=0, int8=config.int8
        )
        emb = torch.zeros(len(flat), backbone.embed_dim)
        parts = distributed.gather_ordered(
            [clf.embed([images[i] for i in batches[b]]) for b in my_batches], len(batches)
        )
        for batch, part in zip(batches, parts):
            emb[batch] = part
        accs = distributed.gather_ordered(
            [_episode_accuracy(emb, episodes[e], config.distance) for e in distributed.shard_indices(len(episodes))],
            len(episodes),
        )
        mean, ci = mean_ci(accs)
        results[method] = {"mean": round(100 * mean, 2), "ci95": round(100 * ci, 2), "episodes": len(accs)}
        _logger.info("%s: %.2f ± %.2f", method, 100 * mean, 100 * ci)
    return {
        "config": asdict(config),
        "data": str(data),
        "classes": len(names),
        "backbone": backbone.name,
        "results": results,
    }


def make_validator(backbone: Backbone, data: Union[str, Path], config: EvalConfig) -> Callable[[LoRAAdapter], float]:
    """``adapter -> mean accuracy`` on fixed episodes of a validation split (for model selection in meta-training)."""

    def validate(adapter: LoRAAdapter) -> float:
        return evaluate(backbone, data, {"val": adapter}, config)["results"]["val"]["mean"] / 100

    return validate


def results_markdown(report: dict) -> str:
    c = report["config"]
    lines = [
        f"{c['way']}-way {c['shot']}-shot, {c['query']} queries per class, {c['episodes']} episodes "
        f"(seed {c['seed']}), on `{report['data']}` ({report['classes']} classes), backbone "
        f"`{report['backbone']}`.",
        "",
        "| method | accuracy (%) | 95% CI |",
        "|---|---|---|",
    ]
    for method, r in report["results"].items():
        lines.append(f"| {method} | {r['mean']:.2f} | ± {r['ci95']:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, json_path: Union[str, Path]) -> None:
    from .io import atomic_write_bytes

    atomic_write_bytes(json_path, json.dumps(report, indent=2).encode())
