"""The toy reproduction, run once per test session (once for all pytest-xdist workers): its work folder and
results, and `weights/` shipped from it."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import pytest
import torch
from filelock import FileLock

_root: Optional[Path] = None


def set_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where the toy run lives: the session's base temporary folder, which pytest-xdist's workers share as the
    parent of their own (pytest removes old ones itself)."""
    global _root
    base = tmp_path_factory.getbasetemp()
    _root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "toy-run"


def _lock() -> FileLock:
    if _root is None:
        raise RuntimeError("tests/conftest.py sets the toy run's folder at the start of the session")
    _root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(_root) + ".lock")


@functools.cache
def toy_run() -> Optional[tuple[Path, dict]]:
    """``(work folder, results)`` of ``reproduce.pipeline`` with the toy preset, made once per test session (a
    second process resumes the finished run: every stage is skipped); None when the Debian fonts it renders glyphs
    from are missing. Tests may add files to the folder, never change it."""
    from reproduce.glyphs import missing_fonts

    if missing_fonts():
        return None
    from reproduce.pipeline import ReproConfig, run

    torch_threads = torch.get_num_threads()
    try:
        with _lock():
            results = run(_root / "repro", ReproConfig.toy())
    finally:
        torch.set_num_threads(torch_threads)  # the pipeline sets its own thread count
    return _root / "repro", results


@functools.cache
def toy_weights() -> Optional[Path]:
    """``weights/`` as the offline reproduction ships it (mini-vit, mini-meta-lora, examples), at toy size."""
    made = toy_run()
    if made is None:
        return None
    from reproduce.ship import ship

    work, results = made
    weights, done = work.parent / "weights", work.parent / "weights.done"
    with _lock():
        if not done.is_file():
            ship(work, weights, results)
            done.touch()
    return weights


def require_toy_run() -> tuple[Path, dict]:
    made = toy_run()
    if made is None:
        from reproduce.glyphs import missing_fonts

        pytest.skip(f"the toy reproduction needs the Debian fonts {missing_fonts()} (see reproduce/)")
    return made


def require_toy_weights() -> Path:
    require_toy_run()
    return toy_weights()
