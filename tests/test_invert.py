import math

import pytest
import torch
from torch import nn

from recycle.invert import BNPrior, InversionConfig, invert
from recycle.tokens import PruningConfig
from tests.helpers import colour_task, train_tiny_lora


@pytest.fixture()
def teacher(tiny_clip):
    images, labels = colour_task()
    return train_tiny_lora(tiny_clip, images, labels)


def tiny_prior(seed=0):
    torch.manual_seed(seed)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    for bn in (cnn[1], cnn[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return BNPrior(cnn, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _teacher_accuracy(backbone, adapter, images, labels, kept=None):
    from recycle.tokens import embed_kept

    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    with adapter.attached(backbone) as head, torch.no_grad():
        x = (images - mean) / std
        if kept is None:
            logits = head(backbone.pre_logits(x))
        else:
            logits = embed_kept(backbone, x, kept, lambda f: head(backbone.model.forward_head(f, pre_logits=True)))
    return (logits.argmax(-1) == labels).float().mean().item()


def test_config_validation():
    with pytest.raises(ValueError, match="steps"):
        InversionConfig(steps=0)
    with pytest.raises(ValueError, match="jitter"):
        InversionConfig(jitter=0.6)
    assert InversionConfig(pruning={11: 0.5}).pruning.schedule == {11: 0.5}


def test_inversion_reaches_the_target_classes_and_writes_masks(tiny_clip, teacher):
    seen = []
    cfg = InversionConfig(per_class=4, steps=60, lr=0.1, pruning=PruningConfig({-1: 0.5}), seed=1, preview_every=30)
    result = invert(tiny_clip, teacher, cfg, bn_prior=tiny_prior(), progress=seen.append)
    assert result.images.shape == (12, 3, 32, 32) and result.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.isfinite(result.images).all() and result.images.min() >= 0 and result.images.max() <= 1
    assert _teacher_accuracy(tiny_clip, teacher, result.images, result.labels) >= 0.9
    assert (result.logits.argmax(-1) == result.labels).float().mean() >= 0.9
    # loss falls; pruning switches on after 25% of the steps; previews come every 30 steps
    assert seen[-1].loss < seen[0].loss
    assert [p.pruning for p in seen].index(True) == 15
    assert [p.step for p in seen if p.preview is not None] == [30, 60]
    # masks: half of the 16 patches kept per image, masked copies zero exactly the dropped patches
    assert result.kept.shape == (12, 8) and result.masked.shape == result.images.shape
    for i in range(12):
        grid = torch.zeros(16, dtype=torch.bool)
        grid[result.kept[i]] = True
        pixels = grid.view(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)
        assert torch.equal(result.masked[i][:, pixels], result.images[i][:, pixels])
        assert result.masked[i][:, ~pixels].abs().sum() == 0
    assert result.logits_kept.shape == (12, 3)
    assert not list(n for n, _ in tiny_clip.model.named_parameters() if "lora" in n)


def test_class_selection_stop_and_no_pruning(tiny_clip, teacher):
    calls = []
    result = invert(
        tiny_clip,
        teacher,
        InversionConfig(per_class=2, steps=50, pruning={}),
        classes=["c2", 0],
        should_stop=lambda: len(calls) >= 5,
        progress=calls.append,
    )
    assert result.stopped and result.steps_done == 5
    assert result.labels.tolist() == [2, 2, 0, 0] and result.kept is None and result.masked is None
    with pytest.raises(ValueError, match="not one of the LoRA's classes"):
        invert(tiny_clip, teacher, InversionConfig(steps=1), classes=["zebra"])


def test_seeded_runs_are_reproducible_and_batches_split(tiny_clip, teacher):
    cfg = InversionConfig(per_class=2, steps=5, seed=3, batch_size=4)
    a = invert(tiny_clip, teacher, cfg, bn_prior=tiny_prior())
    b = invert(tiny_clip, teacher, cfg, bn_prior=tiny_prior())
    assert torch.equal(a.images, b.images) and len(a.losses) == 2


def test_bn_prior_is_zero_at_its_own_statistics():
    prior = tiny_prior()
    x = torch.rand(8, 3, 16, 16, requires_grad=True)
    loss = prior(x)
    loss.backward()
    assert loss > 0 and x.grad.abs().sum() > 0
    # a network whose running stats equal the batch's own statistics gives ~0 for its first BN
    cnn = nn.Sequential(nn.BatchNorm2d(3))
    cnn[0].running_mean.copy_(x.detach().mean((0, 2, 3)))
    cnn[0].running_var.copy_(x.detach().var((0, 2, 3), unbiased=False))
    assert BNPrior(cnn, (0, 0, 0), (1, 1, 1))(x.detach()) < 1e-5


def test_remask_matches_inversion_masks_and_last_block_pruning_keeps_cls(tiny_clip, teacher):
    from recycle.invert import remask
    from recycle.tokens import forward_features_pruned

    result = invert(tiny_clip, teacher, InversionConfig(per_class=2, steps=10, pruning={-1: 0.5}))
    kept, masked, logits = remask(tiny_clip, teacher, result.images, {1: 0.5})
    assert torch.allclose(masked, result.masked, atol=1e-6) and torch.equal(kept, result.kept)
    assert torch.allclose(logits, result.logits_kept, atol=1e-5)
    kept25, _, _ = remask(tiny_clip, teacher, result.images, {1: 0.25})
    assert kept25.shape == (6, 12)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # pruning only the last block leaves the [CLS] output as it is
        full = tiny_clip.model.forward_features(x)[:, 0]
        pruned = forward_features_pruned(tiny_clip.model, x, {1: 0.75})[0][:, 0]
    assert torch.allclose(full, pruned, atol=1e-5)


def test_a_lora_whose_logits_overflow_stops_with_a_clear_message(tiny_clip, teacher):
    """Finite weights scaled by 1e30: the logits overflow, and the inversion stops instead of returning NaN."""
    from dataclasses import replace

    from recycle.invert import InversionError

    huge = replace(teacher, state={k: v * 1e30 for k, v in teacher.state.items()})
    with pytest.raises(InversionError, match=r"teacher's (logits|loss) are not finite.*at step 1.*cannot be inverted"):
        invert(tiny_clip, huge, InversionConfig(per_class=1, steps=3), classes=[0])


def test_bf16_inversion_optimises_fp32_pixels_to_the_target_classes(tiny_clip, teacher):
    """Under bf16 the teacher and the BN prior run in bf16 while the pixels, the loss and the stored outputs stay
    fp32; the inversion still reaches the classes, and the backbone's attention setting is restored."""
    seen = []
    cfg = InversionConfig(per_class=4, steps=60, lr=0.1, pruning=PruningConfig({-1: 0.5}), seed=1, bf16=True)
    result = invert(tiny_clip, teacher, cfg, bn_prior=tiny_prior(), progress=seen.append)
    assert all(t.dtype == torch.float32 for t in (result.images, result.masked, result.logits, result.logits_kept))
    assert seen[-1].loss < seen[0].loss and all(math.isfinite(p.loss) and math.isfinite(p.bn) for p in seen)
    assert seen[0].bn > 0
    assert _teacher_accuracy(tiny_clip, teacher, result.images, result.labels) >= 0.9
    assert result.kept.shape == (12, 8)
    assert all(b.attn.fused_attn for b in tiny_clip.model.blocks)


def test_two_colour_inversion_mixes_one_ink_and_one_paper_per_image(tiny_clip, teacher):
    seen = []
    cfg = InversionConfig(per_class=3, steps=40, lr=0.1, two_colour=0.4, pruning={}, seed=2)
    result = invert(tiny_clip, teacher, cfg, progress=seen.append)
    assert result.images.shape == (9, 3, 32, 32) and seen[-1].loss < seen[0].loss
    for image in result.images:
        pixels = image.reshape(3, -1)
        spread = torch.linalg.svdvals(pixels - pixels.mean(1, keepdim=True))
        assert spread[1] < 1e-3 * spread[0]  # every pixel lies on one line in RGB: between its ink and its paper
    corners = result.images[:, :, 0, 0]
    assert torch.cdist(corners, corners).fill_diagonal_(1).min() > 1e-3  # each image has colours of its own
    with pytest.raises(ValueError, match="two_colour"):
        InversionConfig(two_colour=1.5)
    with pytest.raises(ValueError, match="two_colour"):
        InversionConfig(two_colour=float("nan"))


def test_ink_and_paper_colours_keep_their_contrast_in_either_polarity():
    from recycle.priors import LUMA, ink_and_paper

    ink, paper = ink_and_paper(500, 0.5, torch.Generator().manual_seed(0))
    gap = (ink - paper) @ torch.tensor(LUMA)
    assert gap.abs().min() >= 0.5 and (gap > 0).any() and (gap < 0).any()


def test_the_diversity_term_spreads_the_images_of_a_class_apart(tiny_clip, teacher):
    from recycle.invert import same_class_similarity

    f = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [1.0, 1.0]])
    assert same_class_similarity(f, torch.tensor([0, 0, 1, 1])) == pytest.approx((1 + 1 + 2 * 2**-0.5) / 4)
    assert same_class_similarity(f, torch.tensor([0, 1, 2, 3])) == 0

    def similarity(weight):
        cfg = InversionConfig(per_class=4, steps=40, lr=0.1, pruning={}, seed=3, diversity_weight=weight)
        result = invert(tiny_clip, teacher, cfg)
        mean = torch.tensor(tiny_clip.mean).view(1, 3, 1, 1)
        std = torch.tensor(tiny_clip.std).view(1, 3, 1, 1)
        with teacher.attached(tiny_clip), torch.no_grad():
            features = tiny_clip.pre_logits((result.images - mean) / std)
        return same_class_similarity(features, result.labels).item()

    assert similarity(5.0) < similarity(0.0) - 0.05
    with pytest.raises(ValueError, match="diversity_weight"):
        InversionConfig(diversity_weight=-1)


def test_prior_settings_round_trip_and_refuse_bad_values(tmp_path):
    from recycle.priors import PRIOR_SETTINGS, read_prior_settings, save_prior_settings

    assert read_prior_settings(tmp_path) == {}  # no file: no settings
    written = save_prior_settings(tmp_path, {"bn_weight": 0.02, "tv_weight": 0.3, "two_colour": 0.35, "steps": 7})
    assert written == {"bn_weight": 0.02, "tv_weight": 0.3, "two_colour": 0.35}  # only how surrogates look
    assert read_prior_settings(tmp_path) == written
    assert save_prior_settings(tmp_path, {})["two_colour"] == InversionConfig.two_colour  # defaults fill the gaps
    path = tmp_path / PRIOR_SETTINGS
    for text, match in [
        ("{not json", "unreadable"),
        ("[0.1]", "expected a JSON object"),
        ('{"tv_weight": "0.3"}', "tv_weight='0.3' is not a finite number"),
        ('{"bn_weight": NaN}', "bn_weight=nan is not a finite number"),
        ('{"two_colour": 2.0}', "two_colour"),
        ('{"bn_weight": -1}', "bn_weight"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_prior_settings(tmp_path)
