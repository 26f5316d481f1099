"""The UI's handlers against a real Workspace and Serving on the tiny Llama (no browser): one feedback record per answer
from the panel, answers numbered as seen, over-long input refused before generation, errors that name the
field and never show exception text or server paths, job stages and gate verdicts rendered from old and
new job records, and Activate anyway recorded in the card."""

from __future__ import annotations

import gradio as gr
import pytest

from assistant.errors import AssistantError
from assistant.settings import BASE

from helpers import make_serving, train_fact_adapter


@pytest.fixture
def service(tiny_settings):
    """The Serving; its Workspace is `service.workspace`."""
    s = make_serving(tiny_settings)
    yield s
    s.close()


def _chat(service, message, history=None, meta=None, model="atlas"):
    from assistant.ui import chat
    return list(chat.respond(service, message, history or [], meta or {}, model, "", 0, 8, None))[-1]


def _like(index, liked):
    return gr.LikeData(None, {"index": index, "value": "", "liked": liked})


def test_the_ui_builds_and_answers_are_numbered_as_seen(service):
    from assistant.ui import adapters, build_ui, chat
    assert isinstance(build_ui(service.workspace, service), gr.Blocks)
    adapters.create_domain(service.workspace, "atlas", "You are Atlas.", "")
    _, history, meta, status, _ = _chat(service, "first question")
    assert "answered by atlas" in status and history[-1]["role"] == "assistant"
    _, history, meta, _, _ = _chat(service, "second question", history, meta)
    second = len(history) - 1
    assert chat.answer_number(history, second) == 2        # the second answer is #2, not #3
    target, panel, head, *_ = chat.on_like(service, meta, history, _like(second, False), None)
    assert "answer #2" in head and panel["visible"] is True and target["rating"] == "down"


def test_thumbs_down_then_a_correction_is_one_feedback_record(service):
    from assistant.ui import adapters, chat
    adapters.create_domain(service.workspace, "atlas", "", "")
    _, history, meta, _, _ = _chat(service, "What is the capital of Atlas?")
    index = len(history) - 1
    target, *_ = chat.on_like(service, meta, history, _like(index, False), None)
    out = chat.send_feedback(service, target, "wrong fact", "made up", "Its capital is Corvo.", None)
    new_target, panel, head, reason, reason_text, correction, status = out
    assert new_target is None and panel["visible"] is False                    # the panel closes...
    assert (reason, reason_text, correction) == (None, "", "")                 # ...cleared
    assert "Saved correction" in status and "atlas dataset" in status
    [fb] = service.workspace.store.list_feedback("atlas")
    assert (fb["rating"], fb["correction"], fb["reason"]) == ("down", "Its capital is Corvo.", "wrong fact; made up")


def test_feedback_on_base_answers_says_it_is_kept_for_review(service):
    from assistant.ui import chat
    _, history, meta, _, _ = _chat(service, "hello", model=BASE)
    target, *_ = chat.on_like(service, meta, history, _like(len(history) - 1, False), None)
    status = chat.send_feedback(service, target, None, "", "Hello! How can I help?", None)[-1]
    assert "kept for review" in status and "Data tab" not in status


def test_an_over_long_message_is_refused_before_generation(service):
    from assistant.ui import chat
    text = "word " * 4000
    box, history, _, status, _ = _chat(service, text, model=BASE)
    assert box == text.strip() and history == []            # kept in the box, nothing sent
    assert status.startswith("Error: Message:") and "tokens" in status
    assert service.workspace.store.list_responses(BASE) == []         # never reached the engine
    assert "too long" in chat.token_count(service, text, [], BASE, "")
    assert chat.token_count(service, "hi", [], BASE, "").endswith(f"/ {chat.prompt_limit(service):,} tokens")


def test_the_untouched_train_form_trains_with_automatic_epochs(service):
    """The browser shows an empty Number field as 0: 0 means what empty means (auto), not an error."""
    from assistant.ui import train
    assert train.train_settings("lora", 0, 0.001, 16, "lora", 512, "").epochs is None
    assert train.train_settings("lora", None, 0.001, 16, "lora", 512, "").epochs is None
    assert train.train_settings("lora", 3, 0.001, 16.0, "lora", 512, "").epochs == 3


