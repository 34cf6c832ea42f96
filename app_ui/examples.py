"""The bundled example tasks: ``examples/<name>/{support,query}/<class>/*.png``, found and labelled for the
few-shot tab."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from recycle.images import IMAGE_SUFFIXES

from .limits import MAX_CLASSES

_logger = logging.getLogger("recycle.app")


@dataclass
class ExampleTask:
    """A bundled few-shot task: ``examples/<name>/{support,query}/<class>/*.png``."""

    name: str
    label: str
    support: dict[str, list[str]]
    queries: list[str]


_TASK_LABELS = {
    "han": "Han characters (held-out classes)",
    "hangul": "Hangul (an unseen script)",
    "kana": "Kana (an unseen script)",
    "han-plain": "Han characters, plain (the foundation's own style)",
}


def _task_label(name: str) -> str:
    """``han-3`` -> "Han characters (held-out classes) #3"; a name of no known kind is shown capitalised."""
    if name in _TASK_LABELS:
        return _TASK_LABELS[name]
    base, _, number = name.rpartition("-")
    if base in _TASK_LABELS and number.isdigit():
        return f"{_TASK_LABELS[base]} #{number}"
    return name.replace("_", " ").capitalize()


def find_examples(root: Path, max_classes: int = MAX_CLASSES) -> list[ExampleTask]:
    """The bundled example tasks under `root` (none if the folder does not exist), sorted by name."""
    tasks = []
    if not root.is_dir():
        return tasks
    for task in sorted(p for p in root.iterdir() if p.is_dir()):
        support = {
            c.name: sorted(str(f) for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            for c in sorted(p for p in (task / "support").glob("*") if p.is_dir())
        }
        support = {c: files for c, files in support.items() if files}
        queries = sorted(str(f) for f in (task / "query").glob("*/*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not 2 <= len(support) <= max_classes or not queries:
            _logger.warning("skipping example task %s: needs 2-%d classes and queries", task, max_classes)
            continue
        shots = max(map(len, support.values()))
        label = f"{_task_label(task.name)} · {len(support)}-way {shots}-shot"
        tasks.append(ExampleTask(task.name, label, support, queries))
    return tasks


def shipped_test_split(root: Path) -> Optional[dict]:
    """What the shipped meta-LoRA and the backbone alone scored on the miniature's test split, as the reproduction
    wrote it into ``examples/scores.json`` (``test_split``): ``{"way", "shot", "episodes", "method", "meta-LoRA":
    {"mean", "ci95"}, "NN": {...}}``, or None when it is missing or malformed."""
    path = root / "scores.json"
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return None
        split = json.loads(path.read_text("utf-8")).get("test_split")
        ok = isinstance(split, dict) and all(
            isinstance(split.get(k), dict) and isinstance(split[k].get("mean"), (int, float))
            for k in ("meta-LoRA", "NN")
        )
        return split if ok and isinstance(split.get("episodes"), int) else None
    except (OSError, ValueError, AttributeError):
        return None
