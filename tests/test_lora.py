import copy

import pytest
import torch

from recycle.lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    load_lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    remove_lora,
    unmerge_lora,
)


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture()
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_default_config_is_the_papers():
    cfg = LoRAConfig()
    assert cfg.targets == ("qv",) and cfg.rank == 4 and cfg.scaling == 1.0
    assert LoRAConfig(rank=8, alpha=4).scaling == 0.5


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(targets=("qkvz",)), "unknown LoRA target"),
        (dict(targets=("qv", "qkv")), "overlap"),
        (dict(rank=0), "rank"),
        (dict(alpha=-1.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(targets=()), "empty"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**bad)


def test_injection_leaves_outputs_unchanged_and_targets_qv_slices(tiny_clip, x):
    model = tiny_clip.model
    with torch.no_grad():
        before = model(x)
    paths = inject_lora(model, LoRAConfig())
    assert paths == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, LoRALinear) and layer.slices == {"q": (0, 64), "v": (128, 192)}
    assert layer.lora_A["q"].shape == (4, 64) and layer.lora_B["v"].shape == (64, 4)
    assert torch.count_nonzero(layer.lora_B["q"]) == 0 and layer.lora_A["q"].abs().sum() > 0  # B zero, A Kaiming
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_qv_update_touches_only_q_and_v_rows(tiny_clip):
    inject_lora(tiny_clip.model, LoRAConfig())
    _randomise(tiny_clip.model)
    delta = tiny_clip.model.blocks[0].attn.qkv.delta_weight()
    assert delta[:64].abs().sum() > 0 and delta[128:].abs().sum() > 0
    assert torch.count_nonzero(delta[64:128]) == 0


def test_merge_equals_unmerged_and_unmerge_restores(tiny_clip, x):
    model = tiny_clip.model
    original = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        base = model(x)
    inject_lora(model, LoRAConfig(targets=("qv", "proj", "fc1", "fc2"), rank=3, alpha=6))
    _randomise(model)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
        unmerge_lora(model)
        again = model(x)
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the LoRA is active
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert torch.equal(again, unmerged)
    remove_lora(model)
    assert not list(lora_layers(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_only_lora_trains_and_every_lora_param_gets_a_gradient(tiny_clip, x):
    model = tiny_clip.model
    inject_lora(model, LoRAConfig(targets=("qkv", "fc2")))
    head = torch.nn.Linear(64, 5)
    n = mark_only_lora_trainable(model, head)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    assert n == sum(p.numel() for p in lora_parameters(model)) + 64 * 5 + 5
    _randomise(model)
    head(tiny_clip.pre_logits(x)).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_state_dict_round_trip_and_shape_check(tiny_clip, tiny_clip_dir, x):
    from recycle.backbone import load_backbone

    inject_lora(tiny_clip.model, LoRAConfig())
    _randomise(tiny_clip.model)
    state = lora_state_dict(tiny_clip.model)
    other = load_backbone(str(tiny_clip_dir), device="cpu")
    inject_lora(other.model, LoRAConfig())
    load_lora_state_dict(other.model, state)
    with torch.no_grad():
        assert torch.equal(other.model(x), tiny_clip.model(x))
    state["blocks.0.attn.qkv.lora_A.q"] = torch.zeros(4, 65)
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(other.model, state)


def test_target_that_matches_nothing_raises(tiny_clip):
    with pytest.raises(ValueError, match="out of range"):
        inject_lora(tiny_clip.model, LoRAConfig(blocks=(7,)))
    with pytest.raises(ValueError, match="no `blocks`"):
        inject_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoRAConfig())
    inject_lora(tiny_clip.model, LoRAConfig())
    with pytest.raises(ValueError, match="already carries"):
        inject_lora(tiny_clip.model, LoRAConfig())


def test_merge_refuses_non_finite(tiny_clip):
    inject_lora(tiny_clip.model, LoRAConfig())
    layer = tiny_clip.model.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B["q"].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        merge_lora(tiny_clip.model)
