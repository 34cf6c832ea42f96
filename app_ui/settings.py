"""Where the app finds its shipped weights and pool, which local paths text fields may name, and what it starts with
(falling back to the shipped weights when the requested backbone cannot be loaded)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from recycle.backbone import DEFAULT_BACKBONE, Backbone, BackboneError, backbone_source
from recycle.formats import LoRAAdapter, load_lora
from recycle.hub import hub_reachable, is_repo_id
from recycle.invert import DEFAULT_BN_PRIOR, InversionConfig
from recycle.priors import read_prior_settings
from recycle.runtime import INFERENCE_PRECISIONS

from .errors import InputError, text_field
from .markup import md_code, md_text
from .state import ModelCache

_logger = logging.getLogger("recycle.app")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _env_int(name: str, default: int) -> Union[int, str]:
    """A whole-number environment variable; unset or empty: `default`; anything else is returned as text, for
    `AppSettings` to refuse by name."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        return value[:40]


def _env_flag(name: str, default: bool) -> bool:
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off in any case; unset or empty: `default`.

    Raises:
        ValueError: any other value (a typo must not turn a safety setting around), naming the variable.
    """
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{name}={os.environ[name][:40]!r} is not a yes/no value: use 1 or 0")
    return value in _TRUE


@dataclass
class AppSettings:
    """Where the app finds its shipped weights and pool, and what users may type into text fields.

    Attributes:
        backbone: the requested default backbone (``$RECYCLE_BACKBONE``, else the paper's CLIP).
        weights: shipped weights (``$RECYCLE_WEIGHTS``, else ``weights/`` next to app.py): ``mini-vit``,
            ``mini-meta-lora``, ``examples/<task>/{support,query}/<class>/*.png``, ``example-lora`` (a LoRA
            with a head, to invert) and ``glyph-prior`` (mini-vit's BN-statistics prior).
        pool: the surrogate pool that inversions are added to (``$RECYCLE_POOL``, else ``./pool``).
        allow_local_paths: whether text fields accept local paths (``$RECYCLE_ALLOW_LOCAL_PATHS``; default: yes,
            except on a Hugging Face Space). When off, only Hub ids, uploads and the app's own files are used.
        pool_repo: a Hub dataset ``ORG/NAME`` that **Add to pool** also pushes each run to, when a Hub token is
            configured (``$RECYCLE_POOL_REPO``; ``HF_TOKEN`` or ``hf auth login`` for the token).
        precision: the few-shot tab's arithmetic (``$RECYCLE_PRECISION``): ``auto`` (default: a short calibration
            per backbone picks fp32, bf16 or int8), ``fp32``, ``bf16`` or ``int8``.
        pool_max_mb: **Add to pool** refuses once the pool folder holds this many megabytes
            (``$RECYCLE_POOL_MAX_MB``, default 2048).

    Raises:
        ValueError: `pool_repo` is not a Hub id, `precision` is not one, or `pool_max_mb` is not a whole number >= 1.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: Path = Path(__file__).resolve().parent.parent / "weights"
    pool: Path = Path("pool")
    allow_local_paths: bool = True
    pool_repo: Optional[str] = None
    precision: str = "auto"
    pool_max_mb: int = 2048

    def __post_init__(self) -> None:
        if isinstance(self.pool_max_mb, bool) or not isinstance(self.pool_max_mb, int) or self.pool_max_mb < 1:
            raise ValueError(
                f"RECYCLE_POOL_MAX_MB={self.pool_max_mb!r} is not a whole number of megabytes (at least 1)"
            )
        if self.precision not in INFERENCE_PRECISIONS:
            raise ValueError(
                f"RECYCLE_PRECISION={self.precision[:40]!r} is not a precision: use {', '.join(INFERENCE_PRECISIONS)}"
            )
        if self.pool_repo is not None and not is_repo_id(self.pool_repo):
            raise ValueError(f"RECYCLE_POOL_REPO={self.pool_repo[:80]!r} is not a Hub dataset id: use ORG/NAME")

    @classmethod
    def from_env(cls, **overrides: Any) -> "AppSettings":
        env = {
            "backbone": os.environ.get("RECYCLE_BACKBONE", "").strip() or DEFAULT_BACKBONE,
            "weights": Path(os.environ.get("RECYCLE_WEIGHTS", "").strip() or cls.weights).expanduser(),
            "pool": Path(os.environ.get("RECYCLE_POOL", "").strip() or cls.pool).expanduser(),
            "allow_local_paths": _env_flag("RECYCLE_ALLOW_LOCAL_PATHS", default=not os.environ.get("SPACE_ID")),
            "pool_repo": os.environ.get("RECYCLE_POOL_REPO", "").strip() or None,
            "precision": os.environ.get("RECYCLE_PRECISION", "").strip().lower() or "auto",
            "pool_max_mb": _env_int("RECYCLE_POOL_MAX_MB", cls.pool_max_mb),
        }
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)

    @property
    def shipped_backbone(self) -> Path:
        return self.weights / "mini-vit"

    @property
    def shipped_lora(self) -> Path:
        return self.weights / "mini-meta-lora"

    @property
    def examples(self) -> Path:
        return self.weights / "examples"

    @property
    def example_lora(self) -> Optional[Path]:
        """A zoo LoRA with its head, bundled for the inversion tab (None if not shipped)."""
        folder = self.weights / "example-lora"
        return folder if (folder / "adapter_model.safetensors").is_file() else None

    @property
    def shipped_prior(self) -> Optional[Path]:
        """The BN-statistics prior CNN trained on mini-vit's pretraining glyphs (None if not shipped)."""
        folder = self.weights / "glyph-prior"
        return folder if (folder / "model.safetensors").is_file() else None

    def bn_prior_for(self, backbone: str) -> "PriorChoice":
        """The BN-statistics prior offered for `backbone`: the shipped glyph prior for the shipped mini-vit (exactly
        that folder: the app's own file, read even with local paths off), with the inversion settings the shipped
        run inverted with (`shipped_inversion`), else the paper's ImageNet ResNet-50."""
        prior = self.shipped_prior
        if prior is not None and _same_folder(backbone, self.shipped_backbone):
            look = self.shipped_inversion()
            weight = look.pop("bn_weight", GLYPH_PRIOR_WEIGHT)
            return PriorChoice(
                str(prior),
                weight,
                True,
                f"BN-statistics prior (the shipped `{prior.name}`, weight {weight:g}{_look_text(look)})",
                f"A small CNN trained on {self.shipped_backbone.name}'s own pretraining glyphs: "
                "glyph-like images instead of noise; works offline.",
                flip=False,
                look=look,
            )
        return PriorChoice(
            DEFAULT_BN_PRIOR,
            InversionConfig.bn_weight,
            False,
            f"BN-statistics prior ({DEFAULT_BN_PRIOR}, from the Hub)",
            "The paper's image prior: more natural images, slower; needs the Hub.",
        )

    def shipped_inversion(self) -> dict[str, Optional[float]]:
        """The settings the shipped run inverted its zoo with (`recycle.priors.read_prior_settings` of the glyph
        prior's folder); {} when absent, and {} with a logged warning when unusable."""
        try:
            return read_prior_settings(self.weights / "glyph-prior")
        except ValueError as e:
            _logger.warning("ignoring the shipped inversion settings: %s", e)
            return {}


def _look_text(look: dict) -> str:
    """``", TV 0.3, two colours"``: the shipped run's other image-prior settings, for the checkbox's label."""
    parts = [f", TV {look['tv_weight']:g}"] if look.get("tv_weight") else []
    return "".join(parts + ([", two colours"] if look.get("two_colour") else []))


GLYPH_PRIOR_WEIGHT = 0.1  # glyph-like surrogates within 100 steps (0.01, the paper's weight for ResNet-50, is weaker)


@dataclass(frozen=True)
class PriorChoice:
    """The BN-statistics prior the inversion tab uses for a backbone: what to load, its weight, whether the checkbox
    starts ticked, the checkbox's label and info text, and whether inversion may flip images (not glyphs: they are
    not mirror-symmetric)."""

    name: str  # a timm model name (from the Hub) or the shipped prior's folder
    weight: float
    default: bool
    label: str
    info: str
    flip: bool = True
    # InversionConfig settings that come with the prior (tv_weight, two_colour)
    look: dict = field(default_factory=dict)


def _same_folder(name: str, folder: Path) -> bool:
    try:
        return Path(name).expanduser().resolve() == folder.resolve()
    except (OSError, ValueError):  # NUL bytes, names too long for the filesystem
        return False


def _looks_local(text: str) -> bool:
    if text.startswith((".", "/", "~", "\\", "local-dir:")):
        return True
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):  # too long for a file name, and so on: not a usable path either way
        return False


def _local_backbone(name: str) -> bool:
    """Whether the loader would read backbone `name` from disk (decided on the name as the loader reads it)."""
    try:
        return backbone_source(name)[0] == "local-dir"
    except BackboneError:
        return False  # not loadable at all: the loader says why


class PathPolicy:
    """Decides which strings typed into text fields may name local files.

    With local paths allowed, anything goes (the library reports what is wrong). Without, backbones must be timm
    names, aliases or ``hf-hub:`` ids, LoRAs must be Hub ids (downloaded, never read from disk), and the pool folder
    is the configured one; the app's own defaults (`trusted`) stay usable.
    """

    def __init__(self, allow_local: bool, trusted: Sequence[str] = ()):
        self.allow_local = allow_local
        self.trusted = {str(t) for t in trusted if t}

    def _refuse(self, text: str, what: str) -> None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InputError(
            f"Local paths are disabled on this server, so '{shown}' cannot be used as {what}. "
            + (
                "Enter a Hub id of the form ORG/NAME or upload the files."
                if what == "a LoRA"
                else "Enter a timm model name, an alias or hf-hub:ORG/REPO."
                if what == "a backbone"
                else "Only the server's own pool can be browsed."
            )
        )

    def backbone(self, name: Optional[str]) -> str:
        name = text_field(name, "backbone name")
        if not self.allow_local and name not in self.trusted and (_looks_local(name) or _local_backbone(name)):
            self._refuse(name, "a backbone")
        return name

    def lora(self, text: Optional[str]) -> str:
        text = text_field(text, "LoRA name")
        if self.allow_local or not text or text in self.trusted:
            return text
        if _looks_local(text) and not is_repo_id(text):
            self._refuse(text, "a LoRA")
        if not is_repo_id(text):
            raise InputError(f"'{text}' is not a Hub id of the form ORG/NAME (local paths are disabled on this server)")
        return text

    def load_lora(self, text: str, backbone: Optional[Backbone]) -> LoRAAdapter:
        """The LoRA named by `text`, read from disk only where local paths are allowed (or `text` is trusted)."""
        text = self.lora(text)
        return load_lora(text, backbone, hub_only=not (self.allow_local or text in self.trusted))

    def folder(self, text: Optional[str], default: Path) -> Path:
        text = text_field(text, "pool folder")
        if not text:
            return default
        if not self.allow_local and Path(text).expanduser().resolve() != default.resolve():
            self._refuse(text, "a pool folder")
        return Path(text).expanduser()


@dataclass
class Defaults:
    """What the app starts with: the backbone, the few-shot LoRA, and a note when it fell back to shipped weights."""

    backbone: str
    lora: str = ""
    note: str = ""  # markdown, empty unless the app runs on its shipped weights instead of the requested backbone
    offline: bool = False


def resolve_defaults(settings: AppSettings, cache: ModelCache, requested: Optional[str] = None) -> Defaults:
    """The requested backbone if it can be used, else the shipped mini-vit with its meta-LoRA.

    Quick: a local backbone or a reachable Hub needs no loading now (Hub backbones load on first use); only when the
    Hub is unreachable is the backbone loaded, which either reads the local cache or fails at once.
    """
    requested = requested or settings.backbone
    shipped = settings.shipped_backbone
    if not (shipped / "config.json").is_file() or _looks_local(requested):
        return Defaults(requested)
    if hub_reachable():
        return Defaults(requested)
    try:
        cache.backbone(requested)
        return Defaults(requested)
    except BackboneError as e:
        reason = str(e)
    lora = str(settings.shipped_lora) if (settings.shipped_lora / "adapter_model.safetensors").is_file() else ""
    with_lora = f" with its meta-LoRA {md_code(settings.shipped_lora.name)}" if lora else ""
    note = (
        f"📦 **Offline mode:** {md_code(requested)} cannot be loaded, so the app runs on its shipped weights: the "
        f"small {md_code(shipped.name)} backbone{with_lora}, trained offline on rendered glyphs. Try an example "
        f"below.<details><summary>Why</summary>{md_text(reason, 1000)}</details>"
    )
    _logger.warning("default backbone %s unavailable, using shipped %s: %s", requested, shipped, reason)
    return Defaults(str(shipped), lora, note, offline=True)
