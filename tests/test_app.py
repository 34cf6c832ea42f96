"""The Gradio app, launched on loopback with a tiny local backbone and driven over HTTP with gradio_client.

conftest.py turns Gradio's analytics off (GRADIO_ANALYTICS_ENABLED=False) before gradio is imported.
"""
from __future__ import annotations

import socket
import struct
import zlib
from pathlib import Path
from typing import Sequence

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from recycle.backbone import load_backbone
from recycle.formats import LoRAAdapter, save_adapter
from recycle.lora import LoRAConfig, inject_lora, lora_parameters

CLIP_NAME = "vit_base_patch16_clip_224.openai"  # on the Hub only: unloadable here
Classes = Sequence[tuple[str, Sequence[Path]]]


# ------------------------------------------------------------------------------------------------- synthetic images
def _pattern(kind: str, seed: int, size: tuple[int, int] = (48, 48)) -> Image.Image:
    """A solid colour or stripes with a little noise: same kind and different seed = a near-copy."""
    w, h = size
    base = {"red": (210, 40, 40), "blue": (40, 60, 210), "grey": (128, 128, 128)}.get(kind)
    arr = np.empty((h, w, 3), np.float32)
    if base is None:  # black and white horizontal stripes, 4 px
        arr[:] = 230.0
        arr[(np.arange(h) // 4) % 2 == 0] = 25.0
    else:
        arr[:] = base
    arr += np.random.default_rng(seed).normal(0, 6, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def _halves(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Left half red, right half blue: which way is up matters."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (220, 30, 30)
    arr[:, w // 2:] = (30, 30, 220)
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


def _blank_png(path: Path, width: int, height: int) -> Path:
    """A valid, all-black 1-bit PNG of any size in a few KB: what decompression bombs look like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    block = bytes((1 + (width + 7) // 8) * 1000)  # 1000 scanlines: filter byte + packed bits
    idat = b"".join(z.compress(block) for _ in range(height // 1000))
    idat += z.compress(bytes((1 + (width + 7) // 8) * (height % 1000))) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> dict[str, Path]:
    """Two support images per class and one near-copy query (other noise, other size) per class."""
    root = tmp_path_factory.mktemp("pics")
    out = {}
    for kind in ("red", "blue", "stripes"):
        for i in (1, 2):
            out[f"{kind}{i}"] = root / f"{kind}{i}.png"
            _pattern(kind, seed=i, size=(48, 48)).save(out[f"{kind}{i}"])
        out[f"{kind}_q"] = root / f"{kind}_q.png"
        _pattern(kind, seed=9, size=(56, 40)).save(out[f"{kind}_q"])
    return out


def _launch(default_backbone: str) -> tuple[gr.Blocks, Client]:
    demo = app.build_demo(default_backbone=default_backbone)
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(),
                                    quiet=True, **app.launch_options())
    return demo, Client(url, verbose=False)


@pytest.fixture(scope="module")
def client(tiny_clip_dir) -> Client:
    demo, client = _launch(str(tiny_clip_dir))
    yield client
    client.close()
    demo.close()


@pytest.fixture()
def closed_hub(monkeypatch) -> str:
    """Point huggingface_hub at a port where nothing listens (the app runs in this process)."""
    from huggingface_hub import constants

    url = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    return url


# --------------------------------------------------------------------------------------------------------- helpers
def _classify(client: Client, classes: Classes, queries: Sequence[Path], **extra) -> tuple:
    kwargs = {}
    for i, (name, paths) in enumerate(classes, 1):
        kwargs[f"class_{i}_name"] = name
        kwargs[f"class_{i}_images"] = [{"image": handle_file(str(p)), "caption": None} for p in paths]
    return client.predict(queries=[handle_file(str(q)) for q in queries], api_name="/classify", **kwargs, **extra)


def _check(result: tuple, expected: Sequence[str]) -> list[dict[str, float]]:
    """Assert the predicted labels, in all three outputs, and that probabilities sum to 1; return them."""
    gallery, label, table = result
    headers, rows = table["headers"], table["data"]
    classes = [h[2:-1] for h in headers[2:]]  # "p(name)"
    probs = [dict(zip(classes, row[2:])) for row in rows]
    assert [row[1] for row in rows] == list(expected)
    assert [item["caption"].split(" (p=")[0] for item in gallery] == list(expected)
    assert all(Path(item["image"]).is_file() for item in gallery)
    assert label["label"] == expected[0]
    assert sum(c["confidence"] for c in label["confidences"]) == pytest.approx(1, abs=1e-5)
    for p, name in zip(probs, expected):
        assert sum(p.values()) == pytest.approx(1, abs=1e-3)
        assert p[name] == max(p.values())  # the table is rounded: ties are possible with the tiny backbone
    return probs


def _good_request(client: Client, pics: dict[str, Path], **extra) -> None:
    classes = [(kind, [pics[f"{kind}1"], pics[f"{kind}2"]]) for kind in ("red", "blue", "stripes")]
    queries = [pics["blue_q"], pics["stripes_q"], pics["red_q"]]
    _check(_classify(client, classes, queries, **extra), ["blue", "stripes", "red"])


# ----------------------------------------------------------------------------------------------------------- tests
def test_good_request(client, pics):
    _good_request(client, pics)


def test_status_reports_the_loaded_backbone(client, tiny_clip_dir):
    status = client.predict(api_name="/status")
    assert status.startswith("✅") and str(tiny_clip_dir) in status and "16-d" in status


def _bad_file(tmp: Path, name: str, content: bytes) -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


def _truncated_png(tmp: Path) -> Path:
    _pattern("red", 0, (200, 200)).save(tmp / "full.png")
    data = (tmp / "full.png").read_bytes()
    return _bad_file(tmp, "cut.png", data[: len(data) // 2])


# name -> (make the request's classes/queries/extra from (pics, tmp), pattern the message must match)
BAD_INPUTS = {
    "no classes": (lambda p, t: ([], [p["red_q"]], {}), r"at least 2 classes.*got 0"),
    "class without images": (lambda p, t: ([("red", [p["red1"]]), ("blue", [])], [p["red_q"]], {}),
                             r"class 'blue' has no images"),
    "one class": (lambda p, t: ([("red", [p["red1"], p["red2"]])], [p["red_q"]], {}), r"at least 2 classes.*got 1"),
    "no name": (lambda p, t: ([("", [p["red1"]]), ("blue", [p["blue1"]])], [p["red_q"]], {}),
                r"Class 1 has 1 image\(s\) but no name"),
    "duplicate names": (lambda p, t: ([("red", [p["red1"]]), (" red ", [p["blue1"]])], [p["red_q"]], {}),
                        r"Classes 1 and 2 are both named 'red'.*unique"),
    "no queries": (lambda p, t: ([("red", [p["red1"]]), ("blue", [p["blue1"]])], [], {}),
                   r"at least one query image"),
    "not an image": (lambda p, t: ([("red", [p["red1"]]), ("blue", [_bad_file(t, "notes.png", b"hello")])],
                                   [p["red_q"]], {}), r"class 'blue': notes\.png: not a recognised image"),
    "wrong file type": (lambda p, t: ([("red", [p["red1"]]), ("blue", [p["blue1"]])],
                                      [_bad_file(t, "notes.txt", b"hello")], {}), r"Invalid file type"),
    "empty file": (lambda p, t: ([("red", [p["red1"]]), ("blue", [p["blue1"]])],
                                 [_bad_file(t, "empty.jpg", b"")], {}), r"query empty\.jpg: the file is empty"),
    "truncated image": (lambda p, t: ([("red", [p["red1"]]), ("blue", [p["blue1"]])], [_truncated_png(t)], {}),
                        r"cut\.png: .*(corrupt|truncated)"),
    "huge image": (lambda p, t: ([("red", [p["red1"]]), ("blue", [_blank_png(t / "huge.png", 8000, 6000)])],
                                 [p["red_q"]], {}), r"huge\.png: image is too large \(8000x6000"),
    "decompression bomb": (lambda p, t: ([("red", [p["red1"]]), ("blue", [p["blue1"]])],
                                         [_blank_png(t / "bomb.png", 20000, 20000)], {}),
                           r"bomb\.png: .*decompression bomb"),
    "missing backbone dir": (lambda p, t: ([("red", [p["red1"]]), ("blue", [p["blue1"]])], [p["red_q"]],
                                           {"backbone": str(t / "nowhere")}), r"Backbone directory .*does not exist"),
    "unknown backbone": (lambda p, t: ([("red", [p["red1"]]), ("blue", [p["blue1"]])], [p["red_q"]],
                                       {"backbone": "no_such_vit_model"}), r"Unknown backbone 'no_such_vit_model'"),
    "missing LoRA": (lambda p, t: ([("red", [p["red1"]]), ("blue", [p["blue1"]])], [p["red_q"]],
                                   {"lora": str(t / "nowhere")}), r"neither an existing local path nor a Hub id"),
    "pickled LoRA": (lambda p, t: ([("red", [p["red1"]]), ("blue", [p["blue1"]])], [p["red_q"]],
                                   {"lora": str(_bad_file(t, "adapter.bin", b"\x80\x04K\x01."))}), r"pickle"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_message_and_the_app_keeps_serving(client, pics, tmp_path, case):
    make, pattern = BAD_INPUTS[case]
    classes, queries, extra = make(pics, tmp_path)
    with pytest.raises(AppError, match=pattern):
        _classify(client, classes, queries, **extra)
    _good_request(client, pics)


def test_too_many_images(client, pics, monkeypatch):
    monkeypatch.setattr(app, "MAX_IMAGES", 3)
    with pytest.raises(AppError, match=r"Too many images \(4\); at most 3"):
        _classify(client, [("red", [pics["red1"]]), ("blue", [pics["blue1"], pics["blue2"]])], [pics["red_q"]])
    monkeypatch.undo()
    _good_request(client, pics)


def test_upload_size_is_limited(client, pics, tmp_path):
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(21 * 1024 * 1024)  # sparse: nothing is written
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        _classify(client, [("red", [pics["red1"]]), ("blue", [big])], [pics["red_q"]])


def test_unexpected_errors_are_generic_and_logged(client, pics, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("internal detail")

    monkeypatch.setattr(app, "classify", broken)
    with pytest.raises(AppError, match="Something went wrong") as err:
        _classify(client, [("red", [pics["red1"]]), ("blue", [pics["blue1"]])], [pics["red_q"]])
    assert "internal detail" not in str(err.value)
    assert "internal detail" in caplog.text
    monkeypatch.undo()
    _good_request(client, pics)


@pytest.mark.parametrize("mode, suffix", [("L", ".png"), ("LA", ".png"), ("P", ".png"), ("RGBA", ".png"),
                                          ("CMYK", ".jpg"), ("CMYK", ".tif"), ("I;16", ".png")])
def test_image_modes_work(client, tmp_path, mode, suffix):
    def save(kind: str, seed: int, size: tuple[int, int]) -> Path:
        path = tmp_path / f"{kind}{seed}{suffix}"
        _convert(_pattern(kind, seed, size), mode).save(path)
        assert Image.open(path).mode.startswith(mode[:3])  # really stored in that mode
        return path

    kinds = ("red", "grey", "stripes")  # tell apart in grayscale too
    classes = [(k, [save(k, 1, (48, 48)), save(k, 2, (48, 48))]) for k in kinds]
    queries = [save(k, 9, (56, 40)) for k in reversed(kinds)]
    _check(_classify(client, classes, queries), list(reversed(kinds)))


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
    _check(_classify(client, classes, queries), ["left", "bottom"])


def test_lora(client, pics, tiny_clip_dir, tiny_vit_dir, tmp_path):
    def random_lora(directory: Path, name: str) -> Path:
        backbone = load_backbone(str(directory), device="cpu")
        inject_lora(backbone.model, LoRAConfig())
        with torch.no_grad():
            for p in lora_parameters(backbone.model):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
        return save_adapter(LoRAAdapter.from_model(backbone.model, LoRAConfig(), backbone=str(directory)),
                            tmp_path / name)

    good = random_lora(tiny_clip_dir, "clip-lora")
    _good_request(client, pics, lora=str(good))
    assert f"with LoRA `{good}`" in client.predict(lora=str(good), api_name="/status")
    with pytest.raises(AppError, match="does not fit the backbone"):
        _good_request(client, pics, lora=str(random_lora(tiny_vit_dir, "vit-lora")))
    _good_request(client, pics)


def test_backbone_that_cannot_be_loaded(client, pics, closed_hub):
    with pytest.raises(AppError, match=rf"Cannot load backbone '{CLIP_NAME}'.*unreachable"):
        _good_request(client, pics, backbone=CLIP_NAME)
    status = client.predict(backbone=CLIP_NAME, api_name="/status")
    assert status.startswith("⚠️") and CLIP_NAME in status and closed_hub in status
    _good_request(client, pics)


def test_app_starts_without_its_default_backbone(pics, tiny_clip_dir, closed_hub):
    demo, client = _launch(CLIP_NAME)
    try:
        status = client.predict(api_name="/status")
        assert status.startswith("⚠️ **Not ready.**") and f"Cannot load backbone '{CLIP_NAME}'" in status
        assert "not in the local cache" in status
        with pytest.raises(AppError, match=CLIP_NAME):
            _good_request(client, pics)
        _good_request(client, pics, backbone=str(tiny_clip_dir))
    finally:
        client.close()
        demo.close()


# ------------------------------------------------------------------------------------- handlers and layout, offline
def test_default_backbone_comes_from_the_environment(monkeypatch, tiny_clip_dir):
    monkeypatch.setenv("RECYCLE_BACKBONE", str(tiny_clip_dir))
    dropdowns = [b for b in app.build_demo().blocks.values() if isinstance(b, gr.Dropdown)]
    assert [d.value for d in dropdowns] == [str(tiny_clip_dir)]
    monkeypatch.delenv("RECYCLE_BACKBONE")
    dropdowns = [b for b in app.build_demo().blocks.values() if isinstance(b, gr.Dropdown)]
    assert dropdowns[0].value == app.DEFAULT_BACKBONE


def test_add_class_reveals_one_slot_at_a_time():
    shown, *updates = app.FewShot.add_class(2)
    slots, button = updates[:-1], updates[-1]
    assert shown == 3 and [u["visible"] for u in slots] == [True] * 3 + [False] * (app.MAX_CLASSES - 3)
    assert button["interactive"]
    shown, *updates = app.FewShot.add_class(app.MAX_CLASSES - 1)
    assert shown == app.MAX_CLASSES and all(u["visible"] for u in updates[:-1]) and not updates[-1]["interactive"]
    assert app.FewShot.add_class(app.MAX_CLASSES)[0] == app.MAX_CLASSES


def test_selecting_a_query_shows_its_probabilities():
    def select(index: int) -> gr.SelectData:
        return gr.SelectData(None, {"index": index, "value": None})

    predictions = [{"probs": {"a": 0.9, "b": 0.1}}, {"probs": {"a": 0.2, "b": 0.8}}]
    assert app.FewShot.show_probabilities(predictions, select(1)) == {"a": 0.2, "b": 0.8}
    assert app.FewShot.show_probabilities([], select(0)) is None


def test_model_cache_is_bounded(tiny_clip_dir, tiny_vit_dir):
    clip, vit = str(tiny_clip_dir), str(tiny_vit_dir)
    cache = app.ModelCache(max_backbones=2, max_classifiers=1)
    with cache.classifier(clip) as first:
        pass
    with cache.classifier(clip) as again:
        assert again is first  # reused, with its embedding cache
    with cache.classifier(vit):
        pass
    with cache.classifier(clip) as third:
        assert third is not first and third.backbone is first.backbone  # classifier evicted, backbone kept

    cache = app.ModelCache(max_backbones=1, max_classifiers=4)
    with cache.classifier(clip) as first:
        pass
    with cache.classifier(vit):
        pass
    with cache.classifier(clip) as reloaded:
        assert reloaded is not first and reloaded.backbone is not first.backbone  # evicted with its backbone
