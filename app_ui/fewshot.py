"""The few-shot tab and the shared status line: class slots in, probability cards and a table out."""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import gradio as gr
from PIL import Image

from recycle.images import ImageError, load_image
from recycle.predict import Prediction, SupportError, classify, count_correct, support_from_slots

from .examples import ExampleTask
from .errors import USER_ERRORS, as_text, file_paths, reported, text_field, user_text
from .markup import md_code, md_text
from .limits import (
    INITIAL_CLASSES,
    LOADING,
    MAX_CARDS,
    MAX_CLASSES,
    MAX_IMAGES,
    PREDICT_CONCURRENCY,
    THUMBNAIL_SIZE,
)
from .settings import AppSettings, Defaults, PathPolicy
from .state import ModelCache

_logger = logging.getLogger("recycle.app")


def _read_slots(slots: dict[str, Any]) -> dict[str, list[str]]:
    """Class slots (``class_{i}_name``, ``class_{i}_images``) -> {class name: image paths}
    (`recycle.predict.support_from_slots`: empty slots skipped, every bad name refused, naming its slot)."""
    return support_from_slots(
        [
            (as_text(slots.get(f"class_{i}_name"), f"name of class {i}"), file_paths(slots.get(f"class_{i}_images")))
            for i in range(1, MAX_CLASSES + 1)
        ]
    )


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
    return (
        f'<div class="rc-track"><div class="rc-bar rc-{kind}" style="width:{100 * value:.1f}%"></div></div>'
        f'<span class="rc-val">{100 * value:.0f}%</span>'
    )


def _test_split_line(split: dict, queries: int) -> str:
    """What the shipped pair measured on the miniature's test split, so that one task reads as one sample."""
    lora, nn = split["meta-LoRA"], split["NN"]
    return (
        f'<div class="rc-summary">On the miniature\'s test split ({split["episodes"]} tasks, {split["way"]}-way '
        f"{split['shot']}-shot), this meta-LoRA scores <b>{lora['mean']:.1f}%</b> ± {lora.get('ci95', 0):.1f} and the "
        f"backbone alone <b>{nn['mean']:.1f}%</b> ± {nn.get('ci95', 0):.1f}: one task of {queries} queries is one "
        "sample of that.</div>"
    )


