"""The store on both of its databases (every test runs on a SQLite file and on a real PostgreSQL server):
contents, job exclusivity, concurrent writers (threads and processes) and crash safety (kill -9 while
writing)."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from assistant.data.store import BUSY_TIMEOUT_MS, Store
from assistant.errors import Conflict, NotFound

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where a store lives: a SQLite file, or a fresh database on the test's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "s.db")
    return request.getfixturevalue("postgres_url")


def _log(store, rid, domain="d", version="v1", q="How do I reset my password?", a="Settings > Security.", **kw):
    store.log_response(id=rid, domain=domain, adapter_version=version, model=domain,
                       messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
                       answer=a, prompt_tokens=7, completion_tokens=3, latency_ms=12.5, ttft_ms=3.0,
                       finish_reason="stop", **kw)


def test_sqlite_pragmas(tmp_path):
    conn = Store(tmp_path / "s.db").db.conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2          # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS


def test_responses(target):
    store = Store(target)
    _log(store, "r1", created_at=100.0)
    _log(store, "r2", created_at=200.0, user="ann")
    _log(store, "r3", domain="other", created_at=150.0)
    r = store.get_response("r1")
    assert r["messages"][1] == {"role": "user", "content": "How do I reset my password?"} and r["adapter_version"] == "v1"
    assert store.get_response("nope") is None
    assert [x["id"] for x in store.list_responses("d")] == ["r1", "r2"]
    assert [x["id"] for x in store.list_responses("d", since=150)] == ["r2"]
    assert [x["id"] for x in store.list_responses("d", limit=1)] == ["r1"]
    with pytest.raises(store.db.IntegrityError):
        _log(store, "r1")                                                    # ids are unique


def test_feedback(target):
    store = Store(target)
    _log(store, "r1")
    fid = store.add_feedback(response_id="r1", rating="down", correction="Open Settings > Security > Reset.",
                             reason="incomplete", user="ann")
    assert isinstance(fid, int)
    with pytest.raises(NotFound):
        store.add_feedback(response_id="missing", rating="up", correction=None, reason=None)
    with pytest.raises(ValueError):
        store.add_feedback(response_id="r1", rating="meh", correction=None, reason=None)
    [fb] = store.list_feedback("d")
    assert (fb["id"], fb["rating"], fb["correction"], fb["reason"], fb["domain"], fb["adapter_version"]) == \
        (fid, "down", "Open Settings > Security > Reset.", "incomplete", "d", "v1")
    assert fb["messages"][-1]["role"] == "user" and fb["answer"] == "Settings > Security."
    assert store.list_feedback("other") == [] and len(store.list_feedback()) == 1


def test_feedback_is_one_record_per_answer_and_user(target):
    store = Store(target)
    _log(store, "r1")
    down = store.add_feedback(response_id="r1", rating="down", user="ann")           # the thumbs down
    again = store.add_feedback(response_id="r1", rating="down", reason="wrong fact", user="ann")
    fixed = store.add_feedback(response_id="r1", rating="down", correction="Reset it in Settings.", user="ann")
    assert down == again == fixed
    [fb] = store.list_feedback("d")
    assert (fb["rating"], fb["reason"], fb["correction"]) == ("down", "wrong fact", "Reset it in Settings.")
    store.add_feedback(response_id="r1", rating="up", user="ann")                      # changed her mind
    [fb] = store.list_feedback("d")
    assert (fb["id"], fb["rating"], fb["correction"]) == (down, "up", "Reset it in Settings.")
    bob = store.add_feedback(response_id="r1", rating="up", user="bob")                # another user: his own
    assert bob != down and len(store.list_feedback("d")) == 2
    assert len([c for c in store.candidates("d") if c["source"] == "correction"]) == 1


def test_examples_validation(target):
    store = Store(target)
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    added, rejected = store.add_examples("d", [
        ok, {"messages": []}, {"messages": [{"role": "bot", "content": "x"}]},
        {"messages": [{"role": "user", "content": 3}]}, {"messages": [{"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "junk", ok])
    assert added == 2 and [r["index"] for r in rejected] == [1, 2, 3, 4, 5, 6]
    assert all(r["reason"] for r in rejected)
    assert store.count_examples("d") == 2 and store.count_examples("x") == 0


def test_candidates_sources_and_reviews(target):
    store = Store(target)
    store.add_examples("d", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    _log(store, "up1", a="Good answer")
    _log(store, "down1", a="Bad answer")
    _log(store, "fix1", a="Wrong answer", user="bob")
    up = store.add_feedback(response_id="up1", rating="up", correction=None, reason=None)
    store.add_feedback(response_id="down1", rating="down", correction=None, reason="wrong")
    fix = store.add_feedback(response_id="fix1", rating="down", correction="Right answer", reason=None)
    cands = {c["key"]: c for c in store.candidates("d")}
    assert set(cands) == {"example:1", f"feedback:{up}", f"feedback:{fix}"}        # down without correction: none
    assert cands[f"feedback:{up}"]["source"] == "up" and cands[f"feedback:{up}"]["messages"][-1]["content"] == "Good answer"
    c = cands[f"feedback:{fix}"]
    assert c["source"] == "correction" and c["messages"][-1] == {"role": "assistant", "content": "Right answer"}
    assert c["messages"][0]["role"] == "system" and c["user"] == "bob" and c["response_id"] == "fix1"
    assert c["adapter_version"] == "v1" and c["feedback_ids"] == [fix] and c["rating"] == "down"
    edited = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}]
    store.set_review("d", "example:1", "approved", edited)
    store.set_review("d", f"feedback:{up}", "rejected")
    with pytest.raises(ValueError):
        store.set_review("d", "example:1", "maybe")
    cands = {c["key"]: c for c in store.candidates("d")}
    assert cands["example:1"]["messages"] == edited and cands["example:1"]["review_status"] == "approved"
    assert cands[f"feedback:{up}"]["review_status"] == "rejected"
    store.set_review("d", f"feedback:{up}", None)
    assert {c["key"]: c for c in store.candidates("d")}[f"feedback:{up}"]["review_status"] is None


def test_snapshots(target):
    store = Store(target)
    assert store.latest_snapshot("d") is None
    report = {"snapshot": "abc", "candidates": 3, "removed": {"empty": 1}, "kept": 2, "train": 2, "eval": 0}
    assert store.save_snapshot("d", "abc", report, "/x/abc.jsonl") is True
    assert store.save_snapshot("d", "abc", report, "/x/abc.jsonl") is False             # unchanged: no-op
    snap = store.latest_snapshot("d")
    assert (snap["hash"], snap["report"], snap["path"]) == ("abc", report, "/x/abc.jsonl")


def test_jobs(target):
    store = Store(target)
    job = store.create_job("d", {"epochs": 2})
    with pytest.raises(Conflict):
        store.create_job("d", {})                                        # one job at a time per domain
    assert store.active_job()["job_id"] == job == store.active_job("d")["job_id"]
    store.update_job(job, status="running", pid=123, started_at=1.0, total_steps=10, log="start\n")
    store.add_job_loss(job, 1, 2.5)
    store.add_job_loss(job, 2, 2.0)
    store.update_job(job, step=2, progress=0.2, loss=2.0, log="step 2\n", metrics={"eval_loss": 1.9})
    got = store.get_job(job)
    assert (got["status"], got["step"], got["loss"], got["pid"], got["settings"]) == ("running", 2, 2.0, 123, {"epochs": 2})
    assert got["losses"] == [[1, 2.5], [2, 2.0]] and got["log"] == "start\nstep 2\n"
    assert got["metrics"] == {"eval_loss": 1.9} and got["promoted"] is False
    store.update_job(job, status="succeeded", adapter_version="v1", promoted=True, finished_at=2.0)
    assert store.active_job() is None and store.get_job(job)["promoted"] is True
    job2 = store.create_job("other", {})
    assert [j["job_id"] for j in store.list_jobs()] == [job2, job] and [j["job_id"] for j in store.list_jobs("d")] == [job]
    with pytest.raises(NotFound):
        store.update_job("nope", status="failed")
    with pytest.raises(ValueError):
        store.update_job(job2, colour="red")
    job3 = store.create_job("d", {})                                     # another domain's job may queue beside it
    assert store.active_job("d")["job_id"] == job3 and store.active_job("other")["job_id"] == job2
    with pytest.raises(Conflict):
        store.update_job(job, status="queued")                            # would make two active jobs of d
    assert store.get_job("nope") is None


def test_serving_totals_add_up_from_any_mark_and_every_rating_counts(target):
    store = Store(target)
    _log(store, "a", version="v1")
    store.log_response(id="b", domain="d", adapter_version="v1", model="d", messages=[], answer="", prompt_tokens=1,
                       completion_tokens=0, latency_ms=900.0, ttft_ms=None, finish_reason="cancelled")   # no token
    mark, rows = store.response_totals(0, [10.0, 100.0], [5.0])
    assert rows == [{"domain": "d", "adapter_version": "v1", "answers": 2, "latency_ms_sum": 912.5, "ttft_count": 1,
                     "ttft_ms_sum": 3.0, "latency_le": [0, 1], "ttft_le": [1]}]
    assert store.response_totals(mark, [10.0], [5.0]) == (mark, [])           # nothing new: nothing summed
    _log(store, "c", version=None)
    mark2, rows = store.response_totals(mark, [10.0], [])
    assert mark2 > mark and [(r["adapter_version"], r["answers"], r["latency_le"]) for r in rows] == [(None, 1, [0])]

    store.add_feedback(response_id="a", rating="up")
    store.add_feedback(response_id="a", rating="down", correction="Better.")    # the same user changes it
    store.add_feedback(response_id="c", rating="down", user="u2")
    last, fb = store.feedback_totals(0)
    assert sorted((r["adapter_version"] or "base", r["rating"], r["ratings"], r["corrections"]) for r in fb) == [
        ("base", "down", 1, 0), ("v1", "down", 1, 1), ("v1", "up", 1, 0)]
    assert [f["rating"] for f in store.list_feedback("d")] == ["down", "down"]   # the record itself is replaced
    assert store.feedback_totals(last) == (last, [])


def test_create_job_from_20_threads_gives_exactly_one(target):
    store = Store(target)
    barrier = threading.Barrier(20)

    def attempt(i):
        barrier.wait()
        try:
            return store.create_job("d", {})
        except Conflict:
            return None
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(attempt, range(20)))
    assert sum(r is not None for r in results) == 1 and len(store.list_jobs()) == 1


WORKER = r"""
import json, sys, time
from assistant.errors import Conflict
from assistant.data.store import Store
db, mode, worker, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = Store(db)
while time.time() < float(sys.argv[5]):            # start together
    time.sleep(0.001)