def test_errors_name_the_field_and_never_show_exceptions_or_paths(service):
    from assistant.ui import train
    from assistant.ui.common import UNEXPECTED, bind
    for args, field in (((-1, 0.001, 16, "lora", 512, ""), "Epochs"),
                        ((1.5, 0.001, 16, "lora", 512, ""), "Epochs"), ((None, 2, 16, "lora", 512, ""), "Learning rate"),
                        ((None, 0.001, 0, "lora", 512, ""), "Rank"), ((None, 0.001, 8, "lora", 8, ""), "Max length"),
                        ((None, 0.001, 8, "sgd", 512, ""), "Method"), ((None, 0.001, 8, "lora", 512, "[1]"), "Advanced")):
        with pytest.raises(AssistantError, match=f"^{field}"):
            train.train_settings("lora", *args)

    def broken():
        raise RuntimeError("boom in /srv/secret/state/assistant.db")
    with pytest.raises(gr.Error) as e:
        bind(broken)()
    assert e.value.message == UNEXPECTED

    def domain_error():
        raise AssistantError("could not read /srv/secret/adapters/atlas/v1/card.json")
    with pytest.raises(gr.Error) as e:
        bind(domain_error)()
    assert "/srv" not in e.value.message and "(server path)" in e.value.message


def test_old_and_new_job_records_render_stages_and_the_gate(service):
    from assistant.ui import jobview
    old = {"job_id": "j1", "domain": "atlas", "status": "running", "progress": 0.4, "step": 5, "total_steps": 10,
           "log": "started\nstaging /srv/state/adapters/atlas/.staging-1\nloaded tiny\n", "metrics": {}}
    stages = {s["name"]: s for s in jobview.stages_of(old)}
    assert [s["status"] for s in stages.values()] == ["done", "running", "pending", "pending", "pending"]
    assert (stages["train"]["done"], stages["train"]["total"]) == (5, 10)
    assert 'data-stage="train"' in jobview.stages_html(old)
    assert "/srv" not in jobview.public_log(old) and "staging" not in jobview.public_log(old)
    done = {**old, "status": "succeeded", "progress": 1.0, "adapter_version": "v2", "promoted": False,
            "log": old["log"] + "trained: {}\nevaluated: blocked: corrections match 0.10\n",
            "metrics": {"gate": {"promote": False, "reasons": ["blocked: corrections match 0.10, needs >= 0.50"]}}}
    assert [s["status"] for s in jobview.stages_of(done)] == ["done", "done", "done", "done", "skipped"]
    verdict = jobview.gate_markdown(done)
    assert "Gate blocked atlas@v2" in verdict and "corrections match 0.10" in verdict
    new = {**done, "stage": "activate", "metrics": {"gate": {
        "promote": False, "summary": "The new version did not learn the corrections.",
        "checks": [{"name": "corrections", "passed": False, "value": 0.1, "bound": 0.5,
                    "meaning": "share of corrections answered", "advice": "train more epochs"}]}},
        "stages": [{"name": n, "status": "done", "done": 1, "total": 1, "progress": 1.0, "elapsed_s": 3,
                    "eta_s": None} for n in jobview.STAGES]}
    assert jobview.stages_html(new).count('data-status="done"') == 5
    verdict = jobview.gate_markdown(new)
    assert "did not learn the corrections" in verdict and "failed: train more epochs" in verdict
    failed = {**old, "status": "failed", "error": "RuntimeError: CUDA out of memory at /srv/x/y"}
    assert "RuntimeError" not in jobview.gate_markdown(failed) and "/srv" not in jobview.public_log(failed)


