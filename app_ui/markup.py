"""Untrusted text (names and values read from uploaded or downloaded files, paths typed by users) shown inside
Markdown: always as plain text, never as markup."""

from __future__ import annotations

import string
import unicodedata

__all__ = ["md_text", "md_code"]

# Every ASCII punctuation character can start markup in Markdown (headings, links, emphasis, tables, code, HTML,
# entities), and ':' and '.' make bare URLs into links: all of them are written as numeric character references,
# which Markdown shows as the character and never parses.
_PUNCTUATION = frozenset(string.punctuation)


def md_text(value: object, limit: int = 200) -> str:
    """`value` as Markdown that renders as exactly its text, on one line: line breaks and other control or
    separator characters become spaces, ASCII punctuation becomes character references, and text beyond `limit`
    characters is cut with an ellipsis."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    text = "".join(
        " " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch not in "\u200d" else ch for ch in text
    )
    return "".join(f"&#{ord(ch)};" if ch in _PUNCTUATION else ch for ch in text)


def md_code(value: object, limit: int = 200) -> str:
    """`value` as inline code (an HTML ``<code>`` element, isolated for right-to-left text) holding `md_text`."""
    return f"<code><bdi>{md_text(value, limit)}</bdi></code>"
