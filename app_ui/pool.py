"""The pool tab: sources (LoRAs) and classes, images with their teacher confidences, and the settings that made
them; of the server's pool, a local folder, or a pool dataset on the Hub (``datasets/ORG/NAME``). **Add to pool** can
also push each run to a Hub dataset (`push_run`)."""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import gradio as gr

from recycle.hub import HubError
from recycle.pool import EmptyPoolError, Pool, PoolError, PoolIndex, teacher_confidence
from recycle.pool.hub import HubPoolLimits, fetch_pool, hub_dataset_id, remove_downloads
from recycle.pool.hub_publish import push_pool

from .errors import number_field, reported, text_field, user_text
from .inputs import finite
from .images import display_images, surrogate_gallery
from .limits import (
    MAX_HUB_POOL_BYTES,
    MAX_HUB_POOL_FILES,
    MAX_POOL_GALLERY,
    MAX_POOL_PAGE_PIXELS,
    MAX_POOL_MANIFEST_BYTES,
    MAX_POOL_RUN_ITEMS,
    MAX_POOL_RUNS,
    MAX_POOL_SETTINGS_CHARS,
    MAX_POOL_SOURCES,
    POOL_INDEXES,
)
from .markup import md_code, md_text
from .settings import AppSettings, PathPolicy

INTRO = "The pool holds inverted images, their masks and the teacher's logits, grouped by source LoRA and class."
BROWSE = dict(concurrency_id="pool", concurrency_limit=2)  # pool reads at once

# A Hub pool is downloaded within these bounds, then read with the same bounds as a local one.
HUB_POOL_LIMITS = HubPoolLimits(
    max_runs=MAX_POOL_RUNS,
    max_files=MAX_HUB_POOL_FILES,
    max_bytes=MAX_HUB_POOL_BYTES,
    max_manifest_bytes=MAX_POOL_MANIFEST_BYTES,
    max_items=MAX_POOL_RUN_ITEMS,
)


class ClassView(NamedTuple):
    """What the tab shows of one class: its images, their masked versions, a caption and the runs' settings. The
    field names are the tab's component names (`PoolTab`)."""

    images: list
    masked: list
    details: str
    settings: Any


class SourceView(NamedTuple):
    """A source LoRA chosen: its class list, and its first class shown."""

    label: Any
    images: list
    masked: list
    details: str
    settings: Any


class PoolView(NamedTuple):
    """A pool opened: its summary, the source and class lists, and the first class shown."""

    summary: str
    source: Any
    label: Any
    images: list
    masked: list
    details: str
    settings: Any


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _bounded(value: dict) -> Any:
    """`value` if its JSON is at most `MAX_POOL_SETTINGS_CHARS` characters, else a note saying it was left out (a
    manifest's settings are free-form, and everything shown is sent to the browser)."""
    text = json.dumps(value, default=str)
    if len(text) <= MAX_POOL_SETTINGS_CHARS:
        return value
    return {
        "note": f"{len(text):,} characters of settings, more than the {MAX_POOL_SETTINGS_CHARS:,} shown; see "
        "the run's manifest.json"
    }


