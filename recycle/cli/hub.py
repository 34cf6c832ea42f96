"""The commands that talk to the Hub or write for other libraries: ``zoo``, ``export``, ``push`` and ``push-pool``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .common import backbone_of, warn_provenance, warn_token_on_command_line

_logger = logging.getLogger("recycle")


def gather(args: argparse.Namespace) -> int:
    from ..hub_loras import describe, gather_zoo

    if args.limit < 1:
        raise ValueError("--limit must be at least 1")
    manifest = gather_zoo(
        args.hub, args.out, limit=args.limit, search=args.search, progress=lambda lora: print(describe([lora]))
    )
    print(
        f"zoo {args.out}: {len(manifest['loras'])} LoRAs from the Hub for {args.hub}; invert them with "
        f"`recycle invert --zoo {args.out} --out POOL` (the backbone is read from zoo.json)"
    )
    return 0


def _installed_vit_layout() -> str:
    """ "new" when the transformers installed here names ViT modules ``layers.N.attention.q_proj``, else "old" (also
    when it is not installed). Decided on the text of its ViT module, without importing transformers."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        spec = None
    source = Path(spec.origin).parent / "models" / "vit" / "modeling_vit.py" if spec and spec.origin else None
    try:
        return "new" if source is not None and "self.q_proj" in source.read_text("utf-8") else "old"
    except OSError:
        return "old"


def export(args: argparse.Namespace) -> int:
    from ..backbone import load_backbone
    from ..formats import load_lora
    from ..formats import save_transformers_peft

    if args.backbone is None:
        args.backbone = backbone_of(args.lora)
    backbone = load_backbone(args.backbone, device="cpu")
    cfg = backbone.model.pretrained_cfg
    if cfg.get("source") != "transformers":
        raise ValueError(
            f"backbone '{args.backbone}' is a timm model, and recycle's LoRA files already are PEFT's "
            "layout for it; export writes LoRAs made on a transformers ViT (a folder or Hub repo in "
            "transformers' layout)"
        )
    adapter = load_lora(args.lora, backbone)
    with adapter.attached(backbone):  # refuses, with the reason, a LoRA that does not fit this backbone
        adapter.build_head(backbone.num_features)
    warn_provenance(adapter, backbone)
    base = cfg.get("hf_hub_id") or adapter.info.get("base_model") or args.backbone
    layout = _installed_vit_layout() if args.layout == "auto" else args.layout
    model_type = cfg.get("model_type", "vit")
    out = save_transformers_peft(adapter, args.out, layout=layout, base_model=base, model_type=model_type)
    kind = ("DeiT" if model_type == "deit" else "ViT") + (
        "ForImageClassification" if adapter.head_weight is not None else "Model"
    )
    print(
        f"wrote {out} ({layout} module names): load it with PeftModel.from_pretrained({kind}.from_pretrained("
        f"'{base}'), '{out}')"
    )
    return 0


def push(args: argparse.Namespace) -> int:
    from ..hub import push_folder

    warn_token_on_command_line(args.token)
    url = push_folder(args.dir, args.repo, token=args.token, private=args.private)
    print(f"pushed {args.dir} to {url}")
    return 0


def push_pool(args: argparse.Namespace) -> int:
    from ..pool.hub_publish import push_pool

    warn_token_on_command_line(args.token)
    url = push_pool(args.pool, args.repo, token=args.token, private=args.private, runs=args.run or None)
    print(f"pushed pool {args.pool} to {url}")
    return 0
