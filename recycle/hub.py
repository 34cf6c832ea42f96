"""Hugging Face Hub access through huggingface_hub: reachability, offline fallback, and downloads.

The endpoint is huggingface_hub's own (``HF_ENDPOINT``), so tests and mirrors work unchanged. A Hub that cannot be
reached is detected with one short request instead of huggingface_hub's retry loop, so callers fail (or fall back
to the cache) in seconds.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

__all__ = ["HubError", "endpoint", "hub_reachable", "offline_mode", "is_repo_id", "download_repo_files"]

_logger = logging.getLogger(__name__)
_offline_lock = threading.RLock()
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class HubError(RuntimeError):
    """A Hub download failed. The message names the repository and says what to do."""


def endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def is_repo_id(text: str) -> bool:
    """True for a well-formed ``org/name`` Hub id (no path tricks such as ``..`` or absolute paths)."""
    return bool(_REPO_ID.match(text)) and ".." not in text


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers HTTP at all (any status counts), within `timeout` seconds."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        httpx.head(endpoint() + "/api/models", timeout=timeout)
        return True
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """Serve huggingface_hub calls from the local cache only, for the duration of the block."""
    from huggingface_hub import constants

    with _offline_lock:
        previous = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = previous


def download_repo_files(repo_id: str, allow_patterns: Sequence[str], revision: Optional[str] = None) -> Path:
    """Download the files of `repo_id` matching `allow_patterns` into the cache; return the snapshot folder.

    Falls back to the cache when the Hub is unreachable.

    Raises:
        HubError: malformed id, unknown repository, or unreachable Hub with nothing cached.
    """
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    if not is_repo_id(repo_id):
        raise HubError(f"'{repo_id}' is not a Hub id of the form ORG/NAME, nor an existing local path")
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else offline_mode():
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns))
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"Hub repository '{repo_id}' does not exist, or it is private") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"Hub repository '{repo_id}' has no revision '{revision}'") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise HubError(f"Cannot download '{repo_id}': the Hugging Face Hub at {endpoint()} is unreachable and the "
                       f"files are not cached. Check the connection, or pass a local path instead.") from None
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"Hub request for '{repo_id}' failed: {e}") from None
    return Path(folder)
