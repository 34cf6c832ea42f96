"""A small fake Hugging Face Hub (stdlib only, plus PyYAML imported when a model card is checked) for running the
real ``huggingface_hub`` client against 127.0.0.1.

Model repos are plain folders on disk, ``root/<org>/<name>/<files...>`` (subfolders allowed), all on one branch
``main``. A repo's commit sha is a stable fake: the sha1 of its id and of its sorted ``(path, git blob oid)`` listing,
so it changes exactly when the content does. Model and dataset repos exist (no spaces, PRs or other branches).

Endpoints, each one what huggingface_hub 2.4.0 calls (read from its source):

- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``hf_hub_download``, ``file_exists``. Answers carry ``ETag`` (the git
  blob oid), ``X-Repo-Commit`` and ``Content-Length``: the client refuses a file without the first two. No
  ``X-Xet-Hash`` header is ever sent, so the client downloads over plain HTTP and never tries the Xet protocol.
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: ``model_info``, ``repo_info``,
  ``repo_exists``, and ``snapshot_download`` (which resolves the revision to a sha first). ``?blobs=true``
  (``files_metadata=True``) adds sizes and blob ids to ``siblings``.
- ``GET /api/models?filter=...&search=...&author=...&sort=...&limit=...&expand=...``: ``list_models``. Every
  ``filter`` value must be one of the repo's tags; ``search`` is a case-insensitive substring of the repo id. Tags are
  derived as the Hub derives them: the library (the card's ``library_name``, else ``peft`` for a repo holding
  ``adapter_config.json``, ``timm`` or ``transformers`` from ``config.json``), the card's ``tags``, ``safetensors``
  when a ``.safetensors`` file is present, ``license:X``, ``dataset:D`` for each card ``datasets`` D, and for each
  card ``base_model`` B ``base_model:B`` plus ``base_model:adapter:B`` (peft repos) or ``base_model:finetune:B``.
  With ``expand``, an item holds ``id``/``_id`` and the expanded fields only (``siblings``, ``sha``, ``tags``,
  ``downloads``, ...). One page, sorted by id (every repo has 0 downloads).
- ``GET /{repo}/resolve/{rev}/{path}`` with ``Range: bytes=A-B``: 206 with those bytes and ``Content-Range``, as
  ``parse_safetensors_file_metadata`` reads a header without downloading the weights.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=``: ``list_repo_tree``, ``list_repo_files``,
  ``snapshot_download``. One page, no ``Link`` header.
- ``POST /api/repos/create``: ``create_repo``; 409 with the repo ``url`` if it exists (``exist_ok=True`` reads it).
- ``POST /api/validate-yaml``: called by ``upload_folder``/``create_commit`` when a ``README.md`` is uploaded, and by
  ``RepoCard.validate``. It checks the card's metadata as the Hub does (see ``card_metadata_errors``): the YAML front
  matter must parse to a mapping, and ``base_model`` must name model repos that exist on this server. Errors are a
  400 with ``{"errors": [{"message": ...}]}``, which the client raises as ``ValueError("Invalid metadata in
  README.md. ...")``; a card without front matter gets a warning. A commit that writes a ``README.md`` with bad
  metadata is refused the same way (400), so a client that skips validation cannot land it either.
- ``POST /api/models/{repo}/preupload/{rev}`` and ``/commit/{rev}`` (NDJSON): ``upload_file``, ``upload_folder``,
  ``create_commit``. Preupload answers ``uploadMode: "regular"`` for every file, binary ones included, so the
  client sends the content base64-encoded inside the commit (fine for files of a few MB). Answering ``"lfs"``
  would not lead to the LFS batch API: with ``hf_xet`` installed, 2.4.0 uploads LFS files through the Xet
  protocol (a separate CAS service), and only falls back to LFS batch when Xet is disabled. The commit
  understands ``file``, ``deletedFile`` and ``deletedFolder`` operations and the ``parentCommit`` check.

- Dataset repos: ``root/datasets/<org>/<name>/...`` (``datasets`` cannot be a user name on the Hub, so no model
  repo is ever there), served by the same routes under ``/api/datasets/...`` and ``/datasets/{repo}/resolve/...``
  (``dataset_info``, ``snapshot_download(repo_type="dataset")``, ``hf_hub_download``, ``create_commit``), created by
  ``create_repo(repo_type="dataset")``; ``validate-yaml`` checks a dataset card as a model card.

Anything else is a 404, e.g. the client's best-effort ``GET /api/agent-harnesses`` (user-agent detection, which
shrugs it off; serving it would make the client cache the answer under the real ``HF_HOME``).

Reads need no token; writes need any ``Authorization: Bearer ...`` header (``token="test"`` will do). Errors are
JSON ``{"error": ...}`` with the ``X-Error-Code`` header the client maps to exceptions: ``RepoNotFound`` ->
``RepositoryNotFoundError``, ``EntryNotFound`` -> ``RemoteEntryNotFoundError`` (a subclass of
``huggingface_hub.errors.EntryNotFoundError``), ``RevisionNotFound`` -> ``RevisionNotFoundError``. Responses close
the connection (HTTP/1.0), so after ``stop()`` the client's pooled connections cannot reach a "down" Hub.

Pointing the client at the server. huggingface_hub 2.4.0 reads ``HF_ENDPOINT`` once, at import, into
``constants.ENDPOINT`` and derived values: ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (read per call by
``hf_hub_download``, also through timm's ``hf-hub:``), the module-level ``huggingface_hub.hf_api.api = HfApi()``
behind ``huggingface_hub.model_info``/``list_repo_files``/``upload_folder``/..., ``constants.HF_URL_HOSTS`` and
``utils._http._HUB_ORIGINS`` (redirect trust; this server never redirects). A new ``HfApi()`` reads
``constants.ENDPOINT`` when constructed. Setting ``os.environ["HF_ENDPOINT"]`` after the import changes nothing.
Two correct ways:

1. Any time, also after import (preferred): ``patch_hf_endpoint(monkeypatch, server.url)`` sets
   ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, ``hf_api.api.endpoint`` and the env var (for
   subprocesses), all undone by the monkeypatch. For a session-scoped server use
   ``with pytest.MonkeyPatch.context() as mp: patch_hf_endpoint(mp, server.url); yield server``.
2. Before anything imports huggingface_hub (timm and the project do, at import): at the top of the conftest,
   ``port = free_port(); os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"``, then later start
   ``HubServer(root, port=port)``. This module imports no third-party package, so it is safe to import first.

Also isolate the cache: ``hf_hub_download`` reads ``constants.HF_HUB_CACHE`` per call but that constant is set from
``HF_HUB_CACHE``/``HF_HOME`` at import, so patch the constant (or pass ``cache_dir``). Set the ``HF_HOME`` env var
too: with ``hf_xet`` installed, ``upload_folder`` starts a Xet session (even for regular files) that writes logs
under ``$HF_HOME/xet``, read from the environment when the session starts. Note that with the Hub down
and the file not cached, ``hf_hub_download`` retries the HEAD request 5 times with 1+2+4+8+8 s of backoff before
raising ``LocalEntryNotFoundError``; timeouts do not shorten that (the connection is refused at once).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import pytest

HOST = "127.0.0.1"
DEFAULT_REVISION = "main"
POLL_INTERVAL_S = 0.05  # how soon serve_forever notices stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (for ``HubServer(root, port=free_port())``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def patch_hf_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point the already imported huggingface_hub client at ``url``; the monkeypatch undoes it."""
    from huggingface_hub import constants, hf_api

    url = url.rstrip("/")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", url)


