"""transformers ViTs and their PEFT adapters, made with transformers and PEFT themselves, read by recycle.

The adapters are made in the module names the installed transformers uses; the other layout ("old":
``encoder.layer.{i}.attention.attention.query`` of transformers 4 and 5.0, or "new": ``layers.{i}.attention.q_proj`` of
later 5.x releases) is made from it by renaming the keys, the target modules and the pattern keys exactly as the
other versions name those modules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

from recycle.backbone import BackboneError, load_backbone  # noqa: E402
from recycle.formats import LoRAFormatError, load_lora  # noqa: E402
from tests.helpers import make_image  # noqa: E402

CLASSES = ["apple", "pear", "plum"]
TINY = dict(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    num_labels=3,
    id2label=dict(enumerate(CLASSES)),
    label2id={c: i for i, c in enumerate(CLASSES)},
)

# Module names within a block: old <-> new.
V4_TO_V5 = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
V5_LEAF = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}


def _installed_layout() -> str:
    names = [n for n, _ in transformers.ViTModel(transformers.ViTConfig(**TINY)).named_modules()]
    return "new" if any(n.endswith("attention.q_proj") for n in names) else "old"


LAYOUT = _installed_layout()
OTHER = "old" if LAYOUT == "new" else "new"


def _leaf(name: str, layout: str) -> str:
    """A target-module name written in the old words ("query", "dense"...) in `layout`'s words."""
    return V5_LEAF.get(name, name) if layout == "new" else name


def _module_v4_to_v5(name: str) -> str:
    m = re.fullmatch(r"(.*?)encoder\.layer\.(\d+)\.(.+)", name)
    if not m:
        return name
    for old, new in V4_TO_V5.items():
        if m.group(3) == old or m.group(3).startswith(old + "."):
            return f"{m.group(1)}layers.{m.group(2)}.{new}{m.group(3)[len(old) :]}"
    return f"{m.group(1)}layers.{m.group(2)}.{m.group(3)}"  # the LayerNorms keep their names


def _module_v5_to_v4(name: str) -> str:
    m = re.fullmatch(r"(.*?)layers\.(\d+)\.(.+)", name)
    if not m:
        return name
    for old, new in V4_TO_V5.items():
        if m.group(3) == new or m.group(3).startswith(new + "."):
            return f"{m.group(1)}encoder.layer.{m.group(2)}.{old}{m.group(3)[len(new) :]}"
    return f"{m.group(1)}encoder.layer.{m.group(2)}.{m.group(3)}"


def rename_adapter(src: Path, dst: Path, to: str) -> Path:
    """Copy PEFT adapter `src` to `dst` with every module name in layout `to` (keys, patterns, targets)."""
    rename = _module_v4_to_v5 if to == "new" else _module_v5_to_v4
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()}, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "adapter_config.json").read_text())
    leaves = {
        "new": {"query": ["q_proj"], "key": ["k_proj"], "value": ["v_proj"], "dense": ["o_proj", "fc1", "fc2"]},
        "old": {
            "q_proj": ["query"],
            "k_proj": ["key"],
            "v_proj": ["value"],
            "o_proj": ["dense"],
            "fc1": ["dense"],
            "fc2": ["dense"],
        },
    }[to]
    cfg["target_modules"] = sorted({new for t in cfg["target_modules"] for new in leaves.get(t, [t])})
    for field in ("rank_pattern", "alpha_pattern"):  # pattern keys: full module paths or leaf names
        renamed = {}
        for k, v in (cfg.get(field) or {}).items():
            new = rename(k)
            renamed[leaves[new][0] if new in leaves and len(leaves[new]) == 1 else new] = v
        cfg[field] = renamed
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def hf_vit_dir(tmp_path_factory) -> Path:
    """A tiny random ViTForImageClassification with a non-zero head, saved by transformers with a preprocessor."""
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():  # larger than the init's 0.02 so every layer matters to the logits
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]
    ).save_pretrained(folder)
    return folder