def test_activate_anyway_is_recorded_and_rollback_goes_back(service, tiny_llama, tmp_path):
    from assistant.ui import adapters
    adapters.create_domain(service.workspace, "atlas", "", "")
    for i in (1, 2):
        folder = train_fact_adapter(tiny_llama, tmp_path / f"a{i}", [("q", "a")], steps=1, rank=4)
        service.import_adapter("atlas", folder)
    msg, _ = adapters.activate_anyway(service, "atlas", "v2", "atlas", None)
    assert "manual override" in msg and service.active_version("atlas") == "v2"
    card = service.workspace.registry.read_card("atlas", "v2")
    assert card["manual_override"]["by"] == "anonymous" and card["manual_override"]["at"] > 0
    rows, _, card_md, raw, head, _ = adapters.adapters_view(service.workspace, "atlas", "v2")
    assert [r[0] for r in rows] == ["v1", "v2"] and "activated anyway by anonymous" in rows[1][4]
    assert "### atlas@v2" in card_md and raw != {}
    msg, _ = adapters.rollback(service, "atlas", "atlas", None)
    assert "atlas@v1 is now active" in msg and service.active_version("atlas") == "v1"
    # from the oldest version, back to the base weights (the system prompt alone), and no further
    msg, _ = adapters.rollback(service, "atlas", "atlas", None)
    assert "atlas (base weights) is now active" in msg and service.active_version("atlas") is None
    assert service.chat("atlas", [{"role": "user", "content": "hi"}], max_tokens=2)["adapter_version"] is None
    assert adapters.rollback(service, "atlas", "atlas", None)[0].startswith("Error: atlas has no version older")
    msg, _ = adapters.activate(service, "atlas", "v2", "atlas", None)
    assert service.active_version("atlas") == "v2"
    # the version picker offers the base weights beside the versions, with a card that says what it means
    _, picker, *_ = adapters.adapters_view(service.workspace, "atlas")
    assert picker["choices"][-1] == ("base weights (system prompt only)", "base") and picker["value"] == "v2"
    assert "No adapter" in adapters.show_card(service.workspace, "atlas", "base")[0]
    msg, _ = adapters.activate(service, "atlas", "base", "atlas", None)
    assert "base weights" in msg and service.active_version("atlas") is None
    _, picker, card_md, *_ = adapters.adapters_view(service.workspace, "atlas")
    assert picker["value"] == "base" and "on the base weights" in card_md



def test_seed_files_review_edits_and_export_go_through_the_library(service, tmp_path):
    from assistant.data.seeds import parse_jsonl
    from assistant.ui import adapters, data
    rows, problems = parse_jsonl('{"messages": []}\n\nnot json\n')
    assert len(rows) == 1 and problems == ['line 3: not JSON (each line must be one {"messages": [...]} object)']
    adapters.create_domain(service.workspace, "atlas", "", "")
    good = '{"messages": [{"role": "user", "content": "Who made the glimmerphone?"}, ' \
           '{"role": "assistant", "content": "Orla Brannick made it."}]}'
    res = service.workspace.import_seed_jsonl("atlas", good + "\nnot json\n" + '{"messages": [{"role": "user", "content": "x"}]}')
    assert res["added"] == 1 and len(res["problems"]) == 2
    assert res["message"].startswith("imported 1 examples; rejected 2: line 2: not JSON")
    key = service.workspace.store.candidates("atlas")[0]["key"]
    assert data.review(service.workspace, "edit", "atlas", key, "Who made the glimmerphone?", "") \
        .startswith("Error: answer is empty")
    assert data.review(service.workspace, "edit", "atlas", key, "Who invented the glimmerphone?", "Orla Brannick.") \
        == f"{key}: approved with your edit"
    [item] = service.workspace.store.candidates("atlas")
    assert item["review_status"] == "approved" and item["messages"][-1]["content"] == "Orla Brannick."
    assert data.review(service.workspace, "approved", "atlas", None, "", "").startswith("Error: Review queue")
    path = service.workspace.export_dataset("atlas", tmp_path)
    assert path.parent == tmp_path and path.name.startswith("atlas-") and "Orla Brannick." in path.read_text()
