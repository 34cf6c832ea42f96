import pytest
import torch

from recycle.backbone import BackboneError, load_backbone
from tests.helpers import make_image


def test_local_dir_clip_uses_projection(tiny_clip, tiny_clip_dir):
    assert tiny_clip.embedding == "projection"
    assert tiny_clip.embed_dim == 16 and tiny_clip.num_features == 64
    x = tiny_clip.preprocess([make_image(0), make_image(1)])
    assert x.shape == (2, 3, 32, 32)
    with torch.no_grad():
        emb = tiny_clip.embed(x)
        ref = tiny_clip.model(x)  # timm CLIP: head == CLIP projection
    assert torch.allclose(emb, ref)
    # also loadable with timm's own prefix
    again = load_backbone(f"local-dir:{tiny_clip_dir}", device="cpu")
    assert torch.equal(again.model.head.weight, tiny_clip.model.head.weight)


def test_non_clip_uses_pre_logits(tiny_vit):
    assert tiny_vit.embedding == "pre_logits"
    x = tiny_vit.preprocess([make_image(0)])
    with torch.no_grad():
        assert torch.allclose(
            tiny_vit.embed(x), tiny_vit.model.forward_head(tiny_vit.model.forward_features(x), pre_logits=True)
        )


def test_preprocess_follows_pretrained_cfg(tiny_clip):
    white = make_image(0).point(lambda _: 255)
    x = tiny_clip.preprocess([white])
    expected = (1 - torch.tensor(tiny_clip.mean)) / torch.tensor(tiny_clip.std)
    assert torch.allclose(x[0, :, 5, 5], expected, atol=1e-5)
    assert tiny_clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_missing_and_pickled_dirs_are_refused(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(BackboneError, match="pickles"):
        load_backbone(str(tmp_path))


def test_unknown_name():
    with pytest.raises(BackboneError, match="Unknown backbone"):
        load_backbone("definitely_not_a_model_v9")


def test_unreachable_hub_fails_fast_with_clear_message(monkeypatch):
    from huggingface_hub import constants
    from tests.support.hubserver import free_port

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackboneError) as info:
        load_backbone("vit_base_patch16_clip_224.openai")
    msg = str(info.value)
    assert "vit_base_patch16_clip_224.openai" in msg and "unreachable" in msg and "local directory" in msg
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_blank_name_is_refused():
    with pytest.raises(BackboneError, match="No backbone given"):
        load_backbone("  ")


def test_hub_backbone_downloads_then_loads_from_cache_when_the_hub_is_down(tiny_clip_dir, local_hub):
    import shutil

    shutil.copytree(tiny_clip_dir, local_hub.root / "testorg" / "tiny-clip")
    online = load_backbone("hf-hub:testorg/tiny-clip", device="cpu")
    local_hub.stop()
    offline = load_backbone("hf-hub:testorg/tiny-clip", device="cpu")  # served from the cache, without retries
    x = online.preprocess([make_image(3)])
    with torch.no_grad():
        assert torch.equal(online.embed(x), offline.embed(x))
    with pytest.raises(BackboneError, match="unreachable"):
        load_backbone("hf-hub:testorg/never-downloaded", device="cpu")


# --------------------------------------------------------------------------------------------------- names, pickles
@pytest.mark.parametrize(
    "name, expected",
    [
        ("LOCAL-DIR:/some/folder", ("local-dir", "/some/folder")),
        ("Local-Dir:/x", ("local-dir", "/x")),
        ("hf_hub:org/x", ("hf-hub", "org/x")),
        ("HF-HUB:org/x", ("hf-hub", "org/x")),
        ("/abs/dir", ("local-dir", "/abs/dir")),
        ("clip-b16", (None, "vit_base_patch16_clip_224.openai")),
        ("vit_tiny_patch16_224", (None, "vit_tiny_patch16_224")),
        # a bare Hub id, as transformers names it
        ("google/vit-base-patch16-224", ("hf-hub", "google/vit-base-patch16-224")),
    ],
)
def test_names_are_read_as_timm_reads_them(name, expected):
    from recycle.backbone import backbone_source

    assert backbone_source(name) == expected