def _peft_model(base_dir: Path, seed: int, **lora):
    torch.manual_seed(seed)
    base = transformers.ViTForImageClassification.from_pretrained(base_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # a trained adapter: B and the head are not zero
                p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def _inputs() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _recycle_logits(backbone, adapter, x):
    with torch.no_grad(), adapter.attached(backbone) as head:
        return head(backbone.pre_logits(x))


# The PEFT guide's recipe, and a variant with every target, patterns and rsLoRA.
RECIPES = {
    "guide": dict(r=4, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    "variant": dict(
        r=4,
        lora_alpha=8,
        target_modules=["query", "key", "value", "dense"],
        use_rslora=True,
        rank_pattern={"encoder.layer.1.intermediate.dense": 2},
        alpha_pattern={"value": 3.0},
        modules_to_save=["classifier"],
    ),
}


def _recipe(name: str, layout: str) -> dict:
    lora = dict(RECIPES[name])
    leaves = [_leaf(t, layout) for t in lora["target_modules"]]
    if layout == "new" and "dense" in leaves:
        leaves = [t for t in leaves if t != "dense"] + ["o_proj", "fc1", "fc2"]
    lora["target_modules"] = leaves
    if layout == "new":
        lora["rank_pattern"] = {"layers.1.mlp.fc1": 2} if "rank_pattern" in lora else {}
        lora["alpha_pattern"] = {"v_proj": 3.0} if "alpha_pattern" in lora else {}
    return lora


@pytest.fixture(scope="module", params=sorted(RECIPES))
def hf_adapter(request, hf_vit_dir, tmp_path_factory):
    """(adapter folder in the installed layout, the same in the other layout, PEFT's logits on `_inputs()`)."""
    model = _peft_model(hf_vit_dir, 1, **_recipe(request.param, LAYOUT))
    folder = tmp_path_factory.mktemp(f"adapter_{request.param}")
    model.save_pretrained(folder)
    with torch.no_grad():
        logits = model(pixel_values=_inputs()).logits
    other = rename_adapter(folder, tmp_path_factory.mktemp(f"adapter_{request.param}_other"), OTHER)
    return folder, other, logits


# ----------------------------------------------------------------------------------------------- backbones
def test_transformers_vit_folder_loads_with_transformers_outputs(hf_vit_dir):
    backbone = load_backbone(str(hf_vit_dir), device="cpu")
    reference = transformers.ViTForImageClassification.from_pretrained(hf_vit_dir).eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(backbone.model(x), reference(pixel_values=x).logits, atol=1e-5)
        hidden = reference.vit(pixel_values=x).last_hidden_state[:, 0]
        assert torch.allclose(backbone.pre_logits(x), hidden, atol=1e-5)
    assert backbone.model.norm.eps == 1e-12 and backbone.model.blocks[0].norm1.eps == 1e-12
    assert backbone.embedding == "pre_logits" and backbone.input_size == (3, 32, 32)
    assert backbone.mean == (0.4, 0.5, 0.6) and backbone.std == (0.2, 0.25, 0.3)
    assert backbone.model.pretrained_cfg["label_names"] == CLASSES


def test_preprocessing_matches_the_image_processor(hf_vit_dir):
    backbone = load_backbone(str(hf_vit_dir), device="cpu")
    processor = transformers.ViTImageProcessor.from_pretrained(hf_vit_dir)
    for size in (32, 45):
        image = make_image(3, size=size)
        ours = backbone.preprocess([image])
        theirs = processor(images=[image], return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 32, 32)
        # The same resize and normalisation: at most one grey level apart where the two resamplers round apart.
        assert (ours - theirs).abs().max() < (1e-6 if size == 32 else 1.01 / 255 / 0.2)


def test_vit_model_without_head_and_both_weight_name_layouts(hf_vit_dir, tmp_path):
    reference = transformers.ViTModel.from_pretrained(hf_vit_dir, add_pooling_layer=True).eval()
    folder = tmp_path / "renamed"
    folder.mkdir()
    (folder / "config.json").write_text((hf_vit_dir / "config.json").read_text())
    weights = {k: v.contiguous() for k, v in reference.state_dict().items()}
    names = {"new": _module_v4_to_v5, "old": lambda k: k}
    for layout in ("old", "new"):
        on_disk = {}
        for k, v in weights.items():
            k4 = _module_v5_to_v4(k)  # whatever the installed version calls it, write it in `layout`'s names
            on_disk[names[layout](k4)] = v
        save_file(on_disk, folder / "model.safetensors")
        backbone = load_backbone(str(folder), device="cpu")
        x = _inputs()
        with torch.no_grad():
            assert backbone.model.num_classes == 0
            assert torch.allclose(
                backbone.pre_logits(x), reference(pixel_values=x).last_hidden_state[:, 0], atol=1e-5
            ), layout


def test_bad_transformers_folders_get_clear_errors(hf_vit_dir, tmp_path):
    def folder_with(config: dict, weights: dict | None = None, pickle: bool = False) -> str:
        folder = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        if weights is not None:
            save_file(weights, folder / "model.safetensors")
        if pickle:
            (folder / "pytorch_model.bin").write_bytes(b"not loaded")
        return str(folder)

    config = json.loads((hf_vit_dir / "config.json").read_text())
    weights = load_file(hf_vit_dir / "model.safetensors")
    with pytest.raises(BackboneError, match="model_type 'dinov2' is not supported"):
        load_backbone(folder_with({**config, "model_type": "dinov2"}, weights))
    with pytest.raises(BackboneError, match="pickles, which are never loaded.*save_pretrained"):
        load_backbone(folder_with(config, pickle=True))
    with pytest.raises(BackboneError, match="has shape .* config.json implies"):
        load_backbone(folder_with({**config, "hidden_size": 128}, weights))
    with pytest.raises(BackboneError, match="lacks .* tensors"):
        load_backbone(folder_with({**config, "num_hidden_layers": 3}, weights))
    with pytest.raises(BackboneError, match="not divisible"):
        load_backbone(folder_with({**config, "num_attention_heads": 5}, weights))
    with pytest.raises(BackboneError, match="no known ViT layout"):
        load_backbone(folder_with(config, {"x": torch.zeros(2)}))


def test_hub_ids_of_transformers_vits_load(hf_vit_dir, local_hub):
    import shutil

    shutil.copytree(hf_vit_dir, local_hub.root / "google" / "tiny-vit")
    x = _inputs()
    reference = load_backbone(str(hf_vit_dir), device="cpu")
    for name in ("hf-hub:google/tiny-vit", "google/tiny-vit"):
        backbone = load_backbone(name, device="cpu")
        assert backbone.model.pretrained_cfg["hf_hub_id"] == "google/tiny-vit"
        with torch.no_grad():
            assert torch.equal(backbone.model(x), reference.model(x))
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("google/no-such-vit", device="cpu")


# ----------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("which", ["installed", "other"])
def test_peft_adapters_give_peft_logits(hf_vit_dir, hf_adapter, which):
    installed, other, peft_logits = hf_adapter
    backbone = load_backbone(str(hf_vit_dir), device="cpu")
    adapter = load_lora(installed if which == "installed" else other, backbone)
    assert adapter.class_names == CLASSES and adapter.num_classes == 3
    assert adapter.info["layout"] == (LAYOUT if which == "installed" else OTHER)
    logits = _recycle_logits(backbone, adapter, _inputs())
    assert (logits - peft_logits).abs().max() < 1e-4
    # The bare backbone's classifier is not the adapter's: the comparison can fail.
    with torch.no_grad():
        assert (backbone.model(_inputs()) - peft_logits).abs().max() > 1e-2


@pytest.mark.parametrize("layout", ["installed", "other"])
def test_a_guide_adapter_with_dropout_is_a_deterministic_teacher(hf_vit_dir, tmp_path, layout):
    """The PEFT guide trains with ``lora_dropout=0.1``: inversion must still run its teacher in eval mode, equal to
    transformers + PEFT, and store the logits PEFT gives on the saved images."""
    from recycle.invert import InversionConfig, invert

    model = _peft_model(hf_vit_dir, 3, lora_dropout=0.1, **_recipe("guide", LAYOUT))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    if layout == "other":
        folder = rename_adapter(folder, tmp_path / "other", OTHER)
    backbone = load_backbone(str(hf_vit_dir), device="cpu")
    backbone.model.train()  # as meta-training leaves a shared backbone: attaching must not inherit it
    adapter = load_lora(folder, backbone)
    with torch.no_grad():
        reference = model(pixel_values=_inputs()).logits
    first, second = _recycle_logits(backbone, adapter, _inputs()), _recycle_logits(backbone, adapter, _inputs())
    assert torch.equal(first, second)
    assert (first - reference).abs().max() < 1e-4
    assert backbone.model.training  # the host's mode comes back after the block
    result = invert(backbone, adapter, InversionConfig(per_class=2, steps=3, flip=False, seed=0))
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        on_saved = model(pixel_values=(result.images - mean) / std).logits
    assert (result.logits - on_saved).abs().max() < 1e-4


def test_scales_survive_rank_and_alpha_patterns_and_rslora(hf_vit_dir, tmp_path):
    lora = _recipe("variant", LAYOUT)
    model = _peft_model(hf_vit_dir, 2, **lora)
    model.save_pretrained(tmp_path / "a")
    backbone = load_backbone(str(hf_vit_dir), device="cpu")
    adapter = load_lora(tmp_path / "a", backbone)
    assert set(adapter.config.targets) == {"qkv", "proj", "fc1", "fc2"}
    assert adapter.config.extra["blocks.1.mlp.fc1"]["rank"] == 2
    with torch.no_grad():
        expected = model(pixel_values=_inputs()).logits
    assert (_recycle_logits(backbone, adapter, _inputs()) - expected).abs().max() < 1e-4
    # Without rsLoRA the same tensors mean another update: the reader must honour the flag.
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["use_rslora"] = False
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    plain = load_lora(tmp_path / "a", backbone)
    assert (_recycle_logits(backbone, plain, _inputs()) - expected).abs().max() > 1e-3


def test_refused_adapters_say_why(hf_vit_dir, hf_adapter, tmp_path):
    import shutil

    installed, _, _ = hf_adapter
    backbone = load_backbone(str(hf_vit_dir), device="cpu")

    def variant(**changes) -> Path:
        folder = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(installed, folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        return folder

    with pytest.raises(LoRAFormatError, match="trains biases"):
        load_lora(variant(bias="all"), backbone)
    with pytest.raises(LoRAFormatError, match="not LoRA"):
        load_lora(variant(peft_type="LOHA"), backbone)
    pickled = variant()
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(LoRAFormatError, match=r"never loaded.*save_pretrained"):
        load_lora(pickled, backbone)
    with pytest.raises(LoRAFormatError, match=r"'lora_alpha' must be a positive number of at most 1e\+06"):
        load_lora(variant(lora_alpha=1e308), backbone)
    tensors = load_file(installed / "adapter_model.safetensors")
    twice = variant()  # the same module with and without the "vit." prefix, other weights
    extra = {k.replace(".vit.", ".", 1): v + 1 for k, v in tensors.items() if "layer.0." in k or "layers.0." in k}
    save_file({**tensors, **extra}, twice / "adapter_model.safetensors")
    with pytest.raises(LoRAFormatError, match=r"layer 0's \w+ module appears twice"):
        load_lora(twice, backbone)
    head_only = variant()
    save_file({k: v for k, v in tensors.items() if "classifier" in k}, head_only / "adapter_model.safetensors")
    with pytest.raises(LoRAFormatError, match=r"holds no LoRA pairs \(only a classifier\)"):
        load_lora(head_only, backbone)


def test_head_less_clip_adapters_load_but_cannot_be_inverted(tiny_clip, tmp_path):
    """A FusionBench-style CLIP vision LoRA (q_proj/v_proj, no head) lands on timm CLIP's qkv rows."""
    from recycle.invert import InversionConfig, invert

    d, r = tiny_clip.num_features, 4
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        for p in ("q_proj", "v_proj"):
            key = f"base_model.model.vision_model.encoder.layers.{i}.self_attn.{p}"
            tensors[key + ".lora_A.weight"] = torch.randn(r, d, generator=g)
            tensors[key + ".lora_B.weight"] = torch.randn(d, r, generator=g)
    folder = tmp_path / "clip-lora"
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": 2 * r,
                "target_modules": ["q_proj", "v_proj"],
                "bias": "none",
                "base_model_name_or_path": "openai/clip-vit-base-patch16",
            }
        )
    )
    adapter = load_lora(folder, tiny_clip)
    assert adapter.head_weight is None and adapter.config.targets == ("qv",) and adapter.config.scaling == 2
    assert adapter.backbone == "vit_base_patch16_clip_224.openai"
    x = _inputs()
    with torch.no_grad(), adapter.attached(tiny_clip):
        qkv = tiny_clip.model.blocks[1].attn.qkv
        y = qkv(x.new_ones(1, d))
    base = qkv.base_layer if hasattr(qkv, "base_layer") else qkv
    ones = x.new_ones(1, d)
    key = "base_model.model.vision_model.encoder.layers.1.self_attn."
    want_q = (
        base(ones)[:, :d] + 2 * ones @ tensors[key + "q_proj.lora_A.weight"].T @ tensors[key + "q_proj.lora_B.weight"].T
    )
    assert torch.allclose(y[:, :d], want_q, atol=1e-4) and torch.allclose(y[:, d : 2 * d], base(ones)[:, d : 2 * d])
    with pytest.raises(ValueError, match="no classification head"):
        invert(tiny_clip, adapter, InversionConfig(steps=1))


