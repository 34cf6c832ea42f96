"""The app and pools on the Hub (fake Hub on 127.0.0.1): the pool tab browses a pool dataset by its id
(``datasets/ORG/NAME``) with local paths off, refuses hostile ones with a message, and **Add to pool** pushes the
run to a dataset when one and a token are configured."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from gradio_client.exceptions import AppError

import app_ui
from recycle.pool import Pool
from recycle.pool.hub_publish import push_pool
from tests.support.apptools import close, launch, make_pool, plain, settings, tiny_lora

REPO = "org/shared-pool"


@pytest.fixture(scope="module")
def loras(tiny_clip_dir, tmp_path_factory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("loras")
    return [
        tiny_lora(tiny_clip_dir, tmp / "a", ("cat", "dog", "fox"), steps=3),
        tiny_lora(tiny_clip_dir, tmp / "b", ("oak", "elm", "ash"), steps=5),
    ]


@pytest.fixture(scope="module")
def pool_dir(tiny_clip_dir, loras, tmp_path_factory) -> Path:
    return make_pool(tmp_path_factory.mktemp("pool-src") / "pool", tiny_clip_dir, loras)


def test_a_hub_pool_is_browsed_by_dataset_id_with_local_paths_off(local_hub, pool_dir, tiny_clip_dir, tmp_path):
    push_pool(pool_dir, REPO, token="test")
    s = settings(tmp_path, str(tiny_clip_dir), allow_local_paths=False)
    demo, client = launch(s)
    try:
        summary, sources, classes, images, masked, details, runs = client.predict(
            f"datasets/{REPO}", api_name="/open_pool"
        )
        assert plain(summary) == f"datasets/{REPO}: 2 inversion runs from 2 LoRAs, 4 classes, 12 images."
        assert classes["choices"] == [["cat (3)", "0"], ["dog (3)", "1"]] and len(images) == len(masked) == 3
        assert [m["caption"].split(" · ")[0] for m in masked] == ["4 patches"] * 3
        assert str(tmp_path) not in summary + details  # the server's download folder is not shown
        other = [fp for _, fp in sources["choices"]][1]
        images, masked, details, _ = client.predict(f"hf://datasets/{REPO}", other, "1", api_name="/pool_class")
        assert len(images) == 3 and masked == [] and "**<bdi>elm</bdi>** (3 images)" in details
        # local folders stay closed; malformed and unknown datasets are messages
        with pytest.raises(AppError, match="Local paths are disabled"):
            client.predict(str(pool_dir), api_name="/open_pool")
        with pytest.raises(AppError, match="not a Hub dataset"):
            client.predict("datasets/../../etc", api_name="/open_pool")
        with pytest.raises(AppError, match="'org/missing' does not exist"):
            client.predict("datasets/org/missing", api_name="/open_pool")
        # a hostile dataset (NaN in a manifest, a file outside its run) is refused as a local pool is
        manifest = next((local_hub.root / "datasets" / REPO / "data").glob("*/manifest.json"))
        manifest.write_text(manifest.read_text().replace('"logits": [', '"logits": [NaN, ', 1))
        with pytest.raises(AppError, match="unreadable manifest") as refused:
            client.predict(f"datasets/{REPO}", api_name="/open_pool")
        assert "recycle-pools" not in str(refused.value)  # the server's download folder is not named
        data = json.loads(manifest.read_text().replace("NaN, ", "", 1))
        data["items"][0]["image"] = "../../../../../etc/passwd"
        manifest.write_text(json.dumps(data))
        with pytest.raises(AppError, match="not a file inside the run"):
            client.predict(f"datasets/{REPO}", api_name="/open_pool")
    finally:
        close(demo, client)


def _inverted(tiny_clip_dir, lora: Path, s: app_ui.AppSettings) -> tuple[app_ui.Inversion, gr.Request]:
    inversion = app_ui.Inversion(app_ui.ModelCache(device="cpu"), app_ui.PathPolicy(True), s, str(tiny_clip_dir))
    request = gr.Request(session_hash="s")
    inversion.load(None, str(lora), [], request)
    *_, last = inversion.run(None, [0, 1], 1, 4, "-1:0.5", False, 0.25, 0, request, progress=lambda *a, **k: None)
    assert last[2].startswith("✅ **Done:**")
    return inversion, request


def test_add_to_pool_also_pushes_the_run_to_the_configured_dataset(
    local_hub, loras, tiny_clip_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", "test")
    s = settings(tmp_path, str(tiny_clip_dir), pool_repo=REPO)
    inversion, request = _inverted(tiny_clip_dir, loras[0], s)
    note = inversion.add_to_pool(request)
    assert note.startswith("✅ Added 2 images") and f"Pushed to the Hub dataset datasets/{REPO}." in plain(note)
    run = Pool(s.pool).run_dirs[0].name
    rows = (local_hub.root / "datasets" / REPO / "data" / run / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(r)["class"] for r in rows] == ["cat", "dog"]
    assert (local_hub.root / "datasets" / REPO / "README.md").is_file()


def test_without_a_token_or_with_the_hub_down_the_run_is_kept_locally(
    local_hub, loras, tiny_clip_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)
    s = settings(tmp_path, str(tiny_clip_dir), pool_repo=REPO)
    inversion, request = _inverted(tiny_clip_dir, loras[0], s)
    note = plain(inversion.add_to_pool(request))
    assert note.startswith("✅ Added 2 images") and "Not pushed" in note and "no Hub token" in note
    assert len(Pool(s.pool).runs) == 1 and not (local_hub.root / "datasets" / REPO).exists()

    monkeypatch.setenv("HF_TOKEN", "test")
    local_hub.stop()
    inversion, request = _inverted(
        tiny_clip_dir, loras[1], settings(tmp_path / "b", str(tiny_clip_dir), pool_repo=REPO)
    )
    note = plain(inversion.add_to_pool(request))
    assert note.startswith("✅ Added 2 images") and "Not pushed" in note and "cannot reach the Hugging Face Hub" in note
    assert "kept in the local pool" in note


def test_a_malformed_pool_repo_setting_is_refused(monkeypatch):
    monkeypatch.setenv("RECYCLE_POOL_REPO", "not a repo")
    with pytest.raises(ValueError, match="RECYCLE_POOL_REPO='not a repo' is not a Hub dataset id"):
        app_ui.AppSettings.from_env()
    monkeypatch.setenv("RECYCLE_POOL_REPO", REPO)
    assert app_ui.AppSettings.from_env().pool_repo == REPO
