"""A safetensors file's header, read and checked without its tensors: from a local file, or from the Hub by ranged
requests, each with a bound on the bytes it may read.

A header is an 8-byte little-endian length, then that many bytes of JSON: ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}}`` plus an optional ``__metadata__``. `check_entries` checks every entry (dtype,
shape, offsets that match the shape and tile the data section exactly) before any number in it sizes anything.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Optional

__all__ = ["DTYPE_BYTES", "HeaderError", "parse_header", "check_entries", "fetch_hub_header"]

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
_MAX_NAME = 1000  # characters in a tensor name
_MAX_DIMS = 8
_FIRST_READ = 1 << 16  # the first ranged request: the length and, for most adapters, the whole header


class HeaderError(ValueError):
    """A safetensors header that is missing, too large, malformed, or inconsistent with its file."""


def parse_header(text: bytes, where: str) -> dict:
    """The header's JSON object without ``__metadata__``."""
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise HeaderError(f"{where}: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{where}: its safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def check_entries(header: dict, data_size: Optional[int], where: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Check every tensor entry of a parsed header; ``{name: (shape, dtype)}``.

    Args:
        header: `parse_header`'s object.
        data_size: bytes after the header, when known: the entries' data must tile it exactly.
        where: the file, for messages.

    Raises:
        HeaderError: naming the first entry that is malformed, of an unknown dtype, or whose data does not match its
            shape; or the data overlap, leave gaps or do not fill the file.
    """
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    spans = []
    for name, info in header.items():
        shown = repr(name[:120])
        if len(name) > _MAX_NAME:
            raise HeaderError(f"{where}: a tensor name of {len(name)} characters (at most {_MAX_NAME})")
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and len(info["shape"]) <= _MAX_DIMS
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in info["shape"] + info["data_offsets"]
            )
        ):
            raise HeaderError(f"{where}: tensor {shown} has a malformed header entry")
        if info["dtype"] not in DTYPE_BYTES:
            raise HeaderError(f"{where}: tensor {shown} has the unsupported dtype {info['dtype'][:20]!r}")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        too_far = data_size is not None and end > data_size
        if end - begin != math.prod(shape) * DTYPE_BYTES[info["dtype"]] or too_far:
            raise HeaderError(
                f"{where}: tensor {shown} declares shape {list(shape)} but its data (bytes {begin} to {end}"
                + (f" of {data_size}" if data_size is not None else "")
                + ") does not match; the file is truncated or corrupt"
            )
        spans.append((begin, end))
        out[name] = (shape, info["dtype"])
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise HeaderError(f"{where}: its tensors' data overlap or leave gaps; the file is corrupt")
        position = end
    if data_size is not None and position != data_size:
        raise HeaderError(
            f"{where}: its tensors declare {position} bytes of data, the file holds {data_size}; "
            "it is truncated or corrupt"
        )
    return out


def _get(url: str, start: int, end: int, headers: dict, timeout: float) -> tuple[bytes, Optional[int]]:
    """Bytes `start`..`end` (inclusive) of `url`, and the file's size from ``Content-Range`` when the server says."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import hf_raise_for_status

    response = get_session().get(url, headers={**headers, "range": f"bytes={start}-{end}"}, timeout=timeout)
    hf_raise_for_status(response)
    total = re.fullmatch(r"bytes \d+-\d+/(\d+)", response.headers.get("content-range", "").strip())
    content = response.content
    if len(content) > end - start + 1:  # a server that ignored the range: keep only what was asked for
        content = content[: end - start + 1]
    return content, int(total.group(1)) if total else None


def fetch_hub_header(
    api, repo: str, filename: str, revision: Optional[str], max_bytes: int, timeout: float = 10.0
) -> tuple[dict, Optional[int], int]:
    """A Hub file's safetensors header by ranged requests, reading at most ``8 + max_bytes`` bytes.

    Returns:
        (the parsed header, the size of its data section when the server gives the file's size, the bytes read).

    Raises:
        HeaderError: the header declares more than `max_bytes`, or is truncated or malformed.
        huggingface_hub errors: as the requests raise them (missing repo, revision or file; HTTP errors).
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    where = f"{repo}: {filename}"
    url = hf_hub_url(repo, filename, revision=revision, endpoint=api.endpoint)
    headers = build_hf_headers(token=getattr(api, "token", None))
    first, total = _get(url, 0, min(_FIRST_READ, 8 + max_bytes) - 1, headers, timeout)
    read = len(first)
    if len(first) < 8:
        raise HeaderError(f"{where} is empty or truncated: not a safetensors file")
    (length,) = struct.unpack("<Q", first[:8])
    if length > max_bytes:
        raise HeaderError(
            f"{where}: its safetensors header declares {length:,} bytes, more than the {max_bytes:,} accepted "
            "(an adapter's header is a few kilobytes)"
        )
    if total is not None and 8 + length > total:
        raise HeaderError(f"{where} is truncated: its header needs {8 + length} bytes, the file has {total}")
    text = first[8 : 8 + length]
    if len(text) < length:
        rest, _ = _get(url, 8 + len(text), 7 + length, headers, timeout)
        read += len(rest)
        text += rest
    if len(text) != length:
        raise HeaderError(f"{where} is truncated: its header needs {length} bytes, the Hub sent {len(text)}")
    return parse_header(text, where), (total - 8 - length if total is not None else None), read
