"""Tuning-free few-shot classification with prototypes (ProtoNet; Snell et al., 2017; LoRA Recycle Eq. 3b).

Support images are embedded and averaged per class into prototypes; a query's class probabilities are the softmax
of its negative distances to the prototypes. No gradient step is taken: a new task costs one forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from typing import Hashable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .backbone import Backbone
from .adapter import LoRAAdapter
from .quantize import int8_model
from .runtime import mixed_precision

__all__ = ["DISTANCES", "compute_prototypes", "pairwise_distances", "prototype_logits", "FewShotClassifier"]

_logger = logging.getLogger(__name__)

DISTANCES = ("l2", "sqeuclidean", "cosine")


def compute_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Mean feature per class.

    Args:
        features: ``(S, D)`` support embeddings.
        labels: ``(S,)`` integer labels in ``[0, C)``; classes may have different numbers of shots.
        num_classes: ``C``; defaults to ``labels.max() + 1``.

    Returns:
        ``(C, D)`` prototypes.
    """
    c = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = torch.bincount(labels, minlength=c)
    if (counts == 0).any():
        raise ValueError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no support examples")
    sums = features.new_zeros(c, features.shape[1]).index_add_(0, labels, features)
    return sums / counts.unsqueeze(1).to(features.dtype)


def pairwise_distances(queries: torch.Tensor, prototypes: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """``(Q, D)`` x ``(C, D)`` -> ``(Q, C)`` distances: ``l2`` = ‖q − c‖₂ (the paper's), ``sqeuclidean`` = ‖q − c‖₂²
    (the official code's), ``cosine`` = 1 − cos(q, c)."""
    if distance == "l2":
        return torch.cdist(queries, prototypes)
    if distance == "sqeuclidean":
        return (queries.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)
    if distance == "cosine":
        return 1 - F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).T
    raise ValueError(f"unknown distance {distance!r}; choose from {DISTANCES}")


def prototype_logits(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    queries: torch.Tensor,
    distance: str = "l2",
    num_classes: Optional[int] = None,
) -> torch.Tensor:
    """ProtoNet logits ``(Q, C)`` = −distance(query, prototype); differentiable, used by meta-training too."""
    prototypes = compute_prototypes(support, support_labels, num_classes)
    return -pairwise_distances(queries, prototypes, distance)


def _image_key(img: Image.Image) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


