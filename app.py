"""LoRA Recycle web app: classify images from a few labelled examples per class, without any training.

Layout, wiring and thin handlers only; the work is done by `recycle` (`recycle.predict.classify` on a
`recycle.fewshot.FewShotClassifier`). Run ``python app.py``; ``GRADIO_SERVER_NAME`` and ``GRADIO_SERVER_PORT``
choose the address, and ``RECYCLE_BACKBONE`` the default backbone (a timm name, an alias, ``hf-hub:ORG/REPO`` or a
local directory). Backbones load on first use, so the app starts even when the Hugging Face Hub is unreachable; the
status line says what is missing.
"""
from __future__ import annotations

import contextlib
import html
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Optional

import gradio as gr
from PIL import Image

from recycle.backbone import ALIASES, DEFAULT_BACKBONE, Backbone, BackboneError, load_backbone
from recycle.fewshot import FewShotClassifier
from recycle.formats import LoRAFormatError, load_lora
from recycle.hub import HubError
from recycle.images import ImageError, load_image
from recycle.predict import Prediction, SupportError, classify, clean_class_name

__all__ = ["MAX_CLASSES", "ModelCache", "FewShot", "build_demo", "launch_options", "main"]

_logger = logging.getLogger("recycle.app")

MAX_CLASSES = 8  # class slots in the few-shot tab
INITIAL_CLASSES = 2  # slots shown before "Add class" is pressed
MAX_IMAGES = 200  # support + query images in one request
MAX_FILE_SIZE = "20mb"  # per uploaded file
THUMBNAIL_SIZE = 256  # longest side of the images in the predictions gallery
# Errors whose message is written for the end user: shown as they are.
USER_ERRORS = (SupportError, ImageError, BackboneError, LoRAFormatError, HubError)

DESCRIPTION = """\
# LoRA Recycle
Tuning-free few-shot classification ([Hu et al., CVPR 2025](https://arxiv.org/abs/2412.02220)): give a name and a
few example images for each class, add the images to classify, and press **Run**. Each query goes to the class
whose mean embedding (prototype) is nearest; nothing is trained.
"""
CSS = """
#status p { margin: 0; }
"""


class ModelCache:
    """Loaded backbones and few-shot classifiers, each in a small LRU so that memory stays bounded. Thread-safe.

    A classifier is keyed by (backbone, LoRA) and keeps its embedding cache between requests; evicting a backbone
    drops its classifiers too. Loads run one at a time; cached models are served while a load is in progress.
    """

    def __init__(self, max_backbones: int = 2, max_classifiers: int = 4, device: Optional[str] = None):
        self.max_backbones = max_backbones
        self.max_classifiers = max_classifiers
        self.device = device
        self._lock = threading.Lock()  # guards the two tables; held briefly
        self._load_lock = threading.RLock()  # serialises loads, so nothing is loaded twice
        self._backbones: OrderedDict[str, Backbone] = OrderedDict()
        self._classifiers: OrderedDict[tuple[str, str], tuple[FewShotClassifier, threading.Lock]] = OrderedDict()

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
                    adapter = load_lora(lora, model) if lora else None
                    entry = (FewShotClassifier(model, adapter), threading.Lock())
                    with self._lock:
                        self._classifiers[key] = entry
                        while len(self._classifiers) > self.max_classifiers:
                            self._classifiers.popitem(last=False)
        classifier, in_use = entry
        with in_use:  # fit() and predict_proba() share state on the classifier
            yield classifier


def _paths(value: Optional[list]) -> list[str]:
    """File paths from a gr.File (paths) or gr.Gallery ((path, caption) pairs) value."""
    return [item[0] if isinstance(item, (tuple, list)) else str(item) for item in value or []]


def _read_slots(slots: dict[str, Any]) -> dict[str, list[str]]:
    """Class slots -> {class name: image paths}. Empty slots (no name, no images) are skipped.

    Raises:
        SupportError: a slot with images but no name, or two slots with the same name.
    """
    support: dict[str, list[str]] = {}
    slot_of: dict[str, int] = {}
    for i in range(1, MAX_CLASSES + 1):
        raw, files = slots.get(f"class_{i}_name") or "", _paths(slots.get(f"class_{i}_images"))
        if not raw.strip() and not files:
            continue
        name = clean_class_name(raw)
        if not name:
            raise SupportError(f"Class {i} has {len(files)} image(s) but no name. Give every class a name.")
        if name in slot_of:
            raise SupportError(f"Classes {slot_of[name]} and {i} are both named '{name}'. Class names must be unique.")
        slot_of[name] = i
        support[name] = files
    return support