# ----------------------------------------------------------------------------------------------- export
def _vit_module_names(model) -> set[str]:
    return {n for n, _ in model.named_modules()}


@pytest.mark.parametrize("head", [True, False])
def test_exported_loras_load_into_peft_with_equal_outputs(hf_vit_dir, tmp_path, head):
    """A (meta-)LoRA made on the converted backbone, written in the base's PEFT layout, loads into transformers."""
    from recycle.formats import LoRAAdapter
    from recycle.formats import save_transformers_peft
    from recycle.lora import LoRAConfig, inject_lora, lora_parameters, remove_lora

    backbone = load_backbone(str(hf_vit_dir), device="cpu")
    torch.manual_seed(3)
    config = LoRAConfig(
        targets=("qv", "fc1") if head else ("qkv", "proj", "fc2"),
        rank=2,
        alpha=3.0,
        extra={"blocks.1.mlp.fc1" if head else "blocks.0.mlp.fc2": {"rank": 3, "alpha": 1.5}},
    )
    inject_lora(backbone.model, config)
    with torch.no_grad():
        for p in lora_parameters(backbone.model):
            p.copy_(torch.randn_like(p) * 0.3)
    linear = torch.nn.Linear(backbone.num_features, 3) if head else None
    adapter = LoRAAdapter.from_model(backbone.model, config, linear, CLASSES if head else None, str(hf_vit_dir))
    remove_lora(backbone.model)
    save_transformers_peft(adapter, tmp_path / "out", layout=LAYOUT, base_model="google/tiny-vit")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "google/tiny-vit" and cfg["peft_type"] == "LORA"
    x = _inputs()
    if head:
        base = transformers.ViTForImageClassification.from_pretrained(hf_vit_dir)
        model = peft.PeftModel.from_pretrained(base, tmp_path / "out").eval()
        with torch.no_grad():
            theirs = model(pixel_values=x).logits
        ours = _recycle_logits(backbone, adapter, x)
    else:
        base = transformers.ViTModel.from_pretrained(hf_vit_dir, add_pooling_layer=False)
        model = peft.PeftModel.from_pretrained(base, tmp_path / "out").eval()
        with torch.no_grad(), adapter.attached(backbone):
            ours = backbone.pre_logits(x)
            theirs = model(pixel_values=x).last_hidden_state[:, 0]
    assert sum("lora_A" in n for n in _vit_module_names(model)) > 0
    with torch.no_grad():
        bare = backbone.model(x) if head else backbone.pre_logits(x)
    assert (ours - bare).abs().max() > 1e-2  # the LoRA changes the outputs, so the comparison below can fail
    assert (ours - theirs).abs().max() < 1e-4
    # ...and recycle reads its own export back to the same outputs.
    again = load_lora(tmp_path / "out", backbone)
    if head:
        assert again.class_names == CLASSES
        assert (_recycle_logits(backbone, again, x) - ours).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------- command line
