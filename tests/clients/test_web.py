"""The web viewer (clients/web, served at /) in a real headless Chromium (Debian's, driven by
Playwright), against a real `dfserve serve` process. Screenshots go to artifacts/screenshots/.

/usr/bin/chromium missing is a failure, not a skip: `make test` installs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from server import video
from tests.clients.conftest import Server

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

# Test instrumentation, installed from outside the app: on every animation frame, hash the
# canvas pixels and note the status text, so the test sees what a user would have seen.
SAMPLER = """() => {
  window.__samples = [];
  const canvas = document.querySelector('[data-testid=frame]');
  const status = document.querySelector('[data-testid=status]');
  const sample = () => {
    const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let h = 0;
    for (let i = 0; i < d.length; i++) h = (h * 31 + d[i]) | 0;
    window.__samples.push({hash: h, status: status.textContent,
                           frames: Number(canvas.dataset.frames)});
    if (!window.__stopSampling) requestAnimationFrame(sample);
  };
  requestAnimationFrame(sample);
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Debian's chromium is needed: apt-get install -y chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 820}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    expect(page.get_by_test_id("model")).to_have_value("tiny")
    yield page
    context.close()
    server.cancel_all()
    assert not errors, errors


def test_rollout_streams_to_the_canvas_and_downloads(page: Page, tmp_path: Path) -> None:
    tid = page.get_by_test_id
    expect(tid("example")).to_have_value("random")
    assert tid("schedule").evaluate("s => [...s.options].map(o => o.value)") == [
        "pyramid", "autoregressive", "full_sequence", "trapezoid"]
    tid("sampler").select_option("ddim")
    tid("steps").fill("6")
    tid("frames").fill("120")
    page.locator("#seed").fill("11")
    page.evaluate(SAMPLER)
    tid("start").click()
    expect(tid("cancel")).to_be_enabled()
    expect(tid("status")).to_have_text("succeeded", timeout=120_000)
    page.evaluate("() => { window.__stopSampling = true; }")
    samples: list[dict[str, Any]] = page.evaluate("() => window.__samples")
    # The canvas changed while frames arrived, before the rollout was done.
    live = [s for s in samples if s["status"] != "succeeded" and s["frames"] > 0]
    assert len({s["hash"] for s in live}) >= 5, samples[-5:]
    assert len({s["frames"] for s in live}) >= 5
    assert page.get_by_test_id("frame").get_attribute("data-frames") == "120"
    assert tid("progress").evaluate("p => [p.value, p.max]") == [120, 120]
    expect(tid("cancel")).to_be_disabled()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "rollout.png"))

    with page.expect_download() as download:
        tid("download").click()
    path = tmp_path / "rollout.mp4"
    download.value.save_as(path)
    frames = video.decode_video(path.read_bytes())
    assert len(frames) == 120 and frames[0].shape == (16, 16, 3)


def test_cancel_from_the_page(page: Page) -> None:
    tid = page.get_by_test_id
    tid("frames").fill("500")
    tid("steps").fill("8")
    tid("start").click()
    expect(tid("frame")).not_to_have_attribute("data-frames", "0", timeout=60_000)
    tid("cancel").click()
    expect(tid("status")).to_have_text("cancelled", timeout=30_000)
    assert int(tid("frame").get_attribute("data-frames") or 0) < 500
    expect(tid("download")).to_be_disabled()


def test_play_with_the_keyboard(page: Page) -> None:
    tid = page.get_by_test_id
    tid("play").click()
    expect(tid("status")).to_contain_text("playing", timeout=60_000)
    legend = tid("legend")
    expect(legend).to_be_visible()
    # The legend is made from the model's action names: arrows/WASD for left/right/up.
    for name, key in (("left", "←"), ("right", "→"), ("up", "↑"), ("noop", "1")):
        expect(legend.locator(f'[data-action="{name}"]')).to_contain_text(key)
    canvas = tid("frame")
    expect(canvas).to_have_attribute("data-frames", "0")
    before = canvas.evaluate("c => c.toDataURL()")  # the context frame is shown
    keys = ["ArrowLeft", "ArrowUp", "d", "w", "ArrowRight", "a", "1", "ArrowUp", "ArrowLeft",
            "w"]  # 10 steps: arrows and WASD move, "1" is the first spare key (noop)
    for key in keys:
        page.keyboard.press(key)
    expect(canvas).to_have_attribute("data-frames", "10", timeout=60_000)
    for key in ("s", "ArrowDown", "2", "x"):  # unbound for this model (no "down", 4 actions)
        page.keyboard.press(key)
    page.wait_for_timeout(600)
    assert canvas.get_attribute("data-frames") == "10"
    assert tid("status").text_content().startswith("playing")
    assert canvas.evaluate("c => c.toDataURL()") != before
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "play.png"))
    tid("play").click()  # Stop
    expect(tid("play")).to_have_text("Play", timeout=10_000)
    expect(legend).to_be_hidden()
