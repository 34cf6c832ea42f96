"""The official LoRA Recycle files: ``w_a_XXX``/``w_b_XXX`` q/v LoRAs on HF CLIP plus ``fc_{in}in_{out}out``, a head
on CLIP's projected embedding, composed here with the projection into one Linear on the pre-logits feature."""

from __future__ import annotations

import re

import torch

from ..adapter import LoRAAdapter, LoRAFormatError
from ..lora import LoRAConfig

__all__ = ["from_official", "is_official"]


def is_official(tensors: dict) -> bool:
    """Whether a file's tensor names are the official code's."""
    return any(re.fullmatch(r"w_a_\d{3}", k) for k in tensors)


def from_official(tensors: dict[str, torch.Tensor], name: str, backbone) -> LoRAAdapter:
    """Official LoRA Recycle file: ``w_a_{i:03d}``/``w_b_{i:03d}`` (even i = q_proj, odd = v_proj of layer i//2,
    update ``B A x`` with scale 1) and ``fc_{in}in_{out}out`` (head on CLIP's projected embedding, no bias)."""
    a_keys = sorted(k for k in tensors if re.fullmatch(r"w_a_\d{3}", k))
    head_keys = [k for k in tensors if re.fullmatch(r"fc_\d+in_\d+out", k)]
    unknown = sorted(set(tensors) - set(a_keys) - {k.replace("w_a_", "w_b_") for k in a_keys} - set(head_keys))
    if unknown:
        raise LoRAFormatError(f"{name}: unexpected tensors {unknown[:5]} in an official LoRA Recycle file")
    if len(a_keys) % 2:
        raise LoRAFormatError(f"{name}: {len(a_keys)} w_a tensors; q/v pairs need an even number")
    state = {}
    for i, key in enumerate(a_keys):
        if key != f"w_a_{i:03d}" or f"w_b_{i:03d}" not in tensors:
            raise LoRAFormatError(f"{name}: w_a/w_b tensors are not numbered 000..{len(a_keys) - 1:03d} in pairs")
        slice_name = "q" if i % 2 == 0 else "v"
        state[f"blocks.{i // 2}.attn.qkv.lora_A.{slice_name}"] = tensors[key]
        state[f"blocks.{i // 2}.attn.qkv.lora_B.{slice_name}"] = tensors[f"w_b_{i:03d}"]
    if not state:
        raise LoRAFormatError(f"{name}: no w_a_XXX/w_b_XXX tensors found")
    rank = int(tensors["w_a_000"].shape[0])
    config = LoRAConfig(targets=("qv",), rank=rank)
    head_w = head_b = None
    if head_keys:
        if backbone is None:
            raise LoRAFormatError(
                f"{name}: an official LoRA Recycle head sits on CLIP's projection; pass the "
                "backbone so it can be mapped onto the pre-logits feature"
            )
        if backbone.embedding != "projection":
            raise LoRAFormatError(f"{name}: official LoRA Recycle files are for CLIP backbones, not '{backbone.name}'")
        fc = tensors[head_keys[0]].float()
        proj = backbone.model.head
        if fc.ndim != 2 or fc.shape[1] != proj.out_features:
            raise LoRAFormatError(
                f"{name}: the head has shape {list(fc.shape)}, taking {fc.shape[-1]} features, but "
                f"'{backbone.name}' projects to {proj.out_features}"
            )
        with torch.no_grad():  # fc(proj(x)) = (fc W_p) x + fc b_p; the official head has no bias
            head_w = fc @ proj.weight.detach().cpu().float()
            head_b = fc @ proj.bias.detach().cpu().float() if proj.bias is not None else torch.zeros(fc.shape[0])
    return LoRAAdapter(
        config,
        state,
        backbone=getattr(backbone, "name", None),
        head_weight=head_w,
        head_bias=head_b,
        info={"source": "official LoRA Recycle file", "file": name},
    )