def test_cli_inverts_a_peft_adapter_on_its_own_backbone(hf_vit_dir, hf_adapter, tmp_path, capsys):
    from recycle.cli import main
    from recycle.pool import Pool

    installed, other, _ = hf_adapter
    out = tmp_path / "pool"
    common = [
        "--out",
        str(out),
        "--per-class",
        "1",
        "--steps",
        "2",
        "--classes",
        "apple",
        "plum",
        "--bn-prior",
        "none",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(["invert", "--backbone", str(hf_vit_dir), "--lora", str(other)] + common) == 0
    assert main(["invert", "--lora", str(installed)] + common + ["--seed", "1"]) == 0  # the adapter names its base
    assert "teacher accuracy" in capsys.readouterr().out
    pool = Pool(out)
    assert len(pool.runs) == 2 and [c.name for c in pool.classes] == ["apple", "plum"]


def test_cli_export_round_trips_through_peft(hf_vit_dir, hf_adapter, tiny_clip_dir, tmp_path, capsys, caplog):
    from recycle.cli import main

    installed, other, peft_logits = hf_adapter
    assert main(["export", "--lora", str(other), "--backbone", str(hf_vit_dir), "--out", str(tmp_path / "x")]) == 0
    printed = capsys.readouterr().out
    assert f"({LAYOUT} module names)" in printed  # auto: the installed transformers' names
    assert "PeftModel.from_pretrained(ViTForImageClassification" in printed
    base = transformers.ViTForImageClassification.from_pretrained(hf_vit_dir)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "x").eval()
    with torch.no_grad():
        assert (model(pixel_values=_inputs()).logits - peft_logits).abs().max() < 1e-4
    # Each module keeps the rank it was read with (the variant's q/k/v are separate rank-4 LoRAs, fused on reading).
    original = load_file(installed / "adapter_model.safetensors")
    exported = load_file(tmp_path / "x" / "adapter_model.safetensors")
    rank = {k.replace(".default", ""): v.shape for k, v in original.items() if "lora_A" in k}
    assert sorted(rank) == sorted(k for k in exported if "lora_A" in k)
    assert all(exported[k].shape == rank[k] for k in rank)
    # A card the Hub accepts, which tags the base as PEFT does: a local base is named by --base-model.
    export = ["export", "--lora", str(other), "--backbone", str(hf_vit_dir), "--out"]
    assert main(export + [str(tmp_path / "z"), "--base-model", "google/tiny-vit"]) == 0
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "z" / "README.md")
    assert card.data.base_model == "google/tiny-vit" and card.data.library_name == "peft"
    assert "base_model:adapter:google/tiny-vit" in card.data.tags and "lora" in card.data.tags
    assert json.loads((tmp_path / "z" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "google/tiny-vit"
    )
    assert "README.md" in {p.name for p in (tmp_path / "x").iterdir()}  # a local base: a card without base_model
    assert ModelCard.load(tmp_path / "x" / "README.md").data.base_model is None
    assert "--base-model ORG/NAME" in caplog.text
    other_layout = "old" if LAYOUT == "new" else "new"
    assert main(export + [str(tmp_path / "w"), "--layout", other_layout]) == 0
    assert "PEFT here cannot load this" in caplog.text
    assert (
        main(["export", "--lora", str(installed), "--backbone", str(tiny_clip_dir), "--out", str(tmp_path / "y")]) == 1
    )
    assert "is a timm model" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_provenance_is_compared_not_only_shapes():
    from types import SimpleNamespace

    from recycle.provenance import provenance_mismatch

    def backbone(name, hub=None):
        return SimpleNamespace(name=name, model=SimpleNamespace(pretrained_cfg={"hf_hub_id": hub}))

    clip = backbone("vit_base_patch16_clip_224.openai", "timm/vit_base_patch16_clip_224.openai")
    assert "made for 'google/vit-base-patch16-224-in21k'" in provenance_mismatch(
        "google/vit-base-patch16-224-in21k", clip
    )
    assert provenance_mismatch("clip-b16", clip) is None
    assert provenance_mismatch("openai/clip-vit-base-patch16", clip) is None  # the same weights in transformers
    assert provenance_mismatch("hf-hub:timm/vit_base_patch16_clip_224.openai@main", clip) is None
    vit = backbone("google/vit-base-patch16-224-in21k", "google/vit-base-patch16-224-in21k")
    assert provenance_mismatch("vit_base_patch16_224.orig_in21k", vit) is None
    assert provenance_mismatch("clip-b16", vit) is not None
    assert provenance_mismatch("./some/local/folder", clip) is None and provenance_mismatch(None, clip) is None


def test_app_fit_check_names_the_backbone_a_lora_was_made_for(tiny_clip_dir, local_hub):
    """A LoRA that fits CLIP's shapes but was made on another model is not called a fit."""
    import shutil
    from dataclasses import replace

    pytest.importorskip("gradio")
    from app_ui.inversion import Inversion
    from tests.helpers import colour_task, train_tiny_lora

    shutil.copytree(tiny_clip_dir, local_hub.root / "timm" / "vit_base_patch16_clip_224.openai")
    clip = load_backbone("hf-hub:timm/vit_base_patch16_clip_224.openai", device="cpu")
    adapter = train_tiny_lora(clip, *colour_task(), steps=1)
    ok, _ = Inversion._fit(replace(adapter, backbone="clip-b16"), clip, "clip-b16")
    assert ok.startswith("✅")
    other, _ = Inversion._fit(replace(adapter, backbone="google/vit-base-patch16-224-in21k"), clip, "clip-b16")
    from tests.support.apptools import plain

    other = plain(other)
    assert other.startswith("⚠️") and "in shape only" in other and "google/vit-base-patch16-224-in21k" in other


# ----------------------------------------------------------------------------------------------- the Hub's LoRAs
def _publish(
    root: Path, repo: str, adapter_dir: Path, card_base: str | None = None, labels: bool = False, **config_changes
) -> Path:
    """Put a PEFT adapter on the fake Hub as `repo`, naming google/tiny-vit as its base."""
    import shutil

    folder = root / repo
    folder.mkdir(parents=True)
    shutil.copy(adapter_dir / "adapter_model.safetensors", folder)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "google/tiny-vit", **config_changes})
    )
    if card_base:
        (folder / "README.md").write_text(f"---\nbase_model: {card_base}\nlibrary_name: peft\n---\n# {repo}\n")
    if labels:
        (folder / "config.json").write_text(json.dumps({"id2label": {"0": "salad", "1": "soup", "2": "cake"}}))
    return folder


