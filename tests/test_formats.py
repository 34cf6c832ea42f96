"""LoRA files: our PEFT-layout format, PEFT interop in both directions, the official format, and refusals."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from recycle.backbone import load_backbone
from recycle.formats import LoRAAdapter, LoRAFormatError, load_lora, read_adapter, save_adapter
from recycle.hub import HubError
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


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(),
        LoRAConfig(targets=("qkv", "fc1"), rank=2, alpha=3.0),
        LoRAConfig(targets=("proj", "fc2"), rank=5, blocks=(1,)),
    ],
)
def test_round_trip_is_exact(tiny_clip, tiny_clip_dir, tmp_path, config):
    adapter, head = _trained_adapter(tiny_clip, config)
    x = _x()
    expected = _teacher_logits(tiny_clip, head, x)
    save_adapter(adapter, tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = read_adapter(tmp_path / "lora")
    assert loaded.config.targets == config.targets and loaded.config.rank == config.rank
    assert loaded.config.scaling == pytest.approx(config.scaling)
    assert loaded.class_names == ["cat", "dog", "fish"] and loaded.backbone == tiny_clip.name
    for k, v in adapter.state.items():
        assert torch.equal(loaded.state[k], v), k
    fresh = load_backbone(str(tiny_clip_dir), device="cpu")
    loaded.inject(fresh.model)
    assert torch.allclose(_teacher_logits(fresh, loaded.build_head(fresh.num_features), x), expected, atol=1e-6)


def test_hub_only_loading_never_reads_a_local_folder(tiny_clip, tmp_path):
    adapter, _ = _trained_adapter(tiny_clip)
    remove_lora(tiny_clip.model)
    folder = save_adapter(adapter, tmp_path / "lora")
    assert load_lora(str(folder)).class_names == ["cat", "dog", "fish"]
    with pytest.raises(HubError, match="is not a Hub id of the form ORG/NAME"):
        load_lora(str(folder), hub_only=True)


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


@pytest.mark.parametrize(
    "prefix, key", [("", "fc2"), ("timm_model.", "fc2"), ("", r"^blocks\.1\.mlp\.fc2$"), ("", "blocks.0.mlp.fc2")]
)
def test_we_load_peft_saved_timm_adapters(tiny_clip, tiny_clip_dir, tmp_path, prefix, key):
    base = _timm_model(tiny_clip_dir, 4)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["qkv", "fc2"],
        modules_to_save=["head"],
        rank_pattern={key: 2},
        alpha_pattern={key: 1},
    )
    model = peft.get_peft_model(base, cfg)
    ranks = {n: p.shape[0] for n, p in model.named_parameters() if "mlp.fc2.lora_A" in n}
    if key.startswith("^") and all(r == 4 for r in ranks.values()):  # PEFT 0.13 ignores anchored keys
        pytest.skip(f"peft {peft.__version__} does not apply anchored rank_pattern keys")
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
            w[2 * d :] += tensors[f"w_b_{2 * layer + 1:03d}"] @ tensors[f"w_a_{2 * layer + 1:03d}"]
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


# ---------------------------------------------------------------------------------------------- hostile files
def _edited(tiny_clip, tmp_path, edit_config=None, edit_meta=None, edit_tensors=None, config=LoRAConfig()):
    """Save a good adapter, then apply the edits to its config dict, its 'recycle' metadata dict and its tensors."""
    from safetensors import safe_open

    adapter, _ = _trained_adapter(tiny_clip, config)
    remove_lora(tiny_clip.model)
    folder = save_adapter(adapter, tmp_path / "edited")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    weights = folder / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = json.loads(f.metadata()["recycle"])
    tensors = load_file(weights)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(
        tensors, weights, metadata={"format": "pt", "recycle": meta if isinstance(meta, str) else json.dumps(meta)}
    )
    return folder


KEYS = [
    "fc2",
    "mlp.fc2",
    r"mlp\.fc2",
    "blocks.1.mlp.fc2",
    r"^blocks\.1\.mlp\.fc2$",
    "^fc2",
    "lp.fc2",
    "b.ocks.0.attn.qkv",
    "blocks.0.attn.qkv$",
    "attn",
    "qkv",
    "0.attn.qkv",
    ".attn.qkv",
    r"\.attn\.qkv",
    "^blocks.0.attn.qkv",
]
PATHS = ["blocks.0.attn.qkv", "blocks.1.mlp.fc2", "blocks.10.mlp.fc2", "blocks.0.attn.proj", "xblocks.0.attn.qkv"]


def test_pattern_keys_match_exactly_as_peft_does():
    """The accepted keys give PEFT's own answer (Python's re on ``(.*\\.)?(KEY)$``) for every module name."""
    import re

    from recycle.formats.peft_config import ModulePattern as _ModulePattern

    for key in KEYS:
        pattern = _ModulePattern.parse(key, "rank_pattern", "test")
        for path in PATHS:
            assert pattern.matches(path) == bool(re.match(rf"(.*\.)?({key})$", path)), (key, path)


@pytest.mark.parametrize(
    "key",
    ["(.*)*(.*)*(.*)*(.*)*!", "(a+)+$", "blocks.[0-9].fc2", "fc2|proj", ".*", "", "a" * 201, "blocks.0.mlp.fc2\\"],
)
def test_regular_expressions_in_patterns_are_refused_at_once(tiny_clip, tmp_path, key):
    import time

    folder = _edited(
        tiny_clip, tmp_path, edit_config=lambda c: c.update(rank_pattern={key: 4}, alpha_pattern={key: 1.0})
    )
    started = time.perf_counter()
    with pytest.raises(LoRAFormatError, match=r"rank_pattern key .* is not supported.*module paths"):
        read_adapter(folder)
    assert time.perf_counter() - started < 2.0


def test_adversarial_pattern_costs_linear_time(tiny_clip, tmp_path):
    """A key that is accepted cannot be slow: 1000 keys of 200 characters on every module take well under a second."""
    import time

    keys = {"a" * 199 + str(i % 10): 8 for i in range(1000)}
    folder = _edited(tiny_clip, tmp_path, edit_config=lambda c: c.update(rank_pattern=keys))
    started = time.perf_counter()
    read_adapter(folder)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(r="8"), r"'r' must be a positive integer, got '8'"),
        (lambda c: c.update(r=None), r"'r' must be a positive integer, got None"),
        (lambda c: c.update(r=True), r"'r' must be a positive integer, got True"),
        (lambda c: c.update(lora_alpha="big"), r"'lora_alpha' must be a positive number of at most 1e\+06, got 'big'"),
        (lambda c: c.update(rank_pattern="fc2"), r"rank_pattern must be an object"),
        (lambda c: c.update(rank_pattern={"blocks.0.attn.qkv": "8"}), r"rank_pattern\['blocks.0.attn.qkv'\] must be"),
        (lambda c: c.update(alpha_pattern={"qkv": [1]}), r"alpha_pattern\['qkv'\] must be a positive number"),
        (lambda c: c.update(lora_dropout="x"), r"'lora_dropout' must be a number in \[0, 1\)"),
    ],
)
def test_config_values_of_the_wrong_type_are_named(tiny_clip, tmp_path, edit, message):
    with pytest.raises(LoRAFormatError, match=message):
        read_adapter(_edited(tiny_clip, tmp_path, edit_config=edit))


def _set(key, value):
    return lambda m: m.update({key: value})


@pytest.mark.parametrize(
    "edit_meta, message",
    [
        (_set("class_names", [1, 2, 3]), r"class names must be a list of strings, got \[1, 2, 3\]"),
        (_set("class_names", "cat"), r"class names must be a list of strings"),
        (_set("config", "qv"), r"the metadata's 'config' must be an object, got 'qv'"),
        (_set("info", [1]), r"'info' must be an object"),
        (_set("backbone", 5), r"backbone name must be a string"),
        (lambda m: m["config"].update(extra=[1]), r"per-module overrides must be a mapping"),
        (lambda m: m["config"].update(rank="4"), r"rank must be a positive integer, got '4'"),
    ],
)
def test_metadata_of_the_wrong_type_is_named(tiny_clip, tmp_path, edit_meta, message):
    with pytest.raises(LoRAFormatError, match=message):
        read_adapter(_edited(tiny_clip, tmp_path, edit_meta=edit_meta))


def test_metadata_that_is_not_an_object_or_too_deep(tiny_clip, tmp_path):
    from safetensors import safe_open

    folder = _edited(tiny_clip, tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    for text, message in [
        ('"just a string"', r"'recycle' metadata must be a JSON object"),
        ("[" * 200_000 + "]" * 200_000, r"nested too deeply"),
        ('{"version": NaN}', r"not valid JSON: NaN"),
        ('{"version": ' + "9" * 5000 + "}", r"not valid JSON"),
    ]:
        save_file(tensors, weights, metadata={"recycle": text})
        with safe_open(str(weights), "pt") as f:
            assert f.metadata()["recycle"] == text
        with pytest.raises(LoRAFormatError, match=message):
            read_adapter(folder)
    (folder / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(LoRAFormatError, match=r"adapter_config\.json is nested too deeply"):
        read_adapter(folder)


def test_a_5000_digit_block_index_is_refused(tiny_clip, tmp_path):
    def rename(tensors):
        for kind in ("lora_A", "lora_B"):
            tensors[f"base_model.model.blocks.{'9' * 5000}.attn.qkv.{kind}.weight"] = tensors.pop(
                f"base_model.model.blocks.0.attn.qkv.{kind}.weight"
            )

    with pytest.raises(LoRAFormatError, match=r"unsupported tensor 'base_model\.model\.blocks\.999.*block indices"):
        read_adapter(_edited(tiny_clip, tmp_path, edit_tensors=rename))


def test_declared_ranks_are_checked_before_anything_is_allocated(tiny_clip, tmp_path):
    """Zero-size tensors declaring a huge rank, and ranks above min(in, out), never reach an allocation."""

    def empty_pair(tensors):  # a 3.6 KB file that declares rank 10^9
        tensors["base_model.model.blocks.0.attn.qkv.lora_A.weight"] = torch.zeros(10**9, 0)
        tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"] = torch.zeros(0, 10**9)

    with pytest.raises(LoRAFormatError, match=r"lora_A \[1000000000, 0\] and lora_B \[0, 1000000000\].*low-rank"):
        read_adapter(
            _edited(
                tiny_clip,
                tmp_path / "a",
                edit_tensors=empty_pair,
                edit_config=lambda c: c.update(rank_pattern={"blocks.0.attn.qkv": 10**9}),
            )
        )
    # metadata that declares another rank than the tensors have is refused as the file is read
    for rank in (10**9, 100_000, 8):
        with pytest.raises(
            LoRAFormatError,
            match=rf"metadata says rank {rank} for blocks\.0\.attn\.qkv, but its "
            r"tensors have rank 4; the file is inconsistent",
        ):
            read_adapter(
                _edited(tiny_clip, tmp_path / f"b{rank}", edit_meta=lambda m, r=rank: m["config"].update(rank=r))
            )
    assert not any("lora" in n for n, _ in tiny_clip.model.named_parameters())
    # a rank just above min(in, out): refused by name too, though it would fit in memory
    over = LoRAAdapter(
        LoRAConfig(rank=65),
        {
            f"blocks.{i}.attn.qkv.lora_{k}.{s}": torch.zeros(shape)
            for i in range(2)
            for s in "qv"
            for k, shape in (("A", (65, 64)), ("B", (64, 65)))
        },
    )
    with pytest.raises(LoRAFormatError, match=r"rank 65 on blocks\.0\.attn\.qkv exceeds min\(in, out\) = 64"):
        over.inject(tiny_clip.model)


def test_head_of_zero_size_is_refused(tiny_clip, tmp_path):
    def empty_head(tensors):
        tensors["base_model.model.head.weight"] = torch.zeros(10**9, 0)
        tensors["base_model.model.head.bias"] = torch.zeros(0)

    with pytest.raises(LoRAFormatError, match=r"head\.weight has shape \[1000000000, 0\], with no elements"):
        read_adapter(_edited(tiny_clip, tmp_path, edit_tensors=empty_head, edit_meta=_set("class_names", None)))