@pytest.mark.parametrize("name", ["file:/etc/passwd", "C:/weights"])
def test_names_timm_cannot_read_get_a_clear_error(name):
    with pytest.raises(BackboneError, match="cannot be read|Unknown backbone"):  # the wording depends on timm
        load_backbone(name)


@pytest.fixture()
def pickle_only(tiny_clip_dir, tmp_path):
    """A timm folder whose weights are only a pickle (what `torch.save` writes)."""
    folder = tmp_path / "pickled-vit"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_clip_dir / "config.json").read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(tiny_clip_dir / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


@pytest.fixture()
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("prefix", ["", "local-dir:", "LOCAL-DIR:", "Local-Dir:"])
def test_pickle_only_folders_are_refused_under_any_spelling(pickle_only, no_unpickling, prefix):
    with pytest.raises(BackboneError, match=r"no model\.safetensors.*pickles.*safetensors\.torch\.save_file"):
        load_backbone(f"{prefix}{pickle_only}", device="cpu")


def test_the_bn_prior_name_is_read_the_same_way(pickle_only, no_unpickling):
    from recycle.invert import load_bn_prior

    with pytest.raises(BackboneError, match=r"BN prior: .*no model\.safetensors"):
        load_bn_prior(f"Local-Dir:{pickle_only}")


def test_pickle_only_hub_repos_are_refused(pickle_only, local_hub, no_unpickling, tiny_clip_dir):
    import shutil

    shutil.copytree(pickle_only, local_hub.root / "someone" / "pickled-vit")
    with pytest.raises(
        BackboneError,
        match=r"'someone/pickled-vit' has no safetensors weights \(model\.safetensors\)"
        r".*never loaded.*save_file",
    ):
        load_backbone("hf-hub:someone/pickled-vit", device="cpu")
    # with both files, the safetensors one is used, and the pickle never is
    shutil.copy(tiny_clip_dir / "model.safetensors", local_hub.root / "someone" / "pickled-vit")
    assert load_backbone("hf-hub:someone/pickled-vit", device="cpu").embed_dim == 16


def _resize_and_normalise(backbone, images):
    """The preprocessing before timm's transforms were used: PIL resize straight to the input size, then normalise."""
    import numpy as np
    from PIL import Image

    _, h, w = backbone.input_size
    arr = np.stack([np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).div_(255.0)
    return (x - torch.tensor(backbone.mean).view(1, 3, 1, 1)) / torch.tensor(backbone.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", ["weights/mini-vit", "vit_base_patch16_clip_224.openai", "dinov2-s14"])
def test_timm_transform_equals_resize_and_normalise(name):
    """timm's eval transform (squash, crop_pct 1) gives the same tensors as a plain resize, at the model's own size:
    224 px for the DINOv2 alias, although timm's pretrained config says 518."""
    from pathlib import Path

    if name.startswith("weights/"):
        name = str(Path(__file__).resolve().parent.parent / name)
    backbone = load_backbone(name, pretrained=name.startswith("/"), device="cpu")
    images = [make_image(0, 40), make_image(1, 300).resize((300, 180)), make_image(2, 50, "L")]
    x = backbone.preprocess(images)
    assert torch.equal(x, _resize_and_normalise(backbone, images))
    assert x.shape[1:] == backbone.input_size == (3, *backbone.model.patch_embed.img_size)
    if "dinov2" in name:
        assert backbone.model.pretrained_cfg["input_size"][-1] == 518 and backbone.input_size == (3, 224, 224)


def test_timm_name_loads_from_the_cache_when_the_hub_is_down_without_going_offline_globally(
    tiny_clip_dir, local_hub, monkeypatch
):
    """A timm name whose weights are on the Hub (here: a tiny stand-in at timm/vit_base_patch16_clip_224.openai)."""
    import shutil

    import timm
    from huggingface_hub import constants

    from tests.helpers import TINY_CLIP_ARGS

    shutil.copytree(tiny_clip_dir, local_hub.root / "timm" / "vit_base_patch16_clip_224.openai")
    shape = dict(TINY_CLIP_ARGS)
    online = load_backbone("clip-b16", device="cpu", **shape)
    local_hub.stop()
    seen = []
    create_model = timm.create_model

    def observe(*args, **kwargs):  # records the global switch that other threads' downloads would see
        seen.append(constants.HF_HUB_OFFLINE)
        return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", observe)
    offline = load_backbone("clip-b16", device="cpu", **shape)
    assert seen == [False]
    x = online.preprocess([make_image(4)])
    with torch.no_grad():  # (the head is new: the tiny model's 16 outputs are not the pretrained config's 512)
        assert torch.equal(online.pre_logits(x), offline.pre_logits(x))


def test_malformed_names_are_unknown_backbones():
    with pytest.raises(BackboneError, match="Unknown backbone 'ftp:x'"):
        load_backbone("ftp:x")


# ------------------------------------------------------------------- hostile backbone and prior folders: checked first
def _hostile_copy(src, tmp_path, edit_config=None, weights=None, config_text=None):
    """A copy of a tiny model folder with its config.json edited (a dict edit, or raw text) or its weights replaced."""
    import json
    import shutil

    folder = shutil.copytree(src, tmp_path / "hostile")
    if edit_config is not None:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if config_text is not None:
        (folder / "config.json").write_text(config_text)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights(folder / "model.safetensors"))
    return folder


def _args(**values):
    return lambda c: c["model_args"].update(values)


def _header_bytes(header: dict, data: bytes = b"") -> bytes:
    import json
    import struct

    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _wrong_shape(path):
    from safetensors.torch import load_file, save_file
    import io  # noqa: F401

    tensors = load_file(path)
    tensors["blocks.0.attn.qkv.weight"] = torch.zeros(10, 64)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp)
    return tmp.read_bytes()


HOSTILE_BACKBONES = {
    # config.json: its shape and its numbers (each would otherwise build, or try to build, the model it describes)
    "depth 1000": (dict(edit_config=_args(depth=1000)), r"config\.json: 'depth' is 1000, outside the accepted range"),
    "depth 10^6": (dict(edit_config=_args(depth=10**6)), r"'depth' is 1000000, outside"),
    "depth as text": (dict(edit_config=_args(depth="4")), r"config\.json: 'depth' must be an integer, not '4'"),
    "negative depth": (dict(edit_config=_args(depth=-3)), r"'depth' is -3, outside the accepted range 1 to 128"),
    "img_size 10^9": (dict(edit_config=_args(img_size=10**9)), r"'img_size' is 1000000000, outside"),
    "fractional embed_dim": (dict(edit_config=_args(embed_dim=128.5)), r"'embed_dim' must be an integer, not 128\.5"),
    "wide and deep": (
        dict(edit_config=_args(embed_dim=8192, depth=128, num_heads=64)),
        r"model of [\d,]+ parameters, more than the 1,100,000,000 accepted",
    ),
    "too many tokens": (dict(edit_config=_args(img_size=4096, patch_size=8)), r"262144 tokens, more than the 16384"),
    "huge unknown number": (dict(edit_config=_args(reg_tokens=10**9)), r"'reg_tokens' is 1000000000"),
    "list-shaped config": (dict(config_text="[1, 2]"), r"config\.json holds a JSON list; a timm model config is"),
    "config that is not JSON": (dict(config_text="{nope"), r"config\.json is not valid JSON"),
    "architecture 5": (
        dict(edit_config=lambda c: c.update(architecture=5)),
        r"'architecture' must be a timm model name, not 5",
    ),
    "unknown architecture": (
        dict(edit_config=lambda c: c.update(architecture="vit_huge_nonsense")),
        r"'architecture' is 'vit_huge_nonsense', which timm does not know",
    ),
    "ResNet config as a backbone": (
        dict(
            edit_config=lambda c: c.update(
                architecture="resnet18", model_args={"num_classes": 16}, pretrained_cfg={"num_classes": 16}
            )
        ),
        r"describes a ResNet; LoRA Recycle needs a timm ViT",
    ),
    # a transformers ViT config goes to the transformers loader, which checks the weights' names against it
    "transformers config": (
        dict(config_text='{"model_type": "vit", "architectures": ["ViTModel"]}'),
        r"weights are in no known ViT layout",
    ),
    "NaN mean": (
        dict(edit_config=lambda c: c["pretrained_cfg"].update(mean=[float("nan"), 0, 0])),
        r"config\.json is not valid JSON: NaN is not a JSON number",
    ),
    "zero std": (dict(edit_config=lambda c: c["pretrained_cfg"].update(std=[0, 1, 1])), r"'std' is \[0, 1, 1\]"),
    # model.safetensors: checked against the model the config describes, from its header alone
    "empty weights": (dict(weights=lambda p: b""), r"model\.safetensors is empty or truncated \(0 bytes\)"),
    "truncated weights": (dict(weights=lambda p: p.read_bytes()[:-1000]), r"model\.safetensors.*truncated"),
    "120 MB header": (
        dict(weights=lambda p: (120 << 20).to_bytes(8, "little") + b"{}"),
        r"header declares 125829120 bytes, more than",
    ),
    "huge declared shape": (
        dict(
            weights=lambda p: _header_bytes(
                {"pos_embed": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}
            )
        ),
        r"tensor 'pos_embed' declares shape \[1000000, 1000000\] but its data",
    ),
    "wrong shapes": (dict(weights=_wrong_shape), r"'blocks\.0\.attn\.qkv\.weight' has shape \[10, 64\], but the model"),
    "padded with 100 MB": (
        dict(weights=lambda p: p.read_bytes() + bytes(100 << 20)),
        r"model\.safetensors holds [\d,]+ bytes of tensors, more than the model .* can use",
    ),
    "tensor the model lacks": (
        dict(
            weights=lambda p: _header_bytes({"evil": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
        ),
        r"tensor 'evil' is not part of the model",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_BACKBONES))
def test_hostile_backbone_folders_are_refused_before_anything_is_built(tiny_clip_dir, tmp_path, monkeypatch, case):
    import timm

    edits, expected = HOSTILE_BACKBONES[case]
    folder = _hostile_copy(tiny_clip_dir, tmp_path, **edits)
    built = []
    create_model = timm.create_model

    def watch(*args, **kwargs):  # records every real (not meta-device) build
        if torch.empty(0).device.type != "meta":
            built.append(args[0])
        return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", watch)
    with pytest.raises(BackboneError, match=expected) as info:
        load_backbone(str(folder), device="cpu")
    assert str(folder) in str(info.value) and built == []


def test_a_hub_backbone_config_is_checked_before_it_is_built(tiny_clip_dir, local_hub, tmp_path):
    folder = _hostile_copy(tiny_clip_dir, tmp_path, edit_config=_args(depth=1000))
    import shutil

    shutil.copytree(folder, local_hub.root / "evil" / "deep-vit")
    with pytest.raises(BackboneError, match=r"hf-hub:evil/deep-vit.*config\.json: 'depth' is 1000, outside"):
        load_backbone("hf-hub:evil/deep-vit", device="cpu")


def test_the_shipped_and_tiny_backbones_pass_the_checks(tiny_vit):
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "weights" / "mini-vit"
    assert load_backbone(str(shipped), device="cpu").embed_dim > 0 and tiny_vit.embed_dim == 48


@pytest.mark.parametrize(
    "device, expected",
    [
        ("meta", r"device 'meta' cannot run a model"),
        ("xpu", r"device 'xpu' was requested, but this machine has no XPU"),
    ],
)
def test_devices_that_cannot_run_here_are_refused_before_loading(tiny_clip_dir, device, expected):
    if device == "xpu" and getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    with pytest.raises(ValueError, match=expected):
        load_backbone(str(tiny_clip_dir), device=device)


@pytest.fixture()
def tiny_resnet_dir(tmp_path):
    from tests.helpers import save_tiny

    return save_tiny(tmp_path / "tiny-resnet", "resnet18", 0, num_classes=10)


def test_hostile_bn_prior_folders_are_refused(tiny_clip_dir, tiny_resnet_dir, tmp_path):
    import json
    import shutil

    from recycle.invert import load_bn_prior

    assert load_bn_prior(str(tiny_resnet_dir)) is not None  # the good one loads
    with pytest.raises(BackboneError, match=r"BN prior: .*transformers config \(model_type 'resnet'\)"):
        load_bn_prior(
            str(
                _hostile_copy(
                    tiny_resnet_dir,
                    tmp_path,
                    config_text=json.dumps({"model_type": "resnet", "architectures": ["ResNetForImageClassification"]}),
                )
            )
        )
    shutil.rmtree(tmp_path / "hostile")
    with pytest.raises(BackboneError, match=r"BN prior: .*describes a VisionTransformer, which has no BatchNorm"):
        load_bn_prior(str(tiny_clip_dir))
    with pytest.raises(BackboneError, match=r"BN prior: .*'mean' must be a list of numbers"):
        load_bn_prior(
            str(
                _hostile_copy(
                    tiny_resnet_dir, tmp_path, edit_config=lambda c: c["pretrained_cfg"].update(mean="bright")
                )
            )
        )


def test_a_config_with_many_label_names_is_accepted(tiny_clip_dir, tmp_path):
    """Hub configs of ImageNet-22k models list 21,843 labels (and descriptions): long lists of texts are fine."""
    folder = _hostile_copy(
        tiny_clip_dir,
        tmp_path,
        edit_config=lambda c: c["pretrained_cfg"].update(
            label_names=[f"n{i:08d}" for i in range(21843)],
            label_descriptions={f"n{i:08d}": f"a thing number {i}" for i in range(21843)},
        ),
    )
    assert load_backbone(str(folder), device="cpu").embed_dim == 16


def test_a_hub_weights_file_larger_than_any_accepted_model_is_never_downloaded(
    tiny_clip_dir, local_hub, tmp_path, monkeypatch
):
    import shutil

    from huggingface_hub import constants

    import recycle.modelcheck

    shutil.copytree(tiny_clip_dir, local_hub.root / "evil" / "huge-weights")
    monkeypatch.setattr(recycle.modelcheck, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(
        BackboneError,
        match=r"model\.safetensors of the Hub repository 'evil/huge-weights' is "
        r"[\d,]+ bytes, more than any model accepted here needs \(1,000\)",
    ):
        load_backbone("hf-hub:evil/huge-weights", device="cpu")
    from pathlib import Path

    assert not list(Path(constants.HF_HUB_CACHE).rglob("model.safetensors"))


def test_a_cnn_given_as_the_backbone_is_named_as_one(tmp_path):
    """A timm ResNet folder as the backbone: timm cannot take a ViT's arguments for it, and the message says what it
    is rather than passing on timm's TypeError."""
    import timm
    from timm.models import save_for_hf

    args = dict(layers=[1, 1, 1, 1], num_classes=3)
    save_for_hf(
        timm.create_model("resnet18", pretrained=False, **args), str(tmp_path), safe_serialization=True, model_args=args
    )
    with pytest.raises(BackboneError, match=r"describes a ResNet; LoRA Recycle needs a timm ViT as the backbone"):
        load_backbone(str(tmp_path), device="cpu")
