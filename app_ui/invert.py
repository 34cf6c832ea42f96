"""The inversion tab: load a LoRA (Hub id or upload), invert it with live previews, stop, add the result to the
pool or download it as a zip. This module lays out the components and wires the events; the handlers are
`inversion.Inversion` (loading: `invert_lora`)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .hub_loras import HubLoRAList
from .images import surrogate_gallery
from .inputs import finite, strict
from .inversion import Inversion
from .limits import LOADING, MAX_INVERT_IMAGES, MAX_INVERT_STEPS
from .settings import AppSettings, PathPolicy

__all__ = ["PRUNING_PRESETS", "Inversion", "InvertTab", "invert_tab"]

# (label, LAYER:RATIO spec) for the pruning dropdown; any other "LAYER[,LAYER]:RATIO" can be typed in.
PRUNING_PRESETS = [
    ("none: keep every token", "none"),
    ("last block, drop 75% (paper)", "-1:0.75"),
    ("last block, drop 50%", "-1:0.5"),
    ("last block, drop 25%", "-1:0.25"),
    ("second-to-last block, drop 75%", "-2:0.75"),
]
INTRO = """\
Inversion optimises random pixels until the LoRA's classifier is confident they show each class, so the images \
reveal what the LoRA learned, with no training data. While it runs, the best images so far appear every few steps. \
After a quarter of the steps, the [CLS] token's attention decides which patches to keep: the **masked** versions keep \
only those.
"""


@dataclass
class InvertTab:
    """The inversion tab's components by name."""

    hub_id: gr.Textbox
    files: gr.File
    hub_search: gr.Textbox
    hub_list: gr.Button
    hub_found: gr.Dropdown
    hub_note: gr.Markdown
    load: gr.Button
    card: gr.Markdown
    switch: gr.Button
    force: gr.Checkbox
    classes: gr.CheckboxGroup
    per_class: gr.Slider
    steps: gr.Slider
    pruning: gr.Dropdown
    bn_prior: gr.Checkbox
    lr: gr.Number
    seed: gr.Number
    invert: gr.Button
    stop: gr.Button
    stop_note: gr.Markdown
    run_status: gr.Markdown
    images: gr.Gallery
    masked: gr.Gallery
    add: gr.Button
    download: gr.DownloadButton
    pool_note: gr.Markdown


