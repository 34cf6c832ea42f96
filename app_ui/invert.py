"""The inversion tab: load a LoRA (Hub id or upload), invert it with live previews, stop, keep the latest result per
session, add it to the pool, download it as a zip."""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import gradio as gr

from recycle.backbone import Backbone
from recycle.formats import LoRAAdapter, LoRAFormatError, read_adapter, stage_lora_files
from recycle.invert import InversionConfig, InversionProgress, InversionResult, invert
from recycle.pool import run_settings, teacher_confidence, write_run, zip_run
from recycle.provenance import provenance_mismatch
from recycle.tokens import PruningConfig, parse_schedule

from .errors import InputError, as_text, file_paths, kind_of, number_field, reported, text_field, user_text
from .images import display_images
from .markup import md_code, md_text
from .hub_loras import HubLoRAList
from .pool import push_run
from .images import surrogate_gallery
from .inputs import finite, strict
from .limits import (
    LOADING,
    MAX_INVERT_IMAGES,
    MAX_INVERT_STEPS,
    MAX_LORA_FILES,
    MAX_SEED,
    PREVIEW_INTERVAL,
    RESULT_SESSIONS,
    SESSIONS,
)
from .settings import AppSettings, PathPolicy
from .state import ModelCache, SessionStore, session_id

# (label, LAYER:RATIO spec) for the pruning dropdown; any other "LAYER[,LAYER]:RATIO" can be typed in.
PRUNING_PRESETS = [
    ("none: keep every token", "none"),
    ("last block, drop 75% (paper)", "-1:0.75"),
    ("last block, drop 50%", "-1:0.5"),
    ("last block, drop 25%", "-1:0.25"),
    ("second-to-last block, drop 75%", "-2:0.75"),
]


@dataclass
class LoadedLoRA:
    adapter: LoRAAdapter
    source: str  # Hub id, path, or "upload: <file names>"
    backbone: str  # the backbone it was loaded (and checked) for
    made_for: Optional[str] = None  # the backbone it names, when that is not the selected one and may be chosen


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


