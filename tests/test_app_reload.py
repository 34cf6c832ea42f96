"""`gradio app.py`: Gradio's hot-reload mode finds the module-level `demo` and swaps in the edited app."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.apptools import free_port

ROOT = Path(__file__).resolve().parent.parent


def _header(url: str) -> str:
    """The first Markdown block of the served page (the app's header), or '' while the server is not up."""
    try:
        with urllib.request.urlopen(f"{url}/config", timeout=5) as answer:
            config = json.load(answer)
    except OSError:
        return ""
    return next(c["props"]["value"] for c in config["components"] if c.get("type") == "markdown")


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_gradio_reload_mode_swaps_in_the_edited_app(tmp_path):
    # Gradio watches the app's folder, which must lie under the working directory: run a copy from tmp_path.
    shutil.copy2(ROOT / "app.py", tmp_path / "app.py")
    shutil.copytree(ROOT / "app_ui", tmp_path / "app_ui", ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "RECYCLE_BACKBONE": str(ROOT / "weights" / "mini-vit"),
        "RECYCLE_WEIGHTS": str(ROOT / "weights"),
        "RECYCLE_POOL": str(tmp_path / "pool"),
        "GRADIO_SERVER_PORT": str(port),
    }
    gradio = Path(sys.executable).with_name("gradio")
    command = [str(gradio)] if gradio.exists() else [sys.executable, "-m", "gradio.cli"]
    server = subprocess.Popen(
        [*command, "app.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait_for(lambda: _header(url).startswith("# ♻️ LoRA Recycle\n"), 120), "the app did not start"
        app_file = tmp_path / "app.py"
        app_file.write_text(
            app_file.read_text(encoding="utf-8").replace("# ♻️ LoRA Recycle\n", "# ♻️ LoRA Recycle (edited)\n", 1),
            encoding="utf-8",
        )

        checks = iter(range(10**6))

        def reloaded() -> bool:
            if next(checks) % 10 == 9:  # a fresh mtime every 5 s, in case the watcher first looked after the edit
                os.utime(app_file)
            return _header(url).startswith("# ♻️ LoRA Recycle (edited)")

        ok = _wait_for(reloaded, 90)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the gradio command and the app it runs, started here
        output = server.communicate(timeout=30)[0].decode(errors="replace")
    assert ok and "failed" not in output, output