def _thumbnail(path: str) -> Image.Image:
    image = load_image(path)  # upright RGB, as the model saw it
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    return image


def _table(predictions: list[Prediction]) -> dict[str, list]:
    classes = list(predictions[0].probs)
    rows = [[p.file, p.label, *(round(p.probs[c], 4) for c in classes)] for p in predictions]
    return {"headers": ["query", "prediction", *(f"p({c})" for c in classes)], "data": rows}


class FewShot:
    """Handlers of the few-shot tab: UI values in, `recycle` calls, UI values out."""

    def __init__(self, cache: ModelCache, default_backbone: str):
        self.cache = cache
        self.default_backbone = default_backbone

    def _model(self, backbone: Optional[str], lora: Optional[str]) -> tuple[str, str]:
        return (backbone or "").strip() or self.default_backbone, (lora or "").strip()

    def status(self, backbone: Optional[str], lora: Optional[str]) -> str:
        """Load the chosen backbone and LoRA, and say whether they are ready or what is missing."""
        backbone, lora = self._model(backbone, lora)
        try:
            with self.cache.classifier(backbone, lora) as classifier:
                model = classifier.backbone
        except USER_ERRORS as e:
            return f"⚠️ **Not ready.** {e}"
        except Exception:  # noqa: BLE001 - reported in the UI, details in the log
            _logger.exception("loading %s with LoRA %r failed", backbone, lora)
            return f"⚠️ **Not ready.** Loading `{backbone}` failed unexpectedly; the details are in the server log."
        embedding = "CLIP projection" if model.embedding == "projection" else "[CLS]"
        with_lora = f" with LoRA `{lora}`" if lora else ""
        _, h, w = model.input_size
        return (f"✅ **Ready:** `{backbone}`{with_lora}: {embedding} embedding ({model.embed_dim}-d), "
                f"{w}×{h} px input, on {model.device}.")

    def classify(self, backbone: Optional[str], lora: Optional[str], queries: Optional[list[str]],
                 **slots: Any) -> tuple[list[tuple[Image.Image, str]], dict[str, float], dict[str, list], list[dict]]:
        """Fit the classes in the slots (``class_{i}_name``, ``class_{i}_images``) and predict every query.

        Returns:
            The captioned query gallery, the first query's probabilities, the table of all probabilities, and the
            predictions (for showing the probabilities of the query selected in the gallery).
        """
        backbone, lora = self._model(backbone, lora)
        try:
            support = _read_slots(slots)
            query_items = [(Path(p).name, p) for p in _paths(queries)]
            count = sum(map(len, support.values())) + len(query_items)
            if count > MAX_IMAGES:
                raise SupportError(f"Too many images ({count}); at most {MAX_IMAGES} per run.")
            with self.cache.classifier(backbone, lora) as classifier:
                predictions = classify(classifier, support, query_items)
            gallery = [(_thumbnail(path), f"{p.label} (p={p.probs[p.label]:.2f})")
                       for (_, path), p in zip(query_items, predictions)]
        except USER_ERRORS as e:
            raise gr.Error(html.escape(str(e), quote=False), title="Cannot classify", print_exception=False) from None
        except Exception:  # noqa: BLE001 - the server keeps serving; details go to the log
            _logger.exception("few-shot classification failed")
            raise gr.Error("Something went wrong while classifying; the details are in the server log. "
                           "Please try again.", title="Unexpected error", print_exception=False) from None
        return gallery, predictions[0].probs, _table(predictions), [p.to_dict() for p in predictions]

    @staticmethod
    def add_class(shown: int) -> tuple:
        """Reveal the next class slot; the button is disabled once all `MAX_CLASSES` are shown."""
        shown = min(int(shown or INITIAL_CLASSES) + 1, MAX_CLASSES)
        slots = [gr.update(visible=i < shown) for i in range(MAX_CLASSES)]
        return shown, *slots, gr.update(interactive=shown < MAX_CLASSES)

    @staticmethod
    def show_probabilities(predictions: Optional[list[dict]], evt: gr.SelectData) -> Optional[dict[str, float]]:
        """The probabilities of the query selected in the predictions gallery."""
        if not predictions or evt.index is None or not 0 <= evt.index < len(predictions):
            return None
        return predictions[evt.index]["probs"]


