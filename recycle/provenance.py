"""Which backbone a LoRA was made for, and whether a loaded backbone is that one.

Shapes alone do not tell: a LoRA tuned on ``google/vit-base-patch16-224-in21k`` fits CLIP ViT-B/16 tensor for
tensor, and gives meaningless outputs there. A LoRA names its base (``base_model_name_or_path``, or recycle's own
metadata); a backbone knows the name it was loaded by and the Hub repository its weights came from. Both are reduced
to canonical ids (Hub repo or timm name, lower case, without ``hf-hub:``, ``timm/`` or a revision, with the few known
equivalences between transformers repositories and timm names), and compared only when both are Hub or timm names:
local folders are never called a mismatch, since a copy of a model has another path.
"""

from __future__ import annotations

import logging
from typing import Optional

_logger = logging.getLogger(__name__)

__all__ = [
    "canonical_ids",
    "backbone_ids",
    "provenance_mismatch",
    "family_mismatch",
    "fit_mismatch",
    "require_fit",
    "EQUIVALENT",
]

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


def _backbone_family(backbone) -> Optional[str]:
    """The model family of a loaded backbone: a transformers folder's ``model_type`` (``vit``, ``deit``), or, for a
    timm model, ``deit`` when its architecture is one of timm's DeiTs and ``vit`` otherwise; None when unknown."""
    cfg = getattr(getattr(backbone, "model", None), "pretrained_cfg", None) or {}
    if cfg.get("source") == "transformers":
        kind = cfg.get("model_type")
        return kind if isinstance(kind, str) else None
    arch = cfg.get("architecture")
    if not isinstance(arch, str):
        return None
    return "deit" if arch.startswith("deit") else "vit"


def family_mismatch(adapter, backbone) -> Optional[str]:
    """A sentence saying that the LoRA's model family (the ``vit.`` / ``deit.`` prefix of a transformers adapter's
    keys, or its folder's config.json) is not the backbone's, or None when they agree or either is unknown."""
    made = adapter.info.get("model_type") if isinstance(getattr(adapter, "info", None), dict) else None
    have = _backbone_family(backbone)
    if not isinstance(made, str) or have is None or made == have:
        return None
    return (
        f"it was made for a {made.upper()} model (its adapter says so), and the selected backbone is a {have.upper()}"
    )


def fit_mismatch(adapter, backbone) -> Optional[str]:
    """Why the LoRA `adapter` was made for another base than `backbone`, though its shapes may fit: the named bases
    differ (`provenance_mismatch`), or the model families do (`family_mismatch`); None when nothing says so."""
    return provenance_mismatch(adapter.backbone, backbone) or family_mismatch(adapter, backbone)


def require_fit(adapter, backbone, force: bool = False, override: str = "--force", name: str = "the LoRA") -> None:
    """Refuse to run `adapter` as a teacher on `backbone` when it was made for another base (`fit_mismatch`); the
    message names both bases and the way out. With `force`, log a warning instead.

    Raises:
        LoRAFormatError: the LoRA was made for another base, and `force` is off.
    """
    from .adapter import LoRAFormatError

    mismatch = fit_mismatch(adapter, backbone)
    if mismatch is None:
        return
    if force:
        _logger.warning("%s fits the backbone in shape, but %s; using it anyway (%s)", name, mismatch, override)
        return
    switch = f"choose the backbone it was made for ('{adapter.backbone}'), or " if adapter.backbone else ""
    raise LoRAFormatError(
        f"{name} fits the backbone in shape, but {mismatch}, so its outputs would mean nothing there: {switch}use "
        f"{override} if you know it fits"
    )
