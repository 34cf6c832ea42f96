"""LoRA inversion: synthesise surrogate images from a pre-tuned LoRA and its head (LoRA Recycle §4.1, Eq. 1–2).

Pixels start as Gaussian noise in the teacher's normalised space and are optimised with Adam (lr 0.25, betas
(0.5, 0.99), 2000 steps) to minimise ``CE(teacher(x), y) + α·R_BN(x)`` (+ optional TV and L2). ``R_BN`` is the
DeepInversion prior: the distance between the batch statistics at every BatchNorm of an ImageNet ResNet-50 and its
running statistics. Every step applies one random roll (up to ±1/8 of H and W) and horizontal flip to the whole batch,
and clamps pixels to the valid range afterwards; the lowest-loss iterate is returned. After 25% of the steps, the
teacher prunes tokens by [CLS] attention (`recycle.tokens`); the tokens kept on the final images give their masks.

Two options go beyond the paper, both off by default: `InversionConfig.two_colour` optimises a coverage map per image
between a random ink and paper colour instead of free pixels (line art in random colours), and
`InversionConfig.diversity_weight` adds the mean cosine similarity of same-class images' teacher features to the loss
(surrogates of a class that differ from each other).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import LoRAAdapter
from .backbone import Backbone
from .priors import DEFAULT_BN_PRIOR, BNPrior, ink_and_paper, load_bn_prior, two_colour_images
from .runtime import check_bf16_flag, mixed_precision
from .tokens import PruningConfig, embed_kept, forward_features_pruned, keep_mask, mask_images

__all__ = [
    "InversionConfig",
    "InversionProgress",
    "InversionResult",
    "BNPrior",
    "load_bn_prior",
    "invert",
    "remask",
    "DEFAULT_BN_PRIOR",
    "InversionError",
]

_logger = logging.getLogger(__name__)


class InversionError(ValueError):
    """An inversion that cannot give usable images (the teacher's outputs are not finite). Meant for the user."""


def _check_finite(name: str, t: Optional[torch.Tensor], when: str) -> None:
    if t is not None and not torch.isfinite(t).all():
        raise InversionError(
            f"the teacher's {name} are not finite (NaN or Inf) {when}: the LoRA or its head scales "
            "them beyond floating-point range, so it cannot be inverted"
        )


# Upper bounds of the float settings (comparisons with NaN fail, so NaN and infinity are refused too).
MAX_INVERSION_LR = 10.0
MAX_LOSS_WEIGHT = 1000.0


@dataclass
class InversionConfig:
    """Inversion settings; defaults are the paper's."""

    per_class: int = 10  # images per class
    steps: int = 2000
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.99)
    bn_weight: float = 0.01  # α of the BN-statistics prior (ignored when no prior is given)
    tv_weight: float = 0.0
    l2_weight: float = 0.0
    jitter: float = 0.125  # max roll as a fraction of H and W
    flip: bool = True
    pruning: PruningConfig = field(default_factory=PruningConfig)
    batch_size: Optional[int] = None  # images optimised together (BN statistics are per batch); None = all
    seed: int = 0
    preview_every: int = 0  # hand the progress callback preview images every N steps (0 = never)
    bf16: bool = False  # teacher and BN prior under bf16 autocast while optimising (pixels, loss, outputs in fp32)
    # None: free RGB pixels (the paper's). A number: two-colour images, each an optimised coverage map mixing a random
    # ink and paper colour whose luminances differ by at least this much (`two_colour_images`): surrogates in the
    # look of tinted line art, with colour varying across the images of a class as it does in such data.
    two_colour: Optional[float] = None
    # Weight of the mean cosine similarity between the teacher's features of same-class images in a batch
    # (`same_class_similarity`): surrogates of one class that differ from each other, as real images of a class do.
    diversity_weight: float = 0.0

    def __post_init__(self):
        check_bf16_flag(self.bf16)
        if isinstance(self.pruning, (dict, str, list)):
            self.pruning = PruningConfig(self.pruning)
        self.betas = tuple(self.betas)
        checks = [
            ("per_class", self.per_class >= 1),
            ("steps", self.steps >= 1),
            ("lr", 0 < self.lr <= MAX_INVERSION_LR),
            ("bn_weight", 0 <= self.bn_weight <= MAX_LOSS_WEIGHT),
            ("tv_weight", 0 <= self.tv_weight <= MAX_LOSS_WEIGHT),
            ("l2_weight", 0 <= self.l2_weight <= MAX_LOSS_WEIGHT),
            ("diversity_weight", 0 <= self.diversity_weight <= MAX_LOSS_WEIGHT),
            ("jitter", 0 <= self.jitter < 0.5),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)),
            ("batch_size", self.batch_size is None or self.batch_size >= 1),
            ("preview_every", self.preview_every >= 0),
            ("seed", isinstance(self.seed, int) and 0 <= self.seed < 2**63),
            ("two_colour", self.two_colour is None or 0 <= self.two_colour < 1),
        ]
        for name, ok in checks:
            if not ok:
                expected = {"lr": f"a number above 0 and at most {MAX_INVERSION_LR:g}"}.get(
                    name, f"a number from 0 to {MAX_LOSS_WEIGHT:g}" if name.endswith("_weight") else ""
                )
                raise ValueError(
                    f"invalid inversion setting {name}={getattr(self, name)!r}"
                    + (f": expected {expected}" if expected else "")
                )


