"""LoRA Recycle web app: few-shot classification, LoRA inversion into surrogate images, and a surrogate-pool browser.

Layout and wiring only; the handlers are in the ``app_ui`` package (one module per tab) and the work is done by
`recycle`. Run ``python app.py``, or ``gradio app.py`` to reload the app whenever a file changes. Environment:

* ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``: the address (default 127.0.0.1:7860).
* ``RECYCLE_BACKBONE``: the default backbone (a timm name, an alias, ``hf-hub:ORG/REPO`` or a local directory;
  default the paper's CLIP ViT-B/16 from the Hub). If it cannot be loaded (no network), the app falls back to the
  shipped ``mini-vit`` and its meta-LoRA, and says so.
* ``RECYCLE_WEIGHTS``: the shipped weights and example tasks (default ``weights/`` next to this file).
* ``RECYCLE_POOL``: the surrogate pool that inversions are added to (default ``./pool``).
* ``RECYCLE_POOL_REPO``: a Hub dataset ``ORG/NAME`` that **Add to pool** also pushes to, when a Hub token is
  configured (``HF_TOKEN``).
* ``RECYCLE_ALLOW_LOCAL_PATHS``: ``0`` makes text fields accept only Hub ids (and uploads), for public servers;
  the default is ``1``, except on a Hugging Face Space.
* ``SPACES_ZERO_GPU``: set by a ZeroGPU Space; prediction and inversion then run under ``spaces.GPU``
  (`app_ui.zerogpu`).

Deep links: ``?tab=few-shot``, ``?tab=invert`` or ``?tab=pool`` opens that tab.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional


def server_port() -> Optional[int]:
    """``GRADIO_SERVER_PORT`` as a port number (None when unset, for Gradio's default).

    Raises:
        ValueError: the variable is not a whole number from 1 to 65535.
    """
    raw = os.environ.get("GRADIO_SERVER_PORT", "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 65535):
        raise ValueError(f"GRADIO_SERVER_PORT={raw[:40]!r} is not a port: use a whole number from 1 to 65535")
    return int(raw)


if __name__ == "__main__":  # Gradio reads GRADIO_SERVER_PORT as it is imported: check it first
    try:
        server_port()
    except ValueError as _e:
        raise SystemExit(f"error: {_e}") from None

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from app_ui import (EMPTY_CARDS, INITIAL_CLASSES, MAX_CLASSES, MAX_FILE_SIZE, MAX_IMAGES,  # noqa: E402
                    MAX_INVERT_IMAGES, MAX_INVERT_STEPS, MAX_POOL_GALLERY, PRUNING_PRESETS, AppSettings, Defaults,
                    ExampleTask, FewShot, HubLoRAList, Inversion, ModelCache, PathPolicy, PoolBrowser, PriorChoice,
                    find_examples, md_code, resolve_defaults)
from app_ui.http import URLLengthLimit  # noqa: E402
from app_ui.inputs import finite, strict  # noqa: E402
from app_ui.zerogpu import wrap_handlers  # noqa: E402
from recycle.backbone import ALIASES, DEFAULT_BACKBONE  # noqa: E402
from recycle.runtime import tune_allocator  # noqa: E402

__all__ = ["build_demo", "launch_options", "main", "server_port", "demo", "TABS", "QUEUE_SIZE", "PREDICT_CONCURRENCY"]

_logger = logging.getLogger("recycle.app")

TABS = {"few-shot": "Few-shot", "invert": "Invert a LoRA", "pool": "Surrogate pool"}
QUEUE_SIZE = 32  # requests waiting in the queue; more are refused with "queue full"
PREDICT_CONCURRENCY = 2  # few-shot predictions at once (inversion has its own single slot)
CACHE_CLEANUP = (3600, 3600)  # delete Gradio's temporary files older than an hour, every hour

HEADER = """\
# ♻️ LoRA Recycle
Reuse LoRAs that other people have tuned, **without their training data** \
([Hu et al., CVPR 2025](https://arxiv.org/abs/2412.02220)). **Few-shot:** classify images from a few examples per \
class, in one forward pass. **Invert a LoRA:** turn a LoRA and its classification head into surrogate images. \
**Surrogate pool:** browse the images inverted so far.
"""
FEW_SHOT_INTRO = """\
Give a name and a few example images for each class, add the images to classify, and press **Run**. Each query goes \
to the class whose mean embedding (prototype) is nearest; nothing is trained. With a meta-LoRA, the predictions of \
the backbone alone are shown beside them.
"""
INVERT_INTRO = """\
Inversion optimises random pixels until the LoRA's classifier is confident they show each class, so the images \
reveal what the LoRA learned, with no training data. While it runs, the best images so far appear every few steps. \
After a quarter of the steps, the [CLS] token's attention decides which patches to keep: the **masked** versions keep \
only those.
"""
POOL_INTRO = "The pool holds inverted images, their masks and the teacher's logits, grouped by source LoRA and class."
CSS = """
#status p { margin: 0; }
.rc-cards { display: flex; flex-direction: column; gap: 10px; }
.rc-card { display: flex; gap: 14px; align-items: flex-start; padding: 10px 12px; border-radius: 10px;
  border: 1px solid var(--block-border-color); background: var(--block-background-fill); }
.rc-thumb { width: 72px; height: 72px; object-fit: contain; border-radius: 6px; flex: none;
  background: var(--background-fill-secondary); image-rendering: pixelated; }
.rc-body { flex: 1; min-width: 0; }
.rc-title { display: flex; flex-wrap: wrap; gap: 8px; align-items: baseline; margin-bottom: 6px; }
.rc-file { color: var(--body-text-color-subdued); font-size: 0.85em; overflow-wrap: anywhere; }
.rc-pred { font-weight: 700; font-size: 1.05em; }
.rc-badge { font-size: 0.8em; padding: 1px 8px; border-radius: 999px; background: var(--background-fill-secondary);
  color: var(--body-text-color-subdued); }
.rc-badge.rc-changed { background: #fef3c7; color: #92400e; }
.rc-row { display: grid; grid-template-columns: minmax(60px, 28%) 1fr; gap: 8px; align-items: center;
  font-size: 0.9em; margin: 2px 0; }
.rc-row.rc-best .rc-name { font-weight: 700; }
.rc-name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; unicode-bidi: isolate; }
.rc-bars { display: flex; flex-direction: column; gap: 2px; }
.rc-line { display: grid; grid-template-columns: 1fr 3.2em; gap: 6px; align-items: center; }
.rc-track { height: 10px; border-radius: 5px; background: var(--background-fill-secondary); overflow: hidden; }
.rc-bar { height: 100%; border-radius: 5px; }
.rc-main { background: var(--color-accent, #6366f1); }
.rc-bare { background: #94a3b8; }
.rc-line:nth-child(2) .rc-track { height: 6px; }
.rc-val { text-align: right; font-variant-numeric: tabular-nums; color: var(--body-text-color-subdued); }
.rc-summary { font-size: 0.9em; color: var(--body-text-color-subdued); }
.rc-key { margin-left: 12px; white-space: nowrap; }
.rc-swatch { display: inline-block; width: 10px; height: 10px; border-radius: 3px; margin-right: 4px; }
.rc-empty { color: var(--body-text-color-subdued); padding: 16px; text-align: center;
  border: 1px dashed var(--block-border-color); border-radius: 10px; }
.pixelated img { image-rendering: pixelated; }
.tight .grid-wrap.fixed-height { height: auto !important; min-height: 0 !important; max-height: none !important; }
.class-images.block { border: none !important; border-top: 1px solid var(--block-border-color) !important; }
#status details { font-size: 0.85em; color: var(--body-text-color-subdued); }
.hint p { font-size: 0.85em; color: var(--body-text-color-subdued); }
"""


# ---------------------------------------------------------------------------------------------------------- tabs
def _gallery(label: str, columns: int) -> gr.Gallery:
    """An output gallery of surrogate images: lossless, crisp pixels, as tall as its images."""
    return gr.Gallery(label=label, columns=columns, height="auto", format="png", object_fit="contain",
                      interactive=False, elem_classes=["pixelated", "tight"], fit_columns=False)


def _few_shot_tab(fewshot: FewShot, defaults: Defaults, examples: list[ExampleTask], backbone: gr.Dropdown,
                  settings: AppSettings) -> SimpleNamespace:
    initial = min(MAX_CLASSES, max([INITIAL_CLASSES, *(len(t.support) for t in examples)]))
    gr.Markdown(FEW_SHOT_INTRO)
    lora = gr.Textbox(defaults.lora, label="Meta-LoRA (optional)", max_lines=1, elem_id="meta-lora",
                      placeholder="Hub id ORG/NAME" + ("" if fewshot.policy.allow_local else " (local paths are off)"),
                      info="e.g. a meta-LoRA; press Enter to load it. Leave empty for the backbone alone.")
    with gr.Column() as examples_box:  # filled below, once the inputs exist
        pass
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown(f"### 1 · Classes\nA name and a few example images for each class (drag and drop), "
                        f"up to {MAX_CLASSES} classes.")
            groups, slots = [], {}
            for i in range(1, MAX_CLASSES + 1):
                with gr.Group(visible=i <= initial) as group:
                    slots[f"class_{i}_name"] = gr.Textbox("", show_label=False, placeholder=f"Class {i} name",
                                                          max_lines=1)
                    slots[f"class_{i}_images"] = gr.Gallery(label=f"Class {i} images", file_types=["image"],
                                                            type="filepath", columns=6, height=150,
                                                            object_fit="contain", interactive=True,
                                                            fit_columns=False, elem_classes="class-images")
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
    if examples:
        # The bundled tasks were made for the shipped backbone and its meta-LoRA: an example selects them too.
        model = ([str(settings.shipped_backbone), str(settings.shipped_lora)]
                 if (settings.shipped_backbone / "config.json").is_file() else [])
        rows = []
        for task in examples:
            items = list(task.support.items())
            row: list[Any] = []
            for i in range(MAX_CLASSES):
                name, files = items[i] if i < len(items) else ("", [])
                row += [name, files]
            rows.append([*row, task.queries, *model])
        inputs = [c for i in range(1, MAX_CLASSES + 1) for c in (slots[f"class_{i}_name"], slots[f"class_{i}_images"])]
        with examples_box:
            example_set = gr.Examples(rows, inputs=[*inputs, queries, *([backbone, lora] if model else [])],
                        example_labels=[t.label for t in examples],
                        label="New here? Click an example: it fills in the classes and queries and selects the "
                              "shipped backbone and meta-LoRA it was made for. Then press Run.")
    else:
        example_set = None
    clear.add([*slots.values(), queries, cards, table])
    return SimpleNamespace(lora=lora, slots=slots, groups=groups, shown=shown, add=add, queries=queries, run=run,
                           cards=cards, table=table, examples=example_set)


def _invert_tab(policy: PathPolicy, example_lora: Optional[Path], prior: PriorChoice) -> SimpleNamespace:
    gr.Markdown(INVERT_INTRO)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            gr.Markdown("### 1 · LoRA\nA LoRA with a classification head: PEFT adapters for timm or transformers "
                        "ViTs (such as PEFT's image-classification guide makes), or the official LoRA Recycle files.")
            hub_id = gr.Textbox(label="Hub id", placeholder="ORG/NAME" + (" or a local folder" if policy.allow_local
                                                                          else ""), max_lines=1, elem_id="hub-id")
            files = gr.File(label="…or upload its files", file_count="multiple", height=130,
                            file_types=[".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"])
            gr.Markdown("Upload `adapter_config.json` with `adapter_model.safetensors`, or one official "
                        "`.safetensors` file, then press **Load LoRA**.", elem_classes="hint")
            if example_lora is not None:  # works offline and on a Space: the app's own file is trusted
                gr.Examples([[str(example_lora)]], inputs=[hub_id], label="No LoRA at hand? Try the bundled one "
                            "(5 Han characters, tuned on the shipped mini-vit), then press Load LoRA")
            with gr.Accordion("LoRAs on the Hub for this backbone", open=False):
                with gr.Row():
                    hub_search = gr.Textbox(label="Name contains", placeholder="e.g. food101 (empty: all)",
                                            max_lines=1, scale=3)
                    hub_list = gr.Button("Search the Hub", scale=1, min_width=120)
                hub_found = gr.Dropdown([], label="Found", interactive=True)
                hub_note = gr.Markdown("", elem_id="hub-loras")
            load = gr.Button("Load LoRA", variant="secondary")
            card = gr.Markdown("No LoRA loaded yet.", elem_id="lora-card")
            switch = gr.Button("Switch the backbone", visible=False, variant="secondary")
            gr.Markdown("### 2 · Settings")
            classes = gr.CheckboxGroup([], label="Classes to invert", info="Load a LoRA to see its classes.")
            with gr.Row():
                per_class = finite(gr.Slider(1, 16, value=1, step=1, label="Images per class"))
                steps = finite(gr.Slider(10, MAX_INVERT_STEPS, value=100, step=10, label="Steps",
                                         info="the paper: 2000; fewer is quicker"))
            pruning = gr.Dropdown([(label, spec) for label, spec in PRUNING_PRESETS], value="-1:0.75",
                                  allow_custom_value=True, label="Token pruning",
                                  info="A preset, or type LAYER[,LAYER…]:RATIO (e.g. 11:0.75; -1 = last block).")
            bn_prior = strict(gr.Checkbox(prior.default, label=prior.label, info=prior.info))  # follows the backbone
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    lr = finite(gr.Number(0.25, label="Learning rate (Adam)", minimum=0.001, maximum=10))
                    seed = finite(gr.Number(0, label="Seed", precision=0, minimum=0))
            gr.Markdown(f"At most {MAX_INVERT_IMAGES} images per run; one inversion runs at a time (others wait in "
                        "the queue).")
            with gr.Row():
                invert = gr.Button("Invert", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            stop_note = gr.Markdown("")
        with gr.Column(scale=3, min_width=360):
            gr.Markdown("### 3 · Surrogate images")
            run_status = gr.Markdown("Load a LoRA, choose classes and press **Invert**.", elem_id="run-status")
            images = _gallery("Inverted images (best so far)", columns=4)
            masked = _gallery("Masked: only the kept patches (kept/all · confidence)", columns=4)
            with gr.Row():
                add = gr.Button("Add to pool", interactive=False)
                download = gr.DownloadButton("Download zip", interactive=False)
            pool_note = gr.Markdown("")
    return SimpleNamespace(hub_id=hub_id, hub_search=hub_search, hub_list=hub_list, hub_found=hub_found,
                           hub_note=hub_note, files=files, load=load, switch=switch, card=card, classes=classes,
                           per_class=per_class,
                           steps=steps, pruning=pruning, bn_prior=bn_prior, lr=lr, seed=seed, invert=invert, stop=stop,
                           stop_note=stop_note, run_status=run_status, images=images, masked=masked, add=add,
                           download=download, pool_note=pool_note)


def _pool_tab(policy: PathPolicy, settings: AppSettings) -> SimpleNamespace:
    gr.Markdown(POOL_INTRO)
    with gr.Row(equal_height=False):
        hub = "or a Hub dataset: datasets/ORG/NAME. Press Enter to open."
        folder = gr.Textbox(str(settings.pool), label="Pool folder or Hub dataset", max_lines=1, scale=4,
                            info=(f"A folder, {hub}" if policy.allow_local
                                  else f"The server's pool (RECYCLE_POOL), {hub}"))
        refresh = gr.Button("↻ Refresh", scale=1, min_width=120)
    summary = gr.Markdown("", elem_id="pool-summary")
    with gr.Row():
        source = gr.Dropdown([], label="Source LoRA", interactive=True, scale=3)
        label = gr.Dropdown([], label="Class", interactive=True, scale=2)
        page = finite(gr.Number(1, label=f"Page ({MAX_POOL_GALLERY} images each)", precision=0, minimum=1,
                                scale=1, min_width=120))
    details = gr.Markdown("")
    with gr.Row(equal_height=False):
        images = _gallery("Images", columns=3)
        masked = _gallery("Masked (kept tokens only)", columns=3)
    with gr.Accordion("Settings that made these images", open=False):
        settings_json = gr.JSON(label="Inversion settings per run")
    return SimpleNamespace(folder=folder, refresh=refresh, summary=summary, source=source, label=label, page=page,
                           details=details, images=images, masked=masked, settings=settings_json)


# ------------------------------------------------------------------------------------------------------- wiring
def _select_tab(request: gr.Request) -> Any:
    tab = request.query_params.get("tab") if request is not None else None
    return gr.Tabs(selected=tab) if tab in TABS else gr.Tabs()


def _backbone_choices(default: str, settings: AppSettings) -> list[str]:
    shipped = [str(settings.shipped_backbone)] if (settings.shipped_backbone / "config.json").is_file() else []
    return list(dict.fromkeys([default, DEFAULT_BACKBONE, *ALIASES, *shipped]))


def build_demo(default_backbone: Optional[str] = None, cache: Optional[ModelCache] = None,
               settings: Optional[AppSettings] = None) -> gr.Blocks:
    """The app's Blocks with its queue configured, not launched.

    Args:
        default_backbone: overrides ``settings.backbone``.
        cache: the model cache (a fresh one by default).
        settings: paths and policies (default: from the environment, `AppSettings.from_env`).
    """
    settings = settings or AppSettings.from_env()
    policy = PathPolicy(settings.allow_local_paths)
    cache = cache or ModelCache()
    cache.lora_loader = policy.load_lora
    defaults = resolve_defaults(settings, cache, default_backbone)
    policy.trusted |= {defaults.backbone, defaults.lora, str(settings.shipped_backbone), str(settings.shipped_lora),
                       str(settings.example_lora or "")} - {""}
    fewshot = FewShot(cache, defaults, policy)
    inversion = Inversion(cache, policy, settings, defaults.backbone)
    hub_loras = HubLoRAList(policy, defaults.backbone)
    browser = PoolBrowser(policy, settings)
    wrap_handlers(fewshot, inversion)  # on ZeroGPU hardware, prediction and inversion run under spaces.GPU
    examples = find_examples(settings.examples)

    with gr.Blocks(title="LoRA Recycle", delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(HEADER)
        backbone = gr.Dropdown(_backbone_choices(defaults.backbone, settings), value=defaults.backbone,
                               allow_custom_value=True, label="Backbone (all tabs)",
                               info="timm name, alias or hf-hub:ORG/REPO"
                                    + (", or a local folder" if policy.allow_local else ""))
        status = gr.Markdown(f"Loading {md_code(defaults.backbone)}…", elem_id="status")
        with gr.Tabs() as tabs:
            with gr.Tab(TABS["few-shot"], id="few-shot"):
                fs = _few_shot_tab(fewshot, defaults, examples, backbone, settings)
            with gr.Tab(TABS["invert"], id="invert"):
                inv = _invert_tab(policy, settings.example_lora, settings.bn_prior_for(defaults.backbone))
            with gr.Tab(TABS["pool"], id="pool") as pool_tab:
                pool = _pool_tab(policy, settings)

        load = dict(concurrency_id="load", concurrency_limit=2)
        browse = dict(concurrency_id="pool", concurrency_limit=2)
        gr.on([demo.load, backbone.change, fs.lora.submit], fewshot.status, inputs=[backbone, fs.lora],
              outputs=status, api_name="status", **load)
        demo.load(_select_tab, None, tabs, api_visibility="private", queue=False)
        if fs.examples is not None:  # an example may switch the backbone and meta-LoRA: say which model answers now
            fs.examples.load_input_event.then(fewshot.status, inputs=[backbone, fs.lora], outputs=status,
                                              api_visibility="private", **load)

        # few-shot
        fs.add.click(fewshot.add_class, inputs=fs.shown, outputs=[fs.shown, *fs.groups, fs.add], api_name="add_class",
                     api_visibility="undocumented", queue=False)
        fs.run.click(fewshot.classify, inputs=[backbone, fs.lora, fs.queries], inputs_kwargs=fs.slots,
                     outputs=[fs.cards, fs.table], api_name="classify", concurrency_id="predict",
                     concurrency_limit=PREDICT_CONCURRENCY)

        # inversion
        gr.on([inv.load.click, inv.hub_id.submit], inversion.load, inputs=[backbone, inv.hub_id, inv.files],
              outputs=[inv.card, inv.classes], api_name="load_lora", **load).then(
            inversion.switch_offer, None, inv.switch, api_name="switch_offer", api_visibility="undocumented", **load)
        inv.switch.click(inversion.switch_backbone, backbone, backbone, api_name="switch_backbone",
                         api_visibility="undocumented", queue=False).then(
            inversion.load, inputs=[backbone, inv.hub_id, inv.files], outputs=[inv.card, inv.classes],
            api_visibility="private", **load).then(inversion.switch_offer, None, inv.switch,
                                                   api_visibility="private", **load)
        inv.invert.click(inversion.run, inputs=[backbone, inv.classes, inv.per_class, inv.steps, inv.pruning,
                                                inv.bn_prior, inv.lr, inv.seed],
                         outputs=[inv.images, inv.masked, inv.run_status, inv.download, inv.add], api_name="invert",
                         concurrency_id="invert", concurrency_limit=1, show_progress_on=[inv.run_status])
        gr.on([inv.hub_list.click, inv.hub_search.submit], hub_loras.search, inputs=[backbone, inv.hub_search],
              outputs=[inv.hub_note, inv.hub_found], api_name="hub_loras", **load)
        inv.hub_found.input(lambda repo: repo or "", inv.hub_found, inv.hub_id, api_visibility="private",
                            queue=False)
        inv.stop.click(inversion.stop, None, inv.stop_note, api_name="stop_inversion", queue=False)  # never queued
        backbone.change(inversion.prior_checkbox, backbone, inv.bn_prior, api_visibility="private", queue=False)

        # pool
        pool_outputs = [pool.summary, pool.source, pool.label, pool.images, pool.masked, pool.details, pool.settings]
        gr.on([pool.refresh.click, pool.folder.submit], browser.open, inputs=pool.folder, outputs=pool_outputs,
              api_name="open_pool", **browse)
        pool_tab.select(browser.refresh, inputs=pool.folder, outputs=pool_outputs, api_name="refresh_pool",
                        api_visibility="undocumented", **browse)
        # a page load reads the pool only when it opens on the pool tab (?tab=pool)
        demo.load(browser.refresh_if_shown, inputs=pool.folder, outputs=pool_outputs, api_visibility="private",
                  **browse)
        pool.source.input(browser.choose_source, inputs=[pool.folder, pool.source],
                          outputs=[pool.label, pool.images, pool.masked, pool.details, pool.settings],
                          api_name="pool_source", **browse)
        pool.label.input(browser.show, inputs=[pool.folder, pool.source, pool.label, pool.page],
                         outputs=[pool.images, pool.masked, pool.details, pool.settings], api_name="pool_class",
                         **browse)
        pool.page.submit(browser.show, inputs=[pool.folder, pool.source, pool.label, pool.page],
                         outputs=[pool.images, pool.masked, pool.details, pool.settings], api_name="pool_page",
                         **browse)
        inv.add.click(inversion.add_to_pool, None, inv.pool_note, api_name="add_to_pool", **browse).then(
            browser.refresh, inputs=pool.folder, outputs=pool_outputs, api_visibility="private", **browse)

    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=PREDICT_CONCURRENCY)
    return demo


def launch_options(settings: Optional[AppSettings] = None) -> dict[str, Any]:
    """Keyword arguments for `gr.Blocks.launch` (theme, CSS, upload limit, example files, the URL length limit);
    tests launch with them."""
    settings = settings or AppSettings.from_env()
    system_fonts = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page also works offline
    theme = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", font=system_fonts,
                           font_mono=["ui-monospace", "monospace"])
    return {"theme": theme, "css": CSS, "max_file_size": MAX_FILE_SIZE, "allowed_paths": [str(settings.examples)],
            "app_kwargs": {"middleware": [Middleware(URLLengthLimit)]}}


demo: Optional[gr.Blocks] = None  # the running app; `gradio app.py` hot-reload finds it here and rebuilds it


def main() -> None:
    """Build the app into the module-level `demo` and launch it (``python app.py``, or ``gradio app.py`` to reload
    on every edit: Gradio re-runs this file and swaps in the new `demo`)."""
    global demo
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    try:
        server_port()
        # The app runs the backbone on every request: reuse freed memory rather than page-fault it in afresh, as
        # the CLI's heavy commands do (RECYCLE_MALLOC=default keeps glibc's defaults). Not on import: tests build
        # the app.
        tune_allocator()
        settings = AppSettings.from_env()
    except ValueError as e:  # a bad environment variable: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    demo = build_demo(settings=settings)
    demo.launch(**launch_options(settings))


if __name__ == "__main__":
    main()
