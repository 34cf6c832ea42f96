"""The commands that talk to the Hub or write for other libraries: ``zoo``, ``export``, ``push`` and ``push-pool``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..io import terminal_safe
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
        f"zoo {args.out}: {len(manifest['loras'])} LoRAs from the Hub for {terminal_safe(args.hub)} "
        f"({manifest['bytes_moved'] / 2**20:.2f} MiB moved); invert them with "
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
    from ..card import write_export_card
    from ..formats import load_lora, save_transformers_peft

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
    base = _hub_base(args, cfg, adapter)
    installed = _installed_vit_layout()
    layout = installed if args.layout == "auto" else args.layout
    if layout != installed:
        _logger.warning(
            "the installed transformers names ViT modules in the %r layout: PEFT here cannot load this %r export "
            "(it is for the transformers releases that use those names)",
            installed,
            layout,
        )
    model_type = cfg.get("model_type", "vit")
    out = save_transformers_peft(adapter, args.out, layout=layout, base_model=base, model_type=model_type)
    kind = ("DeiT" if model_type == "deit" else "ViT") + (
        "ForImageClassification" if adapter.head_weight is not None else "Model"
    )
    write_export_card(out, adapter, base, kind)
    print(
        f"wrote {out} ({layout} module names): load it with PeftModel.from_pretrained({kind}.from_pretrained("
        f"'{base}'), '{out}')"
    )
    return 0


def _hub_base(args: argparse.Namespace, cfg: dict, adapter) -> str:
    """The base model the export names: ``--base-model``, else the Hub repo the backbone's weights came from, else the
    Hub id the LoRA names; a local path only when none is known (with a warning: the card then names no base)."""
    from ..hub import is_repo_id

    for candidate in (getattr(args, "base_model", None), cfg.get("hf_hub_id"), adapter.info.get("base_model")):
        if isinstance(candidate, str) and is_repo_id(candidate):
            return candidate
    if getattr(args, "base_model", None):
        raise ValueError(f"--base-model {args.base_model[:80]!r}: expected a Hub id ORG/NAME")
    _logger.warning(
        "the base %s is a local folder with no Hub id: the export names it by path and its card names no "
        "base_model; pass --base-model ORG/NAME to name the Hub repository it came from",
        terminal_safe(args.backbone),
    )
    return args.backbone


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