def invert_tab(
    inversion: Inversion,
    hub_loras: HubLoRAList,
    policy: PathPolicy,
    settings: AppSettings,
    default_backbone: str,
    backbone: gr.Dropdown,
) -> InvertTab:
    """Lay out the inversion tab and wire its events (**Add to pool** is wired by the app, which also refreshes the
    pool tab)."""
    prior = settings.bn_prior_for(default_backbone)
    gr.Markdown(INTRO)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            gr.Markdown(
                "### 1 · LoRA\nA LoRA with a classification head: PEFT adapters for timm or transformers "
                "ViTs (such as PEFT's image-classification guide makes), or the official LoRA Recycle files."
            )
            hub_id = gr.Textbox(
                label="Hub id",
                placeholder="ORG/NAME" + (" or a local folder" if policy.allow_local else ""),
                max_lines=1,
                elem_id="hub-id",
            )
            files = gr.File(
                label="…or upload its files",
                file_count="multiple",
                height=130,
                file_types=[".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"],
            )
            gr.Markdown(
                "Upload `adapter_config.json` with `adapter_model.safetensors`, or one official "
                "`.safetensors` file, then press **Load LoRA**.",
                elem_classes="hint",
            )
            if settings.example_lora is not None:  # works offline and on a Space: the app's own file is trusted
                gr.Examples(
                    [[str(settings.example_lora)]],
                    inputs=[hub_id],
                    label="No LoRA at hand? Try the "
                    "bundled one (5 Han characters, tuned on the shipped mini-vit), then press Load LoRA",
                )
            with gr.Accordion("LoRAs on the Hub for this backbone", open=False):
                with gr.Row():
                    hub_search = gr.Textbox(
                        label="Name contains", placeholder="e.g. food101 (empty: all)", max_lines=1, scale=3
                    )
                    hub_list = gr.Button("Search the Hub", scale=1, min_width=120)
                hub_found = gr.Dropdown([], label="Found", interactive=True)
                hub_note = gr.Markdown("", elem_id="hub-loras")
            load = gr.Button("Load LoRA", variant="secondary")
            card = gr.Markdown("No LoRA loaded yet.", elem_id="lora-card")
            switch = gr.Button("Switch the backbone", visible=False, variant="secondary")
            force = gr.Checkbox(
                False,
                label="Invert anyway",
                info="Only for a LoRA that was made for another base but that you know fits this backbone.",
            )
            gr.Markdown("### 2 · Settings")
            classes = gr.CheckboxGroup([], label="Classes to invert", info="Load a LoRA to see its classes.")
            with gr.Row():
                per_class = finite(gr.Slider(1, 16, value=1, step=1, label="Images per class"))
                steps = finite(
                    gr.Slider(
                        10,
                        MAX_INVERT_STEPS,
                        value=100,
                        step=10,
                        label="Steps",
                        info="the paper: 2000; fewer is quicker",
                    )
                )
            pruning = gr.Dropdown(
                [(label, spec) for label, spec in PRUNING_PRESETS],
                value="-1:0.75",
                allow_custom_value=True,
                label="Token pruning",
                info="A preset, or type LAYER[,LAYER…]:RATIO (e.g. 11:0.75; -1 = last block).",
            )
            bn_prior = strict(gr.Checkbox(prior.default, label=prior.label, info=prior.info))  # follows the backbone
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    lr = finite(gr.Number(0.25, label="Learning rate (Adam)", minimum=0.001, maximum=10))
                    seed = finite(gr.Number(0, label="Seed", precision=0, minimum=0))
            gr.Markdown(
                f"At most {MAX_INVERT_IMAGES} images per run; one inversion runs at a time (others wait in the queue)."
            )
            with gr.Row():
                invert_button = gr.Button("Invert", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            stop_note = gr.Markdown("")
        with gr.Column(scale=3, min_width=360):
            gr.Markdown("### 3 · Surrogate images")
            run_status = gr.Markdown("Load a LoRA, choose classes and press **Invert**.", elem_id="run-status")
            images = surrogate_gallery("Inverted images (best so far)", columns=4)
            masked = surrogate_gallery("Masked: only the kept patches (kept/all · confidence)", columns=4)
            with gr.Row():
                add = gr.Button("Add to pool", interactive=False)
                download = gr.DownloadButton("Download zip", interactive=False)
            pool_note = gr.Markdown("")
    t = InvertTab(
        hub_id=hub_id,
        files=files,
        hub_search=hub_search,
        hub_list=hub_list,
        hub_found=hub_found,
        hub_note=hub_note,
        load=load,
        card=card,
        switch=switch,
        force=force,
        classes=classes,
        per_class=per_class,
        steps=steps,
        pruning=pruning,
        bn_prior=bn_prior,
        lr=lr,
        seed=seed,
        invert=invert_button,
        stop=stop,
        stop_note=stop_note,
        run_status=run_status,
        images=images,
        masked=masked,
        add=add,
        download=download,
        pool_note=pool_note,
    )

    lora_in, lora_out = [backbone, hub_id, files], [card, classes]
    gr.on(
        [load.click, hub_id.submit], inversion.load, inputs=lora_in, outputs=lora_out, api_name="load_lora", **LOADING
    ).then(inversion.switch_offer, None, switch, api_name="switch_offer", api_visibility="undocumented", **LOADING)
    switch.click(
        inversion.switch_backbone,
        backbone,
        backbone,
        api_name="switch_backbone",
        api_visibility="undocumented",
        queue=False,
    ).then(inversion.load, inputs=lora_in, outputs=lora_out, api_visibility="private", **LOADING).then(
        inversion.switch_offer, None, switch, api_visibility="private", **LOADING
    )
    invert_button.click(
        inversion.run,
        inputs=[backbone, classes, per_class, steps, pruning, bn_prior, lr, seed, force],
        outputs=[images, masked, run_status, download, add],
        api_name="invert",
        concurrency_id="invert",
        concurrency_limit=1,
        show_progress_on=[run_status],
    )
    gr.on(
        [hub_list.click, hub_search.submit],
        hub_loras.search,
        inputs=[backbone, hub_search],
        outputs=[hub_note, hub_found],
        api_name="hub_loras",
        **LOADING,
    )
    hub_found.input(lambda repo: repo or "", hub_found, hub_id, api_visibility="private", queue=False)
    stop.click(inversion.stop, None, stop_note, api_name="stop_inversion", queue=False)  # never queued
    backbone.change(inversion.prior_checkbox, backbone, bn_prior, api_visibility="private", queue=False)
    return t
