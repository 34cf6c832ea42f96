"""The app's pool tab: sources and classes, images and masked images with the teacher's confidences, and the settings
that made them. Corrupt pools are in the bad-input suite (test_app_bad_inputs.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from gradio_client.exceptions import AppError

from app_ui import pool as pool_tab
from tests.support.apptools import close, launch, make_pool, plain, settings, tiny_lora


@pytest.fixture(scope="module")
def pool_dir(tiny_clip_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pool-src")
    loras = [
        tiny_lora(tiny_clip_dir, tmp / "a", ("cat", "dog", "fox")),
        tiny_lora(tiny_clip_dir, tmp / "b", ("oak", "elm", "ash"), steps=10),
    ]
    return make_pool(tmp / "pool", tiny_clip_dir, loras)


@pytest.fixture(scope="module")
def client(tiny_clip_dir, pool_dir, tmp_path_factory):
    s = settings(tmp_path_factory.mktemp("app"), str(tiny_clip_dir))
    s.pool = pool_dir
    demo, client = launch(s)
    yield client
    close(demo, client)


def _manifests(pool_dir: Path) -> list[dict]:
    return [json.loads(m.read_text()) for m in sorted(pool_dir.glob("*/manifest.json"))]


def test_pool_is_browsed_by_source_and_class(client, pool_dir):
    summary, sources, classes, images, masked, details, runs = client.predict(str(pool_dir), api_name="/open_pool")
    assert plain(summary) == f"{pool_dir}: 2 inversion runs from 2 LoRAs, 4 classes, 12 images."
    manifests = _manifests(pool_dir)
    by_name = {m["source"]["name"]: m for m in manifests}
    labels = [label for label, _ in sources["choices"]]
    assert labels[0].startswith("org/lora-0 (") and labels[0].endswith("): 3 classes, 6 images")
    assert sources["value"] == by_name["org/lora-0"]["source"]["fingerprint"]
    assert classes["choices"] == [["cat (3)", "0"], ["dog (3)", "1"]] and classes["value"] == "0"

    # unmasked and masked images, captioned with the teacher's confidence: softmax of the stored logits at the label
    items = [i for i in by_name["org/lora-0"]["items"] if i["label"] == 0]
    expected = [torch.tensor(i["logits"]).softmax(-1)[0].item() for i in items]
    expected_kept = [torch.tensor(i["logits_kept"]).softmax(-1)[0].item() for i in items]
    assert [img["caption"] for img in images] == [f"p={p:.2f} · run 1" for p in expected]
    assert [m["caption"] for m in masked] == [f"4 patches · p={p:.2f}" for p in expected_kept]
    assert f"mean confidence in this class is **{sum(expected) / 3:.2f}** on the images" in details
    assert f"**{sum(expected_kept) / 3:.2f}** on their kept tokens" in details
    ((run_name, run),) = runs.items()
    assert run["settings"] == {"steps": 6, "run": 0} and run["steps_done"] == 6 and not run["stopped"]

    # the other source: its classes, then its second class; it was inverted without pruning, so nothing is masked
    other = by_name["org/lora-1"]["source"]["fingerprint"]
    classes, images, masked, details, runs = client.predict(str(pool_dir), other, api_name="/pool_source")
    assert classes["choices"] == [["oak (3)", "0"], ["elm (3)", "1"]]
    images, masked, details, runs = client.predict(str(pool_dir), other, "1", api_name="/pool_class")
    assert len(images) == 3 and masked == [] and "**<bdi>elm</bdi>** (3 images)" in details
    assert "kept tokens" not in details and list(runs.values())[0]["settings"]["run"] == 1


def test_large_classes_are_shown_a_page_at_a_time(client, pool_dir, monkeypatch):
    monkeypatch.setattr(pool_tab, "MAX_POOL_GALLERY", 2)
    _, sources, classes, images, masked, details, _ = client.predict(str(pool_dir), api_name="/open_pool")
    assert len(images) == len(masked) == 2 and "(showing 1–2 of 3, page 1 of 2)" in plain(details)
    source, label = sources["value"], classes["value"]
    images, masked, details, _ = client.predict(str(pool_dir), source, label, 2, api_name="/pool_page")
    assert len(images) == len(masked) == 1 and "(showing 3–3 of 3, page 2 of 2)" in plain(details)
    images, *_ = client.predict(str(pool_dir), source, label, 99, api_name="/pool_page")  # past the end: the last
    assert len(images) == 1
    with pytest.raises(AppError, match=r"Value 0 is less than minimum value 1"):
        client.predict(str(pool_dir), source, label, 0, api_name="/pool_page")


def test_a_missing_or_empty_pool_is_explained(client, tmp_path):
    summary, sources, *_ = client.predict(str(tmp_path / "none"), api_name="/refresh_pool")
    assert summary.startswith("ℹ️ pool folder") and "does not exist" in plain(summary) and "Add to pool" in summary
    assert sources["choices"] == []
    (tmp_path / "empty").mkdir()
    summary, *_ = client.predict(str(tmp_path / "empty"), api_name="/refresh_pool")
    assert "has no runs yet" in plain(summary)
    with pytest.raises(AppError, match="does not exist"):
        client.predict(str(tmp_path / "none"), api_name="/open_pool")


def test_a_run_being_written_is_not_shown(client, pool_dir, tmp_path):
    copy = shutil.copytree(pool_dir, tmp_path / "pool")
    half = copy / ".tmp-org-lora-2-half-written"
    half.mkdir()
    (half / "images").mkdir()
    summary, *_ = client.predict(str(copy), api_name="/open_pool")
    assert "2 inversion runs from 2 LoRAs" in summary


def _big_run(pool_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the pool whose first run's manifest is edited by `edit(manifest)`."""
    copy = shutil.copytree(pool_dir, tmp_path / "pool")
    path = sorted(copy.glob("*/manifest.json"))[0]
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return copy


