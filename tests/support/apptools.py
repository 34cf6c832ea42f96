"""Shared pieces of the app tests (tests/test_app*.py): synthetic images, launching the app on loopback, calling its
endpoints through gradio_client, tiny LoRAs to publish or upload (the toy-size shipped weights: `toy`)."""

from __future__ import annotations

import html
import shutil
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image
from safetensors.torch import save_file

import app
from app_ui import AppSettings
from recycle.backbone import load_backbone
from recycle.formats import LoRAAdapter, read_adapter, save_adapter
from recycle.invert import InversionConfig, invert
from recycle.lora import LoRAConfig, inject_lora, remove_lora
from recycle.pool import write_run
from recycle.tokens import PruningConfig
from tests.helpers import colour_task, train_tiny_lora
from tests.support.hubserver import free_port

Classes = Sequence[tuple[str, Sequence[Path]]]
KINDS = ("red", "blue", "stripes")


# ------------------------------------------------------------------------------------------------- synthetic images
def pattern(kind: str, seed: int, size: tuple[int, int] = (48, 48)) -> Image.Image:
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


def blank_png(path: Path, width: int, height: int) -> Path:
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


def make_pics(root: Path) -> dict[str, Path]:
    """Two support images per class and one near-copy query (other noise, other size) per class."""
    out = {}
    for kind in KINDS:
        for i in (1, 2):
            out[f"{kind}{i}"] = root / f"{kind}{i}.png"
            pattern(kind, seed=i, size=(48, 48)).save(out[f"{kind}{i}"])
        out[f"{kind}_q"] = root / f"{kind}_q.png"
        pattern(kind, seed=9, size=(56, 40)).save(out[f"{kind}_q"])
    return out


# ------------------------------------------------------------------------------------------------------ launching
def settings(tmp: Path, backbone: str, weights: Optional[Path] = None, **kwargs) -> AppSettings:
    """App settings for a test: `backbone` by default, weights in `weights` (none by default), a pool under `tmp`."""
    return AppSettings(backbone=backbone, weights=weights or tmp / "no-weights", pool=tmp / "pool", **kwargs)


def launch(app_settings: AppSettings, default_backbone: Optional[str] = None) -> tuple[gr.Blocks, Client]:
    """Build and launch the app on a free loopback port (queue as configured by the app); returns it and a client."""
    demo = app.build_demo(default_backbone=default_backbone, settings=app_settings)
    _, url, _ = demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        **app.launch_options(app_settings),
    )
    return demo, Client(url, verbose=False)


def close(demo: gr.Blocks, *clients: Client) -> None:
    for client in clients:
        client.close()
    demo.close()


# --------------------------------------------------------------------------------------------------------- requests
def classify(client: Client, classes: Classes, queries: Sequence[Path], **extra) -> tuple[str, dict]:
    """Call /classify with classes [(name, image paths)] and query paths; returns (cards HTML, table)."""
    kwargs = {}
    for i, (name, paths) in enumerate(classes, 1):
        kwargs[f"class_{i}_name"] = name
        kwargs[f"class_{i}_images"] = [{"image": handle_file(str(p)), "caption": None} for p in paths]
    return client.predict(queries=[handle_file(str(q)) for q in queries], api_name="/classify", **kwargs, **extra)


def check(result: tuple, expected: Sequence[str]) -> list[dict[str, float]]:
    """Assert the predicted labels in the table and in the cards, and that probabilities sum to 1; return them."""
    cards, table = result
    headers, rows = table["headers"], table["data"]
    classes = [h[2:-1] for h in headers[2:] if h.startswith("p(")]
    probs = [dict(zip(classes, row[2 : 2 + len(classes)])) for row in rows]
    assert [row[1] for row in rows] == list(expected)
    labels = [part.split('"', 1)[0] for part in cards.split('data-label="')[1:]]
    assert labels == [html.escape(e) for e in expected]
    assert cards.count('class="rc-thumb" alt=') == len(expected)  # every card has its thumbnail
    for p, name in zip(probs, expected):
        assert sum(p.values()) == pytest.approx(1, abs=1e-3)
        assert p[name] == max(p.values())  # the table is rounded: ties are possible with the tiny backbone
    return probs


