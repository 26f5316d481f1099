"""The whole loop in a real browser (headless Debian Chromium through Playwright) against a real
`assistant serve` on the embedded model; the story is tests/browser_story.py. Nothing is written into the
repository: scripts/screenshots.py runs the same story to photograph it for the README."""

from __future__ import annotations

import browser_story
import httpx
import pytest

from helpers import running_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_feedback_to_retrained_answer_in_the_browser(tmp_path, embedded_path):
    if not browser_story.CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    home = tmp_path / "home"
    home.mkdir()
    # the gate asks a dozen of its general probe questions (those test_retrain_e2e.py's gate asks): this walk
    # shows its verdict, it does not judge it
    with running_server(home, "--gate.probes", "12", timeout=180) as (url, _), sync_playwright() as pw:
        api = httpx.Client(base_url=url, timeout=60)
        browser = pw.chromium.launch(executable_path=str(browser_story.CHROMIUM), args=browser_story.CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            browser_story.run(page, url, api, home, tmp_path, embedded_path)
        finally:   # a job outlives its server by design: never leave one training after the test
            browser.close()
            cancel_active(home, api)


def cancel_active(home, api) -> None:
    from assistant.data.store import Store
    job = Store(home / "data" / "assistant.db").active_job()
    if job is not None:
        api.delete(f"/api/jobs/{job['job_id']}")
