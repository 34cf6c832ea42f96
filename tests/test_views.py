from dataclasses import asdict

import pytest
import torch

from recycle.meta import MetaConfig, episode_loss
from recycle.priors import ink_and_paper
from recycle.views import ViewConfig, kept_pixels, random_views, two_tone


def _glyphs(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-colour images ``(n, 3, 16, 16)``: a random blocky coverage map between random ink and paper colours."""
    gen = torch.Generator().manual_seed(seed)
    coverage = (torch.rand(n, 1, 4, 4, generator=gen) < 0.3).float()
    coverage[:, :, :2] = 0  # paper is the majority colour, as on a page
    coverage[:, :, 3, 3] = 1  # and there is ink
    coverage = torch.nn.functional.interpolate(coverage, size=(16, 16), mode="nearest")
    ink, paper = ink_and_paper(n, 0.5, gen)
    images = paper[:, :, None, None] + coverage * (ink - paper)[:, :, None, None]
    return images, coverage, ink, paper


def test_two_tone_recovers_the_colours_and_the_coverage_of_a_two_colour_image():
    images, coverage, ink, paper = _glyphs()
    got_paper, got_ink, got_coverage, residual = two_tone(images)
    assert torch.allclose(got_paper, paper, atol=1e-6)
    assert torch.allclose(got_ink, ink, atol=1e-6)
    assert torch.allclose(got_coverage, coverage, atol=1e-5)
    assert residual.abs().max() < 1e-5


def test_a_uniform_image_is_all_paper():
    image = torch.full((1, 3, 8, 8), 0.3)
    paper, _, coverage, residual = two_tone(image)
    assert torch.allclose(paper, torch.full((1, 3), 0.3))
    assert coverage.abs().max() == 0 and residual.abs().max() < 1e-6


def test_the_default_view_is_the_image_itself():
    images, *_ = _glyphs()
    noisy = (images + 0.05 * torch.randn_like(images)).clamp(0, 1)  # a residual the view must carry along
    assert torch.allclose(random_views(noisy, ViewConfig(), torch.Generator().manual_seed(0)), noisy, atol=1e-5)


def test_recolouring_keeps_the_glyph_and_changes_its_colours():
    images, coverage, ink, paper = _glyphs()
    out = random_views(images, ViewConfig(recolour=1.0, min_contrast=0.5), torch.Generator().manual_seed(1))
    new_paper, new_ink, new_coverage, residual = two_tone(out)
    assert torch.allclose(new_coverage, coverage, atol=1e-3)
    assert residual.abs().max() < 1e-3
    assert (new_paper - paper).abs().max() > 0.05 and (new_ink - ink).abs().max() > 0.05


def test_stroke_views_thicken_and_thin_the_ink():
    images, coverage, *_ = _glyphs(n=32)
    out = random_views(images, ViewConfig(stroke=1.0), torch.Generator().manual_seed(2))
    change = (two_tone(out)[2] - coverage).flatten(1).sum(1)
    assert (change > 1).any() and (change < -1).any()  # some views gained ink, others lost it


def test_views_are_reproducible_and_differ_between_draws():
    images, *_ = _glyphs()
    config = ViewConfig(rotate=10, scale=(0.9, 1.1), shift=0.1, elastic=1.0, stroke=0.4, blur=0.3, recolour=0.8)
    a = random_views(images, config, torch.Generator().manual_seed(3))
    b = random_views(images, config, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    first, second = random_views(images, config, gen), random_views(images, config, gen)
    assert torch.equal(a, b)
    assert (first - second).abs().mean() > 0.01
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1


def test_masked_views_change_only_the_kept_patches_and_do_not_warp():
    images, coverage, *_ = _glyphs(n=2)
    kept = [torch.tensor([0, 5]), torch.tensor([3, 9, 15])]
    valid = kept_pixels(kept, (4, 4), (16, 16))
    assert valid.shape == (2, 1, 16, 16) and valid[0].sum() == 2 * 16 and valid[1].sum() == 3 * 16
    masked = images * valid
    out = random_views(masked, ViewConfig(shift=0.3, recolour=1.0), torch.Generator().manual_seed(4), valid)
    assert torch.equal(out * ~valid, masked * ~valid)
    # no warp: the kept pixels keep their coverage (as estimated from the kept pixels alone)
    kept_coverage = two_tone(out, valid)[2]
    assert torch.allclose(kept_coverage * valid, two_tone(masked, valid)[2] * valid, atol=1e-3)


@pytest.mark.parametrize(
    "field, value",
    [
        ("rotate", -1),
        ("scale", (1.2, 0.8)),
        ("shift", 0.5),
        ("stroke", 2.0),
        ("recolour", float("nan")),
        ("blur", -0.1),
    ],
)
def test_bad_view_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        ViewConfig(**{field: value})


def test_meta_config_takes_views_as_a_dict_and_round_trips():
    config = MetaConfig(views={"stroke": 0.3, "scale": [0.9, 1.1]})
    assert config.views == ViewConfig(stroke=0.3, scale=(0.9, 1.1))
    assert MetaConfig(**asdict(config)) == config
    with pytest.raises(ValueError, match="views"):
        MetaConfig(views="strong")


def test_episode_loss_sees_the_views(tiny_clip):
    from recycle.episodes import PoolEpisode

    images, *_ = _glyphs(n=6)
    images = torch.nn.functional.interpolate(images, size=tuple(tiny_clip.input_size[1:]), mode="nearest")
    labels = torch.tensor([0, 1, 2])
    episode = PoolEpisode(images[:3], labels, images[3:], labels, "cross", [])

    def loss(views, seed=0):
        with torch.no_grad():
            return episode_loss(
                tiny_clip, episode, flip=False, generator=torch.Generator().manual_seed(seed), views=views
            )[0]

    strong = ViewConfig(rotate=20, shift=0.2, stroke=1.0, recolour=1.0)
    assert loss(None) == loss(None)
    assert loss(strong, 0) == loss(strong, 0)
    assert loss(strong, 0) != loss(None)
    assert loss(strong, 0) != loss(strong, 1)
