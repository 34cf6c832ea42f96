"""LoRA Recycle web app: few-shot classification, LoRA inversion into surrogate images, and a surrogate-pool browser.

Assembles the tabs and launches; each tab (its layout, events and handlers) is one module of ``app_ui``, and the
work is done by `recycle`. Run ``python app.py``, or ``gradio app.py`` to reload the app whenever a file changes.
Environment:

* ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``: the address (default 127.0.0.1:7860).
* ``RECYCLE_BACKBONE``: the default backbone (a timm name, an alias, ``hf-hub:ORG/REPO`` or a local directory;
  default the paper's CLIP ViT-B/16 from the Hub). If it cannot be loaded (no network), the app falls back to the
  shipped ``mini-vit`` and its meta-LoRA, and says so.
* ``RECYCLE_WEIGHTS``: the shipped weights and example tasks (default ``weights/`` next to this file).
* ``RECYCLE_POOL``: the surrogate pool that inversions are added to (default ``./pool``).
* ``RECYCLE_POOL_MAX_MB``: **Add to pool** refuses once the pool folder holds this many megabytes (default 2048).
* ``RECYCLE_POOL_REPO``: a Hub dataset ``ORG/NAME`` that **Add to pool** also pushes to, when a Hub token is
  configured (``HF_TOKEN``).
* ``RECYCLE_ALLOW_LOCAL_PATHS``: ``0`` makes text fields accept only Hub ids (and uploads), for public servers;
  the default is ``1``, except on a Hugging Face Space.
* ``RECYCLE_PRECISION``: the few-shot tab's arithmetic: ``auto`` (default; a short calibration per backbone picks
  fp32, bf16 or int8 and the status line says which), ``fp32``, ``bf16`` or ``int8``.
* ``SPACES_ZERO_GPU``: set by a ZeroGPU Space; prediction and inversion then run under ``spaces.GPU``
  (`app_ui.zerogpu`).

Deep links: ``?tab=few-shot``, ``?tab=invert`` or ``?tab=pool`` opens that tab.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
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

from app_ui import (  # noqa: E402
    AppSettings,
    FewShot,
    HubLoRAList,
    Inversion,
    ModelCache,
    PathPolicy,
    PoolBrowser,
    find_examples,
    shipped_test_split,
    md_code,
    resolve_defaults,
)
from app_ui.fewshot import few_shot_tab  # noqa: E402
from app_ui.http import URLLengthLimit  # noqa: E402
from app_ui.invert import invert_tab  # noqa: E402
from app_ui.limits import LOADING, MAX_FILE_SIZE, PREDICT_CONCURRENCY, QUEUE_SIZE  # noqa: E402
from app_ui.pool import BROWSE, PoolView, pool_tab  # noqa: E402
from app_ui.zerogpu import wrap_handlers  # noqa: E402
from recycle.backbone import ALIASES, DEFAULT_BACKBONE  # noqa: E402
from recycle.runtime import tune_allocator  # noqa: E402

__all__ = ["build_demo", "launch_options", "main", "server_port", "demo", "TABS", "QUEUE_SIZE", "PREDICT_CONCURRENCY"]

_logger = logging.getLogger("recycle.app")

TABS = {"few-shot": "Few-shot", "invert": "Invert a LoRA", "pool": "Surrogate pool"}
CACHE_CLEANUP = (3600, 3600)  # delete Gradio's temporary files older than an hour, every hour
STYLESHEET = Path(__file__).resolve().parent / "app_ui" / "style.css"

HEADER = """\
# ♻️ LoRA Recycle
Reuse LoRAs that other people have tuned, **without their training data** \
([Hu et al., CVPR 2025](https://arxiv.org/abs/2412.02220)). **Few-shot:** classify images from a few examples per \
class, in one forward pass. **Invert a LoRA:** turn a LoRA and its classification head into surrogate images. \
**Surrogate pool:** browse the images inverted so far.
"""


def _select_tab(request: gr.Request) -> Any:
    tab = request.query_params.get("tab") if request is not None else None
    return gr.Tabs(selected=tab) if tab in TABS else gr.Tabs()


def _backbone_choices(default: str, settings: AppSettings) -> list[str]:
    shipped = [str(settings.shipped_backbone)] if (settings.shipped_backbone / "config.json").is_file() else []
    return list(dict.fromkeys([default, DEFAULT_BACKBONE, *ALIASES, *shipped]))


def build_demo(
    default_backbone: Optional[str] = None, cache: Optional[ModelCache] = None, settings: Optional[AppSettings] = None
) -> gr.Blocks:
    """The app's Blocks with its queue configured, not launched.

    Args:
        default_backbone: overrides ``settings.backbone``.
        cache: the model cache (a fresh one by default).
        settings: paths and policies (default: from the environment, `AppSettings.from_env`).
    """
    settings = settings or AppSettings.from_env()
    policy = PathPolicy(settings.allow_local_paths)
    cache = cache or ModelCache(precision=settings.precision)
    cache.lora_loader = policy.load_lora
    defaults = resolve_defaults(settings, cache, default_backbone)
    policy.trusted |= {
        defaults.backbone,
        defaults.lora,
        str(settings.shipped_backbone),
        str(settings.shipped_lora),
        str(settings.example_lora or ""),
    } - {""}
    shipped = (str(settings.shipped_backbone), str(settings.shipped_lora))
    fewshot = FewShot(cache, defaults, policy, shipped, shipped_test_split(settings.examples))
    inversion = Inversion(cache, policy, settings, defaults.backbone)
    browser = PoolBrowser(policy, settings)
    wrap_handlers(fewshot, inversion)  # on ZeroGPU hardware, prediction and inversion run under spaces.GPU

    with gr.Blocks(title="LoRA Recycle", delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(HEADER)
        backbone = gr.Dropdown(
            _backbone_choices(defaults.backbone, settings),
            value=defaults.backbone,
            allow_custom_value=True,
            label="Backbone (all tabs)",
            info="timm name, alias or hf-hub:ORG/REPO" + (", or a local folder" if policy.allow_local else ""),
        )
        status = gr.Markdown(f"Loading {md_code(defaults.backbone)}…", elem_id="status")
        with gr.Tabs() as tabs:
            with gr.Tab(TABS["few-shot"], id="few-shot"):
                fs = few_shot_tab(fewshot, defaults, find_examples(settings.examples), settings, backbone, status)
            with gr.Tab(TABS["invert"], id="invert"):
                inv = invert_tab(
                    inversion, HubLoRAList(policy, defaults.backbone), policy, settings, defaults.backbone, backbone
                )
            with gr.Tab(TABS["pool"], id="pool") as pool_tab_:
                pool = pool_tab(browser, policy, settings, demo, pool_tab_)

        gr.on([demo.load, fs.lora.submit], fewshot.status, [backbone, fs.lora], status, api_name="status", **LOADING)
        backbone.change(  # the shipped meta-LoRA leaves with its backbone, then the status follows the change
            fewshot.lora_for_backbone, [backbone, fs.lora], fs.lora, api_visibility="private", queue=False
        ).then(fewshot.status, [backbone, fs.lora], status, api_visibility="private", **LOADING)
        demo.load(_select_tab, None, tabs, api_visibility="private", queue=False)
        inv.add.click(inversion.add_to_pool, None, inv.pool_note, api_name="add_to_pool", **BROWSE).then(
            browser.refresh, inputs=pool.folder, outputs=pool.outputs(PoolView), api_visibility="private", **BROWSE
        )

    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=PREDICT_CONCURRENCY)
    return demo


def launch_options(settings: Optional[AppSettings] = None) -> dict[str, Any]:
    """Keyword arguments for `gr.Blocks.launch` (theme, stylesheet, upload limit, example files, the URL length
    limit); tests launch with them."""
    settings = settings or AppSettings.from_env()
    system_fonts = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page also works offline
    theme = gr.themes.Soft(
        primary_hue="indigo", secondary_hue="slate", font=system_fonts, font_mono=["ui-monospace", "monospace"]
    )
    return {
        "theme": theme,
        "css": STYLESHEET.read_text(encoding="utf-8"),
        "max_file_size": MAX_FILE_SIZE,
        "allowed_paths": [str(settings.examples)],
        "app_kwargs": {"middleware": [Middleware(URLLengthLimit)]},
    }


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