@pytest.fixture()
def hub_with_loras(local_hub, hf_vit_dir, hf_adapter, tmp_path):
    """The fake Hub holding google/tiny-vit and LoRAs for it as people publish them, good and bad."""
    import shutil

    installed, other, _ = hf_adapter
    root = local_hub.root
    shutil.copytree(hf_vit_dir, root / "google" / "tiny-vit")
    _publish(root, "alice/food-lora", installed, card_base="google/tiny-vit", labels=True)  # tagged, with labels
    _publish(root, "bob/tiny-vit-finetuned-lora-beans", other)  # old: no card, found by its name
    pickled = _publish(root, "carol/tiny-vit-lora-bin", installed, card_base="google/tiny-vit")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    headless = _publish(root, "dave/tiny-vit-meta", installed, card_base="google/tiny-vit")
    tensors = load_file(headless / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "classifier" not in k}, headless / "adapter_model.safetensors")
    _publish(root, "erin/tiny-vit-loha", installed, card_base="google/tiny-vit", peft_type="LOHA")
    _publish(root, "frank/other-lora", installed, card_base="google/tiny-vit", base_model_name_or_path="org/else")
    _publish(
        root,
        "hank/food-lora-colab",
        installed,
        card_base="google/tiny-vit",  # its config names a local path
        base_model_name_or_path="/content/tiny-vit",
    )
    _publish(root, "ivan/tiny-vit-lora-untagged-local", installed, base_model_name_or_path="/content/tiny-vit")
    huge = _publish(root, "gina/tiny-vit-lora-huge-config", installed, card_base="google/tiny-vit")
    (huge / "config.json").write_text(json.dumps({"id2label": {"0": "x"}, "padding": "." * (1 << 20)}))
    return local_hub


def test_fake_hub_answers_list_models_and_safetensors_headers_as_the_hub(hub_with_loras):
    from huggingface_hub import HfApi

    api = HfApi()
    tagged = list(
        api.list_models(
            filter=["peft", "base_model:adapter:google/tiny-vit"], sort="downloads", expand=["siblings", "sha", "tags"]
        )
    )
    assert [m.id for m in tagged] == [
        "alice/food-lora",
        "carol/tiny-vit-lora-bin",
        "dave/tiny-vit-meta",
        "erin/tiny-vit-loha",
        "frank/other-lora",
        "gina/tiny-vit-lora-huge-config",
        "hank/food-lora-colab",
    ]
    assert "safetensors" in tagged[0].tags and "adapter_model.safetensors" in [s.rfilename for s in tagged[0].siblings]
    assert [m.id for m in api.list_models(filter="peft", search="TINY-VIT")] == [
        "bob/tiny-vit-finetuned-lora-beans",
        "carol/tiny-vit-lora-bin",
        "dave/tiny-vit-meta",
        "erin/tiny-vit-loha",
        "gina/tiny-vit-lora-huge-config",
        "ivan/tiny-vit-lora-untagged-local",
    ]
    assert [m.id for m in api.list_models(filter="transformers")] == ["google/tiny-vit"]
    header = api.parse_safetensors_file_metadata("alice/food-lora", "adapter_model.safetensors")
    assert header.tensors["base_model.model.classifier.weight"].shape == [3, 64]


def test_hub_loras_are_found_and_vetted_without_their_weights(hub_with_loras):
    from recycle.hub_loras import find_hub_loras

    found = {x.repo: x for x in find_hub_loras("google/tiny-vit", include_unusable=True)}
    assert found["alice/food-lora"].usable and found["alice/food-lora"].classes == ["salad", "soup", "cake"]
    bob = found["bob/tiny-vit-finetuned-lora-beans"]
    assert bob.usable and bob.classes == CLASSES  # it names none: the base's id2label, which has as many classes
    assert "pickle" in found["carol/tiny-vit-lora-bin"].problem
    assert "no classification head" in found["dave/tiny-vit-meta"].problem
    assert "not LoRA" in found["erin/tiny-vit-loha"].problem
    assert "made for 'org/else'" in found["frank/other-lora"].problem
    assert found["gina/tiny-vit-lora-huge-config"].classes == CLASSES  # its 1 MiB config.json is not even fetched
    assert found["hank/food-lora-colab"].usable and found["hank/food-lora-colab"].base_model == "google/tiny-vit"
    assert "made for '/content/tiny-vit'" in found["ivan/tiny-vit-lora-untagged-local"].problem
    assert [x.repo for x in find_hub_loras("hf-hub:google/tiny-vit")] == [
        "alice/food-lora",
        "bob/tiny-vit-finetuned-lora-beans",
        "gina/tiny-vit-lora-huge-config",
        "hank/food-lora-colab",
    ]
    # Vetting downloaded JSON only: no weights are in the cache.
    from huggingface_hub import constants, scan_cache_dir

    cache = scan_cache_dir(constants.HF_HUB_CACHE)
    cached = {f.file_name for repo in cache.repos for rev in repo.revisions for f in rev.files}
    assert "adapter_model.safetensors" not in cached and "adapter_config.json" in cached


