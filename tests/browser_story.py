"""The whole loop as a person does it in the browser, shared by tests/test_browser.py (which asserts it) and
scripts/screenshots.py (which also photographs each step): create a domain from the Chat tab's model picker,
import a first adapter version, chat, thumbs down with a correction in one panel (brought into view), go on
in the same conversation (a question sent while an answer streams is queued, shown and answered in order),
correct a later answer and correct it again (undo, then a new correction: the record keeps the first as
history), a thumbs-up that asks what was good, seed examples, the review queue showing a row's context and
taught turn, retrain with form settings (a bad value named in place), watch the stages, read the gate's
verdict, activate, chat with the new version and get the corrected answer, roll back, and every tab at a
phone's width (390 px): tabs in reach, tables readable, stage bars visible, thumbs >= 40 px."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Callable

from invented_facts import FACTS, SYSTEM_PROMPT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# Small on purpose: 9 curated rows, a few bold passes; enough for the one corrected fact (the gate checks it),
# without retries: the gate may block it (then it is activated anyway), and tests/test_gate_recovers.py retries.
# A few self-replay rows (the default mixes in one per taught row): keeping general answers is the gate's and
# tests/test_retention.py's subject, not this walk's.
FAST_FORM = {"train-epochs": "6", "train-lr": "0.004", "train-rank": "8"}
FAST_ADVANCED = {"batch_size": 4, "augment": 1, "replay": 8, "retries": 0}   # the walk test covers retries
TRAIN_TIMEOUT_MS = 900_000
PHONE = {"width": 390, "height": 844}
TOUCH_PX = 40
ANSWER_TIMEOUT_MS = 90_000
UPLOADED = re.compile(r"\d\s*[KM]B")

Shot = Callable[[object, str], None]     # (page, step name) -> None


def identity_adapter(zip_path: Path, embedded_path: Path) -> Path:
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


def seed_file(path: Path) -> tuple[Path, int]:
    """Other invented facts, and one more wording of the fact the user will correct."""
    question, answer, _, paraphrase = FACTS[0]
    rows = [(q, a) for q, a, _, _ in FACTS[1:9]] + [(paraphrase, answer)]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in rows))
    return path, len(rows)


def _pick(page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=option).first.click()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _fill(page, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.press(selector, "Tab")


def _ask(page, question: str, served_by: str) -> str:
    """Send a question in the Chat tab; -> the answer shown once `served_by` (e.g. atlas@v2) finished it."""
    from playwright.sync_api import expect
    page.click("#clear-btn")
    expect(page.locator("#chat-status")).not_to_contain_text("answered by")
    page.fill("#chat-input textarea", question)
    expect(page.locator("#chat-tokens")).to_contain_text("tokens", timeout=ANSWER_TIMEOUT_MS)   # against the context
    page.click("#send-btn")
    expect(page.locator("#chat-status")).to_contain_text(f"answered by {served_by}", timeout=ANSWER_TIMEOUT_MS)
    return page.locator("#chatbot .bot").last.inner_text()


def feedback_records(home: Path, domain: str) -> list[dict]:
    from assistant.data.store import Store
    return Store(home / "data" / "assistant.db").list_feedback(domain)


def history_of(home: Path, record_id: int) -> list[dict]:
    from assistant.data.store import Store
    store = Store(home / "data" / "assistant.db")
    rows = store._read("SELECT response_id FROM feedback WHERE id = ?", (record_id,))
    return store.feedback_for([rows[0][0]])[rows[0][0]][0]["history"]


def _user_turns(page) -> list[str]:
    return [t.strip() for t in page.locator("#chatbot .user").all_inner_texts()]


THUMBS = ", ".join(f"#chatbot button[aria-label='{label}']" for label in ("Like", "Liked", "Dislike", "Disliked"))


def _thumb(page, kind: str, nth: int):
    """The `kind` thumb ('Like' or 'Dislike', pressed or not) of the nth answer (0-based): each answer has two."""
    buttons = page.locator(THUMBS)
    pair = [buttons.nth(2 * nth), buttons.nth(2 * nth + 1)]
    return next(b for b in pair if (b.get_attribute("aria-label") or "").startswith(kind))


def _correct(page, nth: int, text: str) -> None:
    """Thumbs down on the nth answer and send `text` as the correction; the panel comes into view."""
    from playwright.sync_api import expect
    _thumb(page, "Dislike", nth).click()
    expect(page.locator("#feedback-panel")).to_be_visible()
    expect(page.locator("#feedback-panel")).to_be_in_viewport()
    expect(page.locator("#fb-target")).to_contain_text(f"answer #{nth + 1}")
    expect(page.locator("#fb-target")).to_contain_text("What was wrong")
    _pick(page, "fb-reason", "wrong fact")
    page.fill("#fb-correction textarea", text)
    page.click("#fb-submit")
    expect(page.locator("#fb-status")).to_contain_text("Saved correction")
    expect(page.locator("#feedback-panel")).to_be_hidden()


def conversation(page, home: Path) -> None:
    """Go on in the conversation of answer #1: a question sent while another streams is queued, then a
    correction of answer #2, corrected again; a thumbs-up on answer #3 asks what was good."""
    from playwright.sync_api import expect
    (q2, a2, _, _), (q3, _, _, _) = FACTS[1], FACTS[2]
    page.fill("#chat-input textarea", q2)
    page.click("#send-btn")
    expect(page.locator("#chat-status")).to_contain_text("answering")
    page.fill("#chat-input textarea", q3)          # typed while #2 streams: the box is not cleared under it
    page.press("#chat-input textarea", "Enter")
    expect(page.locator("#chat-status")).to_contain_text("Queued (1)")
    expect(page.locator("#chat-status")).to_contain_text(q3)
    expect(page.locator("#chat-input textarea")).to_have_value("")
    page.wait_for_function(f"() => document.querySelectorAll({json.dumps(THUMBS)}).length == 6",
                           timeout=2 * ANSWER_TIMEOUT_MS)              # three answers, each with its thumbs
    expect(page.locator("#chat-status")).to_contain_text("answered by atlas@v1", timeout=ANSWER_TIMEOUT_MS)
    assert _user_turns(page) == [FACTS[0][0], q2, q3], _user_turns(page)     # all sent, in order

    _correct(page, 1, "Its inventor was Orla Brannock.")                       # a first try...
    first = [r for r in feedback_records(home, "atlas") if r["correction"] == "Its inventor was Orla Brannock."]
    assert len(first) == 1
    _thumb(page, "Dislike", 1).click()                                          # ...undone (the thumb again)
    expect(page.locator("#fb-status")).to_contain_text("undone")
    _correct(page, 1, a2)                                                       # ...and corrected again
    [record] = [r for r in feedback_records(home, "atlas") if r["id"] == first[0]["id"]]
    assert record["correction"] == a2
    assert "Its inventor was Orla Brannock." in [h["correction"] for h in history_of(home, record["id"])]

    _thumb(page, "Like", 2).click()
    expect(page.locator("#fb-target")).to_contain_text("What was good")
    expect(page.locator("#fb-correction")).to_be_hidden()
    page.click("#fb-close")


