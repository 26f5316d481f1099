"""What replicas and workers rely on in a shared PostgreSQL database, on a real server: each queued job is
claimed once however many workers race; a dead worker's job is failed (a live one's is not); a worker's
activation request is served by a replica, or falls back when none answers; the Prometheus totals count a
row committed late by a concurrent transaction exactly once; the near-duplicate index of one replica is
rebuilt from what another accepted."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from assistant.cluster import members as cluster
from assistant.data.registry import Registry
from assistant.data.store import Store
from assistant.errors import AssistantError
from assistant.jobs import run as jobs

ROOT = Path(__file__).resolve().parents[1]


def _log(store, rid, domain="d", version=None):
    store.log_response(id=rid, domain=domain, adapter_version=version, model=domain,
                       messages=[{"role": "user", "content": "q"}], answer="a", prompt_tokens=1, completion_tokens=1,
                       latency_ms=5.0, ttft_ms=1.0, finish_reason="stop")


def test_racing_workers_claim_each_job_once(postgres_url):
    store = Store(postgres_url)
    ids = {store.create_job(f"d{i}", {}) for i in range(30)}
    claimed, lock, barrier = [], threading.Lock(), threading.Barrier(8)

    def worker(k):
        barrier.wait()
        while (job_id := store.claim_job(f"host:{k}")) is not None:
            with lock:
                claimed.append(job_id)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)                     # every job once, none twice
    assert {j["worker"] for j in store.list_jobs()} <= {f"host:{k}" for k in range(8)}


HOLDER = r"""
import sys, time
from assistant.cluster.members import WorkerLock
from assistant.data.store import Store
store = Store(sys.argv[1])
lock = WorkerLock(store)
print(store.claim_job(lock.name, sys.argv[2]), flush=True)
time.sleep(600)
"""


def _claimed_job(postgres_url, tmp_path):
    """Settings, store and registry on the shared database, and a job of domain atlas with its staging folder."""
    from assistant.settings import Settings
    settings = Settings(home=tmp_path, database_url=postgres_url).ensure_dirs()
    store, registry = Store(postgres_url), Registry(settings.adapters_path)
    registry.create_domain("atlas", "", "")
    job_id = store.create_job("atlas", {})
    staging = jobs.staging_path(registry.root, {"domain": "atlas", "job_id": job_id})
    staging.mkdir()
    return settings, store, registry, job_id, staging


@contextlib.contextmanager
def running_under_a_worker(postgres_url, store, job_id):
    """A worker process (HOLDER) claims `job_id`, which runs; the worker is killed (-9) on exit."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, postgres_url, job_id], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == job_id
        store.update_job(job_id, status="running")
        yield
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _reap_dead(settings, store, registry) -> list[str]:
    """Reap until the server notices the dead worker's closed session (at most 10 s) -> the failed ids."""
    deadline = time.monotonic() + 10
    while not (failed := jobs.reap(settings, store, registry)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return failed


def test_a_dead_workers_job_is_failed_and_a_live_ones_is_not(postgres_url, tmp_path):
    settings, store, registry, job_id, staging = _claimed_job(postgres_url, tmp_path)
    with running_under_a_worker(postgres_url, store, job_id):
        assert jobs.reap(settings, store, registry) == []            # its worker lives: left alone
        assert store.get_job(job_id)["status"] == "running" and staging.is_dir()
    failed = _reap_dead(settings, store, registry)
    job = store.get_job(job_id)
    assert failed == [job_id] and job["status"] == "failed" and "worker" in job["error"]
    assert not staging.exists()


def test_a_worker_that_died_after_publishing_says_which_version_to_activate(postgres_url, tmp_path):
    """Killed between publishing and activating: the job names the complete version that is not live and how
    to activate it; nothing is removed and the pointer did not move."""
    settings, store, registry, job_id, staging = _claimed_job(postgres_url, tmp_path)
    (staging / "adapter_model.safetensors").write_bytes(b"weights")
    with running_under_a_worker(postgres_url, store, job_id):
        version = registry.publish("atlas", staging, {"job_id": job_id, "metrics": {"gate": {"promote": True}}})
    _reap_dead(settings, store, registry)
    job = store.get_job(job_id)
    assert job["status"] == "failed" and job["adapter_version"] == version == "v1"
    assert "after publishing atlas@v1" in job["error"] and "activate atlas@v1" in job["error"]
    assert registry.versions("atlas") == ["v1"] and registry.active_version("atlas") is None


def test_an_activation_request_is_served_by_a_replica_or_falls_back(postgres_url, monkeypatch):
    store = Store(postgres_url)
    served, lock = [], cluster.WorkerLock(store)

    def replica():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            req = store.claim_activation(lock.name)                  # a live replica: it holds its lock
            if req is not None:
                served.append((req["domain"], req["version"]))
                store.finish_activation(req["id"], "done")
                return
            time.sleep(0.05)
    t = threading.Thread(target=replica)
    t.start()
    assert cluster.request_activation(store, "atlas", "v2", by="worker-1") is True
    t.join()
    assert served == [("atlas", "v2")]
    monkeypatch.setattr(cluster, "CLAIM_WAIT_S", 0.3)                # nobody serves: the worker goes offline
    assert cluster.request_activation(store, "atlas", "v3", by="worker-1") is False
    assert store.claim_activation("replica-late") is None            # and no replica acts on it later
    lock.release()


def _claim_when_asked(store, claimant: str) -> threading.Thread:
    """A replica that claims the next activation request under `claimant` and then never finishes it."""
    def claim():
        deadline = time.monotonic() + 10
        while store.claim_activation(claimant) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    t = threading.Thread(target=claim)
    t.start()
    return t


def test_a_claim_whose_replica_died_does_not_hang_the_worker(postgres_url, monkeypatch):
    """The claim records its claimant; a worker waiting on a claim whose claimant holds no liveness lock (it
    died mid-activation) stops waiting within CLAIMANT_CHECK_S and activates offline. Before claims named
    their claimant, the worker waited forever."""
    store = Store(postgres_url)
    monkeypatch.setattr(cluster, "CLAIMANT_CHECK_S", 0.3)
    t = _claim_when_asked(store, "gone-host:4242")
    t0 = time.monotonic()
    assert cluster.request_activation(store, "atlas", "v4", by="worker-1") is False
    t.join()
    assert time.monotonic() - t0 < 10
    row = store._read("SELECT status, error, claimed_by FROM activations ORDER BY id DESC LIMIT 1")[0]
    assert (row[0], row[2]) == ("failed", "gone-host:4242") and "stopped" in row[1]
    assert store.finish_activation(store._read("SELECT max(id) FROM activations")[0][0], "done",
                                   only_from="claimed") is False   # the dead claimant's late word changes nothing


def test_a_live_claimant_that_never_finishes_is_waited_for_a_bounded_time(postgres_url, monkeypatch):
    store = Store(postgres_url)
    lock = cluster.WorkerLock(store)
    monkeypatch.setattr(cluster, "CLAIMANT_CHECK_S", 0.2)
    monkeypatch.setattr(cluster, "DONE_WAIT_S", 1.5)
    t = _claim_when_asked(store, lock.name)
    with pytest.raises(AssistantError, match="did not finish it within"):
        cluster.request_activation(store, "atlas", "v5", by="worker-1")
    t.join()
    lock.release()
    assert store._read("SELECT status FROM activations ORDER BY id DESC LIMIT 1")[0][0] == "failed"


def test_totals_count_a_row_committed_late_exactly_once(postgres_url):
    import psycopg
    store = Store(postgres_url)
    _log(store, "r0")
    mark, rows = store.response_totals(0, [10.0], [])
    assert sum(r["answers"] for r in rows) == 1
    slow = psycopg.connect(postgres_url)                             # a replica whose insert commits late
    slow.execute("INSERT INTO responses (id, domain, model, messages, answer, created_at) "
                 "VALUES ('late', 'd', 'd', '[]', 'a', 0)")
    _log(store, "r1")                                                # inserted after, committed first
    mark2, rows = store.response_totals(mark, [10.0], [])
    counted = sum(r["answers"] for r in rows)
    slow.commit()
    slow.close()
    mark3, rows = store.response_totals(mark2, [10.0], [])
    counted += sum(r["answers"] for r in rows)
    assert counted == 2                                              # 'late' and 'r1', each once
    assert store.response_totals(mark3, [10.0], [])[1] == []


@pytest.mark.slow   # the real embedding model
def test_a_replicas_index_is_rebuilt_from_what_another_accepted(postgres_url, tmp_path):
    from assistant.settings import Settings
    from assistant.workspace import Workspace
    shared = tmp_path / "adapters"
    ws_a = Workspace(Settings(home=tmp_path / "a", adapters_dir=shared, database_url=postgres_url))
    ws_b = Workspace(Settings(home=tmp_path / "b", adapters_dir=shared, database_url=postgres_url))
    ws_a.create_domain("atlas", "", "")
    ws_a.store.log_response(id="r1", domain="atlas", adapter_version=None, model="atlas",
                            messages=[{"role": "user", "content": "What is the capital of Zorbania?"}],
                            answer="No idea.", prompt_tokens=1, completion_tokens=1, latency_ms=1.0, ttft_ms=None,
                            finish_reason="stop")
    fid = ws_a.feedback("r1", "down", correction="The capital of Zorbania is Quillton.")
    ws_a.close()                                                     # A's background check has run
    item = [{"role": "user", "content": "What is the capital of Zorbania?"},
            {"role": "assistant", "content": "The capital of Zorbania is Quillton."}]
    curator = ws_b.curator()
    assert curator.check_new("atlas", item) == (None, 0.0)           # B's own index knows nothing yet
    ws_b._fresh_index(curator, "atlas")
    key, sim = curator.check_new("atlas", item)
    assert key == f"feedback:{fid}" and sim > 0.99
    ws_b.close()


def test_replicas_start_one_rollout_per_domain_and_exactly_one_ends_it(postgres_url):
    """Canary rollouts on one PostgreSQL: of replicas starting a rollout of one domain at once, one wins and
    the others get a Conflict; of replicas acting on the same verdict at once, exactly one ends it."""
    from concurrent.futures import ThreadPoolExecutor

    from assistant.data.rollouts import Rollouts
    from assistant.errors import Conflict
    rollouts = Rollouts(Store(postgres_url))

    def start(i):
        try:
            return rollouts.start("canaried", "v2", "v1", 0.2, by=f"replica-{i}")["id"]
        except Conflict:
            return None
    with ThreadPoolExecutor(8) as pool:
        started = [r for r in pool.map(start, range(8)) if r is not None]
    assert len(started) == 1 and rollouts.running("canaried")["id"] == started[0]
    with ThreadPoolExecutor(8) as pool:
        ended = list(pool.map(lambda _: rollouts.end(started[0], "promoted", {"verdict": "promote"}), range(8)))
    assert ended.count(True) == 1 and rollouts.running("canaried") is None
    assert rollouts.latest("canaried")["status"] == "promoted"
