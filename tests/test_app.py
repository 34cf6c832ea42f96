"""The app's few-shot tab, status line and offline default, launched on loopback with a tiny local backbone and
driven over HTTP with gradio_client. The bad-input suite is in test_app_bad_inputs.py.

conftest.py turns Gradio's analytics off (GRADIO_ANALYTICS_ENABLED=False) before gradio is imported.
"""

from __future__ import annotations

import io
import json
import shutil
import unicodedata
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client.exceptions import AppError
from PIL import Image

import app
import app_ui
from app_ui import fewshot
from app_ui.settings import GLYPH_PRIOR_WEIGHT
from recycle.priors import read_prior_settings
from recycle.backbone import load_backbone
from recycle.invert import DEFAULT_BN_PRIOR, InversionConfig
from recycle.formats import LoRAAdapter, read_adapter, save_adapter
from recycle.lora import LoRAConfig, inject_lora, lora_parameters
from tests.support.apptools import (
    KINDS,
    check,
    classify,
    close,
    free_port,
    good_request,
    launch,
    make_pics,
    pattern,
    plain,
    publish,
    settings,
)
from tests.support.toy import require_toy_weights

CLIP_NAME = "vit_base_patch16_clip_224.openai"  # on the Hub only: unloadable here


def _halves(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Left half red, right half blue: which way is up matters."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (220, 30, 30)
    arr[:, w // 2 :] = (30, 30, 220)
    return Image.fromarray(arr, "RGB")


def _convert(img: Image.Image, mode: str) -> Image.Image:
    if mode == "I;16":  # 16-bit grayscale, using the whole range
        return Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)
    if mode == "RGBA":  # partly transparent: composited on white by the app
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(img.size).point(lambda v: 160 + v * 95 // 255))
        return rgba
    return img.convert(mode)


def _save_exif(img: Image.Image, path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif)
    return path


# -------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> dict[str, Path]:
    return make_pics(tmp_path_factory.mktemp("pics"))


@pytest.fixture(scope="module")
def client(tiny_clip_dir, tmp_path_factory):
    demo, client = launch(settings(tmp_path_factory.mktemp("app"), str(tiny_clip_dir)))
    yield client
    close(demo, client)


@pytest.fixture()
def closed_hub(monkeypatch) -> str:
    """Point huggingface_hub at a port where nothing listens (the app runs in this process)."""
    from huggingface_hub import constants

    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    return url


def _random_lora(directory: Path, out: Path) -> Path:
    backbone = load_backbone(str(directory), device="cpu")
    inject_lora(backbone.model, LoRAConfig())
    with torch.no_grad():
        for p in lora_parameters(backbone.model):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    return save_adapter(LoRAAdapter.from_model(backbone.model, LoRAConfig(), backbone=str(directory)), out)


# ----------------------------------------------------------------------------------------------------------- tests
def test_good_request(client, pics):
    cards, table = classify(
        client, [(k, [pics[f"{k}1"], pics[f"{k}2"]]) for k in KINDS], [pics["blue_q"], pics["stripes_q"], pics["red_q"]]
    )
    check((cards, table), ["blue", "stripes", "red"])
    assert table["headers"] == ["query", "prediction", "p(red)", "p(blue)", "p(stripes)"]  # no comparison column
    assert cards.count('class="rc-card"') == 3 and cards.count('class="rc-track"') == 9  # one bar per class
    assert 'data-query="blue_q.png"' in cards and "rc-summary" not in cards


def test_status_reports_the_loaded_backbone(client, tiny_clip_dir):
    status = client.predict(api_name="/status")
    assert status.startswith("✅") and str(tiny_clip_dir) in plain(status) and "16-d" in status


def test_too_many_images(client, pics, monkeypatch):
    monkeypatch.setattr(fewshot, "MAX_IMAGES", 3)
    with pytest.raises(AppError, match=r"Too many images \(4\); at most 3"):
        classify(client, [("red", [pics["red1"]]), ("blue", [pics["blue1"], pics["blue2"]])], [pics["red_q"]])
    monkeypatch.undo()
    good_request(client, pics)


def test_upload_size_is_limited(client, pics, tmp_path):
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(21 * 1024 * 1024)  # sparse: nothing is written
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        classify(client, [("red", [pics["red1"]]), ("blue", [big])], [pics["red_q"]])
    good_request(client, pics)


def test_unexpected_errors_are_generic_and_logged(client, pics, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("internal detail")

    monkeypatch.setattr(fewshot, "classify", broken)
    with pytest.raises(AppError, match="Something went wrong") as err:
        classify(client, [("red", [pics["red1"]]), ("blue", [pics["blue1"]])], [pics["red_q"]])
    assert "internal detail" not in str(err.value)
    assert "internal detail" in caplog.text
    monkeypatch.undo()
    good_request(client, pics)


@pytest.mark.parametrize(
    "mode, suffix",
    [
        ("L", ".png"),
        ("LA", ".png"),
        ("P", ".png"),
        ("RGBA", ".png"),
        ("CMYK", ".jpg"),
        ("CMYK", ".tif"),
        ("I;16", ".png"),
    ],
)
def test_image_modes_work(client, tmp_path, mode, suffix):
    def save(kind: str, seed: int, size: tuple[int, int]) -> Path:
        path = tmp_path / f"{kind}{seed}{suffix}"
        _convert(pattern(kind, seed, size), mode).save(path)
        assert Image.open(path).mode.startswith(mode[:3])  # really stored in that mode
        return path

    kinds = ("red", "grey", "stripes")  # tell apart in grayscale too
    classes = [(k, [save(k, 1, (48, 48)), save(k, 2, (48, 48))]) for k in kinds]
    queries = [save(k, 9, (56, 40)) for k in reversed(kinds)]
    check(classify(client, classes, queries), list(reversed(kinds)))


@pytest.mark.parametrize("rotated", ["query", "support"])
def test_exif_orientation_is_applied(client, tmp_path, rotated):
    """Upright: "left" = red on the left, "bottom" = red at the bottom (the left one turned 90° left).

    Each rotated JPEG stores the *other* class's pixels plus an EXIF tag that turns them upright, so if EXIF were
    ignored every prediction would be swapped.
    """
    left = _halves()
    bottom = left.transpose(Image.Transpose.ROTATE_90)
    left.save(tmp_path / "left.png")
    bottom.save(tmp_path / "bottom.png")
    left_exif = _save_exif(bottom, tmp_path / "left_exif.jpg", 6)  # tag 6: turn 90° right to view
    bottom_exif = _save_exif(left, tmp_path / "bottom_exif.jpg", 8)  # tag 8: turn 90° left to view
    if rotated == "query":
        classes = [("left", [tmp_path / "left.png"]), ("bottom", [tmp_path / "bottom.png"])]
        queries = [left_exif, bottom_exif]
    else:
        classes = [("left", [left_exif]), ("bottom", [bottom_exif])]
        queries = [tmp_path / "left.png", tmp_path / "bottom.png"]
    check(classify(client, classes, queries), ["left", "bottom"])


def test_unicode_class_names_work_and_are_shown_safely(client, pics):
    """RTL, emoji, combining marks and markup in class names: predicted, returned intact (NFC) and escaped."""
    names = ["قطة", "🐱 cat", "Cafe\u0301 <b>x</b>"]
    classes = [(name, [pics[f"{k}1"], pics[f"{k}2"]]) for name, k in zip(names, KINDS)]
    cards, table = classify(client, classes, [pics["stripes_q"], pics["red_q"]])
    expected = [unicodedata.normalize("NFC", names[2]), names[0]]
    check((cards, table), expected)
    assert "<b>x</b>" not in cards and "&lt;b&gt;x&lt;/b&gt;" in cards  # markup in names is text, not HTML
    assert "<bdi>قطة</bdi>" in cards  # bidi-isolated: an RTL name does not reorder the text around it


def test_lora_is_compared_with_the_backbone_alone(client, pics, tiny_clip_dir, tiny_vit_dir, tmp_path):
    good = _random_lora(tiny_clip_dir, tmp_path / "clip-lora")
    cards, table = classify(
        client,
        [(k, [pics[f"{k}1"], pics[f"{k}2"]]) for k in KINDS],
        [pics["blue_q"], pics["stripes_q"], pics["red_q"]],
        lora=str(good),
    )
    check((cards, table), ["blue", "stripes", "red"])
    assert table["headers"][-1] == "backbone alone"
    assert [row[-1] for row in table["data"]] == ["blue", "stripes", "red"]  # the easy task: both get it right
    assert "3 of 3</b> predictions agree" in cards and cards.count('data-bare-label="') == 3
    assert cards.count('class="rc-bar rc-main"') == 9 and cards.count('class="rc-bar rc-bare"') == 9
    assert f"with meta-LoRA {good}" in plain(client.predict(lora=str(good), api_name="/status"))
    with pytest.raises(AppError, match="does not fit the backbone"):
        good_request(client, pics, lora=str(_random_lora(tiny_vit_dir, tmp_path / "vit-lora")))
    good_request(client, pics)


def test_backbone_that_cannot_be_loaded(client, pics, closed_hub):
    with pytest.raises(AppError, match=rf"Cannot load backbone '{CLIP_NAME}'.*unreachable"):
        good_request(client, pics, backbone=CLIP_NAME)
    status = client.predict(backbone=CLIP_NAME, api_name="/status")
    assert status.startswith("⚠️") and CLIP_NAME in plain(status) and closed_hub in plain(status)
    good_request(client, pics)


def test_app_starts_without_its_default_backbone_and_without_shipped_weights(pics, tiny_clip_dir, closed_hub, tmp_path):
    demo, client = launch(settings(tmp_path, CLIP_NAME))
    try:
        status = client.predict(api_name="/status")
        assert status.startswith("⚠️ **Not ready.**") and f"Cannot load backbone '{CLIP_NAME}'" in plain(status)
        assert "not in the local cache" in plain(status)
        with pytest.raises(AppError, match=CLIP_NAME):
            good_request(client, pics)
        good_request(client, pics, backbone=str(tiny_clip_dir))
    finally:
        close(demo, client)


def test_offline_default_uses_the_shipped_weights_and_offers_examples(closed_hub, tmp_path):
    """Without the Hub, the app runs on weights/mini-vit + mini-meta-lora and offers example tasks."""
    weights = require_toy_weights()
    s = settings(tmp_path, CLIP_NAME, weights)
    demo, client = launch(s)
    try:
        status = client.predict(api_name="/status")
        assert "Offline mode" in status and f"{CLIP_NAME} cannot be loaded" in plain(status)
        assert "unreachable" in plain(status)
        assert f"✅ Ready: {weights / 'mini-vit'} with meta-LoRA {weights / 'mini-meta-lora'}" in plain(status)
        config = client.config
        dropdown = next(c for c in config["components"] if c["props"].get("label") == "Backbone (all tabs)")
        lora = next(c for c in config["components"] if c["props"].get("label") == "Meta-LoRA (optional)")
        assert dropdown["props"]["value"] == str(weights / "mini-vit")
        assert lora["props"]["value"] == str(weights / "mini-meta-lora")
        dataset = next(c for c in config["components"] if c["type"] == "dataset")
        labels = dataset["props"]["sample_labels"]
        assert labels[0] == "Han characters (held-out classes) #1 · 5-way 1-shot" and len(labels) == 10
        assert "Hangul (an unseen script) · 5-way 1-shot" in labels
        # What a click on the first example fills in, classified with the default meta-LoRA (and without it).
        task = app_ui.find_examples(weights / "examples")[0]
        cards, table = classify(
            client,
            [(c, [Path(f) for f in files]) for c, files in task.support.items()],
            [Path(q) for q in task.queries],
        )
        assert len(table["data"]) == len(task.queries) == 15 and table["headers"][-1] == "backbone alone"
        assert {row[1] for row in table["data"]} <= set(task.support)
        assert cards.count('class="rc-card"') == 15
        # the queries carry their classes: the page counts correct answers with and without the meta-LoRA
        truth = [Path(q).name.split("__")[0] for q in task.queries]
        lora_ok = sum(row[1] == t for row, t in zip(table["data"], truth))
        bare_ok = sum(row[-1] == t for row, t in zip(table["data"], truth))
        assert f'<div class="rc-scoreline"><b class="rc-score">{lora_ok} of 15</b>' in cards  # first, and large
        assert f'<b class="rc-score-bare">{bare_ok} of 15</b>' in cards
        split = app_ui.shipped_test_split(weights / "examples")  # the shipped pair: what its test split measured
        assert split is not None and f"this meta-LoRA scores <b>{split['meta-LoRA']['mean']:.1f}%</b>" in cards
    finally:
        close(demo, client)


SHIPPED = Path(app.__file__).resolve().parent / "weights"


@pytest.mark.skipif(not (SHIPPED / "example-lora" / "adapter_model.safetensors").is_file(), reason="not shipped")
def test_bundled_lora_can_be_inverted_offline_even_with_local_paths_off(closed_hub, tmp_path):
    """A visitor of a Space (local paths off) with no Hub LoRA at hand inverts the bundled example LoRA."""
    demo, client = launch(settings(tmp_path, CLIP_NAME, SHIPPED, allow_local_paths=False))
    try:
        lora = str(SHIPPED / "example-lora")
        offered = [
            c
            for c in client.config["components"]
            if c["type"] == "dataset" and lora in json.dumps(c["props"].get("samples"))
        ]
        assert offered, "the invert tab offers the bundled LoRA as an example"
        card, classes = client.predict(hub_id=lora, files=[], api_name="/load_lora")
        assert ": 5 classes" in card and "Fits the selected backbone" in card and len(classes["choices"]) == 5
        job = client.submit(
            classes=[0, 1],
            per_class=2,
            steps=20,
            pruning="-1:0.75",
            bn_prior=False,
            lr=0.25,
            seed=0,
            api_name="/invert",
        )
        job.result(timeout=120)
        assert "Done" in str(job.outputs()[-1])
        with pytest.raises(AppError, match="Local paths are disabled"):  # the trust covers that folder only
            client.predict(hub_id=str(SHIPPED / "examples"), files=[], api_name="/load_lora")
    finally:
        close(demo, client)


def _zip_run(path: str) -> tuple[dict, torch.Tensor]:
    """The manifest and the unmasked images ``(N, 3, H, W)`` in [0, 1] of an inversion's zip."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("manifest.json"))
        manifest = json.loads(zf.read(name))
        folder = name.rsplit("/", 1)[0]
        images = [
            torch.from_numpy(np.array(Image.open(io.BytesIO(zf.read(f"{folder}/{item['image']}"))).convert("RGB")))
            for item in manifest["items"]
        ]
    return manifest, torch.stack(images).permute(0, 3, 1, 2).float() / 255


def _total_variation(images: torch.Tensor) -> float:
    return (
        (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
        + (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    ).item()


@pytest.mark.skipif(not (SHIPPED / "glyph-prior" / "model.safetensors").is_file(), reason="not shipped")
def test_offline_inversion_of_the_bundled_lora_uses_the_glyph_prior_by_default(closed_hub, tmp_path):
    """Offline, the BN prior is the shipped glyph CNN, ticked by default: smooth, stroke-like images the teacher still
    recognises, where inverting without a prior gives high-frequency noise."""
    demo, client = launch(settings(tmp_path, CLIP_NAME, SHIPPED, allow_local_paths=False))
    try:
        checkbox = next(
            c["props"]
            for c in client.config["components"]
            if str(c["props"].get("label", "")).startswith("BN-statistics prior")
        )
        look = read_prior_settings(SHIPPED / "glyph-prior")  # the shipped run's settings (none: weight 0.1 alone)
        weight = look.pop("bn_weight", GLYPH_PRIOR_WEIGHT)
        assert (
            checkbox["value"] is True
            and "glyph-prior" in checkbox["label"]
            and f"weight {weight:g}" in checkbox["label"]
        )
        client.predict(hub_id=str(SHIPPED / "example-lora"), files=[], api_name="/load_lora")
        runs = {}
        for prior in (checkbox["value"], False):  # the default, then without a prior
            job = client.submit(
                classes=[0, 1, 2, 3, 4],
                per_class=2,
                steps=100,
                pruning="-1:0.75",
                bn_prior=prior,
                lr=0.25,
                seed=0,
                api_name="/invert",
            )
            job.result(timeout=300)
            runs[prior] = _zip_run(job.outputs()[-1][3]["value"])
        (with_prior, images), (without, noise) = runs[True], runs[False]
        assert with_prior["settings"]["bn_prior"] == str(SHIPPED / "glyph-prior")
        assert with_prior["settings"]["bn_weight"] == weight and without["settings"]["bn_prior"] is None
        for key, value in look.items():  # the look comes with the prior; without it, plain pixels
            assert with_prior["settings"][key] == value and without["settings"][key] == getattr(InversionConfig, key)
        assert with_prior["settings"]["flip"] is False  # glyphs are not mirror-symmetric
        agree = [int(torch.tensor(i["logits"]).argmax()) == i["label"] for i in with_prior["items"]]
        assert sum(agree) / len(agree) >= 0.8, agree
        assert _total_variation(images) < 0.75 * _total_variation(noise), (
            _total_variation(images),
            _total_variation(noise),
        )
    finally:
        close(demo, client)


def test_unusable_shipped_inversion_settings_fall_back_with_a_warning(tmp_path, caplog):
    weights = tmp_path / "weights"
    (weights / "glyph-prior").mkdir(parents=True)
    (weights / "glyph-prior" / "model.safetensors").write_bytes(b"")  # only its presence matters here
    (weights / "glyph-prior" / "inversion.json").write_text('{"tv_weight": -3}')
    s = settings(tmp_path, CLIP_NAME, weights)
    with caplog.at_level("WARNING", logger="recycle.app"):
        choice = s.bn_prior_for(str(weights / "mini-vit"))
    assert choice.look == {} and choice.weight == GLYPH_PRIOR_WEIGHT
    assert "ignoring the shipped inversion settings" in caplog.text and "tv_weight" in caplog.text


def test_the_glyph_prior_is_trusted_for_the_shipped_backbone_only(closed_hub, tmp_path):
    """The shipped prior is read from disk for the shipped mini-vit only: a copy of mini-vit elsewhere gets the Hub
    ResNet-50 (unloadable offline, so the run says so), and its folder cannot be typed in as a backbone or a LoRA."""
    weights = require_toy_weights()
    s = settings(tmp_path, CLIP_NAME, weights, allow_local_paths=False)
    assert s.bn_prior_for(str(weights / "mini-vit")).name == str(weights / "glyph-prior")
    copy = tmp_path / "mini-vit-copy"
    shutil.copytree(weights / "mini-vit", copy)
    for other in (str(copy), CLIP_NAME, f"local-dir:{weights / 'glyph-prior'}"):
        choice = s.bn_prior_for(other)
        assert choice.name == DEFAULT_BN_PRIOR and not choice.default and DEFAULT_BN_PRIOR in choice.label
        assert choice.flip  # natural images: the paper's flips
    shipped = s.bn_prior_for(str(weights / "mini-vit"))
    assert not shipped.flip
    # The shipped run's inversion settings come with it: its BN weight, and the look (TV, two colours) besides.
    look = json.loads((weights / "glyph-prior" / "inversion.json").read_text())
    assert shipped.weight == look.pop("bn_weight") and shipped.look == look and set(look) == {"tv_weight", "two_colour"}
    png = next((weights / "examples").rglob("*.png"))
    demo, client = launch(s)
    try:
        for field in ("backbone", "lora"):
            with pytest.raises(AppError, match="Local paths are disabled"):
                classify(client, [("a", [png]), ("b", [png])], [png], **{field: str(weights / "glyph-prior")})
    finally:
        close(demo, client)
    local = settings(tmp_path, str(copy), weights)  # local paths on: the copy is a usable backbone
    cache = app_ui.ModelCache()
    inversion = app_ui.Inversion(cache, app_ui.PathPolicy(True), local, str(copy))
    assert inversion.prior_checkbox(str(copy))["value"] is False
    assert inversion.prior_checkbox(str(weights / "mini-vit"))["value"] is True
    request = gr.Request(session_hash="s")
    inversion.load(None, str(weights / "example-lora"), [], request)
    with pytest.raises(gr.Error, match=rf"BN prior: .*{DEFAULT_BN_PRIOR.split('.')[0]}.*Untick"):
        list(inversion.run(None, [0], 1, 2, "none", True, 0.25, 0, request, progress=lambda *a, **k: None))


@pytest.mark.skipif(not (SHIPPED / "mini-meta-lora" / "recheck.json").is_file(), reason="no shipped weights yet")
def test_offline_default_on_the_real_shipped_weights_classifies_its_examples(closed_hub, tmp_path):
    """The committed weights/ (not a toy run): offline, the app loads them and answers the bundled examples (a
    seeded draw from the test and cross-domain splits) exactly as the library does, with the meta-LoRA and with the
    backbone alone. How accurate those answers are is the reproduction's business (tests/test_reproduce.py)."""
    from recycle.fewshot import FewShotClassifier

    recheck = json.loads((SHIPPED / "mini-meta-lora" / "recheck.json").read_text())
    backbone = load_backbone(str(SHIPPED / "mini-vit"), device="cpu")
    lora = read_adapter(SHIPPED / "mini-meta-lora", backbone)
    demo, client = launch(settings(tmp_path, CLIP_NAME, SHIPPED))
    try:
        assert f"with meta-LoRA {SHIPPED / 'mini-meta-lora'}" in plain(client.predict(api_name="/status"))
        tasks = app_ui.find_examples(SHIPPED / "examples")
        assert [t.name for t in tasks] == sorted(p.name for p in (SHIPPED / "examples").iterdir() if p.is_dir())
        assert recheck["data"].get("cross_script", "hangul") in [t.name for t in tasks]
        for task in tasks:
            _, table = classify(
                client,
                [(c, [Path(f) for f in files]) for c, files in task.support.items()],
                [Path(q) for q in task.queries],
            )
            images = [Image.open(f).convert("RGB") for files in task.support.values() for f in files]
            labels = [c for c, files in task.support.items() for _ in files]
            queries = [Image.open(q).convert("RGB") for q in task.queries]
            for column, adapter in ((1, lora), (-1, None)):
                expected = FewShotClassifier(backbone, adapter).fit(images, labels).predict(queries)
                assert [row[column] for row in table["data"]] == expected, (task.name, column)
    finally:
        close(demo, client)


def test_examples_are_offered_only_when_bundled(tmp_path, tiny_clip_dir):
    assert app_ui.find_examples(tmp_path / "missing") == []
    demo = app.build_demo(settings=settings(tmp_path, str(tiny_clip_dir)))
    assert not [b for b in demo.blocks.values() if isinstance(b, gr.Dataset)]
    weights = require_toy_weights()
    demo = app.build_demo(settings=settings(tmp_path, str(tiny_clip_dir), weights))
    dataset = next(b for b in demo.blocks.values() if isinstance(b, gr.Dataset))
    tasks = app_ui.find_examples(weights / "examples")  # 8 test tasks, the cross-domain one and the plain one
    assert len(dataset.samples) == len(tasks) == 10
    # each example selects the shipped backbone and meta-LoRA it was made for, after the slots and the queries
    assert all(
        sample[-2:] == [str(weights / "mini-vit"), str(weights / "mini-meta-lora")] for sample in dataset.samples
    )
    assert [t.name for t in tasks] == sorted(["han-plain", "hangul", *(f"han-{i}" for i in range(1, 9))])
    assert [t.label for t in tasks][:2] == [
        "Han characters (held-out classes) #1 · 5-way 1-shot",
        "Han characters (held-out classes) #2 · 5-way 1-shot",
    ]
    task = next(t for t in tasks if t.name == "han-8")
    assert len(task.support) == 5 and all(len(f) == 2 for f in task.support.values()) and len(task.queries) == 15
    assert all(Path(q).name.startswith(f"{Path(q).parent.name}__") for q in task.queries)  # labelled queries


# ------------------------------------------------------------------------------------- handlers and layout, offline
def test_settings_come_from_the_environment(monkeypatch, tiny_clip_dir, tmp_path):
    monkeypatch.setenv("RECYCLE_BACKBONE", str(tiny_clip_dir))
    monkeypatch.setenv("RECYCLE_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("RECYCLE_POOL", str(tmp_path / "p"))
    monkeypatch.setenv("RECYCLE_ALLOW_LOCAL_PATHS", "0")
    s = app_ui.AppSettings.from_env()
    assert (s.backbone, s.weights, s.pool, s.allow_local_paths) == (
        str(tiny_clip_dir),
        tmp_path / "w",
        tmp_path / "p",
        False,
    )
    dropdowns = [
        b for b in app.build_demo().blocks.values() if isinstance(b, gr.Dropdown) and b.label.startswith("Backbone")
    ]
    assert [d.value for d in dropdowns] == [str(tiny_clip_dir)]
    for name in ("RECYCLE_BACKBONE", "RECYCLE_WEIGHTS", "RECYCLE_POOL", "RECYCLE_ALLOW_LOCAL_PATHS"):
        monkeypatch.delenv(name)
    s = app_ui.AppSettings.from_env()
    assert s.backbone == app.DEFAULT_BACKBONE and s.weights == Path(app.__file__).parent / "weights"
    assert s.allow_local_paths and s.pool == Path("pool")
    monkeypatch.setenv("SPACE_ID", "org/space")  # on a Hugging Face Space, local paths are off unless asked for
    assert not app_ui.AppSettings.from_env().allow_local_paths
    monkeypatch.setenv("RECYCLE_ALLOW_LOCAL_PATHS", " Yes ")
    assert app_ui.AppSettings.from_env().allow_local_paths
    monkeypatch.setenv("RECYCLE_ALLOW_LOCAL_PATHS", "fasle")  # a typo never turns a safety setting around
    with pytest.raises(ValueError, match="RECYCLE_ALLOW_LOCAL_PATHS='fasle' is not a yes/no value: use 1 or 0"):
        app_ui.AppSettings.from_env()


def test_add_class_reveals_one_slot_at_a_time():
    shown, *updates = app_ui.FewShot.add_class(3)
    slots, button = updates[:-1], updates[-1]
    assert shown == 4 and [u["visible"] for u in slots] == [True] * 4 + [False] * (app_ui.MAX_CLASSES - 4)
    assert button["interactive"]
    shown, *updates = app_ui.FewShot.add_class(app_ui.MAX_CLASSES - 1)
    assert shown == app_ui.MAX_CLASSES and all(u["visible"] for u in updates[:-1])
    assert not updates[-1]["interactive"]
    assert app_ui.FewShot.add_class(app_ui.MAX_CLASSES)[0] == app_ui.MAX_CLASSES


def test_model_cache_is_bounded(tiny_clip_dir, tiny_vit_dir):
    clip, vit = str(tiny_clip_dir), str(tiny_vit_dir)
    cache = app_ui.ModelCache(max_backbones=2, max_classifiers=1)
    with cache.classifier(clip) as first:
        pass
    with cache.classifier(clip) as again:
        assert again is first  # reused, with its embedding cache
    with cache.classifier(vit):
        pass
    with cache.classifier(clip) as third:
        assert third is not first and third.backbone is first.backbone  # classifier evicted, backbone kept

    cache = app_ui.ModelCache(max_backbones=1, max_classifiers=4)
    with cache.classifier(clip) as first:
        pass
    with cache.classifier(vit):
        pass
    with cache.classifier(clip) as reloaded:
        assert reloaded is not first and reloaded.backbone is not first.backbone  # evicted with its backbone
    inverter = cache.inverter(clip)
    assert inverter is not cache.backbone(clip) and cache.inverter(clip) is inverter  # a private copy, kept
    assert cache.inverter(vit) is not inverter  # one copy only: another backbone replaces it


def test_session_store_is_bounded_and_releases_what_it_drops():
    dropped = []
    store = app_ui.SessionStore(2, on_evict=dropped.append)
    store.set("a", 1)
    store.set("b", 2)
    store.get("a")  # "a" is now the most recent
    store.set("c", 3)
    assert (store.get("b"), store.get("a"), store.get("c"), len(store)) == (None, 1, 3, 2) and dropped == [2]
    store.set("a", 4)  # replacing a session's value releases the old one
    assert dropped == [2, 1] and store.get("a") == 4


def test_main_tunes_the_allocator_before_it_builds_and_launches(monkeypatch):
    """`python app.py` serves backbone forwards all day: glibc malloc is tuned at start-up, never on import."""
    calls = []

    class Demo:
        def launch(self, **kwargs):
            calls.append("launch")

    monkeypatch.setattr(app, "tune_allocator", lambda: calls.append("tune") or {})
    monkeypatch.setattr(app, "build_demo", lambda settings: calls.append("build") or Demo())
    monkeypatch.setattr(app, "launch_options", lambda settings: {})
    monkeypatch.setattr(app, "demo", None)
    app.main()
    assert calls == ["tune", "build", "launch"]


def test_labelled_queries_are_scored_for_the_meta_lora_and_for_the_backbone_alone():
    from recycle.predict import Prediction, count_correct, query_label

    assert query_label("永__0.png", ["永", "木"]) == "永" and query_label("Mr. X__a.b.jpg", ["Mr. X"]) == "Mr. X"
    assert query_label("dog.png", ["dog"]) is None and query_label("cat__1.png", ["dog"]) is None

    def pred(file, label):
        return Prediction(file, label, {"永": 0.6 if label == "永" else 0.4, "木": 0.4 if label == "永" else 0.6})

    lora = [pred("永__0.png", "永"), pred("木__1.png", "木"), pred("木__2.png", "永"), pred("other.png", "木")]
    bare = [pred("永__0.png", "木"), pred("木__1.png", "木"), pred("木__2.png", "永"), pred("other.png", "木")]
    assert count_correct(lora) == (2, 3) and count_correct(bare) == (1, 3) and count_correct(lora[3:]) is None
    cards = fewshot.probability_cards(lora, [""] * 4, bare, "weights/mini-meta-lora")
    assert '<b class="rc-score">2 of 3</b> correct with the meta-LoRA' in cards
    assert '<b class="rc-score-bare">1 of 3</b> with the backbone alone' in cards
    assert "test split" not in cards  # only the shipped pair's measurement is shown, and only for that pair
    split = {"way": 5, "shot": 1, "episodes": 600, "meta-LoRA": {"mean": 46.59, "ci95": 0.94}, "NN": {"mean": 44.42}}
    with_split = fewshot.probability_cards(lora, [""] * 4, bare, "x", split)
    assert "test split (600 tasks, 5-way 1-shot), this meta-LoRA scores <b>46.6%</b>" in with_split
    assert with_split.index("rc-scoreline") < with_split.index("test split")
    alone = fewshot.probability_cards(bare, [""] * 4)
    assert '<b class="rc-score">1 of 3</b> correct' in alone
    assert "rc-score" not in fewshot.probability_cards(lora[3:], [""], bare[3:], "x")  # no labels, no score


BAD_ENVIRONMENTS = [
    {"GRADIO_SERVER_PORT": "abc"},
    {"GRADIO_SERVER_PORT": "99999"},
    {"GRADIO_SERVER_PORT": "-1"},
    {"RECYCLE_MALLOC": "junk"},
    {"RECYCLE_MALLOC": "off"},
    {"RECYCLE_POOL_REPO": "not/a/repo"},
    {"RECYCLE_ALLOW_LOCAL_PATHS": "fasle"},
    {"RECYCLE_PRECISION": "fp16"},
]


@pytest.mark.parametrize("env", BAD_ENVIRONMENTS)
def test_bad_environment_variables_stop_the_app_with_one_line(env, monkeypatch):
    """`app.main` stops before building anything, with one line naming the variable."""
    monkeypatch.setenv("RECYCLE_BACKBONE", "none")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(app, "build_demo", lambda **kwargs: pytest.fail("the app was built"))
    name = next(iter(env))
    with pytest.raises(SystemExit) as stop:
        app.main()
    assert str(stop.value).startswith(f"error: {name}={env[name]!r} is not a") and "\n" not in str(stop.value)


def test_a_bad_environment_variable_ends_the_process_with_one_line_and_no_traceback(tmp_path):
    import os
    import subprocess
    import sys

    app_py = Path(__file__).resolve().parent.parent / "app.py"
    out = subprocess.run(
        [sys.executable, str(app_py)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "RECYCLE_BACKBONE": "none", "GRADIO_SERVER_PORT": "abc"},
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: GRADIO_SERVER_PORT='abc' is not a")


def test_the_precision_comes_from_the_environment_and_a_bad_one_is_named(monkeypatch, tiny_clip_dir):
    monkeypatch.setenv("RECYCLE_PRECISION", " INT8 ")
    assert app_ui.AppSettings.from_env().precision == "int8"
    monkeypatch.setenv("RECYCLE_POOL_MAX_MB", "500")
    assert app_ui.AppSettings.from_env().pool_max_mb == 500
    monkeypatch.setenv("RECYCLE_POOL_MAX_MB", "lots")
    with pytest.raises(ValueError, match="RECYCLE_POOL_MAX_MB='lots' is not a whole number of megabytes"):
        app_ui.AppSettings.from_env()
    monkeypatch.delenv("RECYCLE_POOL_MAX_MB")
    monkeypatch.setenv("RECYCLE_PRECISION", "fp16")
    with pytest.raises(ValueError, match="RECYCLE_PRECISION='fp16' is not a precision: use auto, fp32, bf16, int8"):
        app_ui.AppSettings.from_env()
    with pytest.raises(ValueError, match="precision='int4'"):
        app_ui.ModelCache(precision="int4")
    cache = app_ui.ModelCache(device="cpu", precision="auto")  # calibrated once per backbone, when it loads
    cache.backbone(str(tiny_clip_dir))
    precision, why = cache.precision_of(str(tiny_clip_dir))
    assert precision == "fp32" and "instant" in why  # a tiny model: nothing to gain
    with cache.classifier(str(tiny_clip_dir)) as classifier:
        assert not classifier.int8 and not classifier.bf16


def test_online_the_examples_bring_the_shipped_model_even_with_local_paths_off(local_hub, tiny_clip_dir, tmp_path):
    """As on a Space: the default backbone loads from a reachable Hub and text fields take Hub ids only, yet an
    example selects the shipped backbone and meta-LoRA it was made for, and the status then names them."""
    weights = require_toy_weights()
    online = f"hf-hub:timm/{CLIP_NAME}"  # the tiny CLIP on the fake Hub, in timm's Hub layout
    publish(local_hub.root, f"timm/{CLIP_NAME}", tiny_clip_dir)
    demo, client = launch(settings(tmp_path, online, weights, allow_local_paths=False))
    try:
        status = plain(client.predict(api_name="/status"))
        assert f"✅ Ready: {online}" in status and "Offline mode" not in status  # the Hub default, online
        dataset = next(c for c in client.config["components"] if c["type"] == "dataset")
        shipped = [str(weights / "mini-vit"), str(weights / "mini-meta-lora")]
        samples = dataset["props"]["samples"]
        assert samples and all(sample[-2:] == shipped for sample in samples)
        # what the example's click sets, checked by the same handler that answers the page
        status = plain(client.predict(backbone=shipped[0], lora=shipped[1], api_name="/status"))
        assert f"✅ Ready: {shipped[0]} with meta-LoRA {shipped[1]}" in status
        refused = plain(client.predict(backbone=str(tiny_clip_dir), lora="", api_name="/status"))
        assert "Not ready" in refused  # any other local path stays refused
    finally:
        close(demo, client)


def test_choosing_another_backbone_clears_the_shipped_meta_lora_only():
    """The shipped meta-LoRA was made for the shipped backbone: another backbone empties its field (the status would
    otherwise turn "Not ready"), while any other LoRA stays for the user to judge."""
    from app_ui import FewShot, ModelCache, PathPolicy
    from app_ui.settings import Defaults

    shipped = ("/srv/weights/mini-vit", "/srv/weights/mini-meta-lora")
    fs = FewShot(ModelCache(), Defaults(shipped[0], shipped[1]), PathPolicy(True), shipped)
    assert fs.lora_for_backbone("clip-b16", shipped[1]) == ""
    assert fs.lora_for_backbone(shipped[0], shipped[1]) == gr.update()
    assert fs.lora_for_backbone("clip-b16", "org/meta-lora") == gr.update()
