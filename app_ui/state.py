"""What the app holds between requests, bounded: loaded models (`ModelCache`) and per-session values
(`SessionStore`). Thread-safe."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

import gradio as gr

from recycle.backbone import Backbone, BackboneError, load_backbone
from recycle.fewshot import FewShotClassifier
from recycle.formats import LoRAAdapter, load_lora
from recycle.invert import DEFAULT_BN_PRIOR, BNPrior, load_bn_prior
from recycle.quantize import choose_precision
from recycle.runtime import INFERENCE_PRECISIONS, resolve_inference_precision

_logger = logging.getLogger("recycle.app")

T = TypeVar("T")


class ModelCache:
    """Loaded backbones and few-shot classifiers, each in a small LRU so that memory stays bounded. Thread-safe.

    A classifier is keyed by (backbone, LoRA) and keeps its embedding cache between requests; evicting a backbone
    drops its classifiers too. Inversion gets its own copy of one backbone (`inverter`), because inverting holds
    the backbone for minutes and predictions must not wait for it. Loads run one at a time; cached models are
    served while a load is in progress.
    """

    def __init__(
        self,
        max_backbones: int = 2,
        max_classifiers: int = 4,
        device: Optional[str] = None,
        lora_loader: Optional[Callable[[str, Backbone], LoRAAdapter]] = None,
        precision: str = "fp32",
    ):
        if precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"precision={precision!r}: choose from {', '.join(INFERENCE_PRECISIONS)}")
        self.max_backbones = max_backbones
        self.max_classifiers = max_classifiers
        self.device = device
        self.precision = precision
        self._precisions: dict[str, tuple[str, str]] = {}  # backbone name -> (fp32 | bf16 | int8, why)
        self.lora_loader = lora_loader or load_lora
        self._lock = threading.Lock()  # guards the tables; held briefly
        self._load_lock = threading.RLock()  # serialises loads, so nothing is loaded twice
        self._backbones: OrderedDict[str, Backbone] = OrderedDict()
        self._classifiers: OrderedDict[tuple[str, str], tuple[FewShotClassifier, threading.Lock]] = OrderedDict()
        self._inverter: Optional[tuple[str, Backbone]] = None
        self._prior: Optional[tuple[str, BNPrior]] = None

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
            precision = self._choose_precision(backbone)
            with self._lock:
                self._backbones[name] = backbone
                self._precisions[name] = precision
                while len(self._backbones) > self.max_backbones:
                    evicted, _ = self._backbones.popitem(last=False)
                    self._precisions.pop(evicted, None)
                    for key in [k for k in self._classifiers if k[0] == evicted]:
                        del self._classifiers[key]
                    _logger.info("evicted backbone %s", evicted)
            return backbone

    def _choose_precision(self, backbone: Backbone) -> tuple[str, str]:
        """The arithmetic predictions run in on `backbone`, decided once when it loads: `precision`, or for
        ``auto`` a short calibration (`recycle.quantize.choose_precision`). A precision the device cannot run
        (int8 off the CPU, or without int8 kernels) falls back to fp32, saying why."""
        if self.precision == "auto":
            return choose_precision(backbone)
        try:
            return resolve_inference_precision(self.precision, backbone.device)
        except ValueError as e:
            _logger.warning("%s; using fp32", e)
            return "fp32", f"{self.precision} cannot run here"

    def precision_of(self, backbone: str) -> tuple[str, str]:
        """``(fp32 | bf16 | int8, why)`` for a loaded backbone (``("fp32", "")`` for one not loaded)."""
        with self._lock:
            return self._precisions.get(backbone, ("fp32", ""))

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
                    precision, _ = self.precision_of(backbone)
                    classifier = FewShotClassifier(model, adapter, bf16=precision == "bf16", int8=precision == "int8")
                    entry = (classifier, threading.Lock())
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

    def bn_prior(self, name: str = DEFAULT_BN_PRIOR) -> BNPrior:
        """The BN-statistics prior `name` (the paper's ImageNet ResNet-50 from the Hub by default, or a local folder
        the app chose), loaded once; one prior is kept."""
        with self._load_lock:
            if self._prior is None or self._prior[0] != name:
                self._prior = None
                try:
                    device = self._inverter[1].device if self._inverter else None
                    self._prior = (name, load_bn_prior(name, device=device))
                except BackboneError as e:
                    raise BackboneError(f"{e} Untick 'BN-statistics prior' to invert without it.") from None
            return self._prior[1]


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


def session_id(request: Optional[gr.Request]) -> str:
    return getattr(request, "session_hash", None) or "default"
