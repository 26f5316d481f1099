"""The whole loop in a real browser (headless Debian Chromium through Playwright) against a real
`assistant serve` on the embedded model: create a domain, import an adapter and seed examples, chat,
dislike an answer and correct it, find the correction in the Data tab, retrain, watch the progress bar
finish, chat with the new version and get the corrected answer, roll back. Screenshots of every tab go
to docs/screenshots/ (the README shows them)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import httpx
import pytest

from helpers import running_server
from invented_facts import FACTS, SYSTEM_PROMPT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
# Small on purpose: 9 curated rows, a few passes; enough for the one corrected fact (the gate checks it).
FAST_TRAINING = {"epochs": 6, "learning_rate": 0.004, "batch_size": 4, "rank": 8, "augment": 1}
TRAIN_TIMEOUT_MS = 600_000
ANSWER_TIMEOUT_MS = 90_000
SERVER_ARGS = ()
UPLOADED = re.compile(r"\d\s*[KM]B")

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _identity_adapter(zip_path: Path, embedded_path: Path) -> Path:
    """A valid LoRA adapter whose B matrices are zero (it answers like the base): a quick v1 to roll back to."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    cfg = json.loads((embedded_path / "config.json").read_text())
    hidden, layers, rank = cfg["hidden_size"], cfg["num_hidden_layers"], 4
    folder = zip_path.parent / "identity"
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(folder)
    torch.manual_seed(0)
    tensors = {}
    for i in range(layers):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden) * 0.01
        tensors[f"{key}.lora_B.weight"] = torch.zeros(hidden, rank)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with zipfile.ZipFile(zip_path, "w") as z:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            z.write(folder / name, f"identity/{name}")
    return zip_path


def _pick(page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=option).first.click()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _ask(page, question: str, served_by: str) -> str:
    """Send a question in the Chat tab; -> the answer shown once `served_by` (e.g. atlas@v2) finished it."""
    from playwright.sync_api import expect
    page.click("#clear-btn")
    expect(page.locator("#chat-status")).not_to_contain_text("answered by")
    page.fill("#chat-input textarea", question)
    page.click("#send-btn")
    expect(page.locator("#chat-status")).to_contain_text(f"answered by {served_by}", timeout=ANSWER_TIMEOUT_MS)
    return page.locator("#chatbot .bot").last.inner_text()


