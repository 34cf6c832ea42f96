"""Handlers of the LoRA Recycle app: UI values in, `recycle` calls, UI values out. The layout lives in ``app.py``.

Everything that holds memory between requests is bounded: loaded models (`ModelCache`), per-session state
(`SessionStore`: the loaded LoRA and the latest inversion of each of a few sessions), and the zip files of inversion
runs (deleted with their session entry). Errors meant for the user (`USER_ERRORS`) are shown as they are; anything
else is logged and reported as a generic error, and the app keeps serving.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import io
import logging
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import unicodedata
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Optional, Sequence, TypeVar

import gradio as gr
import torch
from PIL import Image

from recycle.backbone import DEFAULT_BACKBONE, Backbone, BackboneError, backbone_source, load_backbone
from recycle.fewshot import FewShotClassifier
from recycle.formats import PICKLE_SUFFIXES, LoRAAdapter, LoRAFormatError, load_lora, read_adapter
from recycle.hub import HubError, download_repo_files, hub_reachable, is_repo_id
from recycle.images import IMAGE_SUFFIXES, ImageError, load_image
from recycle.invert import DEFAULT_BN_PRIOR, BNPrior, InversionConfig, InversionError, InversionProgress, \
    InversionResult, invert, load_bn_prior
from recycle.pool import Pool, PoolError, write_run
from recycle.predict import Prediction, SupportError, classify, clean_class_name
from recycle.tokens import PruningConfig, parse_schedule

__all__ = ["InputError", "AppSettings", "Defaults", "PathPolicy", "ModelCache", "SessionStore", "FewShot", "Inversion",
           "PoolBrowser", "ExampleTask", "find_examples", "resolve_defaults", "USER_ERRORS", "MAX_CLASSES",
           "MAX_IMAGES", "MAX_FILE_SIZE", "MAX_INVERT_IMAGES", "MAX_INVERT_STEPS", "PRUNING_PRESETS"]

_logger = logging.getLogger("recycle.app")

# ------------------------------------------------------------------------------------------------------ limits
MAX_CLASSES = 8  # class slots in the few-shot tab
INITIAL_CLASSES = 3  # slots shown before "Add class" is pressed (the bundled examples have 3 classes)
MAX_IMAGES = 200  # support + query images in one few-shot request
MAX_FILE_SIZE = "20mb"  # per uploaded file
MAX_NAME_LENGTH = 80  # characters in a class name
MAX_FIELD_LENGTH = 300  # characters in a backbone, LoRA or folder field
MAX_CARDS = 60  # queries shown with probability bars (all of them are in the table)
THUMBNAIL_SIZE = 96  # px, longest side of a query thumbnail in the probability cards
MAX_INVERT_IMAGES = 32  # classes x images per class in one inversion
MAX_INVERT_STEPS = 2000
MAX_SEED = 2 ** 63 - 1
MAX_LORA_FILES = 4  # files in one LoRA upload
MAX_POOL_GALLERY = 48  # images shown per class in the pool browser
DISPLAY_SIZE = 160  # px: small surrogate images are enlarged (nearest neighbour) to at least this for display
PREVIEW_INTERVAL = 0.5  # s: at most two gallery refreshes a second, however fast the backbone
SESSIONS = 16  # sessions whose loaded LoRA is kept
RESULT_SESSIONS = 4  # sessions whose latest inversion (images, masks, zip) is kept


class InputError(ValueError):
    """A setting in the UI that cannot be used. The message is meant for the end user."""


# Errors whose message is written for the end user: shown as they are.
USER_ERRORS = (InputError, SupportError, ImageError, BackboneError, LoRAFormatError, HubError, PoolError,
               InversionError)

# (label, LAYER:RATIO spec) for the pruning dropdown; any other "LAYER[,LAYER]:RATIO" can be typed in.
PRUNING_PRESETS = [
    ("none: keep every token", "none"),
    ("last block, drop 75% (paper)", "-1:0.75"),
    ("last block, drop 50%", "-1:0.5"),
    ("last block, drop 25%", "-1:0.25"),
    ("second-to-last block, drop 75%", "-2:0.75"),
]

T = TypeVar("T")


def _server_folders() -> list[tuple[str, str]]:
    """Folders whose names mean nothing to a user (staged uploads, Gradio's upload cache, the Hub cache), each with
    what to call a folder inside it."""
    from huggingface_hub import constants

    tmp = tempfile.gettempdir()
    gradio_tmp = os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tmp, "gradio")
    return [(os.path.join(tmp, "recycle-app-"), "the uploaded files"), (gradio_tmp, "the uploaded files"),
            (str(constants.HF_HUB_CACHE), "the downloaded files")]


def _message(e: BaseException) -> str:
    """A user error's message, HTML-escaped, with the server's temporary and cache folders replaced by the name of
    the file they hold (or "the uploaded files" / "the downloaded files")."""
    text = str(e)
    for root, what in _server_folders():
        text = re.sub(re.escape(root) + r"[^\s'\"`]*",
                      lambda m: Path(m.group()).name if Path(m.group()).suffix else what, text)
    return html.escape(text, quote=False)


def _user_error(e: BaseException, title: str) -> gr.Error:
    return gr.Error(_message(e), title=title, print_exception=False)


@contextlib.contextmanager
def _reported(title: str, what: str) -> Iterator[None]:
    """Turn user errors into a `gr.Error` with their message, and anything else into a generic, logged one."""
    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as e:
        raise _user_error(e, title) from None
    except Exception:  # noqa: BLE001 - the server keeps serving; details go to the log
        _logger.exception("%s failed", what)
        raise gr.Error(f"Something went wrong while {what}; the details are in the server log. Please try again.",
                       title="Unexpected error", print_exception=False) from None


# -------------------------------------------------------------------------------------------------- settings
def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


@dataclass
class AppSettings:
    """Where the app finds its shipped weights and pool, and what users may type into text fields.

    Attributes:
        backbone: the requested default backbone (``$RECYCLE_BACKBONE``, else the paper's CLIP).
        weights: shipped weights (``$RECYCLE_WEIGHTS``, else ``weights/`` next to app.py): ``mini-vit``,
            ``mini-meta-lora``, ``examples/<task>/{support,query}/<class>/*.png`` and ``example-lora`` (a LoRA
            with a head, to invert).
        pool: the surrogate pool that inversions are added to (``$RECYCLE_POOL``, else ``./pool``).
        allow_local_paths: whether text fields accept local paths (``$RECYCLE_ALLOW_LOCAL_PATHS``; default: yes,
            except on a Hugging Face Space). When off, only Hub ids, uploads and the app's own files are used.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: Path = Path(__file__).resolve().parent / "weights"
    pool: Path = Path("pool")
    allow_local_paths: bool = True

    @classmethod
    def from_env(cls, **overrides: Any) -> "AppSettings":
        env = {
            "backbone": os.environ.get("RECYCLE_BACKBONE", "").strip() or DEFAULT_BACKBONE,
            "weights": Path(os.environ.get("RECYCLE_WEIGHTS", "").strip() or cls.weights).expanduser(),
            "pool": Path(os.environ.get("RECYCLE_POOL", "").strip() or cls.pool).expanduser(),
            "allow_local_paths": _env_flag("RECYCLE_ALLOW_LOCAL_PATHS", default=not os.environ.get("SPACE_ID")),
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


def _text(value: Any, what: str) -> str:
    """A text input's value as a string (None is empty); any other type is refused, naming the field."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"The {what} must be text, got {_kind(value)}.")
    return value


def _kind(value: Any) -> str:
    """How to name an unexpected value's type for the user."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _field(text: Optional[str], what: str) -> str:
    """A text field's value, trimmed; refused when not text, too long or holding control characters (NUL, newlines,
    ...)."""
    text = _text(text, what).strip()
    if len(text) > MAX_FIELD_LENGTH:
        raise InputError(f"The {what} is {len(text)} characters long; at most {MAX_FIELD_LENGTH}.")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise InputError(f"The {what} contains control characters; type a name or an id.")
    return text


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
        raise InputError(f"Local paths are disabled on this server, so '{shown}' cannot be used as {what}. "
                         + ("Enter a Hub id of the form ORG/NAME or upload the files." if what == "a LoRA" else
                            "Enter a timm model name, an alias or hf-hub:ORG/REPO." if what == "a backbone" else
                            "Only the server's own pool can be browsed."))

    def backbone(self, name: Optional[str]) -> str:
        name = _field(name, "backbone name")
        if not self.allow_local and name not in self.trusted and (_looks_local(name) or _local_backbone(name)):
            self._refuse(name, "a backbone")
        return name

    def lora(self, text: Optional[str]) -> str:
        text = _field(text, "LoRA name")
        if self.allow_local or not text or text in self.trusted:
            return text
        if _looks_local(text) and not is_repo_id(text):
            self._refuse(text, "a LoRA")
        if not is_repo_id(text):
            raise InputError(f"'{text}' is not a Hub id of the form ORG/NAME (local paths are disabled on this "
                             "server)")
        return text

    def load_lora(self, text: str, backbone: Optional[Backbone]) -> LoRAAdapter:
        """The LoRA named by `text`, read from disk only where local paths are allowed (or `text` is trusted)."""
        text = self.lora(text)
        if self.allow_local or text in self.trusted:
            return load_lora(text, backbone)
        folder = download_repo_files(text, ["*.json", "*.safetensors", "*.md"])  # never from a local folder
        if not any(folder.glob("*.safetensors")):
            raise LoRAFormatError(f"Hub repository '{text}' has no .safetensors LoRA weights (pickled .bin/.pt "
                                  "weights are never downloaded or loaded)")
        return read_adapter(folder, backbone, text)

    def folder(self, text: Optional[str], default: Path) -> Path:
        text = _field(text, "pool folder")
        if not text:
            return default
        if not self.allow_local and Path(text).expanduser().resolve() != default.resolve():
            self._refuse(text, "a pool folder")
        return Path(text).expanduser()


# ------------------------------------------------------------------------------------------------------ caches
class ModelCache:
    """Loaded backbones and few-shot classifiers, each in a small LRU so that memory stays bounded. Thread-safe.

    A classifier is keyed by (backbone, LoRA) and keeps its embedding cache between requests; evicting a backbone
    drops its classifiers too. Inversion gets its own copy of one backbone (`inverter`), because inverting holds
    the backbone for minutes and predictions must not wait for it. Loads run one at a time; cached models are
    served while a load is in progress.
    """

    def __init__(self, max_backbones: int = 2, max_classifiers: int = 4, device: Optional[str] = None,
                 lora_loader: Optional[Callable[[str, Backbone], LoRAAdapter]] = None):
        self.max_backbones = max_backbones
        self.max_classifiers = max_classifiers
        self.device = device
        self.lora_loader = lora_loader or load_lora
        self._lock = threading.Lock()  # guards the tables; held briefly
        self._load_lock = threading.RLock()  # serialises loads, so nothing is loaded twice
        self._backbones: OrderedDict[str, Backbone] = OrderedDict()
        self._classifiers: OrderedDict[tuple[str, str], tuple[FewShotClassifier, threading.Lock]] = OrderedDict()
        self._inverter: Optional[tuple[str, Backbone]] = None
        self._prior: Optional[BNPrior] = None

    def _get(self, table: OrderedDict, key: Any) -> Any:
        with self._lock:
            value = table.get(key)
            if value is not None:
                table.move_to_end(key)
            return value

    def backbone(self, name: str) -> Backbone:
        """The backbone called `name`, loaded if needed.

        Raises:
            BackboneError: it cannot be loaded (the message says why).
        """
        if (hit := self._get(self._backbones, name)) is not None:
            return hit
        with self._load_lock:
            if (hit := self._get(self._backbones, name)) is not None:
                return hit
            backbone = load_backbone(name, device=self.device)
            with self._lock:
                self._backbones[name] = backbone
                while len(self._backbones) > self.max_backbones:
                    evicted, _ = self._backbones.popitem(last=False)
                    for key in [k for k in self._classifiers if k[0] == evicted]:
                        del self._classifiers[key]
                    _logger.info("evicted backbone %s", evicted)
            return backbone

    @contextlib.contextmanager
    def classifier(self, backbone: str, lora: str = "") -> Iterator[FewShotClassifier]:
        """The classifier for `backbone` with `lora` (``""`` for none), for exclusive use inside the block.

        Raises:
            BackboneError, LoRAFormatError, HubError: the backbone or the LoRA cannot be loaded.
        """
        key = (backbone, lora)
        entry = self._get(self._classifiers, key)
        if entry is None:
            with self._load_lock:
                entry = self._get(self._classifiers, key)
                if entry is None:
                    model = self.backbone(backbone)
                    adapter = self.lora_loader(lora, model) if lora else None
                    entry = (FewShotClassifier(model, adapter), threading.Lock())
                    with self._lock:
                        self._classifiers[key] = entry
                        while len(self._classifiers) > self.max_classifiers:
                            self._classifiers.popitem(last=False)
        classifier, in_use = entry
        with in_use:  # fit() and predict_proba() share state on the classifier
            yield classifier

    def inverter(self, name: str) -> Backbone:
        """A private copy of backbone `name` for inversion (one is kept; asking for another replaces it)."""
        with self._load_lock:
            if self._inverter is not None and self._inverter[0] == name:
                return self._inverter[1]
            self._inverter = None  # free the old copy before loading the new one
            shared = self.backbone(name)  # loads and validates once, and warms the Hub cache
            copy = load_backbone(name, device=shared.device)
            self._inverter = (name, copy)
            return copy

    def bn_prior(self) -> BNPrior:
        """The BN-statistics prior of the paper (an ImageNet ResNet-50 from the Hub), loaded once."""
        with self._load_lock:
            if self._prior is None:
                try:
                    device = self._inverter[1].device if self._inverter else None
                    self._prior = load_bn_prior(DEFAULT_BN_PRIOR, device=device)
                except BackboneError as e:
                    raise BackboneError(f"{e} Untick 'BN-statistics prior' to invert without it.") from None
            return self._prior


class SessionStore(Generic[T]):
    """One value per browser session, in an LRU of `max_sessions`; evicted or replaced values go to `on_evict`."""

    def __init__(self, max_sessions: int, on_evict: Optional[Callable[[T], None]] = None):
        self.max_sessions = max_sessions
        self.on_evict = on_evict
        self._lock = threading.Lock()
        self._values: OrderedDict[str, T] = OrderedDict()

    def get(self, session: str) -> Optional[T]:
        with self._lock:
            value = self._values.get(session)
            if value is not None:
                self._values.move_to_end(session)
            return value

    def set(self, session: str, value: T) -> None:
        evicted = []
        with self._lock:
            if session in self._values and self._values[session] is not value:
                evicted.append(self._values[session])
            self._values[session] = value
            self._values.move_to_end(session)
            while len(self._values) > self.max_sessions:
                evicted.append(self._values.popitem(last=False)[1])
        for value in evicted:
            if self.on_evict is not None:
                self.on_evict(value)

    def __len__(self) -> int:
        return len(self._values)


def _session(request: Optional[gr.Request]) -> str:
    return getattr(request, "session_hash", None) or "default"


# ------------------------------------------------------------------------------------------------------ startup
@dataclass
class Defaults:
    """What the app starts with: the backbone, the few-shot LoRA, and a note when it fell back to shipped weights."""

    backbone: str
    lora: str = ""
    note: str = ""  # markdown, empty unless the app runs on its shipped weights instead of the requested backbone
    offline: bool = False


def resolve_defaults(settings: AppSettings, cache: ModelCache, requested: Optional[str] = None) -> Defaults:
    """The requested backbone if it can be used, else the shipped mini-vit with its meta-LoRA (issue 5, §5).

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
    with_lora = f" with its meta-LoRA `{settings.shipped_lora.name}`" if lora else ""
    note = (f"📦 **Offline mode:** `{requested}` cannot be loaded, so the app runs on its shipped weights: the small "
            f"`{shipped.name}` backbone{with_lora}, trained offline on rendered glyphs. Try an example below."
            f"<details><summary>Why</summary>{html.escape(reason, quote=False)}</details>")
    _logger.warning("default backbone %s unavailable, using shipped %s: %s", requested, shipped, reason)
    return Defaults(str(shipped), lora, note, offline=True)


@dataclass
class ExampleTask:
    """A bundled few-shot task: ``examples/<name>/{support,query}/<class>/*.png``."""

    name: str
    label: str
    support: dict[str, list[str]]
    queries: list[str]


_TASK_LABELS = {"han": "Han characters (held-out classes)", "hangul": "Hangul (an unseen script)"}


def find_examples(root: Path, max_classes: int = MAX_CLASSES) -> list[ExampleTask]:
    """The bundled example tasks under `root` (none if the folder does not exist), sorted by name."""
    tasks = []
    if not root.is_dir():
        return tasks
    for task in sorted(p for p in root.iterdir() if p.is_dir()):
        support = {c.name: sorted(str(f) for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
                   for c in sorted(p for p in (task / "support").glob("*") if p.is_dir())}
        support = {c: files for c, files in support.items() if files}
        queries = sorted(str(f) for f in (task / "query").glob("*/*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not 2 <= len(support) <= max_classes or not queries:
            _logger.warning("skipping example task %s: needs 2-%d classes and queries", task, max_classes)
            continue
        shots = max(map(len, support.values()))
        label = (f"{_TASK_LABELS.get(task.name, task.name.replace('_', ' ').capitalize())} · {len(support)}-way "
                 f"{shots}-shot")
        tasks.append(ExampleTask(task.name, label, support, queries))
    return tasks


# ------------------------------------------------------------------------------------------------- few-shot tab
def _paths(value: Optional[list]) -> list[str]:
    """File paths from a gr.File (paths) or gr.Gallery ((path, caption) pairs) value."""
    return [item[0] if isinstance(item, (tuple, list)) else str(item) for item in value or []]


def _read_slots(slots: dict[str, Any]) -> dict[str, list[str]]:
    """Class slots -> {class name: image paths}. Empty slots (no name, no images) are skipped.

    Raises:
        SupportError: a slot with images but no name, a name that is too long, or two slots with the same name.
    """
    support: dict[str, list[str]] = {}
    slot_of: dict[str, int] = {}
    for i in range(1, MAX_CLASSES + 1):
        raw, files = _text(slots.get(f"class_{i}_name"), f"name of class {i}"), _paths(slots.get(f"class_{i}_images"))
        if any(ch in raw for ch in "\n\r\v\f\x85\u2028\u2029"):
            raise SupportError(f"Class {i}'s name contains a line break; a class name is one line of text.")
        name = clean_class_name(raw)
        if not name and not files:
            if raw.strip():
                raise SupportError(f"Class {i}'s name has only invisible characters. Give it a visible name.")
            continue
        if not name:
            raise SupportError(f"Class {i} has {len(files)} image(s) but no name. Give every class a name.")
        if len(name) > MAX_NAME_LENGTH:
            raise SupportError(f"Class {i}'s name is {len(name)} characters long; at most {MAX_NAME_LENGTH}.")
        if name in slot_of:
            raise SupportError(f"Classes {slot_of[name]} and {i} are both named '{name}'. Class names must be unique "
                               "(invisible characters and accents written differently do not count).")
        slot_of[name] = i
        support[name] = files
    return support


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumbnail(path: str) -> str:
    try:
        image = load_image(path, max_side=1024)  # upright RGB, as the model saw it
    except ImageError:
        return ""
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    return _data_uri(image)


def _bar(value: float, kind: str) -> str:
    return (f'<div class="rc-track"><div class="rc-bar rc-{kind}" style="width:{100 * value:.1f}%"></div></div>'
            f'<span class="rc-val">{100 * value:.0f}%</span>')


def probability_cards(predictions: list[Prediction], thumbnails: list[str],
                      bare: Optional[list[Prediction]] = None, lora: str = "") -> str:
    """HTML: one card per query with its thumbnail, its predicted class and a probability bar per class; with `bare`
    (the backbone alone), a second bar per class and both predictions, side by side."""
    esc = lambda s: html.escape(str(s))  # noqa: E731
    parts = ['<div class="rc-cards">']
    if bare is not None:
        agree = sum(p.label == b.label for p, b in zip(predictions, bare))
        parts.append(f'<div class="rc-summary">With the meta-LoRA <code>{esc(Path(lora).name or lora)}</code> and '
                     f'with the backbone alone, <b>{agree} of {len(predictions)}</b> predictions agree. '
                     '<span class="rc-key"><i class="rc-swatch rc-main"></i>with meta-LoRA</span>'
                     '<span class="rc-key"><i class="rc-swatch rc-bare"></i>backbone alone</span></div>')
    for i, (p, thumb) in enumerate(zip(predictions[:MAX_CARDS], thumbnails)):
        b = bare[i] if bare is not None else None
        changed = b is not None and b.label != p.label
        parts.append(f'<div class="rc-card" data-query="{esc(p.file)}" data-label="{esc(p.label)}"'
                     + (f' data-bare-label="{esc(b.label)}"' if b else "") + ">")
        parts.append(f'<img class="rc-thumb" alt="{esc(p.file)}" src="{thumb}">' if thumb else
                     '<div class="rc-thumb"></div>')
        parts.append(f'<div class="rc-body"><div class="rc-title"><span class="rc-file">{esc(p.file)}</span> '
                     f'<span class="rc-pred">→ <bdi>{esc(p.label)}</bdi></span>')
        if b is not None:
            parts.append(f' <span class="rc-badge{" rc-changed" if changed else ""}">backbone alone: '
                         f'<bdi>{esc(b.label)}</bdi></span>')
        parts.append("</div>")
        for name, value in p.probs.items():
            best = " rc-best" if name == p.label else ""
            parts.append(f'<div class="rc-row{best}"><span class="rc-name"><bdi>{esc(name)}</bdi></span>'
                         f'<div class="rc-bars"><div class="rc-line">{_bar(value, "main")}</div>')
            if b is not None:
                parts.append(f'<div class="rc-line">{_bar(b.probs[name], "bare")}</div>')
            parts.append("</div></div>")
        parts.append("</div></div>")
    if len(predictions) > MAX_CARDS:
        parts.append(f'<div class="rc-summary">Showing the first {MAX_CARDS} of {len(predictions)} queries; the '
                     "table below has all of them.</div>")
    parts.append("</div>")
    return "".join(parts)


def _table(predictions: list[Prediction], bare: Optional[list[Prediction]]) -> dict[str, list]:
    classes = list(predictions[0].probs)
    headers = ["query", "prediction", *(f"p({c})" for c in classes)]
    rows = [[p.file, p.label, *(round(p.probs[c], 4) for c in classes)] for p in predictions]
    if bare is not None:
        headers.append("backbone alone")
        for row, b in zip(rows, bare):
            row.append(b.label)
    return {"headers": headers, "data": rows}


EMPTY_CARDS = '<div class="rc-empty">Predictions appear here: one card per query with a bar for each class.</div>'


class FewShot:
    """Handlers of the few-shot tab and the shared status line."""

    def __init__(self, cache: ModelCache, defaults: Defaults, policy: PathPolicy):
        self.cache = cache
        self.defaults = defaults
        self.policy = policy

    @property
    def default_backbone(self) -> str:
        return self.defaults.backbone

    def _model(self, backbone: Optional[str], lora: Optional[str]) -> tuple[str, str]:
        backbone = _field(backbone, "backbone name") or self.defaults.backbone
        return self.policy.backbone(backbone), self.policy.lora(lora)

    def status(self, backbone: Optional[str], lora: Optional[str]) -> str:
        """Load the chosen backbone and LoRA, and say whether they are ready or what is missing."""
        note = f"{self.defaults.note}\n\n" if self.defaults.note and (backbone or "") in (
            "", self.defaults.backbone) else ""
        try:
            backbone, lora = self._model(backbone, lora)
            with self.cache.classifier(backbone, lora) as classifier:
                model = classifier.backbone
        except USER_ERRORS as e:
            return f"{note}⚠️ **Not ready.** {_message(e)}"
        except Exception:  # noqa: BLE001 - reported in the UI, details in the log
            _logger.exception("loading %s with LoRA %r failed", backbone, lora)
            return (f"{note}⚠️ **Not ready.** Loading `{backbone}` failed unexpectedly; the details are in the server "
                    "log.")
        embedding = "CLIP projection" if model.embedding == "projection" else "[CLS]"
        with_lora = f" with meta-LoRA `{lora}`" if lora else ""
        _, h, w = model.input_size
        return (f"{note}✅ **Ready:** `{backbone}`{with_lora}: {embedding} embedding ({model.embed_dim}-d), "
                f"{w}×{h} px input, on {model.device}.")

    def classify(self, backbone: Optional[str], lora: Optional[str], queries: Optional[list[str]],
                 **slots: Any) -> tuple[str, dict[str, list]]:
        """Fit the classes in the slots (``class_{i}_name``, ``class_{i}_images``) and predict every query; with a
        LoRA, also with the backbone alone, for comparison.

        Returns:
            The probability cards (HTML) and the table of all probabilities.
        """
        with _reported("Cannot classify", "classifying"):
            backbone, lora = self._model(backbone, lora)
            support = _read_slots(slots)
            query_items = [(Path(p).name, p) for p in _paths(queries)]
            count = sum(map(len, support.values())) + len(query_items)
            if count > MAX_IMAGES:
                raise SupportError(f"Too many images ({count}); at most {MAX_IMAGES} per run.")
            with self.cache.classifier(backbone, lora) as classifier:
                predictions = classify(classifier, support, query_items)
            bare = None
            if lora:
                with self.cache.classifier(backbone, "") as classifier:
                    bare = classify(classifier, support, query_items)
            thumbnails = [_thumbnail(path) for _, path in query_items[:MAX_CARDS]]
            return probability_cards(predictions, thumbnails, bare, lora), _table(predictions, bare)

    @staticmethod
    def add_class(shown: int) -> tuple:
        """Reveal the next class slot; the button is disabled once all `MAX_CLASSES` are shown."""
        shown = min(int(shown or INITIAL_CLASSES) + 1, MAX_CLASSES)
        slots = [gr.update(visible=i < shown) for i in range(MAX_CLASSES)]
        return shown, *slots, gr.update(interactive=shown < MAX_CLASSES)


# ------------------------------------------------------------------------------------------------ inversion tab
@dataclass
class LoadedLoRA:
    adapter: LoRAAdapter
    source: str  # Hub id, path, or "upload: <file names>"
    backbone: str  # the backbone it was loaded (and checked) for


@dataclass
class InversionRun:
    """A finished inversion of one session: what the pool needs, and the zip offered for download."""

    lora: LoRAAdapter
    source: str
    result: InversionResult
    settings: dict
    grid: tuple[int, int]
    folder: Path  # temporary folder holding the zip
    zip_path: Optional[Path] = None
    pooled: Optional[Path] = None

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _stage_upload(files: Sequence[str], folder: Path) -> Path:
    """Uploaded LoRA files -> a path `read_adapter` understands (a PEFT folder or a single .safetensors file).

    Raises:
        LoRAFormatError: no weights, pickles, more than one weights file, or files of another kind.
    """
    paths = [Path(f) for f in files]
    if len(paths) > MAX_LORA_FILES:
        raise LoRAFormatError(f"{len(paths)} files uploaded; a LoRA is at most adapter_config.json plus "
                              "adapter_model.safetensors")
    pickles = [p.name for p in paths if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise LoRAFormatError(f"{', '.join(pickles)}: pickled weights are never loaded, because unpickling can run "
                              "arbitrary code. Upload a .safetensors file.")
    weights = [p for p in paths if p.suffix.lower() == ".safetensors"]
    configs = [p for p in paths if p.suffix.lower() == ".json"]
    other = [p.name for p in paths if p not in weights and p not in configs]
    if other:
        raise LoRAFormatError(f"{', '.join(other)}: not a LoRA file; upload adapter_config.json and "
                              "adapter_model.safetensors, or one official .safetensors file")
    if not weights:
        raise LoRAFormatError("no weights uploaded: add adapter_model.safetensors (or an official .safetensors file)")
    if len(weights) > 1 or len(configs) > 1:
        raise LoRAFormatError(f"upload one LoRA at a time: got {len(weights)} .safetensors and {len(configs)} .json "
                              "files")
    if not configs:
        return weights[0]
    shutil.copyfile(configs[0], folder / "adapter_config.json")
    shutil.copyfile(weights[0], folder / "adapter_model.safetensors")
    return folder


def _display(images: torch.Tensor) -> list[Image.Image]:
    """``(N, 3, H, W)`` in [0, 1] -> PIL images, small ones enlarged with nearest neighbour so pixels stay crisp."""
    out = []
    for image in images:
        arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr, "RGB")
        factor = math.ceil(DISPLAY_SIZE / max(pil.size))
        if factor > 1:
            pil = pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)
        out.append(pil)
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _code(text: str) -> str:
    """`text` made safe inside a markdown code span."""
    return str(text).replace("`", "'")


def _confidence(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return logits.float().softmax(-1).gather(1, labels.view(-1, 1).long()).flatten().tolist()


def _number(value: Any, what: str, low: float, high: float, whole: bool = True) -> Any:
    """A numeric input in ``[low, high]`` (an int when `whole`); other types and values are refused, naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"The {what} must be a number, got {_kind(value)}.")
    try:
        number = value if isinstance(value, int) else float(value)
    except ValueError:
        raise InputError(f"The {what} must be a number, got {value[:40]!r}.") from None
    if not (low <= number <= high) or (whole and number != int(number)):  # NaN fails the first test
        kind, bounds = ("a whole number", (int(low), int(high))) if whole else ("a number", (low, high))
        shown = f"{number:.6g}" if isinstance(number, float) else str(number) if number < 10 ** 24 else \
            f"{str(number)[:12]}… ({len(str(number))} digits)"
        raise InputError(f"The {what} must be {kind} from {bounds[0]} to {bounds[1]}, got {shown}.")
    return int(number) if whole else number


def _parse_pruning(text: Optional[str]) -> dict[int, float]:
    text = _text(text, "token pruning setting (a preset, or LAYER:RATIO such as '-1:0.75')").strip()
    if text.lower() in ("", "none", "0", "off"):
        return {}
    try:
        schedule = parse_schedule([s for s in text.replace(";", " ").split() if s])
        PruningConfig(schedule)
    except ValueError as e:
        raise InputError(f"Pruning schedule '{text}': {e}. Write LAYER:RATIO, e.g. '-1:0.75' (last block, drop "
                              "75%) or '3,7:0.3', or choose 'none'.") from None
    return schedule


class Inversion:
    """Handlers of the inversion tab: load a LoRA (Hub id or upload), invert it with live previews, stop, keep the
    latest result per session, add it to the pool, download it as a zip."""

    def __init__(self, cache: ModelCache, policy: PathPolicy, settings: AppSettings, default_backbone: str):
        self.cache = cache
        self.policy = policy
        self.settings = settings
        self.default_backbone = default_backbone
        self.loras: SessionStore[LoadedLoRA] = SessionStore(SESSIONS)
        self.runs: SessionStore[InversionRun] = SessionStore(RESULT_SESSIONS, on_evict=InversionRun.discard)
        self._stops: dict[str, threading.Event] = {}
        self._running = threading.Lock()  # one inversion at a time, even if a cancelled one is still winding down
        self._tmp = Path(tempfile.mkdtemp(prefix="recycle-app-"))

    # ---- loading
    def _backbone_name(self, backbone: Optional[str]) -> str:
        return self.policy.backbone(_field(backbone, "backbone name") or self.default_backbone)

    def load(self, backbone: Optional[str], hub_id: Optional[str], files: Optional[list[str]],
             request: gr.Request = None) -> tuple[str, dict]:
        """Load the LoRA to invert: the uploaded files if any, else the Hub id. Shows its backbone and classes.

        Returns:
            The LoRA's card (markdown) and an update of the class checkboxes.
        """
        with _reported("Cannot load the LoRA", "loading the LoRA"):
            name = self._backbone_name(backbone)
            uploads = _paths(files)
            hub_id = _field(hub_id, "LoRA name")
            if not uploads and not hub_id:
                raise InputError("Enter a Hub id (ORG/NAME) or upload the LoRA's files first.")
            model = self.cache.backbone(name)  # needed to map an official file's head, and to check the fit
            if uploads:
                uploaded = next((Path(f).name for f in uploads if f.endswith(".safetensors")), "LoRA")
                source = "upload:" + uploaded
                with tempfile.TemporaryDirectory(dir=self._tmp) as tmp:
                    adapter = read_adapter(_stage_upload(uploads, Path(tmp)), model, uploaded)
            else:
                source = hub_id
                adapter = self.policy.load_lora(hub_id, model)
            if adapter.head_weight is None:
                raise LoRAFormatError("This LoRA has no classification head, so there is nothing to invert (a "
                                      "meta-LoRA, for example, has none). Load a LoRA tuned with a head.")
            fit = self._fit(adapter, model, name)
            self.loras.set(_session(request), LoadedLoRA(adapter, source, name))
            names = adapter.class_names or []
            c = adapter.config
            card = "\n".join([
                f"**Loaded** `{_code(source)}`: {len(names)} classes; LoRA on {', '.join(c.targets)}, rank {c.rank}, "
                f"scale {c.scaling:g}; made for backbone `{_code(adapter.backbone or 'unknown')}`.",
                "", fit, "", "**Classes:** " + ", ".join(f"<bdi>{html.escape(n)}</bdi>" for n in names)])
            choices = [(n, i) for i, n in enumerate(names)]
            return card, gr.update(choices=choices, value=[i for _, i in choices[:2]],
                                   info=f"{len(choices)} classes; fewer classes and images make a quicker run.")

    @staticmethod
    def _fit(adapter: LoRAAdapter, model: Backbone, name: str) -> str:
        try:
            with adapter.attached(model):
                adapter.build_head(model.num_features)
        except LoRAFormatError as e:
            return (f"⚠️ It does **not fit** the selected backbone `{name}`: {_message(e)}. "
                    "Choose the backbone it was made for at the top of the page, then load it again.")
        return f"✅ Fits the selected backbone `{name}`: choose the classes and press **Invert**."

    # ---- running
    def _config(self, classes: Optional[list], per_class: Any, steps: Any, pruning: Optional[str], lr: Any,
                seed: Any) -> tuple[list[int], InversionConfig]:
        if not classes:
            raise InputError("Choose at least one class to invert.")
        if not isinstance(classes, list):
            raise InputError(f"The classes must be a list of class choices, got {_kind(classes)}.")
        per_class = _number(per_class, "number of images per class", 1, MAX_INVERT_IMAGES)
        steps = _number(steps, "number of steps", 1, MAX_INVERT_STEPS)
        seed = _number(seed or 0, "seed", 0, MAX_SEED)
        lr = _number(lr, "learning rate", 0, 10, whole=False)
        if per_class * len(classes) > MAX_INVERT_IMAGES:
            raise InputError(f"{len(classes)} classes × {per_class} images = {len(classes) * per_class} images; "
                             f"at most {MAX_INVERT_IMAGES} per run. Choose fewer classes or images per class.")
        if lr == 0:
            raise InputError("The learning rate must be above 0.")
        schedule = _parse_pruning(pruning)
        preview = max(1, min(10, steps // 20))
        try:
            config = InversionConfig(per_class=per_class, steps=steps, lr=lr, seed=seed, preview_every=preview,
                                     pruning=PruningConfig(schedule or {-1: 0.0}))
        except ValueError as e:
            raise InputError(f"Inversion settings: {e}.") from None
        return [self._class_index(c) for c in classes], config

    @staticmethod
    def _class_index(c: Any) -> int:
        try:
            return int(c)
        except (TypeError, ValueError):
            raise InputError(f"Unknown class {c!r}: choose classes from the list.") from None

    def run(self, backbone: Optional[str], classes: Optional[list], per_class: Any, steps: Any,
            pruning: Optional[str], bn_prior: bool, lr: Any, seed: Any, request: gr.Request = None,
            progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:
        """Invert the session's LoRA with live previews; the last update adds the masked images and the zip.

        Yields:
            (images gallery, masked gallery, status markdown, zip file, "add to pool" button update).
        """
        session = _session(request)
        with _reported("Cannot invert", "inverting"):
            loaded = self.loras.get(session)
            if loaded is None:
                raise InputError("Load a LoRA first (step 1): enter a Hub id or upload its files.")
            name = self._backbone_name(backbone)
            if name != loaded.backbone:
                raise InputError(f"The backbone changed to `{name}` since the LoRA was loaded for "
                                      f"`{loaded.backbone}`; load the LoRA again.")
            targets, config = self._config(classes, per_class, steps, pruning, lr, seed)
            names = loaded.adapter.class_names or []
            for t in targets:
                if not 0 <= t < loaded.adapter.num_classes:
                    raise InputError(f"Class index {t} is out of range: the LoRA has {loaded.adapter.num_classes}"
                                          " classes.")
        off = gr.update(value=None, interactive=False)
        yield [], [], "⏳ Preparing the backbone…", off, gr.update(interactive=False)
        with _reported("Cannot invert", "inverting"):
            model = self.cache.inverter(name)
            try:
                config.pruning.resolved(len(model.model.blocks))
            except ValueError as e:
                raise InputError(f"Pruning schedule: {e}.") from None
            prior = self.cache.bn_prior() if bn_prior else None
            with loaded.adapter.attached(model):  # fails now, with a clear message, if it does not fit
                pass
        stop = threading.Event()
        self._stops[session] = stop
        updates: queue.Queue = queue.Queue()
        outcome: dict[str, Any] = {}

        def work() -> None:
            with self._running:
                try:
                    outcome["result"] = invert(model, loaded.adapter, config, targets, prior,
                                               progress=updates.put, should_stop=stop.is_set)
                except BaseException as e:  # noqa: BLE001 - handed to the generator, which reports it
                    outcome["error"] = e
                finally:
                    updates.put(None)

        labels = [names[t] for t in targets for _ in range(config.per_class)]
        started = time.monotonic()
        worker = threading.Thread(target=work, name="inversion", daemon=True)
        waiting = self._running.locked()
        worker.start()
        try:
            if waiting:
                yield [], [], "⏳ Waiting for the previous inversion to stop…", off, gr.update(interactive=False)
            done, shown_at, preview = False, 0.0, None
            while not done:
                latest = None
                try:
                    item = updates.get(timeout=0.5)
                    while True:
                        if item is None:
                            done = True
                            break
                        latest = item
                        preview = item.preview if item.preview is not None else preview
                        item = updates.get_nowait()
                except queue.Empty:
                    pass
                if latest is not None:
                    text = self._progress_text(latest, time.monotonic() - started, stop.is_set())
                    progress(latest.step / latest.steps, desc=text)
                    if preview is not None and time.monotonic() - shown_at >= PREVIEW_INTERVAL:
                        gallery = list(zip(_display(preview), [f"{c} · step {latest.step}" for c in labels]))
                        preview, shown_at = None, time.monotonic()
                        yield gallery, [], f"⏳ {text}", gr.update(), gr.update()
            worker.join()
            with _reported("Cannot invert", "inverting"):
                if "error" in outcome:
                    raise outcome["error"]
                yield self._finish(session, loaded, outcome["result"], config, name, prior is not None, targets,
                                   time.monotonic() - started)
        finally:
            stop.set()  # a cancelled or failed run stops its worker too
            if self._stops.get(session) is stop:
                del self._stops[session]

    @staticmethod
    def _progress_text(p: InversionProgress, elapsed: float, stopping: bool) -> str:
        left = elapsed / max(p.step, 1) * (p.steps - p.step)
        prune = " · pruning tokens" if p.pruning else ""
        stop = " · stopping…" if stopping else ""
        return (f"Step {p.step}/{p.steps} · loss {p.loss:.3f} · teacher accuracy {100 * p.accuracy:.0f}%{prune} · "
                f"{elapsed:.0f} s elapsed, ~{left:.0f} s left{stop}")

    def _finish(self, session: str, loaded: LoadedLoRA, result: InversionResult, config: InversionConfig,
                backbone: str, bn_prior: bool, targets: list[int], seconds: float) -> tuple:
        names = loaded.adapter.class_names or [str(i) for i in range(loaded.adapter.num_classes)]
        model = self.cache.inverter(backbone)
        grid = tuple(model.model.patch_embed.grid_size)
        settings = {**dataclasses.asdict(config), "backbone": backbone, "classes": [names[t] for t in targets],
                    "bn_prior": DEFAULT_BN_PRIOR if bn_prior else None, "made_by": "app"}
        settings["pruning"]["schedule"] = {str(k): v for k, v in config.pruning.schedule.items() if v > 0}
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self._tmp))
        run = InversionRun(loaded.adapter, loaded.source, result, settings, grid, folder)
        run_dir = write_run(folder / "pool", result, loaded.adapter, loaded.source, settings, grid)
        run.zip_path = folder / f"{run_dir.name}.zip"
        with zipfile.ZipFile(run.zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(run_dir.rglob("*")):
                if f.is_file():
                    zf.write(f, f"{run_dir.name}/{f.relative_to(run_dir)}")
        shutil.rmtree(folder / "pool", ignore_errors=True)
        self.runs.set(session, run)
        labels = result.labels
        conf = _confidence(result.logits, labels)
        gallery = [(im, f"{names[int(y)]} · p={c:.2f}") for im, y, c in zip(_display(result.images), labels, conf)]
        masked = []
        if result.masked is not None:
            total = grid[0] * grid[1]
            conf_kept = _confidence(result.logits_kept, labels)
            masked = [(im, f"{names[int(y)]} · {k.numel()}/{total} · p={c:.2f}")
                      for im, y, k, c in zip(_display(result.masked), labels, result.kept, conf_kept)]
        mean = sum(conf) / len(conf)
        how = (f"⏹ **Stopped** after {result.steps_done} of {config.steps} steps: these are the best images so far."
               if result.stopped else f"✅ **Done:** {config.steps} steps in {seconds:.0f} s.")
        status = (f"{how} {len(labels)} images; the teacher's mean confidence in their class is {mean:.2f}. "
                  + ("The masked versions keep the patches the [CLS] token attended to most. " if masked else "")
                  + "Add them to the pool, or download them as a zip.")
        return (gallery, masked, status, gr.update(value=str(run.zip_path), interactive=True),
                gr.update(interactive=True))

    def stop(self, request: gr.Request = None) -> str:
        """Ask this session's running inversion to stop; it returns the best images so far."""
        event = self._stops.get(_session(request))
        if event is None:
            return "Nothing is running."
        event.set()
        return "⏹ Stopping… the best images so far will be shown."

    def add_to_pool(self, request: gr.Request = None) -> str:
        """Write this session's latest inversion into the pool folder."""
        with _reported("Cannot add to the pool", "adding to the pool"):
            run = self.runs.get(_session(request))
            if run is None:
                raise InputError("There is no inversion to add yet: run one first.")
            if run.pooled is not None:
                return f"Already in the pool as `{run.pooled.name}`."
            run.pooled = write_run(self.settings.pool, run.result, run.lora, run.source, run.settings, run.grid)
            n = run.result.images.shape[0]
            return (f"✅ Added {n} images to the pool at `{self.settings.pool}` as `{run.pooled.name}`. See the "
                    "Surrogate pool tab.")


# ------------------------------------------------------------------------------------------------------ pool tab
class PoolBrowser:
    """Handlers of the pool tab: sources (LoRAs) and classes, images with their teacher confidences and settings."""

    def __init__(self, policy: PathPolicy, settings: AppSettings):
        self.policy = policy
        self.settings = settings

    def _open(self, folder: Optional[str]) -> Pool:
        return Pool(self.policy.folder(folder or "", self.settings.pool))

    @staticmethod
    def _source_choices(pool: Pool) -> list[tuple[str, str]]:
        return [(f"{s['name']} ({fp[:8]}): {_plural(len(s['class_names']), 'class')}, {_plural(s['images'], 'image')}",
                 fp)
                for fp, s in pool.sources().items()]

    @staticmethod
    def _class_choices(pool: Pool, source: Optional[str]) -> list[tuple[str, str]]:
        return [(f"{c.name} ({len(c.items)})", str(c.label)) for c in pool.classes if c.source == source]

    def open(self, folder: Optional[str]) -> tuple:
        """Open the pool: its summary and the source list, with the first source and class shown.

        Returns:
            (summary markdown, source dropdown, class dropdown, images, masked images, details markdown, settings).
        """
        with _reported("Cannot open the pool", "opening the pool"):
            pool = self._open(folder)
            sources = self._source_choices(pool)
            source = sources[0][1]
            classes = self._class_choices(pool, source)
            images = sum(len(r["items"]) for r in pool.runs)
            summary = (f"**{pool.root}**: {_plural(len(pool.runs), 'inversion run')} from "
                       f"{_plural(len(sources), 'LoRA')}, {_plural(len(pool.classes), 'class')}, "
                       f"{_plural(images, 'image')}" + (", with masked versions." if pool.masked_available else "."))
            shown = self._show(pool, source, classes[0][1])
            return (summary, gr.update(choices=sources, value=source), gr.update(choices=classes, value=classes[0][1]),
                    *shown)

    def refresh(self, folder: Optional[str]) -> tuple:
        """Like `open`, but a missing or empty pool is explained in the summary instead of raised."""
        try:
            return self.open(folder)
        except gr.Error as e:
            empty = gr.update(choices=[], value=None)
            hint = (" Invert a LoRA in the **Invert a LoRA** tab and press **Add to pool**."
                    if "no runs" in e.message or "does not exist" in e.message else "")
            return f"ℹ️ {e.message}.{hint}", empty, empty, [], [], "", None

    def choose_source(self, folder: Optional[str], source: Optional[str]) -> tuple:
        """The classes of `source`, with the first one shown."""
        with _reported("Cannot open the pool", "opening the pool"):
            pool = self._open(folder)
            classes = self._class_choices(pool, source)
            if not classes:
                raise PoolError(f"The pool has no LoRA with fingerprint '{source}'. Press Refresh.")
            return gr.update(choices=classes, value=classes[0][1]), *self._show(pool, source, classes[0][1])

    def show(self, folder: Optional[str], source: Optional[str], label: Optional[str]) -> tuple:
        """Images of one class of one source: unmasked and masked, captioned with the teacher's confidence."""
        with _reported("Cannot open the pool", "showing pool images"):
            return self._show(self._open(folder), source, label)

    @staticmethod
    def _show(pool: Pool, source: Optional[str], label: Optional[str]) -> tuple:
        match = [c for c in pool.classes if c.source == source and str(c.label) == str(label)]
        if not match:
            raise PoolError(f"The pool has no class {label!r} from LoRA {source!r}. Press Refresh.")
        cls = match[0]
        items = cls.items[:MAX_POOL_GALLERY]
        images, masked, conf, conf_kept = [], [], [], []
        for ref in items:
            item = pool.item(ref)
            image = pool.load(ref)
            p = torch.tensor(item["logits"]).softmax(-1)[cls.label].item()
            conf.append(p)
            images.append((_display(image[None])[0], f"p={p:.2f} · run {ref.run + 1}"))
            if "masked" in item:
                pk = torch.tensor(item["logits_kept"]).softmax(-1)[cls.label].item()
                conf_kept.append(pk)
                masked.append((_display(pool.load(ref, masked=True)[None])[0],
                               f"{len(item['kept'])} patches · p={pk:.2f}"))
        runs = sorted({ref.run for ref in items})
        settings = {pool.run_dirs[r].name: {"settings": pool.runs[r]["settings"],
                                            "steps_done": pool.runs[r].get("steps_done"),
                                            "stopped": pool.runs[r].get("stopped"),
                                            "created": pool.runs[r].get("created")} for r in runs}
        shown = (f"showing {len(items)} of {len(cls.items)}" if len(cls.items) > len(items) else
                 _plural(len(items), "image"))
        details = (f"**<bdi>{html.escape(cls.name)}</bdi>** ({shown}): the teacher LoRA's mean confidence in this "
                   f"class is **{sum(conf) / len(conf):.2f}** on the images"
                   + (f" and **{sum(conf_kept) / len(conf_kept):.2f}** on their kept tokens." if conf_kept else "."))
        return images, masked, details, settings