class FewShotClassifier:
    """Prototype classifier on a (LoRA-equipped) backbone: ``fit`` on a support set, then ``predict_proba``.

    Args:
        backbone: a loaded `Backbone`; it can be shared by several classifiers.
        lora: an optional `LoRAAdapter` (e.g. the meta-LoRA), merged into the backbone while embedding and removed
            afterwards (the backbone's weights are restored exactly).
        distance: ``"l2"`` (paper), ``"sqeuclidean"`` or ``"cosine"``.
        batch_size: images per forward pass.
        bf16: run the backbone under bfloat16 autocast (CPU or GPU; `recycle.runtime.mixed_precision`).
        int8: run an int8 copy of the backbone with the LoRA baked in (CPU only; `recycle.quantize.int8_model`,
            made at the first embedding and cached).
        cache_size: how many embeddings to keep, keyed by image content and LoRA (least recently used go first).

    Example:
        >>> clf = FewShotClassifier(load_backbone("clip-b16")).fit(images, ["cat", "cat", "dog"])
        >>> clf.predict_proba(queries)  # (Q, 2)
    """

    def __init__(
        self,
        backbone: Backbone,
        lora: Optional[LoRAAdapter] = None,
        distance: str = "l2",
        batch_size: int = 32,
        bf16: bool = False,
        cache_size: int = 4096,
        int8: bool = False,
    ):
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose from {DISTANCES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if bf16 and int8:
            raise ValueError("choose one of bf16 and int8, not both")
        if int8 and backbone.device.type != "cpu":
            raise ValueError(f"int8 inference runs on the CPU; this backbone is on {backbone.device}")
        self.backbone = backbone
        self.lora = lora
        self.distance = distance
        self.batch_size = batch_size
        self.bf16 = bf16
        self.int8 = int8
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lora_key = (lora.fingerprint() if lora is not None else "-") + ("/int8" if int8 else "")
        self.classes: list[Hashable] = []
        self.prototypes: Optional[torch.Tensor] = None
        self.stats = {"embedded": 0, "cache_hits": 0}
        if lora is not None:  # fail now, not at the first request, if the LoRA does not fit
            with backbone.lock, lora.attached(backbone):
                pass

    @contextlib.contextmanager
    def _attached(self) -> Iterator[None]:
        """Hold the shared backbone (with this classifier's LoRA, if any) for the duration of the block."""
        with self.backbone.lock:
            with self.lora.attached(self.backbone, merged=True) if self.lora is not None else contextlib.nullcontext():
                yield

    @torch.inference_mode()
    def _forward(self, images: Sequence[Image.Image]) -> torch.Tensor:
        device = self.backbone.device
        model = self._int8_model() if self.int8 else None
        out = []
        # An int8 copy is private: the shared backbone is held (with the LoRA attached) only for the fp32/bf16 path.
        with self._attached() if model is None else contextlib.nullcontext():
            for i in range(0, len(images), self.batch_size):
                x = self.backbone.preprocess(images[i : i + self.batch_size]).to(device)
                with mixed_precision(self.backbone.model, device, self.bf16):
                    out.append(self.backbone.embed(x, model=model).float().cpu())
        return torch.cat(out)

    def _int8_model(self) -> Optional[torch.nn.Module]:
        """The int8 copy with this classifier's LoRA baked in, or None when the weights are not finite (the fp32
        path then reports them as it always does)."""
        try:
            return int8_model(self.backbone, self.lora)
        except ValueError as e:
            _logger.warning("int8 unavailable for this model (%s); embedding in fp32", e)
            return None

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> ``(N, D)`` float32 embeddings on the CPU, reusing cached ones."""
        if not images:
            return torch.empty(0, self.backbone.embed_dim)
        keys = [(self._lora_key, _image_key(im)) for im in images]
        hits = {k: self._cache[k] for k in keys if k in self._cache}
        todo = {k: i for i, k in reversed(list(enumerate(keys))) if k not in hits}
        fresh = dict(zip(todo, self._forward([images[i] for i in todo.values()]))) if todo else {}
        for k in hits:
            self._cache.move_to_end(k)
        for k, e in fresh.items():
            self._store(k, e)
        self.stats["embedded"] += len(fresh)
        self.stats["cache_hits"] += len(images) - len(fresh)
        return torch.stack([hits[k] if k in hits else fresh[k] for k in keys])

    def _store(self, key: tuple[str, str], emb: torch.Tensor) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = emb
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()

    def fit(self, images: Sequence[Image.Image], labels: Sequence[Hashable]) -> "FewShotClassifier":
        """Build one prototype per class from the support set (any number of shots per class).

        Raises:
            ValueError: fewer than two classes, or images and labels of different lengths.
        """
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} support images but {len(labels)} labels")
        classes = list(dict.fromkeys(labels))
        if len(classes) < 2:
            raise ValueError(f"few-shot classification needs at least 2 classes, got {len(classes)}: {classes}")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[c] for c in labels])
        self.prototypes = compute_prototypes(self.embed(images), y, len(classes))
        self.classes = classes
        return self

    def predict_proba(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(Q, C)`` class probabilities, columns in the order of `classes`."""
        if self.prototypes is None:
            raise RuntimeError("call fit() with a support set before predicting")
        logits = -pairwise_distances(self.embed(images), self.prototypes, self.distance)
        return logits.softmax(dim=-1)

    def predict(self, images: Sequence[Image.Image]) -> list[Hashable]:
        return [self.classes[i] for i in self.predict_proba(images).argmax(dim=-1).tolist()]
