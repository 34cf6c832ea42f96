"""User errors: which exceptions are shown to the user as they are, how they are reported, and the checks of input
values that raise them."""

from __future__ import annotations

import contextlib
import html
import logging
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterator, Optional

import gradio as gr

from recycle.backbone import BackboneError
from recycle.formats import LoRAFormatError
from recycle.hub import HubError
from recycle.images import ImageError
from recycle.invert import InversionError
from recycle.pool import PoolError
from recycle.predict import SupportError

from .limits import MAX_FIELD_LENGTH

_logger = logging.getLogger("recycle.app")


class InputError(ValueError):
    """A setting in the UI that cannot be used. The message is meant for the end user."""


# Errors whose message is written for the end user: shown as they are.
USER_ERRORS = (
    InputError,
    SupportError,
    ImageError,
    BackboneError,
    LoRAFormatError,
    HubError,
    PoolError,
    InversionError,
)


def _server_folders() -> list[tuple[str, str]]:
    """Folders whose names mean nothing to a user (staged uploads, Gradio's upload cache, the Hub cache, downloaded
    pool datasets), each with
    what to call a folder inside it."""
    from huggingface_hub import constants

    from recycle.pool.hub import pool_cache_dir

    tmp = tempfile.gettempdir()
    gradio_tmp = os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tmp, "gradio")
    return [
        (os.path.join(tmp, "recycle-app-"), "the uploaded files"),
        (gradio_tmp, "the uploaded files"),
        (str(constants.HF_HUB_CACHE), "the downloaded files"),
        (str(pool_cache_dir()), "the downloaded pool"),
    ]


def user_text(e: BaseException) -> str:
    """A user error's message as plain text, with the server's temporary and cache folders replaced by the name of
    the file they hold (or "the uploaded files" / "the downloaded files")."""
    text = str(e)
    for root, what in _server_folders():
        text = re.sub(
            re.escape(root) + r"[^\s'\"`]*", lambda m: Path(m.group()).name if Path(m.group()).suffix else what, text
        )
    return text


def user_message(e: BaseException) -> str:
    """`user_text`, HTML-escaped (for error pop-ups)."""
    return html.escape(user_text(e), quote=False)


def _user_error(e: BaseException, title: str) -> gr.Error:
    return gr.Error(user_message(e), title=title, print_exception=False)


@contextlib.contextmanager
def reported(title: str, what: str) -> Iterator[None]:
    """Turn user errors into a `gr.Error` with their message, and anything else into a generic, logged one."""
    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as e:
        raise _user_error(e, title) from None
    except Exception:  # noqa: BLE001 - the server keeps serving; details go to the log
        _logger.exception("%s failed", what)
        raise gr.Error(
            f"Something went wrong while {what}; the details are in the server log. Please try again.",
            title="Unexpected error",
            print_exception=False,
        ) from None


def as_text(value: Any, what: str) -> str:
    """A text input's value as a string (None is empty); any other type is refused, naming the field."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"The {what} must be text, got {kind_of(value)}.")
    return value


def kind_of(value: Any) -> str:
    """How to name an unexpected value's type for the user."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def text_field(text: Optional[str], what: str) -> str:
    """A text field's value, trimmed; refused when not text, too long or holding control characters (NUL, newlines,
    ...)."""
    text = as_text(text, what).strip()
    if len(text) > MAX_FIELD_LENGTH:
        raise InputError(f"The {what} is {len(text)} characters long; at most {MAX_FIELD_LENGTH}.")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise InputError(f"The {what} contains control characters; type a name or an id.")
    return text


def number_field(value: Any, what: str, low: float, high: float, whole: bool = True) -> Any:
    """A numeric input in ``[low, high]`` (an int when `whole`); other types and values are refused, naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"The {what} must be a number, got {kind_of(value)}.")
    try:
        number = value if isinstance(value, int) else float(value)
    except ValueError:
        raise InputError(f"The {what} must be a number, got {value[:40]!r}.") from None
    if not (low <= number <= high) or (whole and number != int(number)):  # NaN fails the first test
        kind, bounds = ("a whole number", (int(low), int(high))) if whole else ("a number", (low, high))
        shown = (
            f"{number:.6g}"
            if isinstance(number, float)
            else str(number)
            if number < 10**24
            else f"{str(number)[:12]}… ({len(str(number))} digits)"
        )
        raise InputError(f"The {what} must be {kind} from {bounds[0]} to {bounds[1]}, got {shown}.")
    return int(number) if whole else number


def file_paths(value: Optional[list]) -> list[str]:
    """File paths from a gr.File (paths) or gr.Gallery ((path, caption) pairs) value."""
    return [item[0] if isinstance(item, (tuple, list)) else str(item) for item in value or []]
