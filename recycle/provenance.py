"""Which backbone a LoRA was made for, and whether a loaded backbone is that one.

Shapes alone do not tell: a LoRA tuned on ``google/vit-base-patch16-224-in21k`` fits CLIP ViT-B/16 tensor for
tensor, and gives meaningless outputs there. A LoRA names its base (``base_model_name_or_path``, or recycle's own
metadata); a backbone knows the name it was loaded by and the Hub repository its weights came from. Both are reduced
to canonical ids (Hub repo or timm name, lower case, without ``hf-hub:``, ``timm/`` or a revision, with the few known
equivalences between transformers repositories and timm names), and compared only when both are Hub or timm names:
local folders are never called a mismatch, since a copy of a model has another path.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["canonical_ids", "backbone_ids", "provenance_mismatch", "EQUIVALENT"]

# Hub repositories (transformers' layout) and the timm models holding the same weights.
EQUIVALENT = {
    "google/vit-base-patch16-224-in21k": "vit_base_patch16_224.orig_in21k",
    "openai/clip-vit-base-patch16": "vit_base_patch16_clip_224.openai",
    "openai/clip-vit-base-patch32": "vit_base_patch32_clip_224.openai",
    "openai/clip-vit-large-patch14": "vit_large_patch14_clip_224.openai",
}


def _is_local(name: str) -> bool:
    from .backbone import BackboneError, backbone_source

    try:
        return backbone_source(name)[0] == "local-dir"
    except BackboneError:
        return True  # not a name anyone can load: treat as unknown


def canonical_ids(name: Optional[str]) -> set[str]:
    """The ids `name` (a backbone name, timm name, alias or Hub id) is known by; empty for local folders and None."""
    from .backbone import ALIASES

    if not isinstance(name, str) or not name.strip() or _is_local(name.strip()):
        return set()
    text = name.strip()
    text = ALIASES[text][0] if text in ALIASES else text
    for prefix in ("hf-hub:", "hf_hub:"):
        if text.lower().startswith(prefix):
            text = text[len(prefix) :]
    text = text.split("@")[0].lower()
    ids = {text}
    if text.startswith("timm/"):
        ids.add(text[len("timm/") :])
    for hub, timm_name in EQUIVALENT.items():
        if hub in ids or timm_name in ids:
            ids |= {hub, timm_name, "timm/" + timm_name}
    return ids


def backbone_ids(backbone) -> set[str]:
    """The ids of a loaded `recycle.backbone.Backbone`: its name and the Hub repository its weights came from."""
    from .backbone import hub_repo_id

    ids = canonical_ids(backbone.name)
    cfg = getattr(backbone.model, "pretrained_cfg", None) or {}
    for extra in (cfg.get("hf_hub_id"), hub_repo_id(backbone.name) if ids else None):
        ids |= canonical_ids(extra)
    return ids


def provenance_mismatch(made_for: Optional[str], backbone) -> Optional[str]:
    """A sentence saying that the LoRA made for `made_for` was not made for `backbone`, or None when it was, or when
    that cannot be known (no name, or a local folder on either side)."""
    wanted, have = canonical_ids(made_for), backbone_ids(backbone)
    if not wanted or not have or wanted & have:
        return None
    return f"it was made for '{made_for}', not for the selected backbone '{backbone.name}'"
