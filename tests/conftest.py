"""Shared fixtures: tiny timm ViTs saved in timm's local-dir layout, and an isolated Hugging Face cache."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Hermetic runs: no telemetry, no stray Hub traffic, a private cache. Set before huggingface_hub is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The CLI's heavy commands tune glibc malloc for the whole process (`recycle.runtime.tune_allocator`); tests call
# them in-process, so keep the test process on glibc's defaults (test_runtime checks the tuning in subprocesses).
os.environ.setdefault("RECYCLE_MALLOC", "default")
# Each test process (each pytest-xdist worker) gets its own Gradio upload folder: the apps clean theirs up
# (`delete_cache`), and must never delete another process's uploads.
os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix=f"gradio-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")

import pytest
import torch

from recycle.backbone import Backbone, load_backbone
from tests.helpers import TINY_CLIP_ARGS, TINY_VIT_ARGS, save_tiny

atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], True)

# Tiny models gain nothing from intra-op threads, and spinning threads slow badly when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _toy_run_folder(tmp_path_factory) -> None:
    """The toy reproduction (`tests.support.toy`) lives in the session's temporary folder, shared by xdist workers."""
    from tests.support import toy

    toy.set_root(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A CLIP-architecture ViT (pre-norm, projection head to 16-d), 32 px, 16 tokens."""
    return save_tiny(tmp_path_factory.mktemp("tiny_clip"), "vit_base_patch16_clip_224", 0, **TINY_CLIP_ARGS)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A standard (non-CLIP) ViT without a head: embeddings are the pre-logits [CLS] feature."""
    return save_tiny(tmp_path_factory.mktemp("tiny_vit"), "vit_tiny_patch16_224", 1, **TINY_VIT_ARGS)


@pytest.fixture()
def tiny_clip(tiny_clip_dir) -> Backbone:
    return load_backbone(str(tiny_clip_dir), device="cpu")


@pytest.fixture()
def tiny_vit(tiny_vit_dir) -> Backbone:
    return load_backbone(str(tiny_vit_dir), device="cpu")


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path, monkeypatch):
    """Every test gets an empty Hugging Face cache, so nothing leaks between tests or from the machine."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(cache), raising=False)


@pytest.fixture()
def local_hub(tmp_path, monkeypatch):
    """A fake Hugging Face Hub on 127.0.0.1 serving ``server.root/<org>/<name>/``; the real client points at it."""
    from tests.support.hubserver import HubServer, patch_hf_endpoint

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with HubServer(root) as server:
        patch_hf_endpoint(monkeypatch, server.url)
        yield server