def good_request(client: Client, pics: dict[str, Path], **extra) -> None:
    """The reference request: three classes, three queries, all predicted right."""
    classes = [(kind, [pics[f"{kind}1"], pics[f"{kind}2"]]) for kind in KINDS]
    queries = [pics["blue_q"], pics["stripes_q"], pics["red_q"]]
    check(classify(client, classes, queries, **extra), ["blue", "stripes", "red"])


def quick_good_request(client: Client, pics: dict[str, Path]) -> None:
    """A smaller good request (three uploads instead of nine), for suites that make one after every case."""
    check(
        classify(client, [("red", [pics["red1"]]), ("stripes", [pics["stripes1"]])], [pics["stripes_q"]]), ["stripes"]
    )


# ------------------------------------------------------------------------------------------------------------ LoRAs
def tiny_lora(
    backbone_dir: Path, out: Path, classes: Sequence[str] = ("red", "green", "blue"), steps: int = 30
) -> Path:
    """Tune a q/v LoRA with a head on colour images on the tiny backbone and save it in PEFT layout at `out`."""
    backbone = load_backbone(str(backbone_dir), device="cpu")
    images, labels = colour_task(n_classes=len(classes), per_class=4)
    adapter = train_tiny_lora(backbone, images, labels, steps=steps)
    adapter.class_names = list(classes)
    adapter.backbone = str(backbone_dir)
    return save_adapter(adapter, out)


def headless_lora(backbone_dir: Path, out: Path) -> Path:
    """A LoRA without a classification head (like a meta-LoRA): it cannot be inverted."""
    backbone = load_backbone(str(backbone_dir), device="cpu")
    inject_lora(backbone.model, LoRAConfig())
    adapter = LoRAAdapter.from_model(backbone.model, LoRAConfig(), backbone=str(backbone_dir))
    remove_lora(backbone.model)
    return save_adapter(adapter, out)


def official_lora(backbone_dir: Path, out: Path, n_classes: int = 3, seed: int = 0) -> Path:
    """A file in the official LoRA Recycle format (w_a_XXX/w_b_XXX q/v pairs, fc_{in}in_{out}out head)."""
    backbone = load_backbone(str(backbone_dir), device="cpu")
    g = torch.Generator().manual_seed(seed)
    dim, rank = backbone.num_features, 4
    tensors = {}
    for i in range(2 * len(backbone.model.blocks)):
        tensors[f"w_a_{i:03d}"] = torch.randn(rank, dim, generator=g) * 0.05
        tensors[f"w_b_{i:03d}"] = torch.randn(dim, rank, generator=g) * 0.05
    proj = backbone.embed_dim
    tensors[f"fc_{proj}in_{n_classes}out"] = torch.randn(n_classes, proj, generator=g)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def make_pool(root: Path, backbone_dir: Path, lora_dirs: list[Path]) -> Path:
    """One inversion run per LoRA: 2 classes x 3 images, the first run masked at 75%, the second unmasked."""
    backbone = load_backbone(str(backbone_dir), device="cpu")
    for i, lora in enumerate(lora_dirs):
        adapter = read_adapter(lora)
        config = InversionConfig(per_class=3, steps=6, pruning=PruningConfig({-1: 0.75 if i == 0 else 0.0}), seed=i)
        result = invert(backbone, adapter, config, classes=[0, 1])
        write_run(root, result, adapter, f"org/lora-{i}", {"steps": 6, "run": i}, (4, 4))
    return root


def publish(hub_root: Path, repo_id: str, folder: Path) -> str:
    """Put the files of `folder` into the fake Hub as model repo `repo_id`."""
    shutil.copytree(folder, hub_root / repo_id)
    return repo_id


def plain(markdown: str) -> str:
    """The text a reader sees of `markdown` (rendered as CommonMark with inline HTML, tags dropped, entities
    decoded)."""
    import html as _html
    import re as _re

    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark", {"html": True}).render(markdown)
    return _html.unescape(_re.sub(r"<[^>]+>", "", rendered)).strip()


def rendered(markdown: str) -> str:
    """`markdown` rendered to HTML as CommonMark with inline HTML."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).render(markdown)