def probability_cards(
    predictions: list[Prediction],
    thumbnails: list[str],
    bare: Optional[list[Prediction]] = None,
    lora: str = "",
    test_split: Optional[dict] = None,
) -> str:
    """HTML: one card per query with its thumbnail, its predicted class and a probability bar per class; with `bare`
    (the backbone alone), a second bar per class and both predictions, side by side. When the queries' file names
    carry their classes, the score comes first, in large type; with `test_split` (the shipped pair's measured test
    accuracy), beside what the miniature's test split measured."""
    esc = lambda s: html.escape(str(s))  # noqa: E731
    parts = ['<div class="rc-cards">']
    score, bare_score = count_correct(predictions), count_correct(bare) if bare is not None else None
    if score:
        scoreline = f'<b class="rc-score">{score[0]} of {score[1]}</b> correct' + (
            f' with the meta-LoRA · <b class="rc-score-bare">{bare_score[0]} of {bare_score[1]}</b> with the '
            "backbone alone"
            if bare_score
            else ""
        )
        parts.append(f'<div class="rc-scoreline">{scoreline}</div>')
        if test_split is not None:
            parts.append(_test_split_line(test_split, score[1]))
    if bare is not None:
        agree = sum(p.label == b.label for p, b in zip(predictions, bare))
        parts.append(
            f'<div class="rc-summary">With the meta-LoRA <code>{esc(Path(lora).name or lora)}</code> and '
            f"with the backbone alone, <b>{agree} of {len(predictions)}</b> predictions agree"
            + (" (the queries' file names carry their classes)." if score else ".")
            + ' <span class="rc-key"><i class="rc-swatch rc-main"></i>with meta-LoRA</span>'
            '<span class="rc-key"><i class="rc-swatch rc-bare"></i>backbone alone</span></div>'
        )
    for i, (p, thumb) in enumerate(zip(predictions[:MAX_CARDS], thumbnails)):
        b = bare[i] if bare is not None else None
        changed = b is not None and b.label != p.label
        parts.append(
            f'<div class="rc-card" data-query="{esc(p.file)}" data-label="{esc(p.label)}"'
            + (f' data-bare-label="{esc(b.label)}"' if b else "")
            + ">"
        )
        parts.append(
            f'<img class="rc-thumb" alt="{esc(p.file)}" src="{thumb}">' if thumb else '<div class="rc-thumb"></div>'
        )
        parts.append(
            f'<div class="rc-body"><div class="rc-title"><span class="rc-file">{esc(p.file)}</span> '
            f'<span class="rc-pred">→ <bdi>{esc(p.label)}</bdi></span>'
        )
        if b is not None:
            parts.append(
                f' <span class="rc-badge{" rc-changed" if changed else ""}">backbone alone: '
                f"<bdi>{esc(b.label)}</bdi></span>"
            )
        parts.append("</div>")
        for name, value in p.probs.items():
            best = " rc-best" if name == p.label else ""
            parts.append(
                f'<div class="rc-row{best}"><span class="rc-name"><bdi>{esc(name)}</bdi></span>'
                f'<div class="rc-bars"><div class="rc-line">{_bar(value, "main")}</div>'
            )
            if b is not None:
                parts.append(f'<div class="rc-line">{_bar(b.probs[name], "bare")}</div>')
            parts.append("</div></div>")
        parts.append("</div></div>")
    if len(predictions) > MAX_CARDS:
        parts.append(
            f'<div class="rc-summary">Showing the first {MAX_CARDS} of {len(predictions)} queries; the '
            "table below has all of them.</div>"
        )
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

    def __init__(
        self,
        cache: ModelCache,
        defaults: Defaults,
        policy: PathPolicy,
        shipped: Optional[tuple[str, str]] = None,
        test_split: Optional[dict] = None,
    ):
        self.cache = cache
        self.defaults = defaults
        self.policy = policy
        self.shipped = shipped  # (backbone, meta-LoRA) shipped together: the meta-LoRA fits that backbone only
        self.test_split = test_split  # what that pair measured on the miniature's test split

    def lora_for_backbone(self, backbone: Optional[str], lora: Optional[str]) -> Any:
        """The meta-LoRA field after the backbone changed: emptied when it holds the shipped meta-LoRA and the new
        backbone is not the one it was made for (it would not fit), else left as it is."""
        if self.shipped is not None and (lora or "").strip() == self.shipped[1] and (backbone or "") != self.shipped[0]:
            return ""
        return gr.update()

    @property
    def default_backbone(self) -> str:
        return self.defaults.backbone

    def _model(self, backbone: Optional[str], lora: Optional[str]) -> tuple[str, str]:
        backbone = text_field(backbone, "backbone name") or self.defaults.backbone
        return self.policy.backbone(backbone), self.policy.lora(lora)

    def status(self, backbone: Optional[str], lora: Optional[str]) -> str:
        """Load the chosen backbone and LoRA, and say whether they are ready or what is missing."""
        note = (
            f"{self.defaults.note}\n\n"
            if self.defaults.note and (backbone or "") in ("", self.defaults.backbone)
            else ""
        )
        try:
            backbone, lora = self._model(backbone, lora)
            with self.cache.classifier(backbone, lora) as classifier:
                model = classifier.backbone
        except USER_ERRORS as e:
            return f"{note}⚠️ **Not ready.** {md_text(user_text(e), 1000)}"
        except Exception:  # noqa: BLE001 - reported in the UI, details in the log
            _logger.exception("loading %s with LoRA %r failed", backbone, lora)
            return (
                f"{note}⚠️ **Not ready.** Loading {md_code(backbone)} failed unexpectedly; the details are in "
                "the server log."
            )
        embedding = "CLIP projection" if model.embedding == "projection" else "[CLS]"
        with_lora = f" with meta-LoRA {md_code(lora)}" if lora else ""
        _, h, w = model.input_size
        precision, why = self.cache.precision_of(backbone)
        return (
            f"{note}✅ **Ready:** {md_code(backbone)}{with_lora}: {embedding} embedding ({model.embed_dim}-d), "
            f"{w}×{h} px input, on {model.device} in {precision}" + (f" ({md_text(why, 200)})." if why else ".")
        )

    def classify(
        self, backbone: Optional[str], lora: Optional[str], queries: Optional[list[str]], **slots: Any
    ) -> tuple[str, dict[str, list]]:
        """Fit the classes in the slots (``class_{i}_name``, ``class_{i}_images``) and predict every query; with a
        LoRA, also with the backbone alone, for comparison.

        Returns:
            The probability cards (HTML) and the table of all probabilities.
        """
        with reported("Cannot classify", "classifying"):
            backbone, lora = self._model(backbone, lora)
            support = _read_slots(slots)
            query_items = [(Path(p).name, p) for p in file_paths(queries)]
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
            split = self.test_split if self.shipped is not None and (backbone, lora) == self.shipped else None
            return probability_cards(predictions, thumbnails, bare, lora, split), _table(predictions, bare)

    @staticmethod
    def add_class(shown: int) -> tuple:
        """Reveal the next class slot; the button is disabled once all `MAX_CLASSES` are shown."""
        shown = min(int(shown or INITIAL_CLASSES) + 1, MAX_CLASSES)
        slots = [gr.update(visible=i < shown) for i in range(MAX_CLASSES)]
        return shown, *slots, gr.update(interactive=shown < MAX_CLASSES)


INTRO = """\
Give a name and a few example images for each class, add the images to classify, and press **Run**. Each query goes \
to the class whose mean embedding (prototype) is nearest; nothing is trained. With a meta-LoRA, the predictions of \
the backbone alone are shown beside them.
"""


