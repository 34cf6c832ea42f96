"""LoRA Recycle: tuning-free few-shot learning by recycling pre-tuned LoRAs (Hu et al., CVPR 2025).

The public API, importable from ``recycle`` directly (each name is imported from its module on first use; the
functions named like their modules, ``recycle.invert.invert`` and ``recycle.evaluate.evaluate``, are imported from
those modules)::

    from recycle import FewShotClassifier, load_backbone, load_image, load_lora
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it
_PUBLIC = {
    "Backbone": "backbone",
    "load_backbone": "backbone",
    "LoRAAdapter": "adapter",
    "LoRAFormatError": "adapter",
    "average_loras": "adapter",
    "load_lora": "formats",
    "read_adapter": "formats",
    "save_adapter": "formats",
    "save_transformers_peft": "formats",
    "load_image": "images",
    "FewShotClassifier": "fewshot",
    "InversionConfig": "invert",
    "load_bn_prior": "invert",
    "PruningConfig": "tokens",
    "Pool": "pool",
    "MetaConfig": "meta",
    "meta_train": "meta",
    "EvalConfig": "evaluate",
    "load_zoo": "zoo",
}
__all__ = [
    "Backbone",
    "EvalConfig",
    "FewShotClassifier",
    "InversionConfig",
    "LoRAAdapter",
    "LoRAFormatError",
    "MetaConfig",
    "Pool",
    "PruningConfig",
    "average_loras",
    "load_backbone",
    "load_bn_prior",
    "load_image",
    "load_lora",
    "load_zoo",
    "meta_train",
    "read_adapter",
    "save_adapter",
    "save_transformers_peft",
]

if TYPE_CHECKING:
    from .adapter import LoRAAdapter, LoRAFormatError, average_loras
    from .backbone import Backbone, load_backbone
    from .evaluate import EvalConfig
    from .fewshot import FewShotClassifier
    from .formats import load_lora, read_adapter, save_adapter, save_transformers_peft
    from .images import load_image
    from .invert import InversionConfig, load_bn_prior
    from .meta import MetaConfig, meta_train
    from .pool import Pool
    from .tokens import PruningConfig
    from .zoo import load_zoo


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'recycle' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
