"""Attention-guided token pruning and the forward pass over kept tokens only (LoRA Recycle §4.3).

During inversion, a pruning block drops the patch tokens that the [CLS] token attends to least (attention averaged
over heads, paper Eq. 5–6). The survivors after the last pruning block define a patch mask: the masked image keeps
exactly those patches, and meta-training feeds only those tokens ("double-efficient").

timm's fused attention never materialises the attention matrix, so a pruning block runs attention itself from
``attn.qkv`` and computes the [CLS] row of the attention matrix alongside. Departures from the official code, which
are bugs there:

* the block's second residual is ``h + MLP(LN2(h))`` (the official code adds ``LN2(h)`` instead of ``h``);
* selection is vectorised over the batch with ``topk``/``gather`` instead of a Python loop over images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PruningConfig",
    "parse_schedule",
    "attention_with_cls_scores",
    "pruning_block_forward",
    "forward_features_pruned",
    "patch_grid",
    "keep_mask",
    "mask_images",
    "embed_kept",
    "kept_count",
]


def parse_schedule(specs: Union[str, Sequence[str]]) -> dict[int, float]:
    """``["11:0.75"]`` or ``"3,6,8,11:0.3"`` -> ``{layer: fraction dropped}``. Layers are 0-based; negative
    indices count from the end (``-1`` = last block)."""
    if isinstance(specs, str):
        specs = [specs]
    schedule: dict[int, float] = {}
    for spec in specs:
        m = re.fullmatch(r"\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*:\s*([0-9.]+)\s*", spec)
        if not m:
            raise ValueError(f"pruning spec {spec!r} is not LAYER[,LAYER...]:RATIO, e.g. '11:0.75' or '3,6:0.3'")
        ratio = float(m.group(2))
        for layer in m.group(1).split(","):
            schedule[int(layer)] = ratio
    return schedule


@dataclass
class PruningConfig:
    """Which blocks prune, and how much. Default: the last block drops 75% of the patch tokens (the paper's)."""

    schedule: dict[int, float] = field(default_factory=lambda: {-1: 0.75})
    start: float = 0.25  # fraction of the inversion steps run with all tokens before pruning switches on

    def __post_init__(self):
        if isinstance(self.schedule, (str, list, tuple)):
            self.schedule = parse_schedule(self.schedule)
        self.schedule = {int(k): float(v) for k, v in self.schedule.items()}
        for layer, ratio in self.schedule.items():
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"pruning ratio for layer {layer} must be in [0, 1), got {ratio}")
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"pruning start must be a fraction of the steps in [0, 1], got {self.start}")

    def resolved(self, depth: int) -> dict[int, float]:
        """Schedule with negative layers resolved against a model of `depth` blocks, zero ratios dropped."""
        out = {}
        for layer, ratio in self.schedule.items():
            idx = layer + depth if layer < 0 else layer
            if not 0 <= idx < depth:
                raise ValueError(f"pruning layer {layer} is out of range for a model with {depth} blocks")
            if ratio > 0:
                out[idx] = ratio
        return out

    @property
    def enabled(self) -> bool:
        return any(r > 0 for r in self.schedule.values())


def kept_count(num_patches: int, schedule: dict[int, float]) -> int:
    """Patch tokens left after applying `schedule` (each ratio is relative to the tokens still present)."""
    n = num_patches
    for layer in sorted(schedule):
        n -= int(n * schedule[layer])
    return n