@dataclass
class FewShotTab:
    """The few-shot tab's components by name; `slots` maps ``class_{i}_name`` / ``class_{i}_images`` to the class
    slots' components."""

    lora: gr.Textbox
    slots: dict
    groups: list
    shown: gr.State
    add: gr.Button
    queries: gr.File
    run: gr.Button
    cards: gr.HTML
    table: gr.Dataframe
    examples: Optional[gr.Examples]


def _example_set(
    examples: list[ExampleTask], slots: dict, queries: gr.File, model: list, model_inputs: list
) -> gr.Examples:
    rows = []
    for task in examples:
        items = list(task.support.items())
        row: list[Any] = []
        for i in range(MAX_CLASSES):
            name, files = items[i] if i < len(items) else ("", [])
            row += [name, files]
        rows.append([*row, task.queries, *model])
    inputs = [c for i in range(1, MAX_CLASSES + 1) for c in (slots[f"class_{i}_name"], slots[f"class_{i}_images"])]
    return gr.Examples(
        rows,
        inputs=[*inputs, queries, *model_inputs],
        example_labels=[t.label for t in examples],
        label="New here? Click an example: it fills in the classes and queries and selects the "
        "shipped backbone and meta-LoRA it was made for. Then press Run.",
    )


def few_shot_tab(
    fewshot: FewShot,
    defaults: Defaults,
    examples: list[ExampleTask],
    settings: AppSettings,
    backbone: gr.Dropdown,
    status: gr.Markdown,
) -> FewShotTab:
    """Lay out the few-shot tab and wire its events. The bundled example tasks were made for the shipped backbone
    and its meta-LoRA, so an example selects them too, and `status` then says which model answers."""
    initial = min(MAX_CLASSES, max([INITIAL_CLASSES, *(len(t.support) for t in examples)]))
    gr.Markdown(INTRO)
    lora = gr.Textbox(
        defaults.lora,
        label="Meta-LoRA (optional)",
        max_lines=1,
        elem_id="meta-lora",
        placeholder="Hub id ORG/NAME" + ("" if fewshot.policy.allow_local else " (local paths are off)"),
        info="e.g. a meta-LoRA; press Enter to load it. Leave empty for the backbone alone.",
    )
    with gr.Column() as examples_box:  # filled below, once the inputs exist
        pass
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown(
                f"### 1 · Classes\nA name and a few example images for each class (drag and drop), "
                f"up to {MAX_CLASSES} classes."
            )
            groups, slots = [], {}
            for i in range(1, MAX_CLASSES + 1):
                with gr.Group(visible=i <= initial) as group:
                    slots[f"class_{i}_name"] = gr.Textbox(
                        "", show_label=False, placeholder=f"Class {i} name", max_lines=1
                    )
                    slots[f"class_{i}_images"] = gr.Gallery(
                        label=f"Class {i} images",
                        file_types=["image"],
                        type="filepath",
                        columns=6,
                        height=150,
                        object_fit="contain",
                        interactive=True,
                        fit_columns=False,
                        elem_classes="class-images",
                    )
                groups.append(group)
            shown = gr.State(initial)
            add = gr.Button("＋ Add class", size="sm", interactive=initial < MAX_CLASSES)
        with gr.Column(scale=1):
            gr.Markdown(f"### 2 · Queries\nThe images to classify (at most {MAX_IMAGES} images in all).")
            queries = gr.File(label="Query images", file_count="multiple", file_types=["image"], height=150)
            with gr.Row():
                clear = gr.ClearButton(value="Clear")
                run = gr.Button("Run", variant="primary")
            gr.Markdown("### 3 · Predictions")
            cards = gr.HTML(EMPTY_CARDS, elem_id="predictions")
            with gr.Accordion("All probabilities (table)", open=False):
                table = gr.Dataframe(label="All queries", interactive=False, wrap=True)
    example_set = None
    if examples:
        shipped = (settings.shipped_backbone / "config.json").is_file()
        model = [str(settings.shipped_backbone), str(settings.shipped_lora)] if shipped else []
        with examples_box:
            example_set = _example_set(examples, slots, queries, model, [backbone, lora] if shipped else [])
        example_set.load_input_event.then(
            fewshot.status,
            inputs=[backbone, lora],
            outputs=status,
            api_name="example_status",
            api_visibility="private",
            **LOADING,
        )
    clear.add([*slots.values(), queries, cards, table])
    add.click(
        fewshot.add_class,
        inputs=shown,
        outputs=[shown, *groups, add],
        api_name="add_class",
        api_visibility="undocumented",
        queue=False,
    )
    run.click(
        fewshot.classify,
        inputs=[backbone, lora, queries],
        inputs_kwargs=slots,
        outputs=[cards, table],
        api_name="classify",
        concurrency_id="predict",
        concurrency_limit=PREDICT_CONCURRENCY,
    )
    return FewShotTab(lora, slots, groups, shown, add, queries, run, cards, table, example_set)
