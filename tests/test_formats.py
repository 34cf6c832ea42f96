"""LoRA files: our PEFT-layout format, PEFT interop in both directions, the official format, and refusals."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from recycle.backbone import load_backbone
from recycle.formats import LoRAAdapter, LoRAFormatError, read_adapter, save_adapter
from recycle.lora import LoRAConfig, inject_lora, lora_parameters, remove_lora

peft = pytest.importorskip("peft")


def _x(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _trained_adapter(backbone, config=LoRAConfig(), classes=("cat", "dog", "fish"), seed=0):
    """An adapter with random (non-zero) LoRA weights and head, as if it had been tuned."""
    inject_lora(backbone.model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(backbone.model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    head = torch.nn.Linear(backbone.num_features, len(classes))
    adapter = LoRAAdapter.from_model(backbone.model, config, head, list(classes), backbone=backbone.name)
    return adapter, head


def _teacher_logits(backbone, head, x):
    with torch.no_grad():
        return head(backbone.pre_logits(x))


def _timm_model(directory, num_classes):
    """The tiny backbone as plain timm builds it with a fresh N-class head: what PEFT users start from."""
    return timm.create_model(f"local-dir:{directory}", pretrained=True, num_classes=num_classes)


@pytest.mark.parametrize("config", [LoRAConfig(), LoRAConfig(targets=("qkv", "fc1"), rank=2, alpha=3.0),
                                    LoRAConfig(targets=("proj", "fc2"), rank=5, blocks=(1,))])
def test_round_trip_is_exact(tiny_clip, tiny_clip_dir, tmp_path, config):
    adapter, head = _trained_adapter(tiny_clip, config)
    x = _x()
    expected = _teacher_logits(tiny_clip, head, x)
    save_adapter(adapter, tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    loaded = read_adapter(tmp_path / "lora")
    assert loaded.config.targets == config.targets and loaded.config.rank == config.rank
    assert loaded.config.scaling == pytest.approx(config.scaling)
    assert loaded.class_names == ["cat", "dog", "fish"] and loaded.backbone == tiny_clip.name
    for k, v in adapter.state.items():
        assert torch.equal(loaded.state[k], v), k
    fresh = load_backbone(str(tiny_clip_dir), device="cpu")
    loaded.inject(fresh.model)
    assert torch.allclose(_teacher_logits(fresh, loaded.build_head(fresh.num_features), x), expected, atol=1e-6)


def test_fused_qv_export_layout(tiny_clip, tmp_path):
    adapter, _ = _trained_adapter(tiny_clip)
    save_adapter(adapter, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a = tensors["base_model.model.blocks.0.attn.qkv.lora_A.weight"]
    b = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert a.shape == (8, 64) and b.shape == (192, 8)
    assert torch.count_nonzero(b[64:128]) == 0 and torch.count_nonzero(b[:64, 4:]) == 0
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["modules_to_save"] == ["head"]
    assert cfg["peft_type"] == "LORA"


@pytest.mark.parametrize("config", [LoRAConfig(), LoRAConfig(targets=("qv", "fc1"), rank=2, alpha=1.0)])
def test_peft_loads_our_files_with_equal_outputs(tiny_clip, tiny_clip_dir, tmp_path, config):
    adapter, head = _trained_adapter(tiny_clip, config)
    x = _x()
    expected = _teacher_logits(tiny_clip, head, x)
    save_adapter(adapter, tmp_path)
    model = peft.PeftModel.from_pretrained(_timm_model(tiny_clip_dir, 3), str(tmp_path)).eval()
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("prefix", ["", "timm_model."])
def test_we_load_peft_saved_timm_adapters(tiny_clip, tiny_clip_dir, tmp_path, prefix):
    base = _timm_model(tiny_clip_dir, 4)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc2"], modules_to_save=["head"],
                          rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 1})
    model = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    x = _x()
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(str(tmp_path))
    if prefix:  # what transformers' TimmWrapperForImageClassification adapters look like
        f = tmp_path / "adapter_model.safetensors"
        tensors = load_file(f)
        save_file({k.replace("base_model.model.", "base_model.model." + prefix): v for k, v in tensors.items()}, f)
    adapter = read_adapter(tmp_path)
    assert set(adapter.config.targets) == {"qkv", "fc2"} and adapter.num_classes == 4
    adapter.inject(tiny_clip.model)
    got = _teacher_logits(tiny_clip, adapter.build_head(tiny_clip.num_features), x)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_official_format_matches_reference_computation(tiny_clip, tiny_clip_dir, tmp_path):
    """Official LoRA Recycle keys mapped onto timm's fused qkv equal an explicit per-row weight edit."""
    d, r, n = 64, 4, 5
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i in range(2 * len(tiny_clip.model.blocks)):
        tensors[f"w_a_{i:03d}"] = torch.randn(r, d, generator=g) * 0.2
        tensors[f"w_b_{i:03d}"] = torch.randn(d, r, generator=g) * 0.2
    fc = torch.randn(n, tiny_clip.embed_dim, generator=g)
    tensors[f"fc_{tiny_clip.embed_dim}in_{n}out"] = fc
    save_file(tensors, tmp_path / "lora_0.safetensors")

    # Reference: edit q rows [0:d] and v rows [2d:3d] of each qkv weight directly, then fc on the CLIP projection.
    ref = load_backbone(str(tiny_clip_dir), device="cpu")
    with torch.no_grad():
        for layer, block in enumerate(ref.model.blocks):
            w = block.attn.qkv.weight
            w[:d] += tensors[f"w_b_{2 * layer:03d}"] @ tensors[f"w_a_{2 * layer:03d}"]
            w[2 * d:] += tensors[f"w_b_{2 * layer + 1:03d}"] @ tensors[f"w_a_{2 * layer + 1:03d}"]
        x = _x()
        expected = ref.embed(x) @ fc.T

    adapter = read_adapter(tmp_path / "lora_0.safetensors", backbone=tiny_clip)
    assert adapter.config.targets == ("qv",) and adapter.config.rank == 4 and adapter.config.scaling == 1.0
    adapter.inject(tiny_clip.model)
    got = _teacher_logits(tiny_clip, adapter.build_head(tiny_clip.num_features), x)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    with pytest.raises(LoRAFormatError, match="pass the backbone"):
        read_adapter(tmp_path / "lora_0.safetensors")