class HubServer:
    """Serves ``root/<org>/<name>/...`` as Hub model repos on ``http://127.0.0.1:<port>``, from a daemon thread.

    ``port=0`` binds a free port at ``start()``; a stopped server restarts on the port it had. ``verbose=True``
    logs requests and connection errors to stderr, as ``http.server`` does.
    """

    def __init__(self, root: Path, port: int = 0, *, verbose: bool = False) -> None:
        self.root = Path(root)
        self.verbose = verbose
        self._port = port
        self._store = _RepoStore(self.root)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("HubServer has no port yet: start() it or pass port=")
        return f"http://{HOST}:{self._port}"

    def start(self) -> str:
        """Bind and serve; returns the base URL, the value for ``HF_ENDPOINT``."""
        if self._httpd is not None:
            raise RuntimeError("HubServer already started")
        httpd = _Server((HOST, self._port), _Handler)
        self._port = int(httpd.server_address[1])
        httpd.store, httpd.url, httpd.verbose = self._store, self.url, self.verbose
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, args=(POLL_INTERVAL_S,), name=f"hubserver:{self._port}", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and close the socket: the Hub is down until ``start()`` again."""
        if self._httpd is None or self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _HubError(Exception):
    """An error answer: HTTP status, message, and the ``X-Error-Code`` the client maps to an exception."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}