@dataclass
class InversionProgress:
    step: int  # steps done in the current batch
    steps: int
    batch: int  # index of the batch being optimised
    batches: int
    loss: float
    ce: float
    bn: float
    accuracy: float  # teacher accuracy on the augmented batch at this step
    pruning: bool  # whether the teacher prunes tokens at this step
    preview: Optional[torch.Tensor] = None  # (B, 3, H, W) best images so far, in [0, 1]


@dataclass
class InversionResult:
    """Synthetic images and what the teacher says about them.

    Attributes:
        images: ``(N, 3, H, W)`` in [0, 1].
        labels: ``(N,)`` head indices of the target classes.
        logits: ``(N, C)`` teacher logits on the full images.
        kept: ``(N, K)`` kept patch indices (None without pruning).
        masked: ``(N, 3, H, W)`` images with the dropped patches zeroed (None without pruning).
        logits_kept: ``(N, C)`` teacher logits on the kept tokens only (None without pruning).
        losses: best loss of each batch.
        steps_done: steps run per batch (fewer than asked if stopped).
        stopped: whether a stop request ended the run early.
    """

    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    kept: Optional[torch.Tensor] = None
    masked: Optional[torch.Tensor] = None
    logits_kept: Optional[torch.Tensor] = None
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    stopped: bool = False