def _backbone_choices(default: str) -> list[str]:
    return list(dict.fromkeys([default, DEFAULT_BACKBONE, *ALIASES]))


def _few_shot_tab(demo: gr.Blocks, handlers: FewShot) -> None:
    default = handlers.default_backbone
    with gr.Row():
        backbone = gr.Dropdown(_backbone_choices(default), value=default, allow_custom_value=True, scale=3,
                               label="Backbone", info="timm name, alias, hf-hub:ORG/REPO or a local folder")
        lora = gr.Textbox("", label="LoRA (optional)", placeholder="local folder or file, or Hub id ORG/NAME", scale=2,
                          max_lines=1, info="e.g. a meta-LoRA; press Enter to load it")
    status = gr.Markdown(f"Loading `{default}`…", label="Status", elem_id="status")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown("### 1 · Classes\nA name and a few example images for each class (drag and drop).")
            groups, slots = [], {}
            for i in range(1, MAX_CLASSES + 1):
                with gr.Group(visible=i <= INITIAL_CLASSES) as group:
                    slots[f"class_{i}_name"] = gr.Textbox("", show_label=False, placeholder=f"Class {i} name",
                                                          max_lines=1)
                    slots[f"class_{i}_images"] = gr.Gallery(label=f"Class {i} images", file_types=["image"],
                                                            type="filepath", columns=6, height=180,
                                                            object_fit="cover", interactive=True)
                groups.append(group)
            shown = gr.State(INITIAL_CLASSES)
            add = gr.Button("＋ Add class", size="sm")
        with gr.Column(scale=1):
            gr.Markdown("### 2 · Queries\nThe images to classify.")
            queries = gr.File(label="Query images", file_count="multiple", file_types=["image"], height=180)
            with gr.Row():
                clear = gr.ClearButton(value="Clear")
                run = gr.Button("Run", variant="primary")
            gr.Markdown("### 3 · Predictions\nClick a query to see its probabilities.")
            results = gr.Gallery(label="Predictions", columns=4, object_fit="contain", height="auto",
                                 interactive=False)
            probs = gr.Label(label="Probabilities", num_top_classes=MAX_CLASSES)
            table = gr.Dataframe(label="All queries", interactive=False, wrap=True)
            predictions = gr.State([])

    clear.add([*slots.values(), queries, results, probs, table, predictions])
    gr.on([demo.load, backbone.change, lora.submit], handlers.status, inputs=[backbone, lora], outputs=status,
          api_name="status")
    add.click(handlers.add_class, inputs=shown, outputs=[shown, *groups, add], api_name="add_class")
    run.click(handlers.classify, inputs=[backbone, lora, queries], inputs_kwargs=slots,
              outputs=[results, probs, table, predictions], api_name="classify")
    results.select(handlers.show_probabilities, inputs=predictions, outputs=probs, api_name="show_probabilities",
                   api_visibility="undocumented")


def build_demo(default_backbone: Optional[str] = None, cache: Optional[ModelCache] = None) -> gr.Blocks:
    """The app's Blocks, not launched. `default_backbone` defaults to ``$RECYCLE_BACKBONE``, else the paper's CLIP."""
    default = default_backbone or os.environ.get("RECYCLE_BACKBONE") or DEFAULT_BACKBONE
    handlers = FewShot(cache or ModelCache(), default)
    with gr.Blocks(title="LoRA Recycle") as demo:
        gr.Markdown(DESCRIPTION)
        with gr.Tabs():
            with gr.Tab("Few-shot", id="few-shot"):
                _few_shot_tab(demo, handlers)
    return demo


def launch_options() -> dict[str, Any]:
    """Keyword arguments for `gr.Blocks.launch` (theme, CSS, upload limit); tests launch with them too."""
    system_fonts = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page also works offline
    theme = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", font=system_fonts,
                           font_mono=["ui-monospace", "monospace"])
    return {"theme": theme, "css": CSS, "max_file_size": MAX_FILE_SIZE}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    build_demo().queue(max_size=32).launch(**launch_options())


if __name__ == "__main__":
    main()
