"""Photograph the loop for the README: runs the browser story of tests/browser_story.py against a fresh
`assistant serve` on the embedded model and writes each step to docs/screenshots/, at 1400 px wide
(<step>.png) and at 390 px wide, a phone (<step>-phone.png).

    python scripts/screenshots.py [--out docs/screenshots]

Needs Debian's chromium at /usr/bin/chromium and the test dependencies (bash scripts/setup.sh --test).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

WIDE = {"width": 1400, "height": 900}
PHONE = {"width": 390, "height": 844}
SETTLE_MS = 600


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = ap.parse_args()
    import browser_story
    import httpx
    from playwright.sync_api import sync_playwright
    from test_browser import cancel_active

    from assistant.engine.model import ensure_embedded
    from assistant.settings import default_cache_dir

    from helpers import running_server

    args.out.mkdir(parents=True, exist_ok=True)

    def shot(page, name: str) -> None:
        page.wait_for_timeout(SETTLE_MS)          # menus fade out, plots draw
        page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
        page.set_viewport_size(PHONE)
        page.wait_for_timeout(SETTLE_MS)          # the layout settles
        page.screenshot(path=str(args.out / f"{name}-phone.png"), full_page=True)
        page.set_viewport_size(WIDE)
        page.wait_for_timeout(SETTLE_MS)
        print(f"wrote {name}.png and {name}-phone.png", file=sys.stderr)

    embedded = ensure_embedded(default_cache_dir(), verify=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        home.mkdir()
        with running_server(home, timeout=180) as (url, _), sync_playwright() as pw:
            api = httpx.Client(base_url=url, timeout=60)
            browser = pw.chromium.launch(executable_path=str(browser_story.CHROMIUM),
                                         args=browser_story.CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=WIDE)
                page.set_default_timeout(30_000)
                browser_story.run(page, url, api, home, tmp, embedded, shot)
            finally:
                browser.close()
                cancel_active(home, api)
    return 0


if __name__ == "__main__":
    sys.exit(main())