def same_class_similarity(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over pairs of distinct images of the same class: features ``(B, D)``, labels ``(B,)``
    -> scalar (0 when no class has two images)."""
    z = F.normalize(features, dim=-1)
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return (z @ z.T)[same].mean() if same.any() else features.new_zeros(())


def _start(
    config: InversionConfig,
    n: int,
    size: tuple[int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor],
    gen: torch.Generator,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The optimised tensor of `n` new images and the map from it to images in the teacher's normalised space: the
    pixels themselves ``(n, 3, H, W)``, clipped to `bounds` (the valid range), or with `config.two_colour` coverage
    logits ``(n, 1, H, W)`` between fixed random colours per image."""
    device = mean.device
    if config.two_colour is None:
        noise = torch.randn(n, 3, *size, generator=gen).to(device)
        return torch.maximum(torch.minimum(noise, bounds[1]), bounds[0]), lambda x: x
    coverage = torch.randn(n, 1, *size, generator=gen).to(device)
    ink, paper = (c.to(device) for c in ink_and_paper(n, config.two_colour, gen))
    return coverage, lambda x: (two_colour_images(x, ink, paper) - mean) / std


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class _Teacher:
    """Backbone (with the LoRA attached) + head, optionally pruning tokens."""

    def __init__(self, backbone: Backbone, head: nn.Linear, schedule: dict[int, float]):
        self.backbone, self.head, self.schedule = backbone, head, schedule

    def __call__(self, x: torch.Tensor, prune: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        logits, _, kept = self.features_and_logits(x, prune)
        return logits, kept

    def features_and_logits(
        self, x: torch.Tensor, prune: bool
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(logits (B, C), pre-logits features (B, D), kept patch indices or None)``."""
        model = self.backbone.model
        if prune and self.schedule:
            feats, kept = forward_features_pruned(model, x, self.schedule)
        else:
            feats, kept = model.forward_features(x), None
        pre = model.forward_head(feats, pre_logits=True)
        return self.head(pre), pre, kept

    @torch.no_grad()
    def masks(self, x: torch.Tensor, schedule: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept patch indices under `schedule`, masked images in [0, 1], and the teacher's logits on the kept tokens
        (all on the CPU) for normalised images `x`."""
        model = self.backbone.model
        _, kept = forward_features_pruned(model, x, schedule)
        mean = torch.tensor(self.backbone.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.backbone.std, device=x.device).view(1, 3, 1, 1)
        images = (x * std + mean).clamp(0, 1)
        masked = mask_images(images, keep_mask(kept, tuple(model.patch_embed.grid_size)))
        logits = embed_kept(self.backbone, x, kept, lambda f: self.head(model.forward_head(f, pre_logits=True)))
        return kept.cpu(), masked.cpu(), logits.cpu()


def remask(
    backbone: Backbone, adapter: LoRAAdapter, images: torch.Tensor, schedule: dict[int, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks of already inverted `images` (``(N, 3, H, W)`` in [0, 1]) under another pruning `schedule`.

    Returns kept indices ``(N, K)``, masked images and teacher logits on the kept tokens. With pruning in the last
    block only, the pruned and unpruned teachers give the same [CLS] output (pruning sits between attention and the
    token-wise MLP), so inversion is unchanged by the last-block ratio: one inversion plus `remask` at each ratio
    equals separate inversions at each ratio.
    """
    device = backbone.device
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    with adapter.attached(backbone) as head:
        return _Teacher(backbone, head, schedule).masks((images.to(device) - mean) / std, schedule)


def _resolve_classes(adapter: LoRAAdapter, classes: Optional[Sequence]) -> list[int]:
    names = adapter.class_names or []
    if classes is None:
        return list(range(adapter.num_classes))
    out = []
    for c in classes:
        if isinstance(c, int) or (isinstance(c, str) and c.isdigit() and c not in names):
            idx = int(c)
            if not 0 <= idx < adapter.num_classes:
                raise ValueError(f"class index {idx} is out of range: the LoRA's head has {adapter.num_classes}")
        elif c in names:
            idx = names.index(c)
        else:
            raise ValueError(f"class {c!r} is not one of the LoRA's classes {names}")
        out.append(idx)
    if not out:
        raise ValueError("choose at least one class to invert")
    return out


def invert(
    backbone: Backbone,
    adapter: LoRAAdapter,
    config: InversionConfig = InversionConfig(),
    classes: Optional[Sequence] = None,
    bn_prior: Optional[BNPrior] = None,
    progress: Optional[Callable[[InversionProgress], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> InversionResult:
    """Invert `adapter` (LoRA + head) on `backbone` into ``len(classes) · per_class`` synthetic images.

    Args:
        backbone: the frozen backbone (the LoRA is attached for the duration of the call).
        adapter: the pre-tuned LoRA; it must have a head.
        config: inversion settings.
        classes: class names or head indices to invert (default: all).
        bn_prior: the BN-statistics prior (`load_bn_prior`), or None for none.
        progress: called after every step with an `InversionProgress`.
        should_stop: polled every step; when it returns True the best images so far are returned.

    Returns:
        An `InversionResult`; ``kept``/``masked`` are set when the config prunes tokens.
    """
    if adapter.head_weight is None:
        raise ValueError("this LoRA has no classification head, so there is nothing to invert")
    targets = _resolve_classes(adapter, classes)
    device = backbone.device
    depth = len(backbone.model.blocks)
    schedule = config.pruning.resolved(depth) if config.pruning.enabled else {}
    prune_from = int(config.pruning.start * config.steps)
    labels = torch.tensor(targets, device=device).repeat_interleave(config.per_class)
    n = labels.numel()
    batch_size = config.batch_size or n
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    _, h, w = backbone.input_size
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    gen = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    bn_weight = config.bn_weight if bn_prior is not None else 0.0
    best_all, losses, stopped, steps_done = [], [], False, 0

    with adapter.attached(backbone) as head:
        head.requires_grad_(False)
        teacher = _Teacher(backbone, head, schedule)
        for b, sl in enumerate(batches):
            y = labels[sl]
            x, normalised = _start(config, y.numel(), (h, w), mean, std, (lo, hi), gen)
            x.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=config.lr, betas=config.betas)
            best, best_loss = x.detach().clone(), float("inf")
            for step in range(config.steps):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                dy = rng.randint(-int(h * config.jitter), int(h * config.jitter))
                dx = rng.randint(-int(w * config.jitter), int(w * config.jitter))
                xa = torch.roll(normalised(x), shifts=(dy, dx), dims=(2, 3))
                if config.flip and rng.random() < 0.5:
                    xa = xa.flip(3)
                prune = bool(schedule) and step >= prune_from
                with mixed_precision(backbone.model, device, config.bf16):  # the BN prior too
                    logits, features, _ = teacher.features_and_logits(xa, prune)
                    bn = bn_prior(xa * std + mean) if bn_weight > 0 else None
                logits = logits.float()
                _check_finite("logits", logits, f"at step {step + 1}")
                ce = F.cross_entropy(logits, y)
                bn = bn.float() if bn is not None else ce.new_zeros(())
                loss = ce + bn_weight * bn
                _check_finite("loss", loss, f"at step {step + 1}")
                if config.tv_weight > 0:
                    loss = loss + config.tv_weight * _total_variation(xa)
                if config.l2_weight > 0:
                    loss = loss + config.l2_weight * xa.pow(2).mean()
                if config.diversity_weight > 0:
                    loss = loss + config.diversity_weight * same_class_similarity(features.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if loss.item() < best_loss:  # keep the iterate that scored this loss, i.e. before the update
                    best_loss, best = loss.item(), x.detach().clone()
                opt.step()
                if config.two_colour is None:
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                if progress is not None:
                    show = config.preview_every and ((step + 1) % config.preview_every == 0 or step + 1 == config.steps)
                    progress(
                        InversionProgress(
                            step + 1,
                            config.steps,
                            b,
                            len(batches),
                            loss.item(),
                            ce.item(),
                            bn.item(),
                            (logits.argmax(-1) == y).float().mean().item(),
                            prune,
                            (normalised(best) * std + mean).clamp(0, 1).detach().cpu() if show else None,
                        )
                    )
                steps_done = max(steps_done, step + 1)
            best_all.append(normalised(best).detach())
            losses.append(best_loss)
            if stopped:
                break

        x = torch.cat(best_all)
        labels = labels[: x.shape[0]]
        with torch.no_grad():
            logits, _ = teacher(x, prune=False)
            result = InversionResult(
                (x * std + mean).clamp(0, 1).cpu(),
                labels.cpu(),
                logits.cpu(),
                losses=losses,
                steps_done=steps_done,
                stopped=stopped,
            )
            if schedule:
                result.kept, result.masked, result.logits_kept = teacher.masks(x, schedule)
        for name in ("images", "logits", "masked", "logits_kept"):
            _check_finite(name, getattr(result, name), "on the final images")
    _logger.info("inverted %d images (%d steps, best loss %.4f)", x.shape[0], steps_done, min(losses))
    return result
