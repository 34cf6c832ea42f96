"""Hugging Face Hub access through huggingface_hub: reachability, offline fallback, downloads and uploads.

The endpoint is huggingface_hub's own (``HF_ENDPOINT``), so tests and mirrors work unchanged. A Hub that cannot be
reached is detected with one short request instead of huggingface_hub's retry loop; then each call is made with
``local_files_only=True``, so callers fail (or fall back to the cache) in seconds without switching other threads'
downloads to offline mode.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["HubError", "endpoint", "hub_reachable", "is_repo_id", "download_repo_files", "push_folder"]

_logger = logging.getLogger(__name__)


class HubError(RuntimeError):
    """A Hub download or upload failed. The message names the repository and says what to do."""


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_repo_id(text: str) -> bool:
    """True for a well-formed ``org/name`` Hub id (huggingface_hub's rules: no ``..``, ``--``, paths or URLs)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers HTTP at all (any status counts), within `timeout` seconds."""
    import importlib

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    session = get_session()  # huggingface_hub's own client: httpx in 1.x, httpx2 in 2.x
    transport = importlib.import_module(type(session).__module__.split(".")[0])
    try:
        session.head(endpoint() + "/api/models", timeout=timeout)
        return True
    except transport.HTTPError:
        return False


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
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(allow_patterns), local_files_only=not hub_reachable()
        )
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"Hub repository '{repo_id}' does not exist, or it is private") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"Hub repository '{repo_id}' has no revision '{revision}'") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise HubError(
            f"Cannot download '{repo_id}': the Hugging Face Hub at {endpoint()} is unreachable and the "
            f"files are not cached. Check the connection, or pass a local path instead."
        ) from None
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"Hub request for '{repo_id}' failed: {e}") from None
    return Path(folder)


PUBLISHED_SUFFIXES = (".safetensors", ".json", ".md")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _publishable_files(folder: Path) -> dict[str, bytes]:
    """``{path inside folder: content}`` of the files `push_folder` uploads: regular files (never symbolic links, nor
    anything under a linked or hidden folder) ending in `PUBLISHED_SUFFIXES`, read without following links.

    Raises:
        HubError: `folder` is not a folder, or holds pickles.
    """
    if folder.is_symlink() or not folder.is_dir():
        raise HubError(f"'{folder}' is not a folder with .safetensors weights")
    files: dict[str, bytes] = {}
    pickles, links = [], []
    for directory, subdirs, names in os.walk(folder, followlinks=False):
        subdirs[:] = sorted(
            d for d in subdirs if not d.startswith(".") and not os.path.islink(os.path.join(directory, d))
        )
        for name in sorted(names):
            path = Path(directory) / name
            relative = path.relative_to(folder).as_posix()
            if name.startswith("."):
                continue
            if name.endswith(_PICKLE_SUFFIXES):
                pickles.append(relative)
            if not name.endswith(PUBLISHED_SUFFIXES):
                continue
            if path.is_symlink() or not stat.S_ISREG(path.lstat().st_mode):
                links.append(relative)
                continue
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                with os.fdopen(fd, "rb") as f:
                    files[relative] = f.read()
            except OSError as e:
                raise HubError(f"cannot read {path} ({e.strerror or e})") from None
    if pickles:
        raise HubError(f"'{folder}' contains pickled files {pickles}; only safetensors are published")
    if links:
        _logger.warning(
            "push: %s skipped: symbolic links and special files are never pushed, only regular files", ", ".join(links)
        )
    return files


def upload_files(
    repo_id: str,
    files: dict[str, bytes],
    message: str,
    repo_type: str = "model",
    token: Optional[str] = None,
    private: bool = False,
    card_hint: str = "",
) -> None:
    """Create `repo_id` if needed and commit `files` (path in the repo -> bytes read beforehand, so nothing can be
    swapped for a link between a check and the upload) in one commit.

    Raises:
        HubError: the Hub refused the upload or its card (`card_hint` says how to fix the card), or is unreachable.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub import errors as hf_errors

    kind = "dataset " if repo_type == "dataset" else ""
    api = HfApi(endpoint=endpoint(), token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, exist_ok=True, private=private)
        api.create_commit(
            repo_id=repo_id,
            repo_type=repo_type,
            commit_message=message,
            operations=[CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()],
        )
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"upload to {kind}'{repo_id}' failed: {e}") from None
    except ValueError as e:
        if "metadata in README.md" not in str(e):
            raise
        raise HubError(
            f"the Hub refused the {'dataset' if kind else 'model'} card of '{repo_id}': {e}"
            + (f"\n{card_hint}" if card_hint else "")
        ) from None
    except Exception as e:  # noqa: BLE001 - network failures come from several libraries
        if "connect" in type(e).__name__.lower() or isinstance(e, (ConnectionError, OSError)):
            raise HubError(f"cannot reach the Hugging Face Hub at {endpoint()} to upload '{repo_id}'") from None
        raise


def push_folder(folder, repo_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Create `repo_id` if needed and upload `folder` (its regular safetensors, JSON and Markdown files only, never
    symbolic links); returns its URL.

    Raises:
        HubError: malformed id, nothing to upload, pickles in the folder, or the upload failed.
    """
    folder = Path(folder)
    if not is_repo_id(repo_id):
        raise HubError(f"'{repo_id}' is not a Hub id of the form ORG/NAME")
    files = _publishable_files(folder)
    if not any(name.endswith(".safetensors") for name in files):
        raise HubError(f"'{folder}' is not a folder with .safetensors weights (symbolic links are never pushed)")
    upload_files(
        repo_id,
        files,
        "Upload LoRA (LoRA Recycle)",
        token=token,
        private=private,
        card_hint=f"Fix the YAML front matter of {folder / 'README.md'} (e.g. rewrite it with "
        "recycle.card.write_model_card).",
    )
    return f"{endpoint()}/{repo_id}"