def attention_with_cls_scores(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm `Attention` forward that also returns the [CLS] attention row.

    With timm's fused attention on (``attn.fused_attn``), the output comes from
    `torch.nn.functional.scaled_dot_product_attention` and only the [CLS] row of the attention matrix is computed
    on the side; otherwise (e.g. bf16 on the CPU, see `recycle.runtime.mixed_precision`) the attention matrix is
    computed explicitly and its [CLS] row is read off.

    Args:
        attn: a timm ``Attention`` (``qkv``, ``num_heads``, ``scale``, ``q_norm``, ``k_norm``, ``norm``, ``proj``).
        x: ``(B, N, C)`` normalised tokens, [CLS] first.

    Returns:
        ``(B, N, C)`` attention output and ``(B, N)`` attention of [CLS] to every token, averaged over heads.
    """
    if getattr(attn, "gate", None) is not None:
        raise ValueError("token pruning does not support gated attention")
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if getattr(attn, "fused_attn", True):
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
        )
        cls_row = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]  # (B, H, N)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
        out = attn.attn_drop(weights) @ v
        cls_row = weights[:, :, 0]
    out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
    out = attn.proj_drop(attn.proj(out))
    return out, cls_row.float().mean(dim=1)


def pruning_block_forward(
    block: nn.Module, x: torch.Tensor, ratio: float, num_prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ViT ``Block`` that drops the ``int(P·ratio)`` patch tokens with the lowest [CLS] attention.

    Pruning happens after attention and its residual, before the MLP; prefix tokens are always kept.

    Args:
        x: ``(B, num_prefix + P, C)`` tokens.

    Returns:
        ``(B, num_prefix + K, C)`` tokens and ``(B, K)`` indices (into the P patch tokens, ascending) that were kept.
    """
    attn_out, scores = attention_with_cls_scores(block.attn, block.norm1(x))
    h = x + block.drop_path1(block.ls1(attn_out))
    num_patches = x.shape[1] - num_prefix
    keep = num_patches - int(num_patches * ratio)
    idx = scores[:, num_prefix:].topk(keep, dim=1).indices.sort(dim=1).values  # (B, K)
    patches = h[:, num_prefix:].gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    h = torch.cat([h[:, :num_prefix], patches], dim=1)
    return h + block.drop_path2(block.ls2(block.mlp(block.norm2(h)))), idx


def _embed_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch + position embedding + pre-norm, as timm's ``forward_features`` does before the blocks."""
    tokens = model._pos_embed(model.patch_embed(x))
    return model.norm_pre(model.patch_drop(tokens))


def _num_prefix(model: nn.Module) -> int:
    if getattr(model, "cls_token", None) is None:
        raise ValueError("token pruning needs a [CLS] token; this model has none")
    return int(model.num_prefix_tokens)


def forward_features_pruned(
    model: nn.Module, x: torch.Tensor, schedule: dict[int, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ViT ``forward_features`` with token pruning at the blocks in `schedule` (resolved, 0-based).

    Args:
        x: ``(B, 3, H, W)`` normalised images.

    Returns:
        ``(B, num_prefix + K, C)`` final (normed) tokens and ``(B, K)`` kept patch indices on the full patch grid.
    """
    num_prefix = _num_prefix(model)
    tokens = _embed_tokens(model, x)
    positions = torch.arange(tokens.shape[1] - num_prefix, device=x.device).expand(x.shape[0], -1)
    for i, block in enumerate(model.blocks):
        ratio = schedule.get(i, 0.0)
        if ratio > 0:
            tokens, idx = pruning_block_forward(block, tokens, ratio, num_prefix)
            positions = positions.gather(1, idx)
        else:
            tokens = block(tokens)
    return model.norm(tokens), positions


def patch_grid(model: nn.Module) -> tuple[int, int]:
    return tuple(model.patch_embed.grid_size)


def keep_mask(kept: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, K)`` kept patch indices -> ``(B, gh, gw)`` boolean patch mask (True = kept)."""
    mask = torch.zeros(kept.shape[0], grid[0] * grid[1], dtype=torch.bool, device=kept.device)
    mask.scatter_(1, kept, True)
    return mask.view(-1, *grid)


def mask_images(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the dropped patches: ``(B, C, H, W)`` images in [0, 1] times the upsampled ``(B, gh, gw)`` mask."""
    b, _, h, w = images.shape
    gh, gw = mask.shape[1:]
    if h % gh or w % gw:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch grid {gh}x{gw}")
    pixel_mask = mask.to(images.dtype).repeat_interleave(h // gh, 1).repeat_interleave(w // gw, 2)
    return images * pixel_mask.unsqueeze(1)


def embed_kept(
    backbone,
    x: torch.Tensor,
    kept: Union[torch.Tensor, Sequence[torch.Tensor]],
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Embed images from their prefix tokens and kept patch tokens only (standard, fused attention).

    Patch and position embeddings are computed for every patch, so kept tokens keep their positions; then the
    prefix and kept tokens are gathered and run through the blocks. Images with different numbers of kept patches
    run in separate groups of equal count (no padding, so every result is exact).

    Args:
        backbone: a `recycle.backbone.Backbone`.
        x: ``(B, 3, H, W)`` normalised images.
        kept: ``(B, K)`` kept patch indices, or B 1-D index tensors of any lengths.
        reduce: final tokens ``(G, N, C)`` -> outputs ``(G, D)``; default ``backbone.embed_features``.

    Returns:
        ``(B, D)`` outputs (embeddings by default), in input order.
    """
    model = backbone.model
    num_prefix = _num_prefix(model)
    tokens = _embed_tokens(model, x)
    rows = list(kept.unbind(0)) if torch.is_tensor(kept) else list(kept)
    if len(rows) != x.shape[0]:
        raise ValueError(f"got kept indices for {len(rows)} images but {x.shape[0]} images")
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(int(r.numel()), []).append(i)
    out = [None] * len(rows)
    for members in groups.values():
        group = tokens[members]
        idx = torch.stack([rows[i].to(x.device).long() for i in members])  # (G, K)
        patches = group[:, num_prefix:].gather(1, idx.unsqueeze(-1).expand(-1, -1, group.shape[-1]))
        feats = model.norm(model.blocks(torch.cat([group[:, :num_prefix], patches], dim=1)))
        for i, e in zip(members, (reduce or backbone.embed_features)(feats)):
            out[i] = e
    return torch.stack(out)
