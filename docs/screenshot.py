"""Retake docs/screenshot.png: the web viewer after a rollout with the bundled default model.

Run against a server started with `make serve` (default http://127.0.0.1:8000):
    .venv/bin/python docs/screenshot.py [URL]
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
OUT = Path(__file__).with_name("screenshot.png")


def main() -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 820})
        page.goto(URL + "/")
        tid = page.get_by_test_id
        tid("frames").fill("48")
        tid("start").click()
        expect(tid("status")).to_have_text("succeeded", timeout=300_000)
        page.screenshot(path=str(OUT))
        browser.close()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