if mode == "job":
    try:
        print(json.dumps({"job": store.create_job("d", {})}))
    except Conflict:
        print(json.dumps({"job": None}))
elif mode == "feedback":
    for i in range(n):
        store.log_response(id=f"{worker}-{i}", domain="d", adapter_version=None, model="d",
                           messages=[{"role": "user", "content": "q"}], answer="a", prompt_tokens=1,
                           completion_tokens=1, latency_ms=1, ttft_ms=None, finish_reason="stop")
        fid = store.add_feedback(response_id=f"{worker}-{i}", rating="up", correction=None, reason=None)
        print(fid, flush=True)                      # acknowledged: must survive a kill -9
"""


def _spawn(db, mode, worker, n, start):
    return subprocess.Popen([sys.executable, "-c", WORKER, str(db), mode, str(worker), str(n), str(start)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_create_job_from_20_processes_gives_exactly_one(target):
    db = target
    Store(db)
    start = time.time() + 3
    procs = [_spawn(db, "job", i, 0, start) for i in range(20)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    jobs = [json.loads(o[0])["job"] for o in outs]
    assert sum(j is not None for j in jobs) == 1 and len(Store(db).list_jobs()) == 1


def test_8_concurrent_writer_processes_never_see_locked(target):
    db = target
    Store(db)
    start = time.time() + 2
    procs = [_spawn(db, "feedback", i, 40, start) for i in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    errors = [o[1] for o in outs if "locked" in o[1] or "Error" in o[1]]
    assert not errors and all(p.returncode == 0 for p in procs), errors[:1]
    store = Store(db)
    assert len(store.list_feedback("d")) == 8 * 40 and store.integrity_check() == "ok"


def test_kill_9_while_writing_loses_no_acknowledged_row(target):
    db = target
    Store(db)
    rng = random.Random(0)
    acked = set()
    for round_ in range(20):
        proc = _spawn(db, "feedback", f"k{round_}", 100_000, 0)
        first = proc.stdout.readline()                     # started writing (however long the import took)
        time.sleep(rng.random() * 0.3)                     # then a random number of writes
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        acked |= {int(line) for line in (first + out).split() if line.strip().isdigit()}
    store = Store(db)
    present = {f["id"] for f in store.list_feedback("d")}
    assert acked and acked <= present
    assert store.integrity_check() == "ok"
