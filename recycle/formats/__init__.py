"""LoRA files: every on-disk format a `recycle.adapter.LoRAAdapter` is read from or written to.

* `peft_timm`: PEFT's layout on timm ViTs, the native format (``save_adapter``), which PEFT loads into the same timm
  model, and PEFT adapters others saved for timm ViTs;
* `peft_transformers`: PEFT adapters made on transformers ViTs and CLIP, mapped onto timm's modules, and written back
  in that layout (``save_transformers_peft``);
* `official`: the official LoRA Recycle files (q/v LoRAs on HF CLIP and a head on its projection);
* `peft_config`: the PEFT config every PEFT reader checks; `safety`: the checks every reader goes through;
* `load`: ``read_adapter`` and ``load_lora``, which tell the format from the files.

Refused with a reason: pickles, non-LoRA PEFT types, DoRA and bias variants, shapes that do not fit the backbone,
and non-finite values.
"""

from typing import Optional

from ..adapter import LoRAAdapter, LoRAFormatError
from .load import load_lora, read_adapter, stage_lora_files
from .peft_config import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .peft_timm import save_adapter, timm_key_kind
from .peft_transformers import is_transformers_adapter, save_transformers_peft, transformers_key_kind
from .safety import PICKLE_SUFFIXES

__all__ = [
    "LoRAAdapter",
    "LoRAFormatError",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PICKLE_SUFFIXES",
    "save_adapter",
    "read_adapter",
    "load_lora",
    "stage_lora_files",
    "save_transformers_peft",
    "is_transformers_adapter",
    "tensor_key_kind",
]


def tensor_key_kind(key: str) -> Optional[str]:
    """``"lora"`` or ``"head"`` for a tensor name some PEFT reader here takes, else None."""
    return transformers_key_kind(key) or timm_key_kind(key)
