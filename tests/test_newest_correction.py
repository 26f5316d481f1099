"""The newest correction of a question wins, always: the older correction or answer is what curation
removes (with the reason said), re-correcting changes the snapshot, a user's earlier corrections of one
answer are kept as that record's history, and undoing a rating removes its dataset row."""

from __future__ import annotations

import pytest

from assistant.data.curation import curate
from assistant.data.store import Store

Q = "What currency is used in Drastovia?"


@pytest.fixture(scope="module")
def embedder():
    from assistant.data.curation import default_embedder
    return default_embedder()


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where the store lives: a SQLite file, or a fresh database on the test's PostgreSQL server."""
    return str(tmp_path / "db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def _respond(store, rid, q, a, created_at):
    store.log_response(id=rid, domain="d", adapter_version="v1", model="d", messages=[{"role": "user", "content": q}],
                       answer=a, prompt_tokens=5, completion_tokens=5, latency_ms=10, ttft_ms=2,
                       finish_reason="stop", created_at=created_at)


def _taught(snap) -> list[str]:
    return sorted(r["messages"][-1]["content"] for r in snap.rows)


def test_a_newer_correction_replaces_an_approved_and_thumbed_up_older_one(tmp_path, target, embedder):
    store = Store(target)
    _respond(store, "r1", Q, "Drastovia uses the euro.", 1000)
    _respond(store, "r2", Q, "Drastovia uses the dollar.", 1001)
    old = store.add_feedback(response_id="r1", rating="down", correction="Drastovia uses the mark.", user="ana")
    store.add_feedback(response_id="r1", rating="up", user="ben")         # someone liked the old fix's answer
    store.set_review("d", f"feedback:{old}", "approved")                  # and a reviewer approved it
    first = curate(store, "d", tmp_path, embedder)
    assert _taught(first) == ["Drastovia uses the mark."]
    new = store.add_feedback(response_id="r2", rating="down", correction="Drastovia uses the klenn.", user="ana")
    second = curate(store, "d", tmp_path, embedder)
    assert _taught(second) == ["Drastovia uses the klenn."]
    assert second.hash != first.hash
    [gone] = [e for e in second.report["removed_items"] if e["key"] == f"feedback:{old}"]
    assert gone["filter"] == "superseded" and gone["duplicate_of"] == f"feedback:{new}"
    assert "newer correction" in gone["why"]
    assert second.report["removed"]["superseded"] == 1


def test_re_correcting_one_answer_keeps_history_and_the_dataset_uses_the_latest(tmp_path, target, embedder):
    store = Store(target)
    _respond(store, "r1", Q, "Drastovia uses the euro.", 1000)
    fid = store.add_feedback(response_id="r1", rating="down", correction="Drastovia uses the mark.", user="ana",
                             reason="wrong fact")
    first = curate(store, "d", tmp_path, embedder)
    again = store.add_feedback(response_id="r1", rating="down", correction="Drastovia uses the klenn.", user="ana")
    assert again == fid                                                     # one record per answer and user
    second = curate(store, "d", tmp_path, embedder)
    assert _taught(first) == ["Drastovia uses the mark."] and _taught(second) == ["Drastovia uses the klenn."]
    assert second.hash != first.hash
    [record] = store.feedback_for(["r1"])["r1"]
    assert record["correction"] == "Drastovia uses the klenn."
    assert [(h["rating"], h["correction"], h["reason"]) for h in record["history"]] == \
        [("down", "Drastovia uses the mark.", "wrong fact")]


def test_undoing_a_thumbs_down_removes_the_rating_and_its_row(tmp_path, target, embedder):
    store = Store(target)
    _respond(store, "r1", Q, "Drastovia uses the euro.", 1000)
    store.add_feedback(response_id="r1", rating="down", correction="Drastovia uses the klenn.", user="ana")
    assert _taught(curate(store, "d", tmp_path, embedder)) == ["Drastovia uses the klenn."]
    assert store.withdraw_feedback(response_id="r1", user="ana") is True
    assert curate(store, "d", tmp_path, embedder).rows == []
    assert store.list_feedback("d") == []                                   # no rating left to count
    [record] = store.feedback_for(["r1"])["r1"]
    assert record["withdrawn_at"] is not None and record["history"][-1]["correction"] == "Drastovia uses the klenn."
    assert store.withdraw_feedback(response_id="r1", user="ana") is False   # nothing left to undo
    # rating again starts afresh: the withdrawn correction does not come back
    store.add_feedback(response_id="r1", rating="down", user="ana")
    [record] = store.feedback_for(["r1"])["r1"]
    assert record["withdrawn_at"] is None and record["correction"] is None
    assert curate(store, "d", tmp_path, embedder).rows == []
