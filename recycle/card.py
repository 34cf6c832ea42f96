"""Model cards for LoRA folders, built with huggingface_hub's `ModelCard` so the Hub accepts their metadata.

The Hub validates a README's YAML front matter on every commit: ``base_model`` must name a model repository that
exists there. So it is the repository the backbone's weights come from (``clip-b16`` ->
``timm/vit_base_patch16_clip_224.openai``, ``hf-hub:org/repo`` -> ``org/repo``), and it is left out for a local
backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .backbone import hub_repo_id
from .adapter import LoRAAdapter
from .io import atomic_write_bytes

__all__ = ["card_data", "write_model_card", "write_export_card"]

TAGS = ["lora-recycle", "few-shot", "timm", "lora"]


def card_data(adapter: LoRAAdapter, license: str = "apache-2.0"):
    """The card's metadata (`huggingface_hub.ModelCardData`).

    ``pipeline_tag`` is ``image-classification`` for a LoRA with a head and ``image-feature-extraction`` for one
    without (a meta-LoRA: its embeddings feed prototypes). ``base_model`` is the backbone's Hub repository, if any.
    """
    from huggingface_hub import ModelCardData

    base_model = hub_repo_id(adapter.backbone) if adapter.backbone else None
    return ModelCardData(
        base_model=base_model,
        library_name="peft",
        license=license,
        tags=list(TAGS),
        pipeline_tag="image-classification" if adapter.head_weight is not None else "image-feature-extraction",
    )


def _body(adapter: LoRAAdapter, command: Optional[str], results_md: Optional[str]) -> list[str]:
    info = dict(adapter.info)
    meta = info.pop("meta_training", None)
    lines = ["# Meta-LoRA (LoRA Recycle)" if meta else "# LoRA", ""]
    if meta:
        lines += [
            "A meta-LoRA distilled **without any real training data** from pre-tuned LoRAs, following "
            "LoRA Recycle (Hu et al., CVPR 2025): surrogate images were inverted from each LoRA and its head, "
            "and the meta-LoRA was meta-trained on them with a ProtoNet objective (KL to the teacher for "
            "single-LoRA episodes, cross-entropy for cross-LoRA episodes).",
            "",
            "Use it for tuning-free few-shot classification: embed a few labelled support images per class, "
            "average them into prototypes and classify queries by distance, in one forward pass:",
            "",
            "```bash",
            f"python -m recycle predict --backbone {adapter.backbone} --lora <this repo> "
            "--support SUPPORT_DIR --query QUERY_DIR",
            "```",
            "",
        ]
    c = adapter.config
    lines += [
        "## Adapter",
        "",
        f"- backbone: `{adapter.backbone}`",
        f"- targets: {', '.join(c.targets)}; rank {c.rank}; scaling {c.scaling:g}",
        "- files: PEFT layout (`adapter_config.json`, "
        "`adapter_model.safetensors`); loads with PEFT on the same timm model",
        "",
    ]
    if adapter.class_names:
        lines += [f"- head classes: {', '.join(adapter.class_names)}", ""]
    if meta:
        lines += ["## How it was made", "", "```json", json.dumps({**meta, **info}, indent=1, default=str), "```", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    if results_md:
        lines += ["## Results", "", results_md, ""]
    return lines


def write_model_card(
    folder: Path,
    adapter: LoRAAdapter,
    command: Optional[str] = None,
    results_md: Optional[str] = None,
    license: str = "apache-2.0",
) -> Path:
    """Write ``README.md`` for a LoRA folder: metadata the Hub accepts, what it is, how it was made (data-free),
    the command and results. Returns the path."""
    from huggingface_hub import ModelCard

    card = ModelCard(
        "\n".join(["---", card_data(adapter, license).to_yaml(), "---", "", *_body(adapter, command, results_md)])
    )
    path = Path(folder) / "README.md"
    atomic_write_bytes(path, str(card).encode())
    return path


def write_export_card(folder: Path, adapter: LoRAAdapter, base_model: Optional[str], model_class: str) -> Path:
    """Write ``README.md`` for a LoRA exported as a PEFT adapter of a transformers model (``model_class``, e.g.
    ``ViTForImageClassification``), with the metadata PEFT's own ``save_pretrained`` writes: ``library_name: peft``,
    ``base_model`` and the tags ``base_model:adapter:<base>``, ``lora`` and ``transformers``. `base_model` is left
    out of the metadata unless it is a Hub id (the Hub refuses a card whose base is not a repository). Returns the
    path."""
    from huggingface_hub import ModelCard, ModelCardData

    from .hub import is_repo_id

    hub_base = base_model if isinstance(base_model, str) and is_repo_id(base_model) else None
    tags = ["lora", "transformers", "lora-recycle"] + ([f"base_model:adapter:{hub_base}"] if hub_base else [])
    data = ModelCardData(
        base_model=hub_base,
        library_name="peft",
        tags=sorted(tags),
        pipeline_tag="image-classification" if adapter.head_weight is not None else "image-feature-extraction",
    )
    load = hub_base or "<the base model>"
    body = [
        "# LoRA (exported by LoRA Recycle)",
        "",
        f"A PEFT LoRA adapter of `{load}`, written by `recycle export` from "
        + ("a meta-LoRA distilled with LoRA Recycle." if "meta_training" in adapter.info else "a LoRA."),
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {model_class}",
        "",
        f'model = PeftModel.from_pretrained({model_class}.from_pretrained("{load}"), "<this folder or repo>")',
        "```",
        "",
    ]
    if adapter.class_names:
        body += [f"Classes: {', '.join(adapter.class_names[:50])}{' ...' if len(adapter.class_names) > 50 else ''}", ""]
    card = ModelCard("\n".join(["---", data.to_yaml(), "---", "", *body]))
    path = Path(folder) / "README.md"
    atomic_write_bytes(path, str(card).encode())
    return path
