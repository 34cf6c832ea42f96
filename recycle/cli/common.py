"""What several commands share: terminal-safe text, where a command finds its backbone, and warnings."""

from __future__ import annotations

import logging
from pathlib import Path

from ..adapter import LoRAAdapter, LoRAFormatError
from ..backbone import DEFAULT_BACKBONE, Backbone

_logger = logging.getLogger("recycle")


def backbone_of(lora: str) -> str:
    """The backbone LoRA `lora` names (read without a backbone), or the default when it names none."""
    from ..formats import load_lora

    try:
        made_for = load_lora(lora).backbone
    except LoRAFormatError:  # e.g. an official file, whose head needs the backbone: the real load says what is wrong
        made_for = None
    if made_for:
        _logger.info("using the backbone the LoRA was made for: %s", made_for)
        return made_for
    _logger.info("the LoRA names no backbone; using %s", DEFAULT_BACKBONE)
    return DEFAULT_BACKBONE


def zoo_backbone(zoo: str) -> str:
    """The backbone a zoo's zoo.json names (a zoo gathered from the Hub names its base), else the default."""
    from ..io import loads_strict

    path = Path(zoo) / "zoo.json"
    try:
        named = loads_strict(path.read_bytes(), str(path)).get("backbone") if path.is_file() else None
    except (ValueError, AttributeError):
        named = None
    return named if isinstance(named, str) and named else DEFAULT_BACKBONE


def warn_provenance(adapter: LoRAAdapter, backbone: Backbone) -> None:
    """Warn when `adapter` fits `backbone` in shape but was made for another model."""
    from ..provenance import fit_mismatch

    mismatch = fit_mismatch(adapter, backbone)
    if mismatch:
        _logger.warning("the LoRA fits the backbone in shape, but %s; its outputs will mean nothing there", mismatch)


def warn_token_on_command_line(token: object) -> None:
    """Warn that a token given as an option is visible to others."""
    if token:
        _logger.warning(
            "--token exposes the token in the shell history and the process list; set HF_TOKEN or run "
            "`hf auth login` instead"
        )
