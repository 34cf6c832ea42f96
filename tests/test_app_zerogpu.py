"""ZeroGPU (`app_ui.zerogpu`), with the real `spaces` package: the prediction and inversion handlers run under
``spaces.GPU`` when the Space signals ZeroGPU hardware, ask for a duration that fits the request, take and return
values that cross a process boundary; without the signal the app is unchanged and answers on the CPU."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import gradio as gr
import pytest

import app_ui
from app_ui import zerogpu
from recycle.invert import InversionConfig
from recycle.tokens import PruningConfig
from tests.support.apptools import close, free_port, good_request, launch, make_pics, settings, tiny_lora

spaces = pytest.importorskip("spaces")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lora(tiny_clip_dir, tmp_path_factory) -> Path:
    return tiny_lora(tiny_clip_dir, tmp_path_factory.mktemp("lora") / "colours", steps=5)


def _registered(demo: gr.Blocks, api_name: str):
    return next(f.fn for f in demo.fns.values() if f.api_name == api_name)


@pytest.mark.parametrize(
    "value, on",
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("t", True),
        ("", False),
        ("false", False),
        ("0", False),
        ("yes", False),
    ],
)
def test_zero_gpu_is_read_from_the_environment_as_spaces_reads_it(monkeypatch, value, on):
    from spaces.config import boolean

    monkeypatch.setenv("SPACES_ZERO_GPU", value)
    assert zerogpu.zero_gpu() is on is boolean(value)


def test_durations_fit_the_request_within_bounds():
    assert zerogpu.predict_seconds(0) == 10 and zerogpu.predict_seconds(200) == 20
    assert zerogpu.predict_seconds(10**9) == 60
    assert zerogpu.invert_seconds(10, 1) == 30  # a short run asks for the minimum
    assert 30 < zerogpu.invert_seconds(2000, 8) < zerogpu.invert_seconds(2000, 32) <= 300
    assert zerogpu.invert_seconds(10**6, 10**6) == 300
    # from the handlers' own arguments, whatever they hold
    config = InversionConfig(per_class=4, steps=2000, pruning=PruningConfig({-1: 0.75}))
    assert zerogpu.compute_duration("b", None, [0, 1, 2], config, None, [], "stop") == zerogpu.invert_seconds(2000, 12)
    assert zerogpu.compute_duration("b", None, "junk", None) == 30
    assert zerogpu.classify_duration(
        "b", "", ["q1", "q2"], class_1_name="a", class_1_images=[1, 2, 3], class_2_images=None
    ) == zerogpu.predict_seconds(5)
    assert zerogpu.classify_duration(None, None, {"not": "a list"}) == 10


def test_handlers_are_wrapped_when_zerogpu_is_signalled(tiny_clip_dir, tmp_path):
    """The app, built in a process where the Space says ZeroGPU (with the real `spaces` package, whose device API
    is unreachable here), registers spaces.GPU versions of prediction and the inversion computation."""
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        import app, app_ui
        settings = app_ui.AppSettings(backbone={str(tiny_clip_dir)!r}, weights=Path({str(tmp_path / "none")!r}),
                                      pool=Path({str(tmp_path / "pool")!r}))
        demo = app.build_demo(settings=settings, cache=app_ui.ModelCache(device="cpu"))
        fns = {{f.api_name: f.fn for f in demo.fns.values()}}
        inversion = fns["invert"].__self__
        print(json.dumps({{"classify": hasattr(fns["classify"], "zerogpu"),
                           "compute": hasattr(inversion.compute, "zerogpu"),
                           "run": hasattr(fns["invert"], "zerogpu"),
                           "load_lora": hasattr(fns["load_lora"], "zerogpu"),
                           "signature": list(__import__("inspect").signature(fns["classify"]).parameters)}}))
    """)
    env = {
        **__import__("os").environ,
        "SPACES_ZERO_GPU": "true",
        "SPACES_ZERO_DEVICE_API_URL": f"http://127.0.0.1:{free_port()}/",
        "HF_HUB_OFFLINE": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["classify"] and found["compute"]
    assert not found["run"] and not found["load_lora"]  # session state stays in the server process
    assert found["signature"][:3] == ["backbone", "lora", "queries"]  # Gradio still sees the handler's parameters


def test_without_the_signal_nothing_is_wrapped_and_the_app_answers_on_cpu(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    demo, client = launch(settings(tmp_path, str(tiny_clip_dir)))
    try:
        classify = _registered(demo, "classify")
        assert not hasattr(classify, "zerogpu") and not hasattr(_registered(demo, "invert").__self__.compute, "zerogpu")
        good_request(client, make_pics(tmp_path))
        assert "on cpu" in client.predict(api_name="/status")
    finally:
        close(demo, client)


def test_a_missing_or_broken_spaces_package_leaves_the_handlers_as_they_are(monkeypatch, caplog):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError

    def handler(x):
        return x

    with caplog.at_level("WARNING", logger="recycle.app"):
        assert zerogpu.gpu(handler, zerogpu.classify_duration) is handler
    assert "running without ZeroGPU" in caplog.text


def test_the_inversion_computation_crosses_a_process_boundary(tiny_clip_dir, lora, tmp_path):
    """What ZeroGPU sends to its worker and back is pickled: the computation's arguments and every frame it yields
    must be plain values, and the server process keeps the session state (the run for Add to pool)."""
    s = settings(tmp_path, str(tiny_clip_dir))
    inversion = app_ui.Inversion(app_ui.ModelCache(device="cpu"), app_ui.PathPolicy(True), s, str(tiny_clip_dir))
    request = gr.Request(session_hash="z")
    inversion.load(None, str(lora), [], request)
    adapter = inversion.loras.get("z").adapter
    config = InversionConfig(per_class=1, steps=4, pruning=PruningConfig({-1: 0.5}), preview_every=1)
    args = (str(tiny_clip_dir), adapter, [0, 2], config, None, ["red", "blue"], str(tmp_path / "stop"))
    pickle.loads(pickle.dumps(args))
    frames = list(inversion.compute(*args))
    for frame in frames:
        pickle.loads(pickle.dumps(frame))
    kind, result, grid = frames[-1]
    assert kind == "done" and result.images.shape[0] == 2 and grid == (4, 4) and not result.stopped
    assert {f[0] for f in frames[:-1]} <= {"progress", "preview", "waiting"}
    # through the handler: the run is kept in this process, for Add to pool
    *_, last = inversion.run(None, [0], 1, 4, "none", False, 0.25, 0, request, progress=lambda *a, **k: None)
    assert last[2].startswith("✅ **Done:**") and inversion.runs.get("z") is not None
    assert inversion.add_to_pool(request).startswith("✅ Added 1 images")


def test_stop_reaches_a_computation_in_another_process_through_its_stop_file(tiny_clip_dir, lora, tmp_path):
    s = settings(tmp_path, str(tiny_clip_dir))
    inversion = app_ui.Inversion(app_ui.ModelCache(device="cpu"), app_ui.PathPolicy(True), s, str(tiny_clip_dir))
    request = gr.Request(session_hash="z")
    inversion.load(None, str(lora), [], request)
    stop_file = tmp_path / "stop"
    stop_file.touch()  # what Stop does, seen by a worker that shares no memory with the server
    config = InversionConfig(per_class=1, steps=2000, pruning=PruningConfig({-1: 0.0}))
    *_, (kind, result, _) = inversion.compute(
        str(tiny_clip_dir), inversion.loras.get("z").adapter, [0], config, None, ["red"], str(stop_file)
    )
    assert kind == "done" and result.stopped and result.steps_done < 2000
