"""Few-shot prediction on files: the shared core of ``python -m recycle predict`` and the app's few-shot tab."""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, TypeVar, Union

import torch

from .fewshot import FewShotClassifier
from .images import ImageError, ImageSource, list_images, load_image

__all__ = [
    "Prediction",
    "SupportError",
    "clean_class_name",
    "checked_class_name",
    "support_from_slots",
    "MAX_NAME_LENGTH",
    "read_support_folder",
    "classify",
    "query_label",
    "count_correct",
]

_logger = logging.getLogger(__name__)
T = TypeVar("T")


MAX_SIDE = 1024  # decoded images are downscaled to this longest side: models see 224-518 px, memory stays bounded


class SupportError(ValueError):
    """The support or query set cannot be used as given. The message is meant for the end user."""


@dataclass
class Prediction:
    file: str  # display name of the query (relative path or upload name)
    label: str  # predicted class
    probs: dict[str, float]  # class -> probability, in the support's class order

    def to_dict(self) -> dict:
        return asdict(self)


def clean_class_name(name: str) -> str:
    """Normalise a user-typed class name (NFC, trimmed, line breaks and tabs made spaces, other control characters
    removed)."""
    text = unicodedata.normalize("NFC", str(name))
    text = "".join(" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch)[0] != "C")
    return " ".join(text.split())


MAX_NAME_LENGTH = 80  # characters in a class name
_LINE_BREAKS = "\n\r\v\f\x85\u2028\u2029"


def checked_class_name(raw: str, which: str) -> str:
    """`clean_class_name` of a typed or folder name, "" when it is blank or invisible; `which` names the class in
    messages ("Class 2", "class 'x'").

    Raises:
        SupportError: a line break, or more than `MAX_NAME_LENGTH` characters.
    """
    if any(ch in raw for ch in _LINE_BREAKS):
        raise SupportError(f"{which}'s name contains a line break; a class name is one line of text.")
    name = clean_class_name(raw)
    if len(name) > MAX_NAME_LENGTH:
        raise SupportError(f"{which}'s name is {len(name)} characters long; at most {MAX_NAME_LENGTH}.")
    return name


def support_from_slots(slots: Sequence[tuple[str, Sequence[T]]]) -> dict[str, list[T]]:
    """Numbered class slots ``[(typed name, images)]`` -> ``{class name: images}`` (`checked_class_name`); slots
    with neither a name nor images are skipped.

    Raises:
        SupportError: naming the slot (from 1): a bad name, a name of invisible characters only, images without a
            name, or two slots with one name.
    """
    support: dict[str, list[T]] = {}
    slot_of: dict[str, int] = {}
    for i, (raw, images) in enumerate(slots, 1):
        name = checked_class_name(raw, f"Class {i}")
        if not name and not images:
            if raw.strip():
                raise SupportError(f"Class {i}'s name has only invisible characters. Give it a visible name.")
            continue
        if not name:
            raise SupportError(f"Class {i} has {len(images)} image(s) but no name. Give every class a name.")
        if name in slot_of:
            raise SupportError(
                f"Classes {slot_of[name]} and {i} are both named '{name}'. Class names must be unique "
                "(invisible characters and accents written differently do not count)."
            )
        slot_of[name] = i
        support[name] = list(images)
    return support


LABEL_SEPARATOR = "__"  # a query file named ``<class>__<anything>.<ext>`` carries its true class


def query_label(file_name: str, classes: Sequence[str]) -> Optional[str]:
    """The true class that a query's file name carries (``<class>__<anything>.<ext>``, as the bundled example tasks
    name their queries) when it is one of `classes`; else None."""
    label, sep, _ = Path(file_name).stem.rpartition(LABEL_SEPARATOR)
    label = clean_class_name(label)
    return label if sep and label in classes else None


def count_correct(predictions: Sequence["Prediction"]) -> Optional[tuple[int, int]]:
    """(correct, labelled) over the predictions whose query file names carry their class (`query_label`); None when
    none does."""
    labelled = [(p, query_label(p.file, list(p.probs))) for p in predictions]
    labelled = [(p, label) for p, label in labelled if label is not None]
    if not labelled:
        return None
    return sum(p.label == label for p, label in labelled), len(labelled)


def read_support_folder(root: Union[str, Path]) -> dict[str, list[Path]]:
    """``root/<class>/<images>`` -> {class: [image paths]}, classes sorted by folder name."""
    root = Path(root)
    if not root.is_dir():
        raise SupportError(f"support folder '{root}' does not exist")
    classes = {d.name: list_images(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not classes:
        raise SupportError(f"support folder '{root}' has no class subfolders (expected {root}/<class>/<images>)")
    return classes


def _load_all(items: Sequence[tuple[str, ImageSource]], what: str) -> list:
    images, errors = [], []
    for name, source in items:
        try:
            images.append(load_image(source, max_side=MAX_SIDE))
        except ImageError as e:
            errors.append(f"{what} {e}" if what else str(e))
    if errors:
        raise SupportError("; ".join(errors))
    return images


def classify(
    classifier: FewShotClassifier,
    support: Mapping[str, Sequence[ImageSource]],
    queries: Sequence[tuple[str, ImageSource]],
) -> list[Prediction]:
    """Fit `classifier` on `support` ({class name: images}) and predict every query ``(display name, image)``.

    Raises:
        SupportError: fewer than two classes, an empty or duplicate class, no queries, or an unreadable image
            (every bad file is named).
    """
    cleaned: dict[str, Sequence[ImageSource]] = {}
    for raw, items in support.items():
        name = checked_class_name(raw, f"class {raw!r}")
        if not name:
            raise SupportError(f"class name {raw!r} is empty; give every class a name")
        if name in cleaned:
            raise SupportError(f"class name '{name}' is used twice; class names must be unique")
        if not items:
            raise SupportError(f"class '{name}' has no images; add at least one")
        cleaned[name] = items
    if len(cleaned) < 2:
        raise SupportError(f"few-shot classification needs at least 2 classes with images, got {len(cleaned)}")
    if not queries:
        raise SupportError("add at least one query image to classify")
    images, labels = [], []
    for name, items in cleaned.items():
        loaded = _load_all([(name, s) for s in items], f"class '{name}':")
        images += loaded
        labels += [name] * len(loaded)
    query_images = _load_all(list(queries), "query")
    classifier.fit(images, labels)
    probs = classifier.predict_proba(query_images)
    if not bool(torch.isfinite(probs).all()):
        raise SupportError(
            f"the backbone '{classifier.backbone.name}' (with its LoRA, if any) gives non-finite "
            "embeddings for these images, so no prediction can be made; its weights or "
            "preprocessing numbers are broken"
        )
    out = []
    for (display, _), p in zip(queries, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        out.append(Prediction(display, classifier.classes[best], dict(zip(classifier.classes, p))))
    return out