def test_cli_zoo_from_the_hub_then_invert_meta_train_and_export(hub_with_loras, tmp_path, capsys):
    from recycle.cli import main
    from recycle.pool import Pool

    zoo = tmp_path / "zoo"
    assert main(["zoo", "--hub", "google/tiny-vit", "--out", str(zoo), "--limit", "10"]) == 0
    manifest = json.loads((zoo / "zoo.json").read_text())
    assert manifest["backbone"] == "google/tiny-vit"
    entries = {e["repo"]: e for e in manifest["loras"]}
    assert set(entries) == {
        "alice/food-lora",
        "bob/tiny-vit-finetuned-lora-beans",
        "gina/tiny-vit-lora-huge-config",
        "hank/food-lora-colab",
    }
    assert entries["alice/food-lora"]["classes"] == ["salad", "soup", "cake"]
    assert entries["bob/tiny-vit-finetuned-lora-beans"]["classes"] == CLASSES  # the base's id2label
    assert all(len(e["revision"]) == 40 for e in entries.values())
    capsys.readouterr()
    assert (
        main(
            [
                "invert",
                "--zoo",
                str(zoo),
                "--out",
                str(tmp_path / "pool"),
                "--per-class",
                "1",
                "--steps",
                "1",
                "--bn-prior",
                "none",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )  # on google/tiny-vit, from zoo.json
    assert len(Pool(tmp_path / "pool").runs) == 4
    run = tmp_path / "run"
    assert (
        main(
            [
                "meta-train",
                "--zoo",
                str(zoo),
                "--out",
                str(run),
                "--steps",
                "1",
                "--way",
                "2",
                "--shot",
                "1",
                "--query",
                "1",
                "--invert-steps",
                "1",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )  # on zoo.json's backbone
    assert main(["export", "--lora", str(run / "meta-lora"), "--out", str(tmp_path / "meta-peft")]) == 0
    exported = json.loads((tmp_path / "meta-peft" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "google/tiny-vit" and exported["modules_to_save"] is None
    hub_with_loras.stop()
    assert main(["zoo", "--hub", "google/tiny-vit", "--out", str(tmp_path / "zoo2")]) == 1
    assert "cannot be reached" in capsys.readouterr().err and not (tmp_path / "zoo2").exists()


def _hostile_header(folder: Path, tensors: dict, metadata_pad: int = 0, junk: int = 0) -> None:
    """Write ``adapter_model.safetensors`` from a raw header `tensors` ({name: (dtype, shape, offsets)}), with
    `metadata_pad` bytes of metadata and `junk` bytes after a data section of the declared size."""
    import struct

    header = {k: {"dtype": d, "shape": list(shape), "data_offsets": list(o)} for k, (d, shape, o) in tensors.items()}
    if metadata_pad:
        header["__metadata__"] = {"pad": "." * metadata_pad}
    text = json.dumps(header).encode()
    data = min(max((o[1] for _, _, o in tensors.values()), default=0), 8 << 20)  # a bomb's file stays small
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(data + junk))


def test_hostile_hub_loras_are_refused_from_their_headers_and_cost_little(
    local_hub, hf_vit_dir, tmp_path, monkeypatch, capsys
):
    """Vetting reads at most a bounded header per repo; gathering downloads only the usable LoRAs, once each, and
    leaves nothing of the refused ones."""
    import shutil

    from recycle.cli import main
    from recycle.hub_loras import find_hub_loras

    adapter = tmp_path / "guide"
    _peft_model(hf_vit_dir, 4, **_recipe("guide", LAYOUT)).save_pretrained(adapter)
    root = local_hub.root
    shutil.copytree(hf_vit_dir, root / "google" / "tiny-vit")
    _publish(root, "alice/food-lora", adapter, card_base="google/tiny-vit")
    (root / "alice" / "food-lora" / "README.md").write_text(
        "---\nbase_model: google/tiny-vit\nlibrary_name: peft\ndatasets: [food101]\n---\n"
    )
    junk = _publish(root, "mallory/junk-tail", adapter, card_base="google/tiny-vit")
    with open(junk / "adapter_model.safetensors", "ab") as f:
        f.write(bytes(3 << 20))  # a valid header, then megabytes the header does not declare
    head = "base_model.model.classifier.modules_to_save.default.weight"
    pair = "base_model.model.vit.encoder.layer.0.attention.attention.query.lora_A.weight"
    label_bomb = _publish(root, "mallory/label-bomb", adapter, card_base="google/tiny-vit")
    _hostile_header(
        label_bomb, {pair: ("F32", [4, 64], [0, 1024]), head: ("F32", [10**12, 64], [1024, 1024 + 256 * 10**12])}
    )
    big_header = _publish(root, "mallory/big-header", adapter, card_base="google/tiny-vit")
    _hostile_header(big_header, {pair: ("F32", [4, 64], [0, 1024])}, metadata_pad=3 << 20)
    stranger = _publish(root, "mallory/stranger-tensor", adapter, card_base="google/tiny-vit")
    _hostile_header(stranger, {pair: ("F32", [4, 64], [0, 1024]), "optimizer.state": ("F32", [2], [1024, 1032])})
    heavy = _publish(root, "mallory/heavy", adapter, card_base="google/tiny-vit")
    _hostile_header(heavy, {pair: ("F32", [4, 64], [0, 1024]), head: ("F32", [3, 400_000], [1024, 1024 + 4_800_000])})

    found = {x.repo: x for x in find_hub_loras("google/tiny-vit", include_unusable=True)}
    assert found["alice/food-lora"].usable and found["alice/food-lora"].datasets == ["food101"]
    assert "truncated or corrupt" in found["mallory/junk-tail"].problem
    assert (
        "truncated or corrupt" in found["mallory/label-bomb"].problem and found["mallory/label-bomb"].num_classes == 0
    )
    assert "more than the 1,048,576 accepted" in found["mallory/big-header"].problem
    assert "no LoRA reader takes: 'optimizer.state'" in found["mallory/stranger-tensor"].problem
    assert found["mallory/heavy"].usable
    assert all(x.bytes_read <= 70_000 for x in found.values())  # a header, never the weights
    monkeypatch.setenv("RECYCLE_HUB_MAX_LORA_MB", "1")
    heavy_found = {x.repo: x for x in find_hub_loras("google/tiny-vit", include_unusable=True)}["mallory/heavy"]
    assert "more than the 1 MiB accepted (RECYCLE_HUB_MAX_LORA_MB)" in heavy_found.problem
    monkeypatch.delenv("RECYCLE_HUB_MAX_LORA_MB")

    zoo = tmp_path / "zoo"
    assert main(["zoo", "--hub", "google/tiny-vit", "--out", str(zoo)]) == 0
    out = capsys.readouterr().out
    assert "; from food101)" in out and "MiB moved" in out
    assert sorted(p.name for p in zoo.iterdir() if p.is_dir()) == ["alice--food-lora"]
    manifest = json.loads((zoo / "zoo.json").read_text())
    usable = (adapter / "adapter_model.safetensors").stat().st_size + (adapter / "adapter_config.json").stat().st_size
    assert manifest["bytes_moved"] <= usable + 6 * (1 << 20) and manifest["loras"][0]["datasets"] == ["food101"]
    from huggingface_hub import constants, scan_cache_dir

    cache = scan_cache_dir(constants.HF_HUB_CACHE)
    cached = {f.file_name for repo in cache.repos for rev in repo.revisions for f in rev.files}
    assert "adapter_model.safetensors" not in cached  # stored once, in the zoo
    # Its export names the Hub base, and the Hub (here the fake one, as the real one does) accepts its card.
    from huggingface_hub import ModelCard

    out = tmp_path / "export"
    assert (
        main(["export", "--lora", str(zoo / "alice--food-lora"), "--backbone", "google/tiny-vit", "--out", str(out)])
        == 0
    )
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "google/tiny-vit"
    assert ModelCard.load(out / "README.md").data.base_model == "google/tiny-vit"
    from recycle.hub import push_folder

    push_folder(out, "alice/food-lora-export", token="test")  # the Hub refuses a commit whose card it rejects
    assert (local_hub.root / "alice" / "food-lora-export" / "README.md").is_file()


def test_a_timm_name_finds_the_loras_of_its_transformers_twin(local_hub, hf_vit_dir, tmp_path):
    from recycle.hub_loras import find_hub_loras

    adapter = tmp_path / "guide"
    _peft_model(hf_vit_dir, 4, **_recipe("guide", LAYOUT)).save_pretrained(adapter)
    _publish(
        local_hub.root,
        "alice/in21k-lora",
        adapter,
        card_base="google/vit-base-patch16-224-in21k",
        base_model_name_or_path="google/vit-base-patch16-224-in21k",
    )
    for name in ("vit_base_patch16_224.orig_in21k", "timm/vit_base_patch16_224.orig_in21k"):
        assert [x.repo for x in find_hub_loras(name)] == ["alice/in21k-lora"]


def test_app_lists_the_hubs_loras_for_the_backbone_and_loads_one(hub_with_loras, tmp_path):
    pytest.importorskip("gradio")
    from tests.support.apptools import close, launch, plain, settings

    demo, client = launch(settings(tmp_path, "hf-hub:google/tiny-vit"))
    try:
        note, picker = client.predict(backbone="hf-hub:google/tiny-vit", text="", api_name="/hub_loras")
        note = plain(note)
        assert "4 LoRAs for google/tiny-vit" in note and "salad, soup, cake" in note
        assert [c[1] for c in picker["choices"]] == [
            "alice/food-lora",
            "bob/tiny-vit-finetuned-lora-beans",
            "gina/tiny-vit-lora-huge-config",
            "hank/food-lora-colab",
        ]
        note, picker = client.predict(backbone="hf-hub:google/tiny-vit", text="BEANS", api_name="/hub_loras")
        assert [c[1] for c in picker["choices"]] == ["bob/tiny-vit-finetuned-lora-beans"]
        card, classes = client.predict(hub_id="alice/food-lora", files=[], api_name="/load_lora")
        card = plain(card)
        assert "3 classes" in card and "✅ Fits" in card and "salad" in card
        hub_with_loras.stop()
        cached, _ = client.predict(backbone="hf-hub:google/tiny-vit", text="", api_name="/hub_loras")
        assert "4 LoRAs" in plain(cached)  # served from the listing cache
        down, picker = client.predict(backbone="hf-hub:google/tiny-vit", text="food", api_name="/hub_loras")
        down = plain(down)
        assert down.startswith("⚠️") and "cannot be reached" in down and picker["choices"] == []
    finally:
        close(demo, client)


@pytest.mark.parametrize(
    "preprocessor, match",
    [
        ({"image_mean": "grey"}, "image_mean must be 3 finite numbers"),
        ({"do_rescale": False}, "1/255"),
        ({"rescale_factor": "x"}, "1/255"),
        ({"resample": "bilinear"}, "unknown resample"),
        ({"image_std": [0, 1, 1]}, "image_std must be positive"),
        ({"size": {"height": 64, "width": 64}}, "resizes to"),
    ],
)
def test_unusable_preprocessor_configs_are_refused(hf_vit_dir, tmp_path, preprocessor, match):
    import shutil

    folder = tmp_path / "vit"
    shutil.copytree(hf_vit_dir, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    with pytest.raises(BackboneError, match=match):
        load_backbone(str(folder), device="cpu")


def test_the_cards_base_model_names_the_backbone_when_the_config_does_not(hf_adapter, tmp_path):
    import shutil

    installed, _, _ = hf_adapter
    folder = tmp_path / "a"
    shutil.copytree(installed, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": None}))
    card = "---\nbase_model:\n- google/vit-base-patch16-224-in21k\nlibrary_name: peft\n---\n"
    (folder / "README.md").write_text(card)
    assert load_lora(folder).backbone == "google/vit-base-patch16-224-in21k"
    (folder / "README.md").write_text("---\nbase_model: [unclosed\n---\n")
    assert load_lora(folder).backbone is None


def test_app_offers_to_switch_to_the_backbone_a_lora_was_made_for(hub_with_loras, tiny_clip_dir, tmp_path):
    import shutil

    pytest.importorskip("gradio")
    from tests.support.apptools import close, launch, plain, settings

    clip = "hf-hub:timm/vit_base_patch16_clip_224.openai"
    shutil.copytree(tiny_clip_dir, hub_with_loras.root / "timm" / "vit_base_patch16_clip_224.openai")
    demo, client = launch(settings(tmp_path, clip))
    try:
        card, _ = client.predict(backbone=clip, hub_id="alice/food-lora", files=[], api_name="/load_lora")
        # The guide's q/v LoRA fits tiny CLIP's widths (in shape only); the variant's MLP LoRA does not fit at all.
        card = plain(card)
        assert ("in shape only" in card or "does not fit" in card) and "google/tiny-vit" in card
        assert client.predict(clip, api_name="/switch_backbone") == "google/tiny-vit"
        card, _ = client.predict(backbone="google/tiny-vit", hub_id="alice/food-lora", files=[], api_name="/load_lora")
        assert "✅ Fits" in card
        assert client.predict("google/tiny-vit", api_name="/switch_backbone") == "google/tiny-vit"
    finally:
        close(demo, client)
    # The button itself (gradio_client does not return button updates): shown only while the LoRA does not fit.
    from types import SimpleNamespace

    from app_ui import Inversion, ModelCache, PathPolicy

    import gradio as gr

    inversion = Inversion(ModelCache(), PathPolicy(True), settings(tmp_path, clip), clip)
    request = SimpleNamespace(session_hash="s1")
    loaded_card = plain(inversion.load(clip, "alice/food-lora", [], request)[0])
    assert (inversion.loras.get("s1").mismatch is not None) == ("in shape only" in loaded_card)
    offer = inversion.switch_offer(request)
    assert offer["visible"] is True and offer["value"] == "Switch the backbone to google/tiny-vit"
    # Invert refuses it without "Invert anyway", naming both bases and the switch; with it, the run starts.
    if inversion.loras.get("s1").mismatch:  # the guide's LoRA, which fits CLIP's shapes
        from recycle.cli import main

        args = ["--out", str(tmp_path / "pool"), "--per-class", "1", "--steps", "1", "--bn-prior", "none", "--quiet"]
        assert main(["invert", "--lora", "alice/food-lora", "--backbone", clip] + args) == 1  # by Hub id, from the CLI
        assert main(["invert", "--lora", "alice/food-lora", "--backbone", clip, "--force"] + args) == 0
        refused = inversion.run(clip, [0], 1, 10, "-1:0.75", False, 0.25, 0, request, force=False)
        with pytest.raises(gr.Error) as err:
            next(refused)
        assert "in shape only" in err.value.message and "google/tiny-vit" in err.value.message
        assert 'Switch the backbone to google/tiny-vit, or tick "Invert anyway"' in err.value.message
        forced = inversion.run(clip, [0], 1, 10, "-1:0.75", False, 0.25, 0, request, force=True)
        assert "Preparing" in next(forced)[2]
        forced.close()
    inversion.load("google/tiny-vit", "alice/food-lora", [], request)
    assert inversion.switch_offer(request)["visible"] is False


def test_other_vit_configs_convert_exactly(tmp_path):
    """Widths timm's mlp_ratio cannot express as a round number, the tanh GELU, no q/k/v bias, timm's eps."""
    torch.manual_seed(4)
    config = transformers.ViTConfig(
        image_size=24,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=100,
        hidden_act="gelu_new",
        qkv_bias=False,
        layer_norm_eps=1e-6,
        num_labels=2,
    )
    reference = transformers.ViTForImageClassification(config).eval()
    reference.save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path), device="cpu")
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(backbone.model(x), reference(pixel_values=x).logits, atol=1e-5)
    assert backbone.model.blocks[0].mlp.fc1.out_features == 100 and backbone.model.norm.eps == 1e-6
    config_json = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config_json, "hidden_act": ["gelu"]}))
    with pytest.raises(BackboneError, match="hidden_act"):
        load_backbone(str(tmp_path), device="cpu")


def test_some_layers_and_unequal_q_v_ranks(hf_vit_dir, tmp_path):
    """layers_to_transform adapts block 1 only; a rank_pattern gives v another rank than q (fused into one qkv LoRA)."""
    value = _leaf("value", LAYOUT)
    lora = dict(
        r=2,
        lora_alpha=4,
        target_modules=[_leaf("query", LAYOUT), value],
        layers_to_transform=[1],
        rank_pattern={value: 3},
        modules_to_save=["classifier"],
    )
    model = _peft_model(hf_vit_dir, 6, **lora)
    model.save_pretrained(tmp_path / "a")
    backbone = load_backbone(str(hf_vit_dir), device="cpu")
    adapter = load_lora(tmp_path / "a", backbone)
    assert adapter.config.blocks == (1,) and adapter.config.targets == ("qkv",)
    with torch.no_grad():
        expected = model(pixel_values=_inputs()).logits
    assert (_recycle_logits(backbone, adapter, _inputs()) - expected).abs().max() < 1e-4
    # Targets that differ between blocks cannot be one LoRAConfig: refused, saying so.
    model = _peft_model(hf_vit_dir, 7, **{**lora, "layers_to_transform": [0, 1]})
    model.save_pretrained(tmp_path / "b")
    both = load_file(tmp_path / "b" / "adapter_model.safetensors")
    uneven = {k: v for k, v in both.items() if not (".0." in k and value in k)}
    assert len(uneven) == len(both) - 2  # block 0 keeps q, loses v
    save_file(uneven, tmp_path / "b" / "adapter_model.safetensors")
    with pytest.raises(LoRAFormatError, match="differ between blocks"):
        load_lora(tmp_path / "b", backbone)


def test_deit_backbones_adapters_and_export(tmp_path, hf_vit_dir, capsys):
    """DeiT: the distillation token after [CLS]; a PEFT LoRA on DeiTForImageClassification; its export loads back."""
    from recycle.cli import main

    torch.manual_seed(8)
    config = transformers.DeiTConfig(**{**TINY, "intermediate_size": 128})
    base = transformers.DeiTForImageClassification(config)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    base.save_pretrained(tmp_path / "deit")
    transformers.DeiTImageProcessor(
        size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path / "deit")
    backbone = load_backbone(str(tmp_path / "deit"), device="cpu")
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(backbone.model(x), base.eval()(pixel_values=x).logits, atol=1e-5)
    assert backbone.input_size == (3, 32, 32) and backbone.model.num_prefix_tokens == 2

    torch.manual_seed(9)
    model = peft.get_peft_model(
        transformers.DeiTForImageClassification.from_pretrained(tmp_path / "deit"),
        peft.LoraConfig(
            r=2,
            lora_alpha=4,
            modules_to_save=["classifier"],
            target_modules=[_leaf("query", LAYOUT), _leaf("value", LAYOUT)],
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.3)
        expected = model.eval()(pixel_values=x).logits
    model.save_pretrained(tmp_path / "lora")
    adapter = load_lora(tmp_path / "lora", backbone)
    assert adapter.class_names == CLASSES
    assert (_recycle_logits(backbone, adapter, x) - expected).abs().max() < 1e-4
    assert (
        main(
            [
                "export",
                "--lora",
                str(tmp_path / "lora"),
                "--backbone",
                str(tmp_path / "deit"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    again = peft.PeftModel.from_pretrained(
        transformers.DeiTForImageClassification.from_pretrained(tmp_path / "deit"), tmp_path / "out"
    ).eval()
    with torch.no_grad():
        assert (again(pixel_values=x).logits - expected).abs().max() < 1e-4

    # The fit check: the DeiT LoRA on a ViT base, and a ViT LoRA on the DeiT base, fit in shape and are refused for
    # inversion by their key prefix, until --force.
    capsys.readouterr()
    common = ["--out", str(tmp_path / "pool"), "--per-class", "1", "--steps", "2", "--bn-prior", "none", "--quiet"]
    deit_on_vit = ["invert", "--lora", str(tmp_path / "lora"), "--backbone", str(hf_vit_dir)] + common
    assert main(deit_on_vit) == 1
    err = capsys.readouterr().err
    assert "made for a DEIT model" in err and "selected backbone is a VIT" in err and "--force" in err
    _peft_model(hf_vit_dir, 1, **_recipe("guide", LAYOUT)).save_pretrained(tmp_path / "vit-lora")
    vit_on_deit = ["invert", "--lora", str(tmp_path / "vit-lora"), "--backbone", str(tmp_path / "deit")] + common
    assert main(vit_on_deit) == 1 and "made for a VIT model" in capsys.readouterr().err
    assert main(deit_on_vit + ["--force"]) == 0
    assert main(["invert", "--lora", str(tmp_path / "lora"), "--backbone", str(tmp_path / "deit")] + common) == 0
