"""The real page in headless Debian Chromium: what renders, the three jobs done by clicking, and a screenshot of
each tab in ``artifacts/screenshots/`` (gitignored). The app runs as it would offline: the Hub backbone cannot be
loaded, so it falls back to the shipped weights (the committed ``weights/``, or a toy-size run of the reproduction
before they exist) and offers their example tasks.

Chromium is a test-only system package (tests/debian-packages.txt; CI installs it). Without it these tests skip.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import pytest

from tests.support.apptools import close, free_port, launch, publish, settings, tiny_lora
from tests.support.toy import toy_weights
from tests.support.browser import CHROMIUM, Browser

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium; see tests/debian-packages.txt)",
)

SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
CLIP_NAME = "vit_base_patch16_clip_224.openai"
COMMITTED = Path(__file__).resolve().parents[1] / "weights"


def shipped_weights() -> Optional[Path]:
    return COMMITTED if (COMMITTED / "mini-meta-lora" / "recheck.json").is_file() else toy_weights()


@pytest.fixture(scope="module")
def served(tiny_clip_dir, tmp_path_factory):
    """(url, backbone dir, app settings): the app offline on its shipped weights (the committed ones, else toy-size
    ones when the fonts for them are installed), else on the tiny CLIP (then without examples)."""
    from huggingface_hub import constants

    weights = shipped_weights()
    tmp = tmp_path_factory.mktemp("browser-app")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # a Hub that is down: offline mode
        s = settings(tmp, CLIP_NAME if weights else str(tiny_clip_dir), weights)
        demo, client = launch(s)
    backbone = weights / "mini-vit" if weights else tiny_clip_dir
    yield client.src.rstrip("/"), backbone, s
    close(demo, client)


@pytest.fixture()
def browser():
    with Browser(width=1400, height=1000) as b:
        yield b


def _click(browser: Browser, text: str, selector: str = "button") -> None:
    """Click the first `selector` element whose visible text is `text`."""
    found = browser.evaluate(f"""(() => {{
        const el = [...document.querySelectorAll({json.dumps(selector)})]
            .find(e => e.innerText.trim() === {json.dumps(text)} && e.offsetParent !== null);
        if (el) el.click();
        return !!el; }})()""")
    assert found, f"no visible {selector} with text {text!r}"


def _type(browser: Browser, elem_id: str, text: str) -> None:
    """Type `text` into the textbox with `elem_id` (as a user would: the value changes, then an input event)."""
    field = f"document.querySelector('#{elem_id} textarea, #{elem_id} input')"
    browser.wait_for(f"{field} !== null", what=f"#{elem_id}")
    browser.evaluate(f"""(() => {{
        const el = {field};
        el.value = {json.dumps(text)};
        el.dispatchEvent(new Event('input', {{bubbles: true}})); }})()""")


def _has_text(text: str) -> str:
    return f"document.body.innerText.includes({json.dumps(text)})"


# ----------------------------------------------------------------------------------------------------------- tests
def test_rendered_page_shows_the_tabs_and_the_status(served, browser):
    """The page as rendered, after Gradio's scripts have run and the status has loaded."""
    url, backbone, _ = served
    browser.open(url)
    browser.wait_for(_has_text("Ready:"), what="the status")
    dom = browser.html()
    for tab in ("Few-shot", "Invert a LoRA", "Surrogate pool"):
        assert f">{tab}<" in dom or f"{tab}</button>" in dom, tab
    text = browser.text()
    assert "LoRA Recycle" in text and "Ready:" in text and str(backbone) in text
    if shipped_weights():
        assert "Offline mode" in text and "Han characters (held-out classes)" in text


def test_few_shot_from_an_example(served, browser):
    """A click on an example fills in its task and selects the shipped backbone and meta-LoRA it was made for (the
    status line says so); Run then answers with and without the meta-LoRA."""
    import app_ui

    url, backbone, s = served
    browser.open(f"{url}/?tab=few-shot")
    browser.wait_for(_has_text("Ready:"), what="the status")
    browser.idle()
    browser.screenshot(SCREENSHOTS / "few-shot-start.png")
    weights = shipped_weights()
    if not weights:
        pytest.skip("no example tasks: the toy shipped weights need the Debian fonts of reproduce/")
    task = app_ui.find_examples(weights / "examples")[0]
    _type(browser, "meta-lora", "")  # the visitor cleared the meta-LoRA: the example brings it back
    _click(browser, task.label)
    lora = str(weights / "mini-meta-lora")
    browser.wait_for(
        f"document.querySelector('#meta-lora textarea, #meta-lora input').value === {json.dumps(lora)}",
        what="the example's meta-LoRA",
    )
    browser.wait_for(_has_text("with meta-LoRA"), what="the status naming the meta-LoRA")
    assert str(backbone) in browser.text()
    _click(browser, "Run")
    cards = browser.wait_for("document.querySelectorAll('.rc-card').length", timeout=120, what="the prediction cards")
    browser.idle()
    assert cards == len(task.queries)
    text = browser.text()
    assert "predictions agree" in text and "backbone alone" in text
    if all("__" in Path(q).name for q in task.queries):  # labelled queries: both models' correct answers counted
        assert re.search(r"\d+ of \d+ correct with the meta-LoRA · \d+ of \d+ with the backbone alone", text)
        assert "On the miniature's test split" in text
    browser.screenshot(SCREENSHOTS / "few-shot.png")


def test_invert_a_hub_lora_then_browse_the_pool(served, browser, local_hub, tmp_path):
    url, backbone, s = served
    publish(local_hub.root, "recycle-demo/glyphs", tiny_lora(backbone, tmp_path / "lora", ("日", "月", "山")))
    browser.open(f"{url}/?tab=invert")
    _type(browser, "hub-id", "recycle-demo/glyphs")
    _click(browser, "Load LoRA")
    browser.wait_for(_has_text("Fits the selected backbone"), what="the LoRA card")
    browser.idle()
    _click(browser, "Invert")
    browser.wait_for(_has_text("Done:"), timeout=120, what="the inversion")
    browser.idle()
    text = browser.text()
    kept = re.search(r"日 · (\d+)/(\d+) · p=", text)  # masked image: kept / all patches (75% pruned by default)
    assert "日 · p=" in text and kept and int(kept[1]) * 4 == int(kept[2])
    browser.screenshot(SCREENSHOTS / "invert.png")
    _click(browser, "Add to pool")
    browser.wait_for(_has_text("Added 2 images to the pool"), what="the pool note")  # 1 image x 2 classes

    _click(browser, "Surrogate pool", 'button[role="tab"]')
    browser.wait_for(_has_text("1 inversion run from 1 LoRA, 2 classes, 2 images"), what="the pool summary")
    browser.idle()
    assert "mean confidence" in browser.text()
    assert browser.evaluate(
        "[...document.querySelectorAll('input')].some(i => i.value.startsWith('recycle-demo/glyphs ('))"
    ), "the source dropdown shows the LoRA's Hub id"
    browser.screenshot(SCREENSHOTS / "pool.png")
