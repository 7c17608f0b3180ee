"""The web viewer (clients/web, served at /) in a real headless Chromium (Debian's, driven by
Playwright), against a real `dfserve serve` process. Screenshots go to artifacts/screenshots/.

/usr/bin/chromium missing is a failure, not a skip: `make test` installs it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from dfserve.server import video
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


VIEWPORT_WIDTH = 1200
BLANK = "c => !c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v)"


def test_a_long_error_wraps_and_lists_the_accepted_actions_once(page: Page) -> None:
    tid = page.get_by_test_id
    tid("actions").fill("x" * 600 + ", left")  # an unknown name with no space to break at
    tid("start").click()
    expect(tid("status")).to_have_text("error", timeout=30_000)
    error = tid("error")
    expect(error).to_be_visible()
    text = error.text_content() or ""
    assert "actions" in text and "x" * 600 in text, text
    for name in ("noop", "left", "right", "up"):
        assert text.count(name) == 1, text  # the message does not repeat `accepted`
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT_WIDTH
    for testid in ("error", "frame", "status"):
        box = tid(testid).bounding_box()
        assert box is not None and 0 <= box["x"] and box["x"] + box["width"] <= VIEWPORT_WIDTH
    status = tid("status").bounding_box()
    assert status is not None and status["width"] < 120  # the pill says "error", no more
    expect(tid("start")).to_be_enabled()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "long-error.png"))


def test_play_keys_work_after_a_click_on_the_idle_checkbox(page: Page) -> None:
    tid = page.get_by_test_id
    tid("play").click()
    expect(tid("status")).to_contain_text("playing", timeout=60_000)
    checkbox = tid("idle-noop")
    checkbox.click()
    checkbox.click()  # on and off again: no idle frames, and the checkbox keeps the focus
    expect(checkbox).not_to_be_checked()
    assert page.evaluate("document.activeElement.id") == "idle-noop"
    canvas = tid("frame")
    before = int(canvas.get_attribute("data-frames") or 0)
    for key in ("ArrowLeft", "ArrowRight", "ArrowUp", "a"):
        page.keyboard.press(key)
    # At most two idle frames can still be in flight from the moment the box was ticked (the
    # page keeps two requests in flight at most), so four more frames need the keys.
    page.wait_for_function("n => Number(document.querySelector('[data-testid=frame]')"
                           ".dataset.frames) >= n", arg=before + 4, timeout=60_000)
    assert tid("status").text_content().startswith("playing")
    tid("play").click()
    expect(tid("play")).to_have_text("Play", timeout=10_000)


def test_start_clears_the_previous_frame_and_the_favicon_loads(page: Page,
                                                               server: Server) -> None:
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400
            else None)  # fmt: skip
    page.reload()
    tid = page.get_by_test_id
    expect(tid("model")).to_have_value("tiny")
    icon = page.evaluate("async () => { const r = await fetch("
                         "document.querySelector('link[rel=icon]').href); "
                         "return [r.status, r.headers.get('content-type')]; }")  # fmt: skip
    assert icon == [200, "image/svg+xml"], icon
    canvas = tid("frame")
    tid("frames").fill("4")
    tid("start").click()
    expect(tid("status")).to_have_text("succeeded", timeout=60_000)
    assert not canvas.evaluate(BLANK)

    # A long rollout holds the only batch slot, so the page's next one waits in the queue
    # with nothing of its own to show yet.
    blocker = httpx.post(f"{server.url}/v1/rollouts", json={"example": "random",
                                                             "frames": 500, "steps": 50})
    assert blocker.status_code == 202, blocker.text
    blocker_url = f"{server.url}{blocker.json()['links']['self']}"
    deadline = time.monotonic() + 60
    while httpx.get(blocker_url).json()["status"] != "running":
        assert time.monotonic() < deadline, "the blocking rollout never started"
        time.sleep(0.05)
    tid("start").click()
    expect(tid("status")).to_contain_text("queued", timeout=30_000)
    assert canvas.get_attribute("data-frames") == "0"
    assert canvas.evaluate(BLANK), "the previous rollout's last frame is still on screen"
    expect(page.locator("#overlay")).to_be_visible()
    httpx.delete(blocker_url)
    expect(tid("status")).to_have_text("succeeded", timeout=60_000)
    assert canvas.get_attribute("data-frames") == "4" and not canvas.evaluate(BLANK)
    expect(page.locator("#overlay")).to_be_hidden()
    assert failed == [], failed


def test_docs_and_redoc_load_with_no_network(browser: Browser, server: Server) -> None:
    """/docs and /redoc with every request outside the server refused, as on a machine
    without internet access: both must render the API from the server's own files."""
    outside: list[str] = []

    def only_the_server(route: Route) -> None:
        if route.request.url.startswith(server.url + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context = browser.new_context(viewport={"width": VIEWPORT_WIDTH, "height": 820})
    context.route("**/*", only_the_server)
    page = context.new_page()
    try:
        page.goto(f"{server.url}/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("dfserve",
                                                                          timeout=30_000)
        expect(page.locator(".opblock-summary-path", has_text="/v1/rollouts").first
               ).to_be_visible()  # fmt: skip
        page.goto(f"{server.url}/redoc")
        expect(page.get_by_role("heading", name=re.compile("dfserve")).first).to_be_visible(
            timeout=30_000)
        expect(page.get_by_text("/v1/rollouts").first).to_be_attached()
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "redoc.png"))
    finally:
        context.close()
    assert outside == [], outside
    for path in ("/docs", "/redoc"):
        html = httpx.get(f"{server.url}{path}").text
        assert not re.findall(r"https?://", html), f"{path} references an external URL"
