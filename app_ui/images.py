"""Surrogate images for display in galleries."""

from __future__ import annotations

import math

import gradio as gr
import torch
from PIL import Image

from .limits import DISPLAY_SIZE


def display_images(images: torch.Tensor) -> list[Image.Image]:
    """``(N, 3, H, W)`` in [0, 1] -> PIL images, small ones enlarged with nearest neighbour so pixels stay crisp."""
    out = []
    for image in images:
        arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr, "RGB")
        factor = math.ceil(DISPLAY_SIZE / max(pil.size))
        if factor > 1:
            pil = pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)
        out.append(pil)
    return out


def surrogate_gallery(label: str, columns: int) -> gr.Gallery:
    """An output gallery of surrogate images: lossless, crisp pixels, as tall as its images."""
    return gr.Gallery(
        label=label,
        columns=columns,
        height="auto",
        format="png",
        object_fit="contain",
        interactive=False,
        elem_classes=["pixelated", "tight"],
        fit_columns=False,
    )
