"""The inversion tab's handlers: invert the session's LoRA with live previews, stop, keep the latest result per
session, add it to the pool, download it as a zip. Loading the LoRA is `invert_lora`; the layout is `invert`."""

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

from recycle.formats import LoRAAdapter
from recycle.invert import InversionConfig, InversionProgress, InversionResult, invert
from recycle.pool import pool_size, run_settings, teacher_confidence, write_run, zip_run
from recycle.tokens import PruningConfig, parse_schedule

from .errors import InputError, as_text, kind_of, number_field, reported
from .images import display_images
from .invert_lora import LoadedLoRA, LoRALoading
from .limits import MAX_INVERT_IMAGES, MAX_INVERT_STEPS, MAX_SEED, PREVIEW_INTERVAL, RESULT_SESSIONS
from .markup import md_code
from .pool import push_run
from .settings import AppSettings, PathPolicy
from .state import ModelCache, SessionStore, session_id


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


class Inversion(LoRALoading):
    """Handlers of the inversion tab: load a LoRA (`LoRALoading`), invert it with live previews, stop, keep the
    latest result per session, add it to the pool, download it as a zip."""

    def __init__(self, cache: ModelCache, policy: PathPolicy, settings: AppSettings, default_backbone: str):
        super().__init__(cache, policy, settings, default_backbone)
        self.runs: SessionStore[InversionRun] = SessionStore(RESULT_SESSIONS, on_evict=InversionRun.discard)
        self._stops: dict[str, tuple[threading.Event, Path]] = {}
        self._running = threading.Lock()  # one inversion at a time, even if a cancelled one is still winding down

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
        force: bool = False,
        progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        """Invert the session's LoRA with live previews; the last update adds the masked images and the zip. A LoRA
        made for another base is refused unless `force` ("Invert anyway") is ticked.

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
            if loaded.mismatch and force is not True:
                switch = f" Switch the backbone to {loaded.made_for}, or" if loaded.made_for else ""
                raise InputError(
                    f"This LoRA fits the backbone {name} in shape only: {loaded.mismatch}, so its surrogates would "
                    f'mean nothing.{switch} tick "Invert anyway" if you know it fits.'
                )
            targets, config = self._config(classes, per_class, steps, pruning, lr, seed)
            choice = self.settings.bn_prior_for(name)
            config = dataclasses.replace(config, flip=choice.flip)
            if bn_prior:  # the prior, with the settings its run inverted with (TV, two colours) on the shipped model
                config = dataclasses.replace(config, bn_weight=choice.weight, **choice.look)
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
            held = pool_size(self.settings.pool)
            if held >= self.settings.pool_max_mb << 20:
                raise InputError(
                    f"The pool at {self.settings.pool} is full: it holds {held / 2**20:.0f} MB, its limit is "
                    f"{self.settings.pool_max_mb} MB (RECYCLE_POOL_MAX_MB). Download this run instead, or free space."
                )
            run.pooled = write_run(self.settings.pool, run.result, run.lora, run.source, run.settings, run.grid)
            n = run.result.images.shape[0]
            pushed = push_run(self.settings, run.pooled)
            return (
                f"✅ Added {n} images to the pool at {md_code(self.settings.pool)} as {md_code(run.pooled.name)}. "
                "See the Surrogate pool tab." + (f" {pushed}" if pushed else "")
            )
