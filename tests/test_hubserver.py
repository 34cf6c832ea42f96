"""The real huggingface_hub client (and timm's ``hf-hub:`` loading) against the fake Hub in
``tests/support/hubserver.py``."""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import _http, get_session
from safetensors.torch import save_file

from tests.support.hubserver import HubServer, free_port, patch_hf_endpoint

# huggingface_hub's HTTP client library: httpx in 1.x, httpx2 in 2.x.
http = importlib.import_module(type(get_session()).__module__.split(".")[0])

REPO = "testorg/tiny"
CONFIG = {"architectures": ["Tiny"], "hidden_size": 8}
VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def write_tiny_repo(repo_dir: Path) -> None:
    (repo_dir / "nested").mkdir(parents=True)
    (repo_dir / "config.json").write_text(json.dumps(CONFIG))
    save_file({"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, repo_dir / "model.safetensors")
    (repo_dir / "nested" / "notes.txt").write_text("nested file\n")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    root = tmp_path / "hub"
    write_tiny_repo(root / REPO)
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import, like the endpoint
    with HubServer(root) as server:
        patch_hf_endpoint(monkeypatch, server.url)
        yield server


def test_fixed_port_and_lifecycle(tmp_path: Path) -> None:
    port = free_port()
    server = HubServer(tmp_path, port=port)
    assert server.url == f"http://127.0.0.1:{port}"
    with server:
        assert server.port == port
        assert http.get(f"{server.url}/api/models/no/repo").headers["X-Error-Code"] == "RepoNotFound"
    with pytest.raises(http.ConnectError):
        http.get(f"{server.url}/api/models/no/repo")
    with pytest.raises(RuntimeError):
        _ = HubServer(tmp_path).url


def test_hf_hub_download_returns_exact_bytes(hub: HubServer) -> None:
    repo_dir = hub.root / REPO
    sha = HfApi().model_info(REPO).sha
    for filename in ("config.json", "model.safetensors", "nested/notes.txt"):
        path = Path(hf_hub_download(REPO, filename))
        assert path.read_bytes() == (repo_dir / filename).read_bytes()
        assert path.as_posix().endswith(f"/snapshots/{sha}/{filename}")
    by_subfolder = hf_hub_download(REPO, "notes.txt", subfolder="nested", revision=sha)
    assert Path(by_subfolder).read_text() == "nested file\n"


def test_snapshot_download_honours_allow_patterns(hub: HubServer) -> None:
    folder = Path(snapshot_download(REPO, allow_patterns=["*.json", "nested/*"]))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["config.json", "nested/notes.txt"]
    assert json.loads((folder / "config.json").read_text()) == CONFIG


def test_listing_info_and_existence(hub: HubServer) -> None:
    api = HfApi()
    expected = ["config.json", "model.safetensors", "nested/notes.txt"]
    assert sorted(api.list_repo_files(REPO)) == expected
    assert sorted(huggingface_hub.list_repo_files(REPO)) == expected  # the module-level client is patched too
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(REPO)}
    assert top == {"config.json": "RepoFile", "model.safetensors": "RepoFile", "nested": "RepoFolder"}
    assert [entry.path for entry in api.list_repo_tree(REPO, "nested")] == ["nested/notes.txt"]

    info = api.model_info(REPO, files_metadata=True)
    sizes = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
    assert sizes == {name: (hub.root / REPO / name).stat().st_size for name in expected}
    assert info.sha is not None and len(info.sha) == 40
    assert api.model_info(REPO, revision=info.sha).sha == info.sha

    assert api.file_exists(REPO, "nested/notes.txt") and not api.file_exists(REPO, "missing.bin")
    assert api.repo_exists(REPO) and not api.repo_exists("testorg/missing")


def test_unknown_repo_file_and_revision_raise_hub_errors(hub: HubServer) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("testorg/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("testorg/missing")
    with pytest.raises(RemoteEntryNotFoundError) as entry_error:
        hf_hub_download(REPO, "missing.bin")
    assert isinstance(entry_error.value, EntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="v2")


def test_upload_folder_lands_exact_bytes_and_downloads_back(hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    lora = {"lora_A": torch.randn(512, 1024), "lora_B": torch.randn(1024, 512)}  # 4 MiB
    save_file(lora, folder / "adapter_model.safetensors")
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# Adapter\n")
    api = HfApi(token="test")

    with pytest.raises(HfHubHTTPError):
        HfApi().create_repo("testorg/adapter", token=False)
    repo_url = api.create_repo("testorg/adapter")
    assert repo_url.repo_id == "testorg/adapter"
    assert api.create_repo("testorg/adapter", exist_ok=True).repo_id == "testorg/adapter"
    with pytest.raises(HfHubHTTPError):
        api.create_repo("testorg/adapter")

    commit = api.upload_folder(repo_id="testorg/adapter", folder_path=folder)
    api.upload_file(path_or_fileobj=b"extra", path_in_repo="extra/info.txt", repo_id="testorg/adapter")
    repo_dir = hub.root / "testorg" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (repo_dir / name).read_bytes() == (folder / name).read_bytes()
        assert Path(hf_hub_download("testorg/adapter", name)).read_bytes() == (folder / name).read_bytes()
    assert (repo_dir / "extra" / "info.txt").read_bytes() == b"extra"
    assert commit.oid != api.model_info("testorg/adapter").sha  # upload_file made a second commit

    unchanged = api.upload_folder(repo_id="testorg/adapter", folder_path=folder)
    assert unchanged.oid == api.model_info("testorg/adapter").sha
    api.upload_folder(repo_id="testorg/adapter", folder_path=folder, delete_patterns=["extra/*"])
    assert not (repo_dir / "extra" / "info.txt").exists()


def test_hub_down_serves_cached_file(hub: HubServer) -> None:
    cached = hf_hub_download(REPO, "config.json")
    hub.stop()
    started = time.monotonic()
    assert hf_hub_download(REPO, "config.json") == cached
    assert time.monotonic() - started < 2


def test_hub_down_without_cache_raises_connection_error(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.stop()
    with pytest.raises(http.ConnectError):
        HfApi().model_info(REPO)
    # With nothing cached, hf_hub_download retries the HEAD call with backoff; record the waits instead of sleeping.
    waits: list[float] = []
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=waits.append))
    with pytest.raises(LocalEntryNotFoundError) as error:
        hf_hub_download(REPO, "config.json")
    assert isinstance(error.value.__cause__, http.ConnectError)
    assert waits == [1, 2, 4, 8, 8]


def test_timm_hf_hub_model_loads_through_server(hub: HubServer) -> None:
    import timm

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **VIT_ARGS).eval()
    repo_dir = hub.root / "testorg" / "tinyvit"
    repo_dir.mkdir(parents=True)
    weights = {name: tensor.contiguous() for name, tensor in source.state_dict().items()}
    save_file(weights, repo_dir / "model.safetensors")
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 3,
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "fixed_input_size": True,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "num_classes": 3,
            "classifier": "head",
        },
        "model_args": VIT_ARGS,  # timm 1.0.31 passes these to the model constructor
    }
    (repo_dir / "config.json").write_text(json.dumps(config))

    loaded = timm.create_model("hf-hub:testorg/tinyvit", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), source(images), rtol=0, atol=0)


def test_dataset_repos_are_created_uploaded_listed_and_downloaded(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(token="test")
    url = api.create_repo("testorg/data", repo_type="dataset")
    assert str(url).endswith("/datasets/testorg/data") and (hub.root / "datasets" / "testorg" / "data").is_dir()
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="sub/table.csv", repo_id="testorg/data", repo_type="dataset"
    )
    info = api.dataset_info("testorg/data", files_metadata=True)
    assert {s.rfilename: s.size for s in info.siblings or []} == {"sub/table.csv": 8}
    path = hf_hub_download("testorg/data", "sub/table.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    folder = snapshot_download("testorg/data", repo_type="dataset", local_dir=tmp_path / "copy")
    assert (Path(folder) / "sub" / "table.csv").read_bytes() == b"a,b\n1,2\n"
    assert not api.repo_exists("testorg/data") and api.repo_exists("testorg/data", repo_type="dataset")
    assert not api.repo_exists(REPO, repo_type="dataset")  # model and dataset repos are apart
