"""The app's inversion tab: LoRAs from the (fake, local) Hub or uploaded, live previews, Stop, the pool and the zip,
per-session state, and predictions served while an inversion runs."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app_ui
from recycle.pool import Pool
from tests.support.apptools import (
    close,
    good_request,
    headless_lora,
    launch,
    make_pics,
    official_lora,
    plain,
    publish,
    settings,
    tiny_lora,
)

INVERT = dict(per_class=2, steps=40, pruning="-1:0.75", bn_prior=False, lr=0.25, seed=0)


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> dict[str, Path]:
    return make_pics(tmp_path_factory.mktemp("pics"))


@pytest.fixture(scope="module")
def loras(tiny_clip_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "peft": tiny_lora(tiny_clip_dir, root / "colours"),
        "official": official_lora(tiny_clip_dir, root / "official" / "lora_task7.safetensors"),
    }


@pytest.fixture(scope="module")
def served(tiny_clip_dir, tmp_path_factory):
    """(client, app settings): the app with the tiny CLIP as its backbone and a pool in a temporary folder."""
    s = settings(tmp_path_factory.mktemp("app"), str(tiny_clip_dir))
    demo, client = launch(s)
    yield client, s
    close(demo, client)


def _upload(client: Client, *files: Path) -> tuple[str, dict]:
    return client.predict(hub_id="", files=[handle_file(str(f)) for f in files], api_name="/load_lora")


def _invert(client: Client, classes=(0, 1), **overrides) -> list[tuple]:
    """Run /invert to the end; returns every update it streamed."""
    job = client.submit(classes=list(classes), **{**INVERT, **overrides}, api_name="/invert")
    job.result(timeout=120)
    return job.outputs()


# ----------------------------------------------------------------------------------------------------------- tests
def test_hub_lora_is_shown_inverted_with_previews_pooled_and_zipped(served, loras, local_hub):
    client, s = served
    publish(local_hub.root, "recycle-test/colours", loras["peft"])
    card, classes = client.predict(hub_id="recycle-test/colours", files=[], api_name="/load_lora")
    assert "Loaded recycle-test/colours: 3 classes" in plain(card) and "rank 4" in card
    assert "✅ Fits the selected backbone" in card and "<bdi>red</bdi>, <bdi>green</bdi>, <bdi>blue</bdi>" in card
    assert classes["choices"] == [["red", 0], ["green", 1], ["blue", 2]] and classes["value"] == [0, 1]

    outputs = _invert(client, classes=(0, 2))
    previews = [o for o in outputs if o[2].startswith("⏳ Step")]
    assert previews, "the gallery refreshes while the optimisation runs"
    first = previews[0]
    assert len(first[0]) == 4 and first[1] == [] and first[0][0]["caption"].startswith("red · step ")
    images, masked, status, download = outputs[-1]  # the "Add to pool" button update is not part of the API
    assert status.startswith("✅ **Done:** 40 steps") and "mean confidence" in status
    assert [i["caption"].split(" · ")[0] for i in images] == ["red", "red", "blue", "blue"]
    assert all(" · p=" in i["caption"] for i in images)
    assert len(masked) == 4 and all(" · 4/16 · p=" in m["caption"] for m in masked)  # 75% of 16 patches dropped
    assert download["interactive"]
    with zipfile.ZipFile(download["value"]) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read(next(n for n in names if n.endswith("manifest.json"))))
    assert sum(n.endswith(".png") for n in names) == 8  # 4 images + 4 masked
    assert manifest["source"]["name"] == "recycle-test/colours" and manifest["settings"]["steps"] == 40
    assert manifest["settings"]["classes"] == ["red", "blue"] and manifest["settings"]["pruning"]["schedule"] == {
        "-1": 0.75
    }

    note = client.predict(api_name="/add_to_pool")
    assert note.startswith("✅ Added 4 images to the pool") and str(s.pool) in plain(note)
    assert client.predict(api_name="/add_to_pool").startswith("Already in the pool")  # not added twice
    pool = Pool(s.pool)
    assert [c.name for c in pool.classes] == ["red", "blue"] and pool.masked_available

    (local_hub.root / "recycle-test" / "official").mkdir(parents=True)  # the official format, from the Hub too
    (local_hub.root / "recycle-test" / "official" / "lora.safetensors").write_bytes(loras["official"].read_bytes())
    card, classes = client.predict(hub_id="recycle-test/official", files=[], api_name="/load_lora")
    assert "Loaded recycle-test/official: 3 classes" in plain(card) and "✅ Fits" in card


def test_uploaded_files_peft_pair_and_official_single_file(served, loras):
    client, _ = served
    card, classes = _upload(client, loras["peft"] / "adapter_config.json", loras["peft"] / "adapter_model.safetensors")
    assert "upload:adapter_model.safetensors: 3 classes" in plain(card) and len(classes["choices"]) == 3
    card, classes = _upload(client, loras["official"])
    assert "upload:lora_task7.safetensors: 3 classes" in plain(card) and "✅ Fits" in card
    assert [c[0] for c in classes["choices"]] == ["class_0", "class_1", "class_2"]
    images, masked, status, _ = _invert(client, classes=(2,), per_class=3, steps=10, pruning="none")[-1]
    assert len(images) == 3 and masked == [] and "10 steps" in status and "masked" not in status


def test_stop_ends_the_run_with_the_best_images_and_predictions_are_served_meanwhile(served, loras, pics):
    client, _ = served
    _upload(client, loras["peft"] / "adapter_config.json", loras["peft"] / "adapter_model.safetensors")
    job = client.submit(classes=[0, 1, 2], **{**INVERT, "steps": 2000}, api_name="/invert")
    deadline = time.monotonic() + 60
    while not any(o[2].startswith("⏳ Step") for o in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), "no preview within a minute"
        time.sleep(0.1)
    other = Client(client.src, verbose=False)  # another user: its prediction does not wait for the inversion
    try:
        started = time.monotonic()
        good_request(other, pics)
        assert not job.done() and time.monotonic() - started < 30
        assert other.predict(api_name="/stop_inversion") == "Nothing is running."  # Stop is per session
    finally:
        other.close()
    assert client.predict(api_name="/stop_inversion").startswith("⏹ Stopping")
    images, masked, status, download = job.result(timeout=60) and job.outputs()[-1]
    assert status.startswith("⏹ **Stopped** after") and "of 2000 steps" in status
    assert len(images) == len(masked) == 6 and Path(download["value"]).is_file()
    assert client.predict(api_name="/stop_inversion") == "Nothing is running."


def test_each_session_has_its_own_lora_and_result(served, loras):
    client, _ = served
    _upload(client, loras["peft"] / "adapter_config.json", loras["peft"] / "adapter_model.safetensors")
    other = Client(client.src, verbose=False)
    try:
        with pytest.raises(AppError, match="Load a LoRA first"):
            _invert(other, classes=())  # its class list is empty: classes are per session too
        with pytest.raises(AppError, match="There is no inversion to add yet"):
            other.predict(api_name="/add_to_pool")
    finally:
        other.close()


def test_an_inversion_without_a_head_or_for_another_backbone_is_refused(
    served, loras, tiny_clip_dir, tiny_vit_dir, tmp_path
):
    client, _ = served
    with pytest.raises(AppError, match="no classification head"):
        _upload(client, *(headless_lora(tiny_clip_dir, tmp_path / "meta").iterdir()))
    card, _ = _upload(client, *(tiny_lora(tiny_vit_dir, tmp_path / "vit-lora", steps=2).iterdir()))
    assert "does **not fit** the selected backbone" in card and str(tiny_vit_dir) in plain(card)
    with pytest.raises(AppError, match="does not fit the backbone"):
        _invert(client)


def test_latest_results_are_kept_for_a_few_sessions_only(tiny_clip_dir, loras, tmp_path):
    """Memory stays bounded: one result per session, for a few sessions; dropped runs lose their files."""
    s = settings(tmp_path, str(tiny_clip_dir))
    policy = app_ui.PathPolicy(True)
    inversion = app_ui.Inversion(app_ui.ModelCache(), policy, s, str(tiny_clip_dir))
    assert inversion.runs.max_sessions == app_ui.RESULT_SESSIONS
    inversion.runs.max_sessions = 2
    zips = []
    for session in ("a", "b", "c", "a"):
        request = gr.Request(session_hash=session)
        inversion.load(None, str(loras["peft"]), [], request)
        *_, last = inversion.run(None, [0], 1, 5, "none", False, 0.25, 0, request, progress=lambda *a, **k: None)
        zips.append(Path(last[3]["value"]))
    assert len(inversion.runs) == 2 and inversion.runs.get("b") is None
    assert [z.is_file() for z in zips] == [False, False, True, True]  # a's first run was replaced, b's evicted


def test_a_full_pool_refuses_new_runs_and_keeps_what_it_holds(tiny_clip_dir, loras, tmp_path):
    s = settings(tmp_path, str(tiny_clip_dir), pool_max_mb=1)
    inversion = app_ui.Inversion(app_ui.ModelCache(), app_ui.PathPolicy(True), s, str(tiny_clip_dir))
    request = gr.Request(session_hash="a")
    inversion.load(None, str(loras["peft"]), [], request)
    for _ in inversion.run(None, [0], 1, 2, "none", False, 0.25, 0, request, progress=lambda *a, **k: None):
        pass
    (s.pool / "old-run").mkdir(parents=True)
    (s.pool / "old-run" / "data.bin").write_bytes(b"x" * (1 << 20))  # the pool now holds its limit
    with pytest.raises(gr.Error, match=r"is full: it holds 1 MB, its limit is 1 MB \(RECYCLE_POOL_MAX_MB\)"):
        inversion.add_to_pool(request)
    assert sorted(p.name for p in s.pool.iterdir()) == ["old-run"]  # nothing added, nothing lost
    (s.pool / "old-run" / "data.bin").unlink()
    assert inversion.add_to_pool(request).startswith("✅ Added 1 images")


HOSTILE_NAMES = ["[x](http://evil.example)", "# big", "<img src=x onerror=alert(1)>", "a\n\n- item", "*em* `code`"]


def test_names_and_metadata_from_a_lora_file_render_as_text(served, tiny_clip_dir, tmp_path):
    """Markdown in a LoRA's metadata (its backbone, its class names) is shown as the text it is: no link, heading,
    image, list or emphasis comes from a file."""
    from recycle.formats import read_adapter, save_adapter
    from tests.support.apptools import rendered

    client, _ = served
    folder = tiny_lora(tiny_clip_dir, tmp_path / "hostile", HOSTILE_NAMES, steps=1)
    adapter = read_adapter(folder)
    adapter.backbone = "vit\n\n# Owned\n[click here](http://evil.example)\nhttp://bare.example"
    save_adapter(adapter, folder)
    card, classes = _upload(client, folder / "adapter_config.json", folder / "adapter_model.safetensors")
    html = rendered(card)
    for tag in ("<a ", "<h1", "<h2", "<img", "<li", "<em", "<ul"):
        assert tag not in html, (tag, html)
    text = plain(card)
    assert "[click here](http://evil.example)" in text and "# Owned" in text
    assert all(name.replace("\n", " ") in text for name in HOSTILE_NAMES)
    assert [c[0] for c in classes["choices"]] == HOSTILE_NAMES  # the checkbox labels are text already


def test_md_text_shows_any_text_as_itself_on_one_line():
    import unicodedata

    from app_ui.markup import md_code, md_text
    from tests.support.apptools import rendered

    for text in HOSTILE_NAMES + ["a|b|c", "1. one", "&amp;", "x\\y", "<script>alert(1)</script>", "\u202eevil"]:
        html = rendered(f"**{md_text(text)}** and {md_code(text)}")
        assert html.count("<p>") == 1 and "<a " not in html and "<script" not in html and "<img" not in html
        shown = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in text).strip()
        assert plain(md_text(text)) == shown