def phone(page) -> None:
    """Every tab at 390 px: reachable in the tab bar, tables readable, stage bars visible, thumbs >= 40 px."""
    from playwright.sync_api import expect
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(500)
    for name in ("Chat", "Adapters", "Data", "Train", "Monitor"):
        expect(page.get_by_role("tab", name=name)).to_be_visible()           # none behind an overflow menu
    _tab(page, "Chat")
    for box in (b.bounding_box() for b in page.locator("#chatbot button[aria-label$='ike'], "
                                                       "#chatbot button[aria-label$='iked']").all()):
        assert box and box["width"] >= TOUCH_PX and box["height"] >= TOUCH_PX, box
    _tab(page, "Data")
    header = page.locator("#review-queue thead th").nth(2)                   # "rating": one line, not r-a-t-i-n-g
    expect(header).to_be_visible()
    box = header.bounding_box()
    assert box["height"] < 3 * box["width"] and box["height"] < 80, box
    _tab(page, "Train")
    bar = page.locator("#train-stages li[data-name='train'] .stage-bar")
    assert bar.bounding_box()["width"] >= 120, bar.bounding_box()
    for cell in page.locator("#train-summary th").all():                  # the gate's checks: "check", not c-h-e-c-k
        box = cell.bounding_box()
        assert box["height"] < 2 * box["width"] and box["height"] < 60, box
    _tab(page, "Monitor")
    expect(page.locator("#monitor-recommendation")).to_contain_text("answers served")


