"""Surrogate pool on disk: inverted images, their masks and teacher logits, written atomically, read safely.

Layout: one folder per inversion run, ``POOL/<run>/``, holding ``images/*.png`` (unmasked), ``masked/*.png``
(dropped patches zeroed) and ``manifest.json``: the source LoRA (name, fingerprint, class names, backbone), the
inversion settings, and per image its class, kept patch indices, teacher logits and file checksums. Masks are
explicit (kept indices), never inferred from black pixels: a kept patch can be black.

A run is built in a hidden ``.tmp-*`` folder and renamed into place in one step, so readers never see a half-written
run; the pool grows by adding runs. Runs from the same LoRA (same fingerprint) form one *source* for episodes.

`manifest` holds the format and the checks every reader uses, `write` adds runs, `read` indexes and samples them.
"""

from __future__ import annotations

from .manifest import (
    MAX_MANIFEST_BYTES,
    MAX_RUN_ITEMS,
    POOL_FORMAT,
    POOL_VERSION,
    EmptyPoolError,
    PoolError,
    read_run_manifest,
    run_file,
    teacher_confidence,
)
from .read import Pool, PoolClass, PoolIndex, PoolItem
from .write import pool_size, run_folder_name, run_settings, write_run, zip_run

__all__ = [
    "pool_size",
    "PoolError",
    "EmptyPoolError",
    "PoolItem",
    "PoolClass",
    "Pool",
    "PoolIndex",
    "write_run",
    "read_run_manifest",
    "run_folder_name",
    "run_settings",
    "run_file",
    "zip_run",
    "teacher_confidence",
    "POOL_FORMAT",
    "POOL_VERSION",
    "MAX_MANIFEST_BYTES",
    "MAX_RUN_ITEMS",
]