def _parse_pruning(text: Optional[str]) -> dict[int, float]:
    text = as_text(text, "token pruning setting (a preset, or LAYER:RATIO such as '-1:0.75')").strip()
    if text.lower() in ("", "none", "0", "off"):
        return {}
    try:
        schedule = parse_schedule([s for s in text.replace(";", " ").split() if s])
        PruningConfig(schedule)
    except ValueError as e:
        raise InputError(
            f"Pruning schedule '{text}': {e}. Write LAYER:RATIO, e.g. '-1:0.75' (last block, drop "
            "75%) or '3,7:0.3', or choose 'none'."
        ) from None
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
        self._stops: dict[str, tuple[threading.Event, Path]] = {}
        self._running = threading.Lock()  # one inversion at a time, even if a cancelled one is still winding down
        self._tmp = Path(tempfile.mkdtemp(prefix="recycle-app-"))

    # ---- loading
    def _backbone_name(self, backbone: Optional[str]) -> str:
        return self.policy.backbone(text_field(backbone, "backbone name") or self.default_backbone)

    def load(
        self, backbone: Optional[str], hub_id: Optional[str], files: Optional[list[str]], request: gr.Request = None
    ) -> tuple[str, dict]:
        """Load the LoRA to invert: the uploaded files if any, else the Hub id. Shows its backbone and classes.

        Returns:
            The LoRA's card (markdown) and an update of the class checkboxes.
        """
        with reported("Cannot load the LoRA", "loading the LoRA"):
            name = self._backbone_name(backbone)
            uploads = file_paths(files)
            hub_id = text_field(hub_id, "LoRA name")
            if not uploads and not hub_id:
                raise InputError("Enter a Hub id (ORG/NAME) or upload the LoRA's files first.")
            model = self.cache.backbone(name)  # needed to map an official file's head, and to check the fit
            if uploads:
                uploaded = next((Path(f).name for f in uploads if f.endswith(".safetensors")), "LoRA")
                source = "upload:" + uploaded
                with tempfile.TemporaryDirectory(dir=self._tmp) as tmp:
                    adapter = read_adapter(stage_lora_files(uploads, Path(tmp), MAX_LORA_FILES), model, uploaded)
            else:
                source = hub_id
                adapter = self.policy.load_lora(hub_id, model)
            if adapter.head_weight is None:
                raise LoRAFormatError(
                    "This LoRA has no classification head, so there is nothing to invert (a "
                    "meta-LoRA, for example, has none). Load a LoRA tuned with a head."
                )
            fit = self._fit(adapter, model, name)
            self.loras.set(session_id(request), LoadedLoRA(adapter, source, name, self._offer(adapter, name, fit)))
            names = adapter.class_names or []
            c = adapter.config
            card = "\n".join(
                [
                    f"**Loaded** {md_code(source)}: {len(names)} classes; LoRA on "
                    f"{md_text(', '.join(c.targets))}, rank {c.rank}, scale {c.scaling:g}; made for backbone "
                    f"{md_code(adapter.backbone or 'unknown')}.",
                    "",
                    fit,
                    "",
                    "**Classes:** " + ", ".join(f"<bdi>{md_text(n)}</bdi>" for n in names),
                ]
            )
            choices = [(n, i) for i, n in enumerate(names)]
            return card, gr.update(
                choices=choices,
                value=[i for _, i in choices[:2]],
                info=f"{len(choices)} classes; fewer classes and images make a quicker run.",
            )

    def _offer(self, adapter: LoRAAdapter, name: str, fit: str) -> Optional[str]:
        """The backbone to offer to switch to: the one the LoRA names, when it does not fit the selected one and the
        path policy lets a user choose it."""
        if fit.startswith("✅") or not adapter.backbone or adapter.backbone == name:
            return None
        try:
            return self.policy.backbone(adapter.backbone)
        except InputError:  # e.g. a local folder on a server whose users may not name one
            return None

    def switch_offer(self, request: gr.Request = None) -> dict:
        """The "switch the backbone" button: shown, naming the backbone, when the session's LoRA was made for another
        one that can be chosen."""
        loaded = self.loras.get(session_id(request))
        made_for = loaded.made_for if loaded is not None else None
        return gr.update(
            visible=made_for is not None,
            value=f"Switch the backbone to {made_for}" if made_for else "Switch the backbone",
        )

    def switch_backbone(self, backbone: Optional[str], request: gr.Request = None) -> str:
        """The backbone the session's LoRA was made for (the current one when there is none to switch to)."""
        loaded = self.loras.get(session_id(request))
        return loaded.made_for if loaded is not None and loaded.made_for else (backbone or self.default_backbone)

    @staticmethod
    def _fit(adapter: LoRAAdapter, model: Backbone, name: str) -> str:
        try:
            with adapter.attached(model):
                adapter.build_head(model.num_features)
        except LoRAFormatError as e:
            return (
                f"⚠️ It does **not fit** the selected backbone {md_code(name)}: {md_text(user_text(e), 1000)}. "
                "Choose the backbone it was made for at the top of the page, then load it again."
            )
        mismatch = provenance_mismatch(adapter.backbone, model)
        if mismatch:  # the shapes fit, but the weights are another model's (e.g. a ViT-B/16 LoRA on CLIP ViT-B/16)
            return (
                f"⚠️ It fits the selected backbone {md_code(name)} in shape only: it was made for "
                f"{md_code(adapter.backbone or '')}, another model, so its outputs would mean nothing here. Switch "
                f"the backbone at the top of the page to {md_code(adapter.backbone or '')}, then load it again."
            )
        return f"✅ Fits the selected backbone {md_code(name)}: choose the classes and press **Invert**."

    def prior_checkbox(self, backbone: Optional[str]) -> dict:
        """The BN-prior checkbox for `backbone`: which prior it uses (label and info), ticked where that is the
        shipped glyph prior."""
        choice = self.settings.bn_prior_for(backbone.strip() if isinstance(backbone, str) else "")
        return gr.update(value=choice.default, label=choice.label, info=choice.info)

    # ---- running
    def _config(
        self, classes: Optional[list], per_class: Any, steps: Any, pruning: Optional[str], lr: Any, seed: Any
    ) -> tuple[list[int], InversionConfig]:
        if not classes:
            raise InputError("Choose at least one class to invert.")
        if not isinstance(classes, list):
            raise InputError(f"The classes must be a list of class choices, got {kind_of(classes)}.")
        per_class = number_field(per_class, "number of images per class", 1, MAX_INVERT_IMAGES)
        steps = number_field(steps, "number of steps", 1, MAX_INVERT_STEPS)
        seed = number_field(seed or 0, "seed", 0, MAX_SEED)
        lr = number_field(lr, "learning rate", 0, 10, whole=False)
        if per_class * len(classes) > MAX_INVERT_IMAGES:
            raise InputError(
                f"{len(classes)} classes × {per_class} images = {len(classes) * per_class} images; "
                f"at most {MAX_INVERT_IMAGES} per run. Choose fewer classes or images per class."
            )
        if lr == 0:
            raise InputError("The learning rate must be above 0.")
        schedule = _parse_pruning(pruning)
        preview = max(1, min(10, steps // 20))
        try:
            config = InversionConfig(
                per_class=per_class,
                steps=steps,
                lr=lr,
                seed=seed,
                preview_every=preview,
                pruning=PruningConfig(schedule or {-1: 0.0}),
            )
        except ValueError as e:
            raise InputError(f"Inversion settings: {e}.") from None
        return [self._class_index(c) for c in classes], config

    @staticmethod
    def _class_index(c: Any) -> int:
        try:
            return int(c)
        except (TypeError, ValueError):
            raise InputError(f"Unknown class {c!r}: choose classes from the list.") from None

    def run(
        self,
        backbone: Optional[str],
        classes: Optional[list],
        per_class: Any,
        steps: Any,
        pruning: Optional[str],
        bn_prior: bool,
        lr: Any,
        seed: Any,
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        """Invert the session's LoRA with live previews; the last update adds the masked images and the zip.

        Yields:
            (images gallery, masked gallery, status markdown, zip file, "add to pool" button update).
        """
        session = session_id(request)
        with reported("Cannot invert", "inverting"):
            loaded = self.loras.get(session)
            if loaded is None:
                raise InputError("Load a LoRA first (step 1): enter a Hub id or upload its files.")
            name = self._backbone_name(backbone)
            if name != loaded.backbone:
                raise InputError(
                    f"The backbone changed to `{name}` since the LoRA was loaded for "
                    f"`{loaded.backbone}`; load the LoRA again."
                )
            targets, config = self._config(classes, per_class, steps, pruning, lr, seed)
            choice = self.settings.bn_prior_for(name)
            config = dataclasses.replace(config, flip=choice.flip)
            if bn_prior:
                config = dataclasses.replace(config, bn_weight=choice.weight)
            names = loaded.adapter.class_names or []
            for t in targets:
                if not 0 <= t < loaded.adapter.num_classes:
                    raise InputError(
                        f"Class index {t} is out of range: the LoRA has {loaded.adapter.num_classes} classes."
                    )
        off = gr.update(value=None, interactive=False)
        yield [], [], "⏳ Preparing the backbone…", off, gr.update(interactive=False)
        # The Stop button reaches the computation through a file, so that it also works when the computation runs
        # in another process (ZeroGPU forks one); in this process the event is enough.
        stop = threading.Event()
        stop_file = self._tmp / f"stop-{uuid.uuid4().hex}"
        self._stops[session] = (stop, stop_file)
        labels = [names[t] for t in targets for _ in range(config.per_class)]
        frames = self.compute(
            name, loaded.adapter, targets, config, choice.name if bn_prior else None, labels, str(stop_file)
        )
        started = time.monotonic()
        try:
            for frame in frames:
                if frame[0] == "progress":
                    progress(frame[1], desc=frame[2])
                elif frame[0] == "preview":
                    yield frame[1], [], f"⏳ {frame[2]}", gr.update(), gr.update()
                elif frame[0] == "waiting":
                    yield [], [], f"⏳ {frame[1]}", off, gr.update(interactive=False)
                else:  # ("done", result, grid)
                    with reported("Cannot invert", "inverting"):
                        yield self._finish(
                            session,
                            loaded,
                            frame[1],
                            config,
                            name,
                            choice.name if bn_prior else None,
                            targets,
                            time.monotonic() - started,
                            frame[2],
                        )
        finally:
            stop.set()
            frames.close()  # a cancelled or failed run stops its worker too
            stop_file.unlink(missing_ok=True)
            if self._stops.get(session, (None,))[0] is stop:
                del self._stops[session]

    def compute(
        self,
        name: str,
        adapter: LoRAAdapter,
        targets: list[int],
        config: InversionConfig,
        prior_name: Optional[str],
        labels: list[str],
        stop_file: str,
    ) -> Iterator[tuple]:
        """The inversion itself, on the backbone's inversion copy: the part that needs the accelerator. It takes
        and yields plain values only and keeps no session state, so it can run in another process (ZeroGPU runs it
        in a forked worker; `app_ui.zerogpu`).

        Yields:
            ``("waiting", text)`` while a previous inversion winds down, ``("progress", fraction, text)``,
            ``("preview", gallery, text)`` every `PREVIEW_INTERVAL` seconds, and last ``("done", result, grid)``.
        """
        with reported("Cannot invert", "inverting"):
            model = self.cache.inverter(name)
            try:
                config.pruning.resolved(len(model.model.blocks))
            except ValueError as e:
                raise InputError(f"Pruning schedule: {e}.") from None
            prior = self.cache.bn_prior(prior_name) if prior_name else None
            with adapter.attached(model):  # fails now, with a clear message, if it does not fit
                pass
            grid = tuple(model.model.patch_embed.grid_size)
        stop = threading.Event()

        def should_stop() -> bool:
            return stop.is_set() or os.path.exists(stop_file)

        updates: queue.Queue = queue.Queue()
        outcome: dict[str, Any] = {}

        def work() -> None:
            with self._running:
                try:
                    outcome["result"] = invert(
                        model, adapter, config, targets, prior, progress=updates.put, should_stop=should_stop
                    )
                except BaseException as e:  # noqa: BLE001 - handed to the generator, which reports it
                    outcome["error"] = e
                finally:
                    updates.put(None)

        started = time.monotonic()
        worker = threading.Thread(target=work, name="inversion", daemon=True)
        waiting = self._running.locked()
        worker.start()
        try:
            if waiting:
                yield ("waiting", "Waiting for the previous inversion to stop…")
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
                    text = self._progress_text(latest, time.monotonic() - started, should_stop())
                    yield ("progress", latest.step / latest.steps, text)
                    if preview is not None and time.monotonic() - shown_at >= PREVIEW_INTERVAL:
                        gallery = list(zip(display_images(preview), [f"{c} · step {latest.step}" for c in labels]))
                        preview, shown_at = None, time.monotonic()
                        yield ("preview", gallery, text)
            worker.join()
            with reported("Cannot invert", "inverting"):
                if "error" in outcome:
                    raise outcome["error"]
            yield ("done", outcome["result"], grid)
        finally:
            stop.set()  # a cancelled or failed run stops its worker too

    @staticmethod
    def _progress_text(p: InversionProgress, elapsed: float, stopping: bool) -> str:
        left = elapsed / max(p.step, 1) * (p.steps - p.step)
        prune = " · pruning tokens" if p.pruning else ""
        stop = " · stopping…" if stopping else ""
        return (
            f"Step {p.step}/{p.steps} · loss {p.loss:.3f} · teacher accuracy {100 * p.accuracy:.0f}%{prune} · "
            f"{elapsed:.0f} s elapsed, ~{left:.0f} s left{stop}"
        )

    def _finish(
        self,
        session: str,
        loaded: LoadedLoRA,
        result: InversionResult,
        config: InversionConfig,
        backbone: str,
        bn_prior: Optional[str],
        targets: list[int],
        seconds: float,
        grid: tuple[int, int],
    ) -> tuple:
        names = loaded.adapter.class_names or [str(i) for i in range(loaded.adapter.num_classes)]
        settings = run_settings(
            config, backbone=backbone, classes=[names[t] for t in targets], bn_prior=bn_prior, made_by="app"
        )
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self._tmp))
        run = InversionRun(loaded.adapter, loaded.source, result, settings, grid, folder)
        run_dir = write_run(folder / "pool", result, loaded.adapter, loaded.source, settings, grid)
        run.zip_path = zip_run(run_dir, folder / f"{run_dir.name}.zip")
        shutil.rmtree(folder / "pool", ignore_errors=True)
        self.runs.set(session, run)
        labels = result.labels
        conf = teacher_confidence(result.logits, labels).tolist()
        gallery = [
            (im, f"{names[int(y)]} · p={c:.2f}") for im, y, c in zip(display_images(result.images), labels, conf)
        ]
        masked = []
        if result.masked is not None:
            total = grid[0] * grid[1]
            conf_kept = teacher_confidence(result.logits_kept, labels).tolist()
            masked = [
                (im, f"{names[int(y)]} · {k.numel()}/{total} · p={c:.2f}")
                for im, y, k, c in zip(display_images(result.masked), labels, result.kept, conf_kept)
            ]
        mean = sum(conf) / len(conf)
        how = (
            f"⏹ **Stopped** after {result.steps_done} of {config.steps} steps: these are the best images so far."
            if result.stopped
            else f"✅ **Done:** {config.steps} steps in {seconds:.0f} s."
        )
        status = (
            f"{how} {len(labels)} images; the teacher's mean confidence in their class is {mean:.2f}. "
            + ("The masked versions keep the patches the [CLS] token attended to most. " if masked else "")
            + "Add them to the pool, or download them as a zip."
        )
        return (
            gallery,
            masked,
            status,
            gr.update(value=str(run.zip_path), interactive=True),
            gr.update(interactive=True),
        )

    def stop(self, request: gr.Request = None) -> str:
        """Ask this session's running inversion to stop; it returns the best images so far."""
        running = self._stops.get(session_id(request))
        if running is None:
            return "Nothing is running."
        event, stop_file = running
        event.set()
        stop_file.touch()
        return "⏹ Stopping… the best images so far will be shown."

    def add_to_pool(self, request: gr.Request = None) -> str:
        """Write this session's latest inversion into the pool folder."""
        with reported("Cannot add to the pool", "adding to the pool"):
            run = self.runs.get(session_id(request))
            if run is None:
                raise InputError("There is no inversion to add yet: run one first.")
            if run.pooled is not None:
                return f"Already in the pool as {md_code(run.pooled.name)}."
            run.pooled = write_run(self.settings.pool, run.result, run.lora, run.source, run.settings, run.grid)
            n = run.result.images.shape[0]
            pushed = push_run(self.settings, run.pooled)
            return (
                f"✅ Added {n} images to the pool at {md_code(self.settings.pool)} as {md_code(run.pooled.name)}. "
                "See the Surrogate pool tab." + (f" {pushed}" if pushed else "")
            )


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
        hub_id,
        files,
        hub_search,
        hub_list,
        hub_found,
        hub_note,
        load,
        card,
        switch,
        classes,
        per_class,
        steps,
        pruning,
        bn_prior,
        lr,
        seed,
        invert_button,
        stop,
        stop_note,
        run_status,
        images,
        masked,
        add,
        download,
        pool_note,
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
        inputs=[backbone, classes, per_class, steps, pruning, bn_prior, lr, seed],
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
