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

__all__ = ["HubError", "endpoint", "hub_reachable", "offline_mode", "is_repo_id", "download_repo_files",
           "write_model_card", "push_folder"]

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


def write_model_card(folder: Path, adapter, command: Optional[str] = None, results_md: Optional[str] = None) -> Path:
    """Write ``README.md`` for a LoRA folder: what it is, how it was made (data-free), the command and results."""
    import json

    from .io import atomic_write_bytes

    info = dict(adapter.info)
    meta = info.pop("meta_training", None)
    lines = ["---", "library_name: peft", "tags:", "- lora-recycle", "- few-shot", "- timm", "- lora"]
    if adapter.backbone and not str(adapter.backbone).startswith(("/", ".", "local-dir:")):
        lines.append(f"base_model: {adapter.backbone}")
    lines += ["---", "", "# Meta-LoRA (LoRA Recycle)" if meta else "# LoRA", ""]
    if meta:
        lines += ["A meta-LoRA distilled **without any real training data** from pre-tuned LoRAs, following "
                  "LoRA Recycle (Hu et al., CVPR 2025): surrogate images were inverted from each LoRA and its head, "
                  "and the meta-LoRA was meta-trained on them with a ProtoNet objective (KL to the teacher for "
                  "single-LoRA episodes, cross-entropy for cross-LoRA episodes).", "",
                  "Use it for tuning-free few-shot classification: embed a few labelled support images per class, "
                  "average them into prototypes and classify queries by distance, in one forward pass:", "",
                  "```bash", f"python -m recycle predict --backbone {adapter.backbone} --lora <this repo> "
                  "--support SUPPORT_DIR --query QUERY_DIR", "```", ""]
    c = adapter.config
    lines += ["## Adapter", "", f"- backbone: `{adapter.backbone}`", f"- targets: {', '.join(c.targets)}; rank "
              f"{c.rank}; scaling {c.scaling:g}", "- files: PEFT layout (`adapter_config.json`, "
              "`adapter_model.safetensors`); loads with PEFT on the same timm model", ""]
    if adapter.class_names:
        lines += [f"- head classes: {', '.join(adapter.class_names)}", ""]
    if meta:
        lines += ["## How it was made", "", "```json", json.dumps({**meta, **info}, indent=1, default=str), "```", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    if results_md:
        lines += ["## Results", "", results_md, ""]
    path = Path(folder) / "README.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def push_folder(folder, repo_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Create `repo_id` if needed and upload `folder` (safetensors, JSON and Markdown files only); returns its URL.

    Raises:
        HubError: malformed id, nothing to upload, pickles in the folder, or the upload failed.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    folder = Path(folder)
    if not is_repo_id(repo_id):
        raise HubError(f"'{repo_id}' is not a Hub id of the form ORG/NAME")
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise HubError(f"'{folder}' is not a folder with .safetensors weights")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if pickles:
        raise HubError(f"'{folder}' contains pickled files {pickles}; only safetensors are published")
    api = HfApi(endpoint=endpoint(), token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=["*.safetensors", "*.json", "*.md"],
                          commit_message="Upload LoRA (LoRA Recycle)")
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"upload to '{repo_id}' failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - network failures come from several libraries
        if "connect" in type(e).__name__.lower() or isinstance(e, (ConnectionError, OSError)):
            raise HubError(f"cannot reach the Hugging Face Hub at {endpoint()} to upload '{repo_id}'") from None
        raise
    return f"{endpoint()}/{repo_id}"
