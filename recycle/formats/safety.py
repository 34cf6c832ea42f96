"""The checks every LoRA reader goes through before a tensor is used: no pickle is ever loaded, safetensors files
are read whole only after their header parses, and unreadable files get a message that names them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..adapter import LoRAFormatError
from .peft_config import ADAPTER_CONFIG, ADAPTER_WEIGHTS

__all__ = ["PICKLE_SUFFIXES", "check_weights_file", "read_safetensors", "refuse_pickles"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_weights_file(path: Path) -> None:
    """Refuse a weights file that is a pickle or not ``.safetensors``, before it is opened."""
    if path.suffix in PICKLE_SUFFIXES:
        raise LoRAFormatError(
            f"{path.name} is a pickle; pickled weights are never loaded because unpickling can "
            "run arbitrary code. Use a .safetensors file."
        )
    if path.suffix != ".safetensors":
        raise LoRAFormatError(f"{path.name} is not a .safetensors file or a PEFT adapter folder")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, in one open."""
    if path.stat().st_size == 0:
        raise LoRAFormatError(f"{path.name} is empty (0 bytes)")
    try:
        with safe_open(str(path), framework="pt") as f:  # one open: header, metadata and tensors
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoRAFormatError(f"{path.name} is not a valid safetensors file (corrupt or truncated?): {e}") from None


def refuse_pickles(folder: Path, label: str) -> None:
    """Raise for a folder without safetensors weights, saying how to convert any pickled weights it holds."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    raise LoRAFormatError(
        f"'{label}' has no {ADAPTER_WEIGHTS}"
        + (
            f"; it has {pickles}, pickled weights, which are never loaded because unpickling can run arbitrary code."
            " Convert them where you trust them: PeftModel.from_pretrained(base_model, folder).save_pretrained(folder)"
            " writes adapter_model.safetensors (PEFT >= 0.7), or safetensors.torch.save_file(state_dict, "
            f"'{ADAPTER_WEIGHTS}') next to {ADAPTER_CONFIG}."
            if pickles
            else "."
        )
    )