class PoolBrowser:
    """Handlers of the pool tab: sources (LoRAs) and classes, images with their teacher confidences and settings."""

    def __init__(self, policy: PathPolicy, settings: AppSettings):
        self.policy = policy
        self.settings = settings
        self._indexes: OrderedDict[str, PoolIndex] = OrderedDict()  # the most recently browsed pool folders
        self._hub: OrderedDict[str, str] = OrderedDict()  # Hub dataset id -> the pool folder of its downloaded commit
        self._lock = threading.Lock()

    @staticmethod
    def _hub_id(folder: Optional[str]) -> Optional[str]:
        text = text_field(folder, "pool folder")
        return hub_dataset_id(text) if text else None

    def _root(self, folder: Optional[str], refresh: bool) -> str:
        """The local folder of the pool named by `folder`: a local folder (as the path policy allows), or the pool
        folder of a Hub dataset's latest commit, downloaded within `HUB_POOL_LIMITS` (looked up again when
        `refresh`, else the commit last opened)."""
        repo = self._hub_id(folder)
        if repo is None:
            return str(self.policy.folder(folder or "", self.settings.pool))
        with self._lock:
            known = self._hub.get(repo)
        if known is None or refresh:
            known = str(fetch_pool(repo, HUB_POOL_LIMITS))
        with self._lock:
            self._hub[repo] = known
            self._hub.move_to_end(repo)
            dropped = []
            while len(self._hub) > POOL_INDEXES:
                dropped.append(self._hub.popitem(last=False)[0])
        # The disk holds at most the latest commit of the last few datasets opened.
        remove_downloads(repo, keep=known)
        for other in dropped:
            remove_downloads(other)
        return known

    def _index(self, folder: Optional[str], refresh: bool = False) -> PoolIndex:
        """The index of the pool in `folder` (the server's own by default, or a Hub dataset), kept per folder: each
        request lists the folder and reads only new or changed manifests, each bounded in size, of at most
        `MAX_POOL_RUNS` runs."""
        root = self._root(folder, refresh)
        with self._lock:
            index = self._indexes.pop(root, None) or PoolIndex(
                root, MAX_POOL_MANIFEST_BYTES, MAX_POOL_RUN_ITEMS, MAX_POOL_RUNS
            )
            self._indexes[root] = index
            while len(self._indexes) > POOL_INDEXES:
                self._indexes.popitem(last=False)
        return index

    def _open(self, folder: Optional[str]) -> Pool:
        return self._index(folder).pool()

    @staticmethod
    def _source_choices(pool: Pool) -> list[tuple[str, str]]:
        """The first `MAX_POOL_SOURCES` sources (LoRAs), as dropdown choices."""
        return [
            (f"{s['name']} ({fp[:8]}): {_plural(len(s['class_names']), 'class')}, {_plural(s['images'], 'image')}", fp)
            for fp, s in itertools.islice(pool.sources().items(), MAX_POOL_SOURCES)
        ]

    @staticmethod
    def _class_choices(pool: Pool, source: Optional[str]) -> list[tuple[str, str]]:
        return [(f"{c.name} ({len(c.items)})", str(c.label)) for c in pool.classes if c.source == source]

    def open(self, folder: Optional[str]) -> PoolView:
        """Open the pool: its summary and the source list, with the first source and class shown."""
        with reported("Cannot open the pool", "opening the pool"):
            return self._open_view(folder)

    def _open_view(self, folder: Optional[str]) -> PoolView:
        index = self._index(folder, refresh=True)
        pool = index.pool()
        repo = self._hub_id(folder)
        sources = self._source_choices(pool)
        source = sources[0][1]
        classes = self._class_choices(pool, source)
        images = sum(len(r["items"]) for r in pool.runs)
        n_sources = len({r["source"]["fingerprint"] for r in pool.runs})
        summary = (
            f"**{md_text(f'datasets/{repo}' if repo else pool.root)}**: "
            f"{_plural(len(pool.runs), 'inversion run')} from "
            f"{_plural(n_sources, 'LoRA')}, {_plural(len(pool.classes), 'class')}, "
            f"{_plural(images, 'image')}"
            + (", with masked versions." if pool.masked_available else ".")
            + (f" The first {len(sources)} LoRAs are listed." if n_sources > len(sources) else "")
            + (
                f" Only the first {len(pool.runs)} of its {index.total_runs} runs are read."
                if index.total_runs > len(pool.runs)
                else ""
            )
        )
        return PoolView(
            summary,
            gr.update(choices=sources, value=source),
            gr.update(choices=classes, value=classes[0][1]),
            *self._show(pool, source, classes[0][1]),
        )

    def refresh(self, folder: Optional[str]) -> PoolView:
        """Like `open`, but a problem is explained in the summary instead of raised; for a pool that does not exist
        yet or holds no runs, with how to start one."""
        try:
            with reported("Cannot open the pool", "opening the pool"):
                try:
                    return self._open_view(folder)
                except EmptyPoolError as e:
                    hint = " Invert a LoRA in the **Invert a LoRA** tab and press **Add to pool**."
                    return self._empty_view(f"{user_text(e)}.{hint}")
        except gr.Error as e:
            return self._empty_view(f"{e.message}.")

    @staticmethod
    def _empty_view(message: str) -> PoolView:
        empty = gr.update(choices=[], value=None)
        return PoolView(f"ℹ️ {md_text(message, 1000)}", empty, empty, [], [], "", None)

    def refresh_if_shown(self, folder: Optional[str], request: gr.Request = None) -> PoolView:
        """`refresh` when the page was opened on the pool tab (``?tab=pool``); otherwise nothing is read or changed."""
        if request is not None and request.query_params.get("tab") == "pool":
            return self.refresh(folder)
        return PoolView(*(gr.skip() for _ in PoolView._fields))

    def choose_source(self, folder: Optional[str], source: Optional[str]) -> SourceView:
        """The classes of `source`, with the first one shown."""
        with reported("Cannot open the pool", "opening the pool"):
            pool = self._open(folder)
            classes = self._class_choices(pool, source)
            if not classes:
                raise PoolError(f"The pool has no LoRA with fingerprint '{source}'. Press Refresh.")
            return SourceView(gr.update(choices=classes, value=classes[0][1]), *self._show(pool, source, classes[0][1]))

    def show(self, folder: Optional[str], source: Optional[str], label: Optional[str], page: Any = 1) -> ClassView:
        """Images of one class of one source, a page of `MAX_POOL_GALLERY` at a time: unmasked and masked, captioned
        with the teacher's confidence (a page beyond the last shows the last)."""
        with reported("Cannot open the pool", "showing pool images"):
            page = number_field(1 if page is None else page, "page", 1, 10**9)
            return self._show(self._open(folder), source, label, page)

    @staticmethod
    def _show(pool: Pool, source: Optional[str], label: Optional[str], page: int = 1) -> ClassView:
        match = [c for c in pool.classes if c.source == source and str(c.label) == str(label)]
        if not match:
            raise PoolError(f"The pool has no class {str(label)[:80]!r} from LoRA {str(source)[:80]!r}. Press Refresh.")
        cls = match[0]
        largest = max(math.prod(pool.runs[r]["image_size"]) for r in {ref.run for ref in cls.items})
        per_page = max(1, min(MAX_POOL_GALLERY, MAX_POOL_PAGE_PIXELS // (2 * largest)))  # unmasked and masked
        pages = max(1, math.ceil(len(cls.items) / per_page))
        page = min(page, pages)
        first = (page - 1) * per_page
        items = cls.items[first : first + per_page]
        images, masked, conf, conf_kept = [], [], [], []
        for ref in items:
            item = pool.item(ref)
            image = pool.load(ref)
            p = teacher_confidence([item["logits"]], [cls.label]).item()
            conf.append(p)
            images.append((display_images(image[None])[0], f"p={p:.2f} · run {ref.run + 1}"))
            if "masked" in item:
                pk = teacher_confidence([item["logits_kept"]], [cls.label]).item()
                conf_kept.append(pk)
                masked.append(
                    (display_images(pool.load(ref, masked=True)[None])[0], f"{len(item['kept'])} patches · p={pk:.2f}")
                )
        runs = sorted({ref.run for ref in items})
        settings = {
            pool.run_dirs[r].name: _bounded(
                {
                    "settings": pool.runs[r]["settings"],
                    "steps_done": pool.runs[r].get("steps_done"),
                    "stopped": pool.runs[r].get("stopped"),
                    "created": pool.runs[r].get("created"),
                }
            )
            for r in runs
        }
        shown = (
            f"showing {first + 1}–{first + len(items)} of {len(cls.items)}, page {page} of {pages}"
            if pages > 1
            else _plural(len(items), "image")
        )
        details = (
            f"**<bdi>{md_text(cls.name)}</bdi>** ({shown}): the teacher LoRA's mean confidence in this "
            f"class is **{sum(conf) / len(conf):.2f}** on the images"
            + (f" and **{sum(conf_kept) / len(conf_kept):.2f}** on their kept tokens." if conf_kept else ".")
        )
        return ClassView(images, masked, details, settings)


def push_run(settings: AppSettings, run_dir: Path) -> str:
    """Push a run just added to the server's pool to the Hub dataset ``settings.pool_repo``, if one is configured and
    a Hub token is; returns a note for the user (empty when no dataset is configured). A failed push loses nothing:
    the run stays in the local pool, and the note says why it was not pushed."""
    if not settings.pool_repo:
        return ""
    from huggingface_hub import get_token

    where = md_code(f"datasets/{settings.pool_repo}")
    if not get_token():
        return f"Not pushed to {where}: no Hub token is configured (set HF_TOKEN)."
    try:
        push_pool(settings.pool, settings.pool_repo, runs=[run_dir.name])
    except (HubError, PoolError) as e:
        return f"⚠️ Not pushed to {where}: {md_text(user_text(e), 500)}. The run is kept in the local pool."
    return f"Pushed to the Hub dataset {where}."


@dataclass
class PoolTab:
    """The pool tab's components, by the names the views (`PoolView`, `SourceView`, `ClassView`) use."""

    folder: gr.Textbox
    refresh: gr.Button
    summary: gr.Markdown
    source: gr.Dropdown
    label: gr.Dropdown
    page: gr.Number
    details: gr.Markdown
    images: gr.Gallery
    masked: gr.Gallery
    settings: gr.JSON

    def outputs(self, view: type) -> list:
        """The components a handler returning `view` (a NamedTuple of this tab) fills, in its field order."""
        return [getattr(self, name) for name in view._fields]


def pool_tab(browser: PoolBrowser, policy: PathPolicy, settings: AppSettings, demo: gr.Blocks, tab: gr.Tab) -> PoolTab:
    """Lay out the pool tab inside `tab` and wire its events; a page load reads the pool only when it opens on this
    tab (``?tab=pool``)."""
    gr.Markdown(INTRO)
    with gr.Row(equal_height=False):
        hub = "or a Hub dataset: datasets/ORG/NAME. Press Enter to open."
        folder = gr.Textbox(
            str(settings.pool),
            label="Pool folder or Hub dataset",
            max_lines=1,
            scale=4,
            info=(f"A folder, {hub}" if policy.allow_local else f"The server's pool (RECYCLE_POOL), {hub}"),
        )
        refresh = gr.Button("↻ Refresh", scale=1, min_width=120)
    summary = gr.Markdown("", elem_id="pool-summary")
    with gr.Row():
        source = gr.Dropdown([], label="Source LoRA", interactive=True, scale=3)
        label = gr.Dropdown([], label="Class", interactive=True, scale=2)
        page = finite(
            gr.Number(
                1, label=f"Page (up to {MAX_POOL_GALLERY} images)", precision=0, minimum=1, scale=1, min_width=120
            )
        )
    details = gr.Markdown("")
    with gr.Row(equal_height=False):
        images = surrogate_gallery("Images", columns=3)
        masked = surrogate_gallery("Masked (kept tokens only)", columns=3)
    with gr.Accordion("Settings that made these images", open=False):
        settings_json = gr.JSON(label="Inversion settings per run")
    t = PoolTab(folder, refresh, summary, source, label, page, details, images, masked, settings_json)

    gr.on(
        [refresh.click, folder.submit],
        browser.open,
        inputs=folder,
        outputs=t.outputs(PoolView),
        api_name="open_pool",
        **BROWSE,
    )
    tab.select(
        browser.refresh,
        inputs=folder,
        outputs=t.outputs(PoolView),
        api_name="refresh_pool",
        api_visibility="undocumented",
        **BROWSE,
    )
    demo.load(browser.refresh_if_shown, inputs=folder, outputs=t.outputs(PoolView), api_visibility="private", **BROWSE)
    source.input(
        browser.choose_source, inputs=[folder, source], outputs=t.outputs(SourceView), api_name="pool_source", **BROWSE
    )
    shown = [folder, source, label, page]
    label.input(browser.show, inputs=shown, outputs=t.outputs(ClassView), api_name="pool_class", **BROWSE)
    page.submit(browser.show, inputs=shown, outputs=t.outputs(ClassView), api_name="pool_page", **BROWSE)
    return t