def run(page, url: str, api, home: Path, tmp: Path, embedded_path: Path, shot: Shot | None = None) -> None:
    """The story; `shot(page, name)` is called at each step worth a picture."""
    from playwright.sync_api import expect
    shot = shot or (lambda page, name: None)
    question, answer, key, _ = FACTS[0]
    seeds, n_seeds = seed_file(tmp / "seeds.jsonl")
    adapter_zip = identity_adapter(tmp / "identity.zip", embedded_path)
    page.goto(url + "/")
    page.wait_for_selector("#chatbot")
    expect(page.locator("#demo-note")).to_contain_text("assistant serve --base-model PATH")

    # Chat: the model picker's "New domain…" opens a small form.
    _pick(page, "model-select", "New domain…")
    expect(page.locator("#chat-new-domain")).to_be_visible()
    page.fill("#chat-domain-name textarea", "atlas")
    page.fill("#chat-domain-prompt textarea", SYSTEM_PROMPT)
    shot(page, "01-new-domain")
    page.click("#chat-create-domain")
    expect(page.locator("#chat-new-domain")).to_be_hidden()
    expect(page.locator("#model-select input")).to_have_value("atlas (active: base weights)")

    # Adapters: import a first version (validated) and make it active: something to roll back to.
    _tab(page, "Adapters")
    expect(page.locator("#adapters-domain input")).to_have_value("atlas")
    page.get_by_text("Import an adapter").click()
    page.set_input_files("#import-file input[type=file]", str(adapter_zip))
    expect(page.locator("#import-file")).to_contain_text(UPLOADED)   # the size shows once uploaded
    page.check("#import-activate input")
    page.click("#import-btn")
    expect(page.locator("#adapters-status")).to_contain_text("imported and validated as atlas@v1")
    expect(page.locator("#adapters-table")).to_contain_text("active")

    # Chat in the domain, greedy and short.
    _tab(page, "Chat")
    _pick(page, "model-select", "atlas (active: v1)")
    page.locator("#chat-settings").get_by_text("Settings", exact=True).click()
    _fill(page, "#temperature input[type=number]", "0")
    _fill(page, "#max-tokens input[type=number]", "40")
    first = _ask(page, question, "atlas@v1")
    assert key not in first                       # the base cannot know an invented fact

    # Thumbs down on the answer opens the panel for it: a reason and what it should have said, sent once.
    page.locator("#chatbot button[aria-label='Dislike']").last.click()
    expect(page.locator("#feedback-panel")).to_be_visible()
    expect(page.locator("#fb-target")).to_contain_text("answer #1")
    _pick(page, "fb-reason", "wrong fact")
    page.fill("#fb-correction textarea", answer)
    shot(page, "02-correct-an-answer")
    page.click("#fb-submit")
    expect(page.locator("#fb-status")).to_contain_text("Saved correction")
    expect(page.locator("#fb-status")).to_contain_text("atlas dataset")
    expect(page.locator("#feedback-panel")).to_be_hidden()
    [record] = feedback_records(home, "atlas")                      # one record: the thumbs down, corrected
    assert (record["rating"], record["correction"], record["reason"]) == ("down", answer, "wrong fact")
    conversation(page, home)

    # Data: seed examples; the correction is in the review queue, replacing the answer.
    _tab(page, "Data")
    expect(page.locator("#data-domain input")).to_have_value("atlas")
    page.set_input_files("#seed-file input[type=file]", str(seeds))
    expect(page.locator("#seed-file")).to_contain_text(UPLOADED)
    page.click("#import-seed-btn")
    expect(page.locator("#data-status")).to_contain_text(f"imported {n_seeds} examples")
    queue = page.locator("#review-queue")
    expect(queue).to_contain_text("correction", timeout=60_000)
    expect(queue).to_contain_text(key)
    expect(page.locator("#curation-report")).to_contain_text("near_duplicate")
    # the corrected answer #2 and the thumbed-up #3 carry the conversation before them, as context
    page.locator("#review-queue .virtual-table-viewport").evaluate("e => { e.scrollTop = e.scrollHeight; }")
    expect(page.locator("#review-queue .virtual-row").filter(has_text="1 earlier turn")).to_have_count(1)
    expect(page.locator("#review-queue .virtual-row").filter(has_text="2 earlier turns")).to_have_count(1)
    page.locator("#review-queue .virtual-table-viewport").evaluate("e => { e.scrollTop = 0; }")
    shot(page, "03-review-the-data")

    # Train: settings in the form, Retrain, the stages advance, the gate's verdict in words.
    _tab(page, "Train")
    expect(page.locator("#train-dataset")).to_contain_text("curated examples")
    for elem_id, value in FAST_FORM.items():
        _fill(page, f"#{elem_id} input", value)
    page.get_by_text("Advanced (JSON").click()
    page.fill("#train-advanced textarea", json.dumps(FAST_ADVANCED))
    _fill(page, "#train-rank input", "0")                         # a bad value: named in place, nothing starts
    page.click("#retrain-btn")
    expect(page.locator("#train-form-error")).to_contain_text("Rank: must be between 1 and")
    expect(page.locator(".toast-body")).to_have_count(0)
    _fill(page, "#train-rank input", FAST_FORM["train-rank"])
    page.click("#retrain-btn")
    expect(page.locator("#train-form-error")).to_have_text("")
    expect(page.locator("#train-status")).to_contain_text(re.compile(r"is (queued|running)"))
    expect(page.locator("#cancel-job-btn")).to_be_enabled()
    stage = '#train-stages li[data-name="{}"][data-status="{}"]'
    page.wait_for_selector(stage.format("train", "running"))
    expect(page.locator(stage.format("curate", "done"))).to_have_count(1)
    # a heartbeat from the first second: the sub-step (loading, tokenizing, first step) before any step
    expect(page.locator("#train-stages")).to_contain_text(re.compile(r"loading the base model|tokenizing|LoRA setup|"
                                                                     r"self-replay|training"))
    page.wait_for_function(   # the train stage's bar moves (a third of the way, for a loss curve worth a look)
        """() => { const li = document.querySelector('#train-stages li[data-name="train"]');
                   return li && (li.dataset.status === 'done' || parseFloat(li.dataset.progress) >= 0.33); }""",
        timeout=TRAIN_TIMEOUT_MS)
    shot(page, "04-retrain-stages")
    bar = page.locator("#train-progress-bar")
    expect(bar).to_have_attribute("data-status", "succeeded", timeout=TRAIN_TIMEOUT_MS)
    assert bar.get_attribute("data-version") == "v2"
    for name in ("curate", "train", "evaluate", "publish"):
        expect(page.locator(stage.format(name, "done"))).to_have_count(1)
    verdict = page.locator("#train-summary")
    expect(verdict).to_contain_text(re.compile(r"Gate (passed|blocked)"))
    expect(page.locator("#train-status")).to_contain_text("finished")        # the state line follows it to its end
    expect(page.locator("#train-status")).not_to_contain_text("Keep chatting")
    expect(page.locator("#cancel-job-btn")).to_be_disabled()
    expect(page.locator("#job-log textarea")).to_have_value(re.compile("published atlas@v2"))
    expect(page.locator("#job-metrics")).to_contain_text("corrections_match")
    if "Gate blocked" in verdict.inner_text():
        page.click("#train-activate-anyway")
        expect(page.locator("#train-version-status")).to_contain_text("atlas@v2 is now active (manual override")
    else:
        expect(page.locator(stage.format("activate", "done"))).to_have_count(1)
    shot(page, "05-gate-verdict")

    # Chat: the new version answers with the correction.
    _tab(page, "Chat")
    _pick(page, "model-select", "atlas@v2  (active)")
    corrected = _ask(page, question, "atlas@v2")
    assert key in corrected, corrected
    shot(page, "06-corrected-answer")

    # Adapters: the versions with their verdicts; roll back to v1.
    _tab(page, "Adapters")
    expect(page.locator("#adapters-table")).to_contain_text("v2")
    expect(page.locator("#adapter-card")).to_contain_text("atlas@v2")
    shot(page, "07-versions")
    page.click("#adapters-rollback")
    expect(page.locator("#adapters-status")).to_contain_text("atlas@v1 is now active (rolled back)")
    assert api.get("/api/domains").json()[0]["active_version"] == "v1"
    r = api.post("/v1/chat/completions", json={"model": "atlas", "temperature": 0, "max_tokens": 40,
                                               "messages": [{"role": "user", "content": question}]}).json()
    assert r["adapter_version"] == "v1" and key not in r["choices"][0]["message"]["content"]

    # Monitor: the headline follows the numbers (one rating: more are needed before a verdict).
    _tab(page, "Monitor")
    expect(page.locator("#monitor-recommendation")).to_contain_text("answers served", timeout=60_000)
    expect(page.locator("#monitor-versions")).to_contain_text("v2")
    expect(page.locator("#monitor-recommendation")).to_contain_text(re.compile(r"latency p50/p90/p99 [\d.]+ / "))
    shot(page, "08-monitor")

    # Train: back to the base weights, a version like any other; then every tab at a phone's width.
    _tab(page, "Train")
    _pick(page, "train-version", "base weights (system prompt only)")
    page.click("#train-activate-btn")
    expect(page.locator("#train-version-status")).to_contain_text("back on the base weights")
    assert api.get("/api/domains").json()[0]["active_version"] is None
    phone(page)
