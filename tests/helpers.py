"""Test helpers shared by several test modules."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from PIL import Image
from timm.models import save_for_hf

TINY_CLIP_ARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=16)
TINY_VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0)


def save_tiny(directory: Path, architecture: str, seed: int, **kwargs) -> Path:
    """A random tiny timm model in local-dir layout (config.json + model.safetensors)."""
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, **kwargs)
    save_for_hf(model, directory, safe_serialization=True)
    return directory


def make_image(seed: int, size: int = 40, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB").convert(mode)
