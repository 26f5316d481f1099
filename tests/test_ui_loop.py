"""The Chat tab's handlers keep every question and every change of mind (no browser; a real Workspace and
Serving on the tiny Llama): a question sent while an answer streams is queued, shown, and answered next on
the conversation as it stands; Stop puts queued questions back in the box; a thumbs-up asks what was good,
a thumbs-down what was wrong and the correction; pressing a thumb again undoes the rating and its row."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from helpers import make_serving


@pytest.fixture
def service(tiny_settings):
    s = make_serving(tiny_settings)
    from assistant.ui import adapters
    adapters.create_domain(s.workspace, "atlas", "You are Atlas.", "")
    yield s
    s.close()


def _page(name="page-1"):
    return SimpleNamespace(session_hash=name, headers={})


def _respond(service, message, history=None, meta=None, page=None):
    from assistant.ui import chat
    return chat.respond(service, message, history or [], meta or {}, "atlas", "", 0, 8, page or _page())


def _like(index, liked):
    return gr.LikeData(None, {"index": index, "value": "", "liked": liked})


def test_a_question_sent_while_an_answer_streams_is_queued_shown_and_answered_next(service):
    first = _respond(service, "first question")
    assert next(first)[0] == ""                                   # the box is cleared at once...
    box, history, _, status, _ = next(first)                     # ...the first answer has started
    assert isinstance(box, type(gr.skip())) and "answering" in status   # and later updates leave the box alone
    # the same page sends two more: each is queued and shown, nothing is lost or answered out of turn
    [queued] = list(_respond(service, "second question", history))
    assert queued[0] == "" and "Queued (1)" in queued[3] and "second question" in queued[3]
    assert isinstance(queued[1], type(gr.skip())) and isinstance(queued[2], type(gr.skip()))
    [queued] = list(_respond(service, "third question", history))
    assert "Queued (2)" in queued[3] and "third question" in queued[3]
    # another page is not queued behind this one
    other = list(_respond(service, "someone else", page=_page("page-2")))[-1]
    assert "answered by atlas" in other[3] and [m["content"] for m in other[1]][0] == "someone else"
    *_, last = list(first)
    _, history, meta, status, _ = last
    assert "answered by atlas" in status
    assert [m["content"] for m in history if m["role"] == "user"] == ["first question", "second question",
                                                                       "third question"]
    assert [m["role"] for m in history] == ["user", "assistant"] * 3
    assert sorted(meta) == ["1", "3", "5"]                        # every answer can be rated
    logged = service.workspace.store.list_responses("atlas")
    third = next(r for r in logged if r["messages"][-1]["content"] == "third question")
    assert [m["content"] for m in third["messages"] if m["role"] == "user"] == \
        ["first question", "second question", "third question"]  # answered on the conversation as it stands
    # the page is free again: the next question is answered at once
    assert "answered by atlas" in list(_respond(service, "fourth", history, meta))[-1][3]


def test_stop_puts_queued_questions_back_in_the_box(service):
    from assistant.ui import chat
    first = _respond(service, "first question")
    next(first)
    _, history, *_ = next(first)
    list(_respond(service, "still to ask", history))
    assert chat.stop(_page()) == "still to ask"
    *_, last = list(first)
    assert [m["content"] for m in last[1] if m["role"] == "user"] == ["first question"]
    assert not isinstance(chat.stop(_page()), str)                  # nothing queued: the box is left alone


def test_thumbs_up_asks_what_was_good_and_undo_removes_the_rating_and_its_row(service):
    from assistant.ui import chat
    _, history, meta, _, _ = list(_respond(service, "What is the capital of Atlas?"))[-1]
    index = len(history) - 1
    target, panel, head, reason, _, correction, _ = chat.on_like(service, meta, history, _like(index, True), None)
    assert "What was good" in head and reason["choices"] and "correct" in reason["choices"]
    assert correction["visible"] is False and "wrong fact" not in reason["choices"]
    assert "Saved feedback" in chat.send_feedback(service, target, "clear", "", "", None)[-1]
    target, panel, head, reason, _, correction, _ = chat.on_like(service, meta, history, _like(index, False), None)
    assert "What was wrong" in head and correction["visible"] is True and "wrong fact" in reason["choices"]
    chat.send_feedback(service, target, "wrong fact", "", "Its capital is Corvo.", None)
    store = service.workspace.store
    assert [r["messages"][-1]["content"] for r in service.workspace.preview("atlas").rows] == ["Its capital is Corvo."]
    *_, status = chat.on_like(service, meta, history, _like(index, ""), None)    # the thumb pressed again
    assert "undone" in status
    assert store.list_feedback("atlas") == [] and service.workspace.preview("atlas").rows == []
    [record] = store.feedback_for([meta[str(index)]["response_id"]])[meta[str(index)]["response_id"]]
    # every step kept: up, up with its reason, down, down with its correction (then withdrawn)
    assert [h["rating"] for h in record["history"]] == ["up", "up", "down", "down"]
    assert record["history"][-1]["correction"] == "Its capital is Corvo." and record["withdrawn_at"]


class _Jobs:
    """A store that keeps what a StageTracker writes."""
    def __init__(self):
        self.rows = []

    def update_job(self, job_id, **fields):
        self.rows.append(fields)


def test_a_stage_says_its_sub_step_at_once_and_estimates_from_completed_steps_only(monkeypatch):
    from assistant.data import stages
    clock = [100.0]
    monkeypatch.setattr(stages.time, "monotonic", lambda: clock[0])
    store = _Jobs()
    t = stages.StageTracker(store, "j1")
    try:
        t.start("train")
        t.note("train", "loading the base model")
        assert store.rows[-1]["stages"][1]["detail"] == "loading the base model"    # written at once
        clock[0] += 120                         # two minutes of loading and warm-up: not a step's cost
        t.advance("train", 1, 40)
        clock[0] += 2
        t.advance("train", 2, 40)
        assert t.snapshot()[1]["eta_s"] is None                 # too few steps to say
        clock[0] += 2
        t.advance("train", 3, 40)
        assert t.snapshot()[1]["eta_s"] == pytest.approx(37 * 2.0)   # 2 s a step since the first: 37 left
        clock[0] += 2
        t.advance("train", 4, 40)
        assert t.snapshot()[1]["eta_s"] == pytest.approx(36 * 2.0)   # converges, no swing from the load
        t.finish("train")
        assert t.snapshot()[1]["detail"] == ""
    finally:
        t.close()


def test_the_state_line_follows_the_job_to_its_end_and_cancel_with_it(service):
    from assistant.ui import jobview, train
    job = {"job_id": "j1", "domain": "atlas", "status": "running", "stage": "train", "progress": 0.1,
           "stages": [{"name": "train", "status": "running", "detail": "tokenizing 12 rows"}], "metrics": {}}
    text = jobview.state_text(job, None, "atlas")
    assert "running: train (tokenizing 12 rows)" in text and "Keep chatting" in text
    assert "atlas (base weights)" in text
    out = train._job_outputs(service.workspace, job, "atlas")
    assert out[1]["interactive"] is True                                     # Cancel while it runs
    ended = {**job, "status": "succeeded", "promoted": True, "adapter_version": "v1", "stage": None,
             "stages": [{"name": "train", "status": "done"}]}
    out = train._job_outputs(service.workspace, ended, "atlas")
    assert "finished: atlas@v1 passed the gate" in out[0] and "Keep chatting" not in out[0]
    assert out[1]["interactive"] is False                                    # and not after its end
    assert out[-1]["visible"] is False                                       # nothing to retry
    from assistant.jobs.process import RETRY_HINT
    kept = {**job, "status": "failed", "error": "evaluate failed: generation failed" + RETRY_HINT}
    assert train._job_outputs(service.workspace, kept, "atlas")[-1]["visible"] is True
    for status, words in (("failed", "failed"), ("cancelled", "cancelled")):
        assert words in jobview.state_text({**job, "status": status, "error": "out of memory"}, "v1", "atlas")


def test_a_passed_check_says_what_passing_means():
    from assistant.gate.verdict import MEANING, MEANING_PASSED
    from assistant.ui import jobview
    job = {"job_id": "j1", "domain": "atlas", "status": "succeeded", "promoted": True, "adapter_version": "v1",
           "metrics": {"gate": {"checks": [
               {"name": "corrections", "passed": True, "value": 0.9, "bound": ">= 0.6", "meaning": MEANING["corrections"]},
               {"name": "taught", "passed": False, "value": 0.1, "bound": ">= 0.5", "meaning": MEANING["taught"],
                "advice": "train more"}]}}}
    md = jobview.gate_markdown(job)
    assert MEANING_PASSED["corrections"] in md and MEANING["corrections"] not in md and MEANING["taught"] in md


def test_form_errors_name_the_field_in_place(service):
    from assistant.ui import train
    for epochs, rank, field in ((-3, 8, "Epochs"), (None, 0, "Rank")):
        form_error, job_id, *rest = train.retrain(service.workspace, "lora", "atlas", epochs, 0.001, rank, "lora",
                                                 512, "", "atlas")
        assert form_error.startswith(f"Error: {field}:"), form_error
        assert all(isinstance(x, type(gr.skip())) for x in [job_id, *rest])   # nothing else is touched


def test_monitor_does_not_suggest_a_retrain_already_running_and_reads_in_seconds(service):
    import time

    from assistant.monitoring.report import MonitorSettings
    from assistant.ui import monitor
    store = service.workspace.store
    n = MonitorSettings().min_feedback
    for i in range(n):
        store.log_response(id=f"r{i}", domain="atlas", adapter_version=None, model="atlas",
                           messages=[{"role": "user", "content": f"question {i}"}], answer="wrong", prompt_tokens=3,
                           completion_tokens=3, latency_ms=18684.6, ttft_ms=500.0, finish_reason="stop",
                           created_at=time.time())
        store.add_feedback(response_id=f"r{i}", rating="down")
    head, versions, answers, rates, *_ = monitor.monitor_view(service.workspace, "atlas")
    assert "Retrain suggested" in head and "18.7 / 18.7 / 18.7 s" in head and "ms" not in head
    assert versions[0][5:] == ["18.7", "18.7", "18.7"]
    assert set(rates["series"]) <= {"up", "down", "correction"}           # one version's rates: a short legend
    job_id = store.create_job("atlas")
    head, *_ = monitor.monitor_view(service.workspace, "atlas")
    assert "Retrain suggested" not in head and "Retraining now" in head and job_id in head
    assert service.workspace.metrics("atlas")["recommendation"]["retrain"] is False


def test_the_review_queue_shows_a_rows_context_and_what_it_teaches(service):
    from assistant.ui import chat, data
    _, history, meta, _, _ = list(_respond(service, "What is the capital of Atlas?"))[-1]
    _, history, meta, _, _ = list(_respond(service, "And its river?", history, meta))[-1]
    target, *_ = chat.on_like(service, meta, history, _like(len(history) - 1, False), None)
    chat.send_feedback(service, target, "wrong fact", "", "The Sarrow.", None)
    rows, items, _, _ = data.data_view(service.workspace, "atlas")
    [row] = rows
    assert row[4] == "1 earlier turn" and row[5] == "And its river?" and row[6] == "The Sarrow."
    *_, convo = data.select_item(items, gr.SelectData(None, {"index": [0, 5], "value": ""}))
    lines = [line for line in convo.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in lines] == ["- system · context", "- user · context", "- assistant · context",
                                                      "- user · context", "- assistant · **taught**"]
    assert lines[-1].endswith("The Sarrow.")
