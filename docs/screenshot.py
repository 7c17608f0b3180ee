"""Retake the README's pictures of the web viewer with the bundled default model:
docs/screenshot.png (after a 48-frame rollout) and docs/play.png (Play, after a few moves).

Run against a server started with `make serve` (default http://127.0.0.1:8000):
    .venv/bin/python docs/screenshot.py [URL]
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
HERE = Path(__file__).parent
# Held moves, as a player would walk: a few steps left, then up, then right.
MOVES = ["ArrowLeft"] * 4 + ["ArrowUp"] * 3 + ["ArrowRight"] * 3


def rollout(page: Page) -> None:
    tid = page.get_by_test_id
    tid("frames").fill("48")
    tid("start").click()
    expect(tid("status")).to_have_text("succeeded", timeout=300_000)
    page.screenshot(path=str(HERE / "screenshot.png"))


def play(page: Page) -> None:
    tid = page.get_by_test_id
    tid("play").click()
    expect(tid("status")).to_contain_text("playing", timeout=60_000)
    for i, key in enumerate(MOVES, start=1):
        page.keyboard.press(key)
        expect(tid("frame")).to_have_attribute("data-frames", str(i), timeout=60_000)
    page.screenshot(path=str(HERE / "play.png"))
    tid("play").click()  # Stop


def main() -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        for take in (rollout, play):
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(URL + "/")
            take(page)
            page.close()
        browser.close()
    print(f"wrote {HERE / 'screenshot.png'} and {HERE / 'play.png'}")


if __name__ == "__main__":
    main()