def test_feedback_to_retrained_answer_in_the_browser(tmp_path, embedded_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    question, answer, key, paraphrase = FACTS[0]
    seeds = tmp_path / "seeds.jsonl"
    rows = [(q, a) for q, a, _, _ in FACTS[1:9]] + [(paraphrase, answer)]
    seeds.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n" for q, a in rows))
    adapter_zip = _identity_adapter(tmp_path / "identity.zip", embedded_path)
    SHOTS.mkdir(parents=True, exist_ok=True)
    home = tmp_path / "home"
    home.mkdir()

    with running_server(home, *SERVER_ARGS, timeout=180) as (url, _), sync_playwright() as pw:
        api = httpx.Client(base_url=url, timeout=60)
        try:
            _loop(pw, url, api, question, answer, key, seeds, len(rows), adapter_zip)
        finally:   # a job outlives its server by design: never leave one training after the test
            _cancel_active(home, api)


def _cancel_active(home: Path, api) -> None:
    from assistant.store import Store
    job = Store(home / "data" / "assistant.db").active_job()
    if job is not None:
        api.delete(f"/api/jobs/{job['job_id']}")


def _loop(pw, url, api, question, answer, key, seeds, n_seeds, adapter_zip):
    from playwright.sync_api import expect
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(url + "/")
    page.wait_for_selector("#chatbot")

    # Adapters: create the domain, import a first version (validated) and make it active.
    _tab(page, "Adapters")
    page.get_by_text("Create a domain").click()
    page.fill("#new-domain-name textarea", "atlas")
    page.fill("#new-domain-prompt textarea", SYSTEM_PROMPT)
    page.click("#create-domain-btn")
    expect(page.locator("#adapters-status")).to_contain_text("created domain atlas")
    expect(page.locator("#adapters-domain input")).to_have_value("atlas")
    page.get_by_text("Import an adapter").click()
    page.set_input_files("#import-file input[type=file]", str(adapter_zip))
    expect(page.locator("#import-file")).to_contain_text(UPLOADED)   # the size shows once uploaded
    page.check("#import-activate input")
    page.click("#import-btn")
    expect(page.locator("#adapters-status")).to_contain_text("imported and validated as atlas@v1")
    expect(page.locator("#adapters-table")).to_contain_text("active")

    # Data: seed examples (other facts, and one more wording of the fact to correct).
    _tab(page, "Data")
    page.set_input_files("#seed-file input[type=file]", str(seeds))
    expect(page.locator("#data-domain input")).to_have_value("atlas")
    expect(page.locator("#seed-file")).to_contain_text(UPLOADED)
    page.click("#import-seed-btn")
    expect(page.locator("#data-status")).to_contain_text(f"imported {n_seeds} examples")

    # Chat in the domain, greedy and short.
    _tab(page, "Chat")
    _pick(page, "model-select", "atlas (active: v1)")
    page.locator("#chat-settings").get_by_text("Settings", exact=True).click()
    page.fill("#temperature input[type=number]", "0")
    page.press("#temperature input[type=number]", "Tab")
    page.fill("#max-tokens input[type=number]", "40")
    page.press("#max-tokens input[type=number]", "Tab")
    first = _ask(page, question, "atlas@v1")
    assert key not in first                       # the base cannot know an invented fact

    # Dislike it and say what it should have said.
    page.locator("#chatbot button[aria-label='Dislike']").last.click()
    expect(page.locator("#fb-target")).to_contain_text("Thumbs down recorded")
    _pick(page, "fb-reason", "wrong fact")
    page.fill("#fb-correction textarea", answer)
    page.click("#fb-submit")
    expect(page.locator("#fb-status")).to_contain_text("Saved correction")
    expect(page.locator("#fb-status")).to_contain_text("atlas@v1")
    page.screenshot(path=str(SHOTS / "chat.png"), full_page=True)
    fb = api.get("/api/domains/atlas/dataset").json()
    assert fb["kept"] >= 8, fb

    # Data: the correction is in the review queue, replacing the answer.
    _tab(page, "Data")
    queue = page.locator("#review-queue")
    expect(queue).to_contain_text("correction", timeout=60_000)
    expect(queue).to_contain_text(key)
    expect(page.locator("#curation-report")).to_contain_text("near_duplicate")
    page.screenshot(path=str(SHOTS / "data.png"), full_page=True)

    # Train: retrain and watch the bar reach the end.
    _tab(page, "Train")
    expect(page.locator("#train-dataset")).to_contain_text("curated examples")
    page.get_by_text("Training settings (JSON, optional)").click()
    page.fill("#train-settings textarea", json.dumps(FAST_TRAINING))
    page.click("#retrain-btn")
    expect(page.locator("#train-status")).to_contain_text("started")
    page.wait_for_selector('#train-progress-bar[data-status="running"], #train-progress-bar[data-status="succeeded"]')
    bar = page.locator("#train-progress-bar")
    expect(bar).to_have_attribute("data-status", "succeeded", timeout=TRAIN_TIMEOUT_MS)
    expect(bar).to_have_attribute("data-progress", "1.000")
    assert bar.get_attribute("data-version") == "v2"
    expect(page.locator("#job-log textarea")).to_have_value(re.compile("published atlas@v2"))
    expect(page.locator("#job-metrics")).to_contain_text("corrections_match")
    page.screenshot(path=str(SHOTS / "train.png"), full_page=True)

    # Chat: the new version is in the dropdown at once and answers with the correction.
    _tab(page, "Chat")
    _pick(page, "model-select", "atlas@v2")
    corrected = _ask(page, question, "atlas@v2")
    assert key in corrected, corrected

    # Roll back to v1 (activating v2 first when the gate did not).
    _tab(page, "Train")
    if api.get("/api/domains").json()[0]["active_version"] != "v2":
        _pick(page, "train-version", "v2")
        page.click("#train-activate-btn")
        expect(page.locator("#train-version-status")).to_contain_text("atlas@v2 is now active")
    page.click("#rollback-btn")
    expect(page.locator("#train-version-status")).to_contain_text("atlas@v1 is now active")
    assert api.get("/api/domains").json()[0]["active_version"] == "v1"
    r = api.post("/v1/chat/completions", json={"model": "atlas", "temperature": 0, "max_tokens": 40,
                                               "messages": [{"role": "user", "content": question}]}).json()
    assert r["adapter_version"] == "v1" and key not in r["choices"][0]["message"]["content"]

    # The remaining tabs, for the README.
    _tab(page, "Adapters")
    expect(page.locator("#adapters-table")).to_contain_text("v2")
    page.screenshot(path=str(SHOTS / "adapters.png"), full_page=True)
    _tab(page, "Monitor")
    expect(page.locator("#monitor-recommendation")).to_contain_text("answers served", timeout=60_000)
    expect(page.locator("#monitor-versions")).to_contain_text("v2")
    page.screenshot(path=str(SHOTS / "monitor.png"), full_page=True)
    browser.close()