def test_manifests_are_bounded_in_bytes_and_items(client, pool_dir, tmp_path):
    big = _big_run(pool_dir, tmp_path / "bytes", lambda m: m["settings"].update(blob="x" * (9 << 20)))
    with pytest.raises(
        AppError,
        match=r"manifest\.json: the manifest is 9,4\d\d,\d{3} bytes, more than the "
        r"8,388,608 accepted",
    ):
        client.predict(str(big), api_name="/open_pool")
    many = _big_run(pool_dir, tmp_path / "items", lambda m: m.update(items=m["items"] * 2000))
    with pytest.raises(AppError, match=r"the manifest lists 12,000 images, more than the 5,000 accepted"):
        client.predict(str(many), api_name="/open_pool")


def test_large_settings_are_not_sent_to_the_browser(client, pool_dir, tmp_path):
    big = _big_run(pool_dir, tmp_path, lambda m: m["settings"].update(blob="x" * 100_000))
    *_, runs = client.predict(str(big), api_name="/open_pool")
    shown = json.dumps(runs)
    assert len(shown) < 30_000 and "more than the 20,000 shown" in shown


def test_a_page_load_reads_the_pool_only_on_the_pool_tab(pool_dir, tiny_clip_dir, tmp_path, monkeypatch):
    import gradio as gr

    from app_ui import PathPolicy
    from app_ui.pool import PoolBrowser

    s = settings(tmp_path, str(tiny_clip_dir))
    s.pool = pool_dir
    browser = PoolBrowser(PathPolicy(True), s)
    opened = []
    monkeypatch.setattr(browser, "refresh", lambda folder: opened.append(folder) or ("shown",))
    skipped = browser.refresh_if_shown(str(pool_dir), None)
    assert len(skipped) == 7 and all(u == gr.skip() for u in skipped) and opened == []

    class Request:
        query_params = {"tab": "pool"}

    assert browser.refresh_if_shown(str(pool_dir), Request()) == ("shown",) and opened == [str(pool_dir)]


def test_only_the_first_runs_of_a_huge_pool_are_read(client, pool_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(pool_tab, "MAX_POOL_RUNS", 1)
    monkeypatch.setattr(pool_tab, "MAX_POOL_SOURCES", 1)
    copy = shutil.copytree(pool_dir, tmp_path / "pool")
    summary, sources, *_ = client.predict(str(copy), api_name="/open_pool")
    assert (
        "1 inversion run from 1 LoRA" in plain(summary)
        and "Only the first 1 of its 2 runs are read" in plain(summary)
        and len(sources["choices"]) == 1
    )