def test_refusals(tiny_clip, tmp_path):
    adapter, _ = _trained_adapter(tiny_clip)
    remove_lora(tiny_clip.model)
    good = save_adapter(adapter, tmp_path / "good")

    (tmp_path / "w.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(LoRAFormatError, match="pickle"):
        read_adapter(tmp_path / "w.bin")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    (pickled / "adapter_config.json").write_text("{}")
    with pytest.raises(LoRAFormatError, match="never loaded"):
        read_adapter(pickled)

    cfg = json.loads((good / "adapter_config.json").read_text())
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(LoRAFormatError, match="not LoRA"):
        read_adapter(ia3)
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoRAFormatError, match="DoRA"):
        read_adapter(ia3)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (good / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    (truncated / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoRAFormatError, match="corrupt or truncated"):
        read_adapter(truncated)

    nan = dict(adapter.state)
    nan["blocks.0.attn.qkv.lora_A.q"] = torch.full((4, 64), float("nan"))
    with pytest.raises(LoRAFormatError, match="NaN"):
        LoRAAdapter(adapter.config, nan)


def test_wrong_backbone_shapes_are_refused(tiny_clip, tiny_vit, tmp_path):
    adapter, _ = _trained_adapter(tiny_clip)
    save_adapter(adapter, tmp_path)
    loaded = read_adapter(tmp_path)
    with pytest.raises(LoRAFormatError, match="does not fit the backbone"):
        loaded.inject(tiny_vit.model)
    assert not any("lora" in n for n, _ in tiny_vit.model.named_parameters())  # nothing left behind
    with pytest.raises(LoRAFormatError, match="head takes 64 features"):
        loaded.build_head(tiny_vit.num_features)
