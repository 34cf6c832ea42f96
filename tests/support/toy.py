"""The toy reproduction, run once per test session: its work folder and results, and `weights/` shipped from it."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import pytest
import torch


@functools.cache
def toy_run() -> Optional[tuple[Path, dict]]:
    """``(work folder, results)`` of ``reproduce.pipeline`` with the toy preset, made once per test session; None
    when the Debian fonts it renders glyphs from are missing. Tests may add files to the folder, never change it."""
    from reproduce.glyphs import missing_fonts

    if missing_fonts():
        return None
    from reproduce.pipeline import ReproConfig, run

    root = Path(tempfile.mkdtemp(prefix="toy-run-"))
    atexit.register(shutil.rmtree, root, True)
    torch_threads = torch.get_num_threads()
    try:
        results = run(root / "repro", ReproConfig.toy())
    finally:
        torch.set_num_threads(torch_threads)  # the pipeline sets its own thread count
    return root / "repro", results


@functools.cache
def toy_weights() -> Optional[Path]:
    """``weights/`` as the offline reproduction ships it (mini-vit, mini-meta-lora, examples), at toy size."""
    made = toy_run()
    if made is None:
        return None
    from reproduce.ship import ship

    work, results = made
    ship(work, work.parent / "weights", results)
    return work.parent / "weights"


def require_toy_run() -> tuple[Path, dict]:
    made = toy_run()
    if made is None:
        from reproduce.glyphs import missing_fonts

        pytest.skip(f"the toy reproduction needs the Debian fonts {missing_fonts()} (see reproduce/)")
    return made


def require_toy_weights() -> Path:
    require_toy_run()
    return toy_weights()
