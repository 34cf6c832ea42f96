"""The pool tab: sources (LoRAs) and classes, images with their teacher confidences, and the settings that made
them."""
from __future__ import annotations

from typing import Optional

import gradio as gr

from recycle.pool import Pool, PoolError, teacher_confidence

from .errors import reported
from .images import display_images
from .limits import MAX_POOL_GALLERY
from .markup import md_text
from .settings import AppSettings, PathPolicy


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


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
        with reported("Cannot open the pool", "opening the pool"):
            pool = self._open(folder)
            sources = self._source_choices(pool)
            source = sources[0][1]
            classes = self._class_choices(pool, source)
            images = sum(len(r["items"]) for r in pool.runs)
            summary = (f"**{md_text(pool.root)}**: {_plural(len(pool.runs), 'inversion run')} from "
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
            return f"ℹ️ {md_text(e.message, 1000)}.{hint}", empty, empty, [], [], "", None

    def choose_source(self, folder: Optional[str], source: Optional[str]) -> tuple:
        """The classes of `source`, with the first one shown."""
        with reported("Cannot open the pool", "opening the pool"):
            pool = self._open(folder)
            classes = self._class_choices(pool, source)
            if not classes:
                raise PoolError(f"The pool has no LoRA with fingerprint '{source}'. Press Refresh.")
            return gr.update(choices=classes, value=classes[0][1]), *self._show(pool, source, classes[0][1])

    def show(self, folder: Optional[str], source: Optional[str], label: Optional[str]) -> tuple:
        """Images of one class of one source: unmasked and masked, captioned with the teacher's confidence."""
        with reported("Cannot open the pool", "showing pool images"):
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
            p = teacher_confidence([item["logits"]], [cls.label]).item()
            conf.append(p)
            images.append((display_images(image[None])[0], f"p={p:.2f} · run {ref.run + 1}"))
            if "masked" in item:
                pk = teacher_confidence([item["logits_kept"]], [cls.label]).item()
                conf_kept.append(pk)
                masked.append((display_images(pool.load(ref, masked=True)[None])[0],
                               f"{len(item['kept'])} patches · p={pk:.2f}"))
        runs = sorted({ref.run for ref in items})
        settings = {pool.run_dirs[r].name: {"settings": pool.runs[r]["settings"],
                                            "steps_done": pool.runs[r].get("steps_done"),
                                            "stopped": pool.runs[r].get("stopped"),
                                            "created": pool.runs[r].get("created")} for r in runs}
        shown = (f"showing {len(items)} of {len(cls.items)}" if len(cls.items) > len(items) else
                 _plural(len(items), "image"))
        details = (f"**<bdi>{md_text(cls.name)}</bdi>** ({shown}): the teacher LoRA's mean confidence in this "
                   f"class is **{sum(conf) / len(conf):.2f}** on the images"
                   + (f" and **{sum(conf_kept) / len(conf_kept):.2f}** on their kept tokens." if conf_kept else "."))
        return images, masked, details, settings
