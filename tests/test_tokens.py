import pytest
import timm
import torch

from recycle.backbone import Backbone
from recycle.tokens import (
    PruningConfig,
    attention_with_cls_scores,
    embed_kept,
    forward_features_pruned,
    keep_mask,
    kept_count,
    mask_images,
    parse_schedule,
    pruning_block_forward,
)


@pytest.fixture(params=["clip", "vit", "registers"])
def backbone(request, tiny_clip, tiny_vit):
    if request.param == "clip":
        return tiny_clip
    if request.param == "vit":
        return tiny_vit
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=3,
        num_heads=2,
        num_classes=0,
        reg_tokens=2,
    ).eval()
    return Backbone(model, "tiny-reg")


def _x(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _tokens(model, x):
    return model.norm_pre(model._pos_embed(model.patch_embed(x)))


def test_schedule_parsing_and_validation():
    assert parse_schedule(["11:0.75"]) == {11: 0.75}
    assert parse_schedule("3,6,8,11:0.3") == {3: 0.3, 6: 0.3, 8: 0.3, 11: 0.3}
    assert PruningConfig().resolved(12) == {11: 0.75}
    assert kept_count(196, {11: 0.75}) == 49
    assert kept_count(196, {3: 0.3, 6: 0.3, 8: 0.3, 11: 0.3}) == 48  # compounding, ~0.7^4
    with pytest.raises(ValueError, match="LAYER"):
        parse_schedule("last:half")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        PruningConfig({3: 1.0})
    with pytest.raises(ValueError, match="out of range"):
        PruningConfig({12: 0.5}).resolved(12)


@torch.no_grad()
def test_explicit_attention_equals_timm(backbone):
    model = backbone.model
    x = model.blocks[0].norm1(_tokens(model, _x()))
    out, scores = attention_with_cls_scores(model.blocks[0].attn, x)
    assert torch.allclose(out, model.blocks[0].attn(x), atol=1e-5)
    assert torch.allclose(scores.sum(-1), torch.ones(3), atol=1e-5)  # a softmax row, averaged over heads


@torch.no_grad()
def test_fused_and_explicit_attention_agree(backbone):
    """SDPA + the [CLS] row alone (timm's fused attention on) and the explicit attention matrix (off, as under bf16
    on the CPU) give the same output and the same [CLS] scores, and the pruned block keeps the same tokens."""
    model = backbone.model
    block = model.blocks[0]
    tokens = _tokens(model, _x())
    x = block.norm1(tokens)
    reference = block.attn(x)  # timm's fused (SDPA) forward
    results = {}
    for fused in (True, False):
        block.attn.fused_attn = fused
        try:
            results[fused] = (
                *attention_with_cls_scores(block.attn, x),
                *pruning_block_forward(block, tokens, 0.5, model.num_prefix_tokens),
            )
        finally:
            block.attn.fused_attn = True
    for out, scores, pruned, idx in results.values():
        assert torch.allclose(out, reference, atol=1e-5)
        assert scores.shape == (3, model.num_prefix_tokens + 16)
    assert torch.allclose(results[True][1], results[False][1], atol=1e-6)
    assert torch.allclose(results[True][2], results[False][2], atol=1e-5)
    assert torch.equal(results[True][3], results[False][3])


@torch.no_grad()
def test_zero_pruning_equals_unpruned(backbone):
    model = backbone.model
    tokens = _tokens(model, _x())
    block = model.blocks[0]
    out, idx = pruning_block_forward(block, tokens, 0.0, model.num_prefix_tokens)
    assert torch.allclose(out, block(tokens), atol=1e-5)
    assert torch.equal(idx, torch.arange(16).expand(3, -1))
    feats, kept = forward_features_pruned(model, _x(), {0: 0.0, 1: 0.0})
    assert torch.allclose(feats, model.forward_features(_x()), atol=1e-5) and kept.shape == (3, 16)


@torch.no_grad()
def test_pruned_block_keeps_prefix_and_uses_the_correct_residual(backbone):
    """Pruning sits between attention and the token-wise MLP, so every kept token (the prefix tokens included)
    must come out exactly as in the unpruned block. The official code's residual (LN2(h) + MLP) would fail."""
    model = backbone.model
    p = model.num_prefix_tokens
    tokens = _tokens(model, _x())
    block = model.blocks[1]
    full = block(tokens)
    out, idx = pruning_block_forward(block, tokens, 0.75, p)
    assert out.shape == (3, p + 4, tokens.shape[-1]) and idx.shape == (3, 4)
    assert torch.allclose(out[:, :p], full[:, :p], atol=1e-5)  # CLS (and registers) always kept
    gathered = full[:, p:].gather(1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert torch.allclose(out[:, p:], gathered, atol=1e-5)
    # kept = highest [CLS] attention, chosen per image (not one choice for the batch)
    _, scores = attention_with_cls_scores(block.attn, block.norm1(tokens))
    expected = scores[:, p:].topk(4, dim=1).indices.sort(dim=1).values
    assert torch.equal(idx, expected)
    assert not all(torch.equal(idx[0], idx[i]) for i in range(1, 3))


@torch.no_grad()
def test_compounded_schedule_tracks_original_positions(tiny_clip):
    feats, kept = forward_features_pruned(tiny_clip.model, _x(), {0: 0.5, 1: 0.5})
    assert kept.shape == (3, 4) and feats.shape[1] == 1 + 4
    assert (kept >= 0).all() and (kept < 16).all()
    assert all(len(set(row.tolist())) == 4 for row in kept)


def test_mask_zeros_exactly_the_dropped_patches():
    kept = torch.tensor([[0, 5, 15], [1, 2, 3]])
    mask = keep_mask(kept, (4, 4))
    assert mask.sum() == 6 and mask[0, 1, 1] and mask[0, 3, 3] and not mask[0, 0, 1]
    images = torch.rand(2, 3, 32, 32) + 0.1  # strictly positive
    masked = mask_images(images, mask)
    for b in range(2):
        for gy in range(4):
            for gx in range(4):
                patch = masked[b, :, gy * 8 : (gy + 1) * 8, gx * 8 : (gx + 1) * 8]
                if mask[b, gy, gx]:
                    assert torch.equal(patch, images[b, :, gy * 8 : (gy + 1) * 8, gx * 8 : (gx + 1) * 8])
                else:
                    assert patch.abs().sum() == 0


@torch.no_grad()
def test_kept_token_forward(backbone):
    x = _x()
    full = embed_kept(backbone, x, torch.arange(16).expand(3, -1))
    assert torch.allclose(full, backbone.embed(x), atol=1e-5)  # fully kept == normal forward
    # unequal counts: each image equals its own forward over just its tokens
    rows = [torch.tensor([0, 3, 9]), torch.arange(16), torch.tensor([2, 4, 6, 8, 10])]
    mixed = embed_kept(backbone, x, rows)
    for i, r in enumerate(rows):
        assert torch.allclose(mixed[i], embed_kept(backbone, x[i : i + 1], r.unsqueeze(0))[0], atol=1e-5)
    assert not torch.allclose(mixed[0], full[0], atol=1e-3)


def test_kept_token_forward_is_differentiable(tiny_clip):
    x = _x()
    x.requires_grad_(True)
    embed_kept(tiny_clip, x, torch.tensor([[0, 1], [2, 3], [4, 5]])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