@dataclass(frozen=True)
class _File:
    size: int
    oid: str  # git blob sha1, what the Hub reports for a regular (non-LFS) file


@dataclass(frozen=True)
class _Snapshot:
    sha: str
    files: dict[str, _File]  # by posix path in the repo
    last_modified: float

    def folders(self) -> list[str]:
        return sorted({str(parent) for path in self.files for parent in PurePosixPath(path).parents} - {"."})


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def card_metadata_errors(content: str, repo_exists: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a ``README.md``, as the Hub's metadata validation reports them.

    Checked: front matter (between the first two ``---`` lines) that is well-formed YAML and a mapping; the types
    of ``license``, ``library_name``, ``pipeline_tag`` (strings) and ``tags`` (a list of strings); and that every
    ``base_model`` names a model repo that exists here, as on the Hub (where a local path or a timm model name that
    is not an ``org/name`` repo is refused).
    """
    import re

    import yaml

    block = re.match(r"^\s*---[\r\n]+([\S\s]*?)[\r\n]+---(\r\n|\n|$)", content)
    if block is None:
        return [], ["Empty or missing yaml metadata in repo card (https://huggingface.co/docs/hub/model-cards)"]
    try:
        metadata = yaml.safe_load(block.group(1))
    except yaml.YAMLError as error:
        return [f"Invalid YAML in the metadata of README.md: {error}"], []
    if metadata is None:
        return [], ["Empty or missing yaml metadata in repo card (https://huggingface.co/docs/hub/model-cards)"]
    if not isinstance(metadata, dict):
        return [f"The metadata of README.md must be a YAML mapping, not {type(metadata).__name__}"], []
    errors = [
        f'"{key}" must be a string'
        for key in ("license", "library_name", "pipeline_tag")
        if key in metadata and not isinstance(metadata[key], str)
    ]
    tags = metadata.get("tags", [])
    if not (isinstance(tags, list) and all(isinstance(tag, str) for tag in tags)):
        errors.append('"tags" must be an array of strings')
    base_models = metadata.get("base_model", [])
    for base_model in base_models if isinstance(base_models, list) else [base_models]:
        if not (isinstance(base_model, str) and repo_exists(base_model)):
            errors.append(
                f'"base_model" with value "{base_model}" is not valid. Use a model id from https://hf.co/models.'
            )
    return errors, []


def repo_tags(repo_dir: Path, files: list[str]) -> list[str]:
    """The tags the Hub derives for a model repo from its card metadata and its files (see the module docstring)."""
    import re

    meta: dict = {}
    card = repo_dir / "README.md"
    if card.is_file():
        import yaml

        block = re.match(r"^\s*---[\r\n]+([\S\s]*?)[\r\n]+---(\r\n|\n|$)", card.read_text("utf-8", "replace"))
        try:
            loaded = yaml.safe_load(block.group(1)) if block else None
        except yaml.YAMLError:
            loaded = None
        meta = loaded if isinstance(loaded, dict) else {}
    library = meta.get("library_name")
    if not isinstance(library, str):
        library = None
        if "adapter_config.json" in files:
            library = "peft"
        elif "config.json" in files:
            try:
                config = json.loads((repo_dir / "config.json").read_text("utf-8"))
            except (ValueError, OSError):
                config = {}
            library = "timm" if "architecture" in config else "transformers" if "model_type" in config else None
    tags = [library] if library else []
    tags += [t for t in meta.get("tags") or [] if isinstance(t, str)]
    if any(f.endswith(".safetensors") for f in files):
        tags.append("safetensors")
    if isinstance(meta.get("license"), str):
        tags.append(f"license:{meta['license']}")
    datasets = meta.get("datasets") or []
    tags += [f"dataset:{d}" for d in (datasets if isinstance(datasets, list) else [datasets]) if isinstance(d, str)]
    bases = meta.get("base_model") or []
    relation = "adapter" if library == "peft" else "finetune"
    for base in bases if isinstance(bases, list) else [bases]:
        if isinstance(base, str):
            tags += [f"base_model:{base}", f"base_model:{relation}:{base}"]
    return list(dict.fromkeys(tags))


def _checked(path: str) -> str:
    """A path inside a repo: relative, normalized, no ``..``."""
    if not path or any(part in ("", ".", "..") for part in path.split("/")):
        raise _HubError(400, f"Invalid path: {path!r}")
    return path


class _RepoStore:
    """The repos on disk. Every read and write goes through ``lock``, so answers see whole commits."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()

    def exists(self, repo_id: str) -> bool:
        try:
            self.repo_dir(repo_id)
        except _HubError:
            return False
        return True

    def repo_dir(self, repo_id: str) -> Path:
        org, _, name = repo_id.partition("/")
        path = self.root / _checked(org) / _checked(name)
        if not path.is_dir():
            raise _HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return path

    def snapshot(self, repo_id: str, revision: str) -> _Snapshot:
        """The repo's files and fake commit sha; ``revision`` must be ``main`` or that sha."""
        repo_dir = self.repo_dir(repo_id)
        files: dict[str, _File] = {}
        listing = hashlib.sha1(repo_id.encode())
        last_modified = repo_dir.stat().st_mtime
        for path in sorted(p for p in repo_dir.rglob("*") if p.is_file()):
            data = path.read_bytes()
            relpath = path.relative_to(repo_dir).as_posix()
            files[relpath] = _File(size=len(data), oid=_git_blob_oid(data))
            listing.update(f"\n{relpath} {files[relpath].oid}".encode())
            last_modified = max(last_modified, path.stat().st_mtime)
        snapshot = _Snapshot(sha=listing.hexdigest(), files=files, last_modified=last_modified)
        if revision not in (DEFAULT_REVISION, snapshot.sha):
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return snapshot

    def create(self, repo_id: str) -> bool:
        """Create an empty repo; False if it already exists."""
        repo_dir = self.root / repo_id
        if repo_dir.is_dir():
            return False
        repo_dir.mkdir(parents=True)
        return True

    def commit(self, repo_id: str, revision: str, lines: list[dict[str, Any]]) -> str:
        """Apply the lines of an NDJSON commit payload; returns the new commit sha."""
        if revision != DEFAULT_REVISION:
            raise _HubError(404, f"Invalid rev id: {revision} (only main takes commits)", "RevisionNotFound")
        snapshot = self.snapshot(repo_id, revision)
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The first line of a commit must be its header")
        parent = lines[0]["value"].get("parentCommit")
        if parent is not None and parent != snapshot.sha:
            raise _HubError(412, f"A commit has happened since {parent}. Please refresh and try again.")
        writes: dict[str, bytes] = {}
        deletes: list[str] = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = _checked(value["path"].strip("/") if key == "deletedFolder" else value["path"])
            if key == "file" and value.get("encoding") == "base64":
                writes[path] = base64.b64decode(value["content"])
                if path == "README.md":
                    errors, _ = card_metadata_errors(writes[path].decode("utf-8", "replace"), self.exists)
                    if errors:
                        raise _HubError(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
            elif (key == "deletedFile" and path in snapshot.files) or (
                key == "deletedFolder" and path in snapshot.folders()
            ):
                deletes.append(path)
            elif key in ("deletedFile", "deletedFolder"):
                raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            else:
                raise _HubError(400, f"Unsupported commit operation {key!r}: this fake Hub only takes regular files")
        repo_dir = self.repo_dir(repo_id)
        for path in deletes:
            target = repo_dir / path
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        for path, data in writes.items():
            target = repo_dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            partial.write_bytes(data)
            os.replace(partial, target)  # whole files only, for readers of the folder outside the server
        return self.snapshot(repo_id, DEFAULT_REVISION).sha


class _Server(ThreadingHTTPServer):
    store: _RepoStore
    url: str
    verbose: bool

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.verbose:  # e.g. a client that hung up mid-answer
            super().handle_error(request, client_address)


class _DatasetView:
    """The server as the dataset routes see it: the same URL and settings, the store of dataset repos
    (``root/datasets``)."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        root = server.store.root / "datasets"
        if not hasattr(server, "dataset_store"):
            server.dataset_store = _RepoStore(root)  # type: ignore[attr-defined]
            server.dataset_store.lock = server.store.lock  # type: ignore[attr-defined]
        self.store = server.dataset_store  # type: ignore[attr-defined]
        self.url = f"{server.url}/datasets"
        self.verbose = server.verbose

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _Handler(BaseHTTPRequestHandler):
    """Routes requests; HTTP/1.0 (the default) closes the connection after each answer."""

    server: _Server
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        # Split before unquoting: the client quotes revisions and tree paths with safe="" (``refs%2Fpr%2F1``).
        parts = [unquote(part) for part in split.path.strip("/").split("/")]
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        if parts[:2] == ["api", "datasets"] or (parts[:1] == ["datasets"] and len(parts) >= 6):
            # A dataset repo: the model routes, on the dataset store.
            parts = ["api", "models", *parts[2:]] if parts[0] == "api" else parts[1:]
            self.server = _DatasetView(self.server)
        try:
            self._route(parts, query)()
        except _HubError as error:
            self._send_json(error.status, {"error": error.message}, error.headers)
        except Exception as error:  # a bug in this server: say so rather than drop the connection
            self._send_json(500, {"error": repr(error)}, {"X-Error-Message": repr(error)})

    def _route(self, parts: list[str], query: dict[str, str]) -> Callable[[], None]:
        method = self.command
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml
        if parts == ["api", "models"] and method == "GET":
            return self._list_models
        if parts[:2] == ["api", "models"] and len(parts) == 4 and method == "GET":
            return partial(self._model_info, f"{parts[2]}/{parts[3]}", DEFAULT_REVISION, query)
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, rest = f"{parts[2]}/{parts[3]}", (method, parts[4]), parts[5:]
            if action == ("GET", "revision") and len(rest) == 1:
                return partial(self._model_info, repo_id, rest[0], query)
            if action == ("GET", "tree"):
                return partial(self._tree, repo_id, rest[0], "/".join(rest[1:]), query)
            if action == ("POST", "preupload") and len(rest) == 1:
                return partial(self._preupload, repo_id, rest[0])
            if action == ("POST", "commit") and len(rest) == 1:
                return partial(self._commit, repo_id, rest[0], query)
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return partial(self._resolve, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise _HubError(404, f"Not implemented by the fake Hub: {method} {self.path}")

    # Reads

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        store = self.server.store
        with store.lock:
            snapshot = store.snapshot(repo_id, revision)
            entry = snapshot.files.get(path)
            if entry is None:  # X-Repo-Commit lets the client cache the absence (``.no_exist``)
                raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": snapshot.sha})
            data = (store.repo_dir(repo_id) / path).read_bytes() if self.command == "GET" else b""
        headers = {"ETag": f'"{entry.oid}"', "X-Repo-Commit": snapshot.sha, "Content-Length": str(entry.size)}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if wanted and self.command == "GET":
            start = int(wanted.group(1))
            end = min(int(wanted.group(2)) if wanted.group(2) else entry.size - 1, entry.size - 1)
            if start >= entry.size:
                raise _HubError(
                    416,
                    f"Range not satisfiable: {self.headers['Range']}",
                    None,
                    {"Content-Range": f"bytes */{entry.size}"},
                )
            headers.update(
                {"Content-Range": f"bytes {start}-{end}/{entry.size}", "Content-Length": str(end - start + 1)}
            )
            self._send(206, data[start : end + 1], "application/octet-stream", headers)
            return
        self._send(200, data, "application/octet-stream", headers)

    def _list_models(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        filters = query.get("filter", [])
        search = (query.get("search") or [""])[-1].lower()
        author = (query.get("author") or [""])[-1]
        limit = int((query.get("limit") or ["1000"])[-1])
        expand = query.get("expand", [])
        store = self.server.store
        items = []
        with store.lock:
            for org in sorted(p for p in store.root.iterdir() if p.is_dir()):
                for repo_dir in sorted(p for p in org.iterdir() if p.is_dir()):
                    repo_id = f"{org.name}/{repo_dir.name}"
                    if (search and search not in repo_id.lower()) or (author and org.name != author):
                        continue
                    snapshot = store.snapshot(repo_id, DEFAULT_REVISION)
                    tags = repo_tags(repo_dir, list(snapshot.files))
                    if not all(f in tags for f in filters):
                        continue
                    info = {
                        "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                        "id": repo_id,
                        "modelId": repo_id,
                        "author": org.name,
                        "sha": snapshot.sha,
                        "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(snapshot.last_modified)),
                        "private": False,
                        "downloads": 0,
                        "likes": 0,
                        "tags": tags,
                        "library_name": next((t for t in tags if t in ("peft", "timm", "transformers")), None),
                        "siblings": [{"rfilename": path} for path in snapshot.files],
                    }
                    if expand:
                        info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
                    else:
                        info.pop("siblings")
                    items.append(info)
        self._send_json(200, items[:limit])

    def _model_info(self, repo_id: str, revision: str, query: dict[str, str]) -> None:
        with self.server.store.lock:
            snapshot = self.server.store.snapshot(repo_id, revision)
        blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = [
            {"rfilename": path, **({"size": entry.size, "blobId": entry.oid} if blobs else {})}
            for path, entry in snapshot.files.items()
        ]
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": snapshot.sha,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(snapshot.last_modified)),
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        self._send_json(200, info)

    def _tree(self, repo_id: str, revision: str, folder: str, query: dict[str, str]) -> None:
        with self.server.store.lock:
            snapshot = self.server.store.snapshot(repo_id, revision)
        folders = snapshot.folders()
        if folder and folder not in folders:
            raise _HubError(404, f"Folder not found: {folder}", "EntryNotFound", {"X-Repo-Commit": snapshot.sha})
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{folder}/" if folder else ""

        def listed(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        tree_oid = {path: hashlib.sha1(f"{snapshot.sha} {path}".encode()).hexdigest() for path in folders}
        entries = [{"type": "directory", "oid": tree_oid[path], "size": 0, "path": path} for path in folders] + [
            {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
            for path, entry in snapshot.files.items()
        ]
        self._send_json(200, [entry for entry in entries if listed(entry["path"])])

    def _validate_yaml(self) -> None:
        payload = self._read_json()
        if payload.get("repoType", "model") not in ("model", "dataset"):
            raise _HubError(400, "This fake Hub only hosts model and dataset repos")
        store = self.server.store
        with store.lock:
            errors, warnings = card_metadata_errors(str(payload.get("content", "")), store.exists)
        answer = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
        self._send_json(400 if errors else 200, answer)

    # Writes

    def _require_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise _HubError(401, "A token is required to write to the Hub")

    def _create_repo(self) -> None:
        self._require_token()
        payload = self._read_json()
        if payload.get("type") == "dataset":  # the same routine on the dataset store
            self.server = _DatasetView(self.server)
            payload["type"] = "model"
        if payload.get("type", "model") != "model":
            raise _HubError(400, "This fake Hub only hosts model and dataset repos")
        if not payload.get("organization"):
            raise _HubError(400, "Pass a namespaced repo id: '<org>/<name>'")
        repo_id = f"{_checked(payload['organization'])}/{_checked(payload['name'])}"
        url = f"{self.server.url}/{repo_id}"
        with self.server.store.lock:
            created = self.server.store.create(repo_id)
        if created:
            self._send_json(200, {"url": url, "name": repo_id})
        else:  # create_repo(exist_ok=True) reads the url from this answer
            self._send_json(409, {"error": "You already created this model repo", "url": url})

    def _preupload(self, repo_id: str, revision: str) -> None:
        self._require_token()
        payload = self._read_json()
        with self.server.store.lock:
            snapshot = self.server.store.snapshot(repo_id, revision)
        # "oid" of the file already there lets the client skip unchanged files.
        files = [
            {
                "path": file["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": entry.oid if (entry := snapshot.files.get(file["path"])) else None,
            }
            for file in payload["files"]
        ]
        self._send_json(200, {"files": files, "commitOid": snapshot.sha})

    def _commit(self, repo_id: str, revision: str, query: dict[str, str]) -> None:
        self._require_token()
        if query.get("create_pr"):
            raise _HubError(400, "This fake Hub does not support pull requests")
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        with self.server.store.lock:
            sha = self.server.store.commit(repo_id, revision, lines)
        url = f"{self.server.url}/{repo_id}/commit/{sha}"
        self._send_json(200, {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    # HTTP plumbing

    def _read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _read_json(self) -> dict[str, Any]:
        payload = json.loads(self._read_body() or b"{}")
        if not isinstance(payload, dict):
            raise _HubError(400, "Expected a JSON object")
        return payload

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers or {})

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        """Answer; a HEAD answer keeps the headers (``Content-Length`` included) and drops the body."""
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
