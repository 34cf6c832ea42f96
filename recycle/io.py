"""Small file helpers shared by every module: atomic writes, strict JSON, and untrusted values in messages."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Union

__all__ = ["atomic_write_bytes", "loads_strict", "dumps_strict", "shown"]


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def loads_strict(text: Union[str, bytes], what: str) -> object:
    """Parse strict JSON (no NaN, Infinity or floats out of range; bounded nesting and integers).

    Raises:
        ValueError: naming `what`, for anything that is not strict JSON.
    """

    def constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise ValueError(f"{number[:20]} is out of range for a float")
        return value

    try:
        return json.loads(text, parse_constant=constant, parse_float=finite)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, NaN/Infinity, integers of > 4300 digits
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def dumps_strict(value: object, **kwargs) -> str:
    """JSON text of `value`; NaN and Infinity are refused (`ValueError`), never written."""
    return json.dumps(value, allow_nan=False, **kwargs)


def shown(value, limit: int = 60) -> str:
    """`value`'s repr, cut to `limit` characters, for error messages about untrusted data."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def terminal_safe(text: str) -> str:
    """`text` with every unprintable character (CR, ESC of ANSI sequences, bidi controls, ...) written as its
    Python escape, so a file or class name cannot move the cursor or recolour the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
