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
    save_for_hf(model, directory, safe_serialization=True, model_args=kwargs)  # (older timm does not infer them)
    return directory


def make_image(seed: int, size: int = 40, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB").convert(mode)


def colour_task(n_classes: int = 3, per_class: int = 6, size: int = 32, seed: int = 0):
    """Images of distinct colours with noise: (list of PIL images, list of int labels)."""
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40), (200, 60, 220), (40, 210, 210)]
    images, labels = [], []
    for c in range(n_classes):
        for i in range(per_class):
            images.append(
                Image.blend(Image.new("RGB", (size, size), colours[c]), make_image(seed + 97 * c + i, size), 0.3)
            )
            labels.append(c)
    return images, labels


def train_tiny_lora(backbone, images, labels, steps: int = 40, lr: float = 1e-2, seed: int = 0):
    """Tune a q/v LoRA and a head on (images, labels); returns the `LoRAAdapter` (the backbone is left clean)."""
    from recycle.formats import LoRAAdapter
    from recycle.lora import LoRAConfig, inject_lora, lora_parameters, remove_lora

    torch.manual_seed(seed)
    config = LoRAConfig()
    inject_lora(backbone.model, config)
    head = torch.nn.Linear(backbone.num_features, max(labels) + 1)
    params = lora_parameters(backbone.model) + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    x, y = backbone.preprocess(images), torch.tensor(labels)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(backbone.pre_logits(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter = LoRAAdapter.from_model(
        backbone.model, config, head, [f"c{i}" for i in range(max(labels) + 1)], backbone=backbone.name
    )
    remove_lora(backbone.model)
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    return adapter
