"""Training jobs on the tiny Llama: a child process in its own process group publishes a version; cancel
kills the group; SIGKILL at random points never leaves a half-written version listed nor moves the active
one; a restart fails orphans and cleans staging; concurrent starts give exactly one job; a too-small
dataset is refused with the number needed."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pytest

from assistant.errors import AssistantError, Conflict, DatasetTooSmall
from assistant.jobs.process import STAGING_PREFIX, resumable

from invented_facts import FACTS, SYSTEM_PROMPT, chat

JOB_TIMEOUT = 300
FAST = {"rank": 4, "alpha": 8, "learning_rate": 0.02, "epochs": 2, "batch_size": 4, "max_seq_len": 128}


@pytest.fixture
def world(tiny_settings):
    from assistant.data.registry import Registry
    from assistant.data.store import Store
    store, registry = Store(tiny_settings.db_path), Registry(tiny_settings.adapters_path)
    registry.create_domain("atlas", SYSTEM_PROMPT, "invented facts")
    added, rejected = store.add_examples("atlas", [{"messages": chat(q, a)} for q, a, _, _ in FACTS])
    assert added == len(FACTS) and not rejected
    return tiny_settings, store, registry


def _wait(store, job_id, until=("succeeded", "failed", "cancelled"), timeout=JOB_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get_job(job_id)
        if job["status"] in until:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {store.get_job(job_id)['status']} after {timeout}s")


def _alive(pid) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _listed_versions_are_complete(registry, domain):
    for v in registry.versions(domain):
        folder = registry.version_path(domain, v)
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                           "card.json"], v
        assert json.loads((folder / "card.json").read_text())["dataset_snapshot"]


@pytest.mark.slow   # a job process that loads a model and trains: 20 s here
def test_job_runs_in_a_child_and_publishes(world):
    from assistant.jobs import run as jobs
    settings, store, registry = world
    job_id = jobs.start_job(settings, store, registry, "atlas", FAST)
    job = _wait(store, job_id)
    assert job["status"] == "succeeded", (job["error"], job["log"])
    assert job["pid"] != os.getpid() and job["adapter_version"] == "v1" and job["progress"] == 1.0
    assert job["step"] == job["total_steps"] == len(job["losses"]) > 0
    assert set(job["metrics"]) >= {"train", "before", "after", "gate"}
    assert job["promoted"] == job["metrics"]["gate"]["promote"]
    assert (registry.active_version("atlas") == "v1") == job["promoted"]
    card = registry.read_card("atlas", "v1")
    assert card["dataset_snapshot"] == job["settings"]["snapshot"] == store.latest_snapshot("atlas")["hash"]
    assert card["base_fingerprint"]["config_hash"] and card["training_settings"]["rank"] == 4
    # seeds are not corrections: the table counts what it says
    assert card["metrics"]["after"]["n_corrections"] == 0 and card["metrics"]["after"]["n_taught"] == len(FACTS)
    assert "created_at" in card
    _listed_versions_are_complete(registry, "atlas")
    assert not list((settings.adapters_path / "atlas").glob(".staging-*"))
    # stages, in order, each with its own progress; the gate's verdict written for a person
    from assistant.data.stages import STAGES
    assert [st["name"] for st in job["stages"]] == list(STAGES) and job["stage"] is None
    assert all(st["status"] == "done" for st in job["stages"][:4])
    assert job["stages"][4]["status"] == ("done" if job["promoted"] else "skipped")
    train, evaluate = job["stages"][1], job["stages"][2]
    assert train["done"] == train["total"] == job["total_steps"] and train["progress"] == 1.0
    assert evaluate["total"] > 0 and evaluate["done"] == evaluate["total"] and evaluate["elapsed_s"] > 0
    gate = job["metrics"]["gate"]
    assert isinstance(gate["summary"], str) and gate["reasons"] and gate["checks"]
    for check in gate["checks"]:
        assert set(check) >= {"name", "passed", "value", "bound", "meaning", "advice"}
    # the record's own short form of the verdict, and when each stage ran
    assert job["gate"]["passed"] == job["promoted"] and job["gate"]["summary"] == gate["summary"]
    assert [c["name"] for c in job["gate"]["checks"]] == [c["name"] for c in gate["checks"]]
    assert all(set(c) == {"name", "passed", "value", "bound", "explanation"} for c in job["gate"]["checks"])
    for st in job["stages"][:4]:
        assert st["started_at"] <= st["finished_at"] <= job["finished_at"]
    # log lines are shown to users: no server paths
    for folder in (settings.adapters_path, settings.state_path, settings.home):
        assert str(folder) not in job["log"]


def test_too_small_dataset_says_how_many(tiny_settings):
    from assistant.data.registry import Registry
    from assistant.data.store import Store
    from assistant.jobs import run as jobs
    from assistant.training.recipe import MIN_EXAMPLES
    store, registry = Store(tiny_settings.db_path), Registry(tiny_settings.adapters_path)
    registry.create_domain("tiny", "", "")
    store.add_examples("tiny", [{"messages": chat(q, a)} for q, a, _, _ in FACTS[:3]])
    with pytest.raises(DatasetTooSmall, match=f"at least {MIN_EXAMPLES}") as e:
        jobs.start_job(tiny_settings, store, registry, "tiny", {})
    assert e.value.status == 422 and store.list_jobs() == []
    with pytest.raises(AssistantError, match="unknown training setting"):
        jobs.start_job(tiny_settings, store, registry, "tiny", {"learning_rat": 1})


def test_twenty_concurrent_starts_give_one_job(world):
    from assistant.data.curation import curate
    from assistant.jobs import run as jobs
    settings, store, registry = world
    curate(store, "atlas", settings)  # warm the embedder so the threads race on create_job, not on loading
    results, barrier = [], threading.Barrier(20)

    def attempt():
        barrier.wait()
        try:
            results.append(jobs.start_job(settings, store, registry, "atlas", FAST))
        except Conflict as e:
            results.append(e)

    threads = [threading.Thread(target=attempt) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [r for r in results if isinstance(r, str)]
    assert len(ids) == 1 and sum(isinstance(r, Conflict) for r in results) == 19
    assert [j["job_id"] for j in store.list_jobs()] == ids
    jobs.cancel_job(settings, store, ids[0])


@pytest.mark.slow   # a job process started and killed: 10 s here
def test_cancel_kills_the_process_group(world):
    from assistant.jobs import run as jobs
    settings, store, registry = world
    job_id = jobs.start_job(settings, store, registry, "atlas", {**FAST, "epochs": 50})
    job = _wait(store, job_id, until=("running",))
    deadline = time.monotonic() + JOB_TIMEOUT
    while store.get_job(job_id)["step"] < 1:           # in the training loop, with a staging folder
        assert time.monotonic() < deadline, store.get_job(job_id)
        time.sleep(0.1)
    pid = job["pid"]
    assert os.getpgid(pid) == pid != os.getpgid(0)      # its own process group
    job = jobs.cancel_job(settings, store, job_id)
    assert job["status"] == "cancelled" and not _alive(pid)
    for watcher in [t for t in threading.enumerate() if t.name == f"job-{job_id}"]:   # reaps the process
        watcher.join(JOB_TIMEOUT)                    # (gone already when it reaped it before cancel returned)
        assert not watcher.is_alive()
    assert store.get_job(job_id)["status"] == "cancelled"  # the watcher did not turn it into "failed"
    stages = {st["name"]: st["status"] for st in store.get_job(job_id)["stages"]}
    assert stages == {"curate": "done", "train": "failed", "evaluate": "pending", "publish": "pending",
                      "activate": "pending"} and store.get_job(job_id)["stage"] is None
    assert registry.versions("atlas") == []
    assert not list((settings.adapters_path / "atlas").glob(".staging-*"))
    # the next job may start at once
    jobs.cancel_job(settings, store, jobs.start_job(settings, store, registry, "atlas", FAST))


KILLS = 6   # jobs killed at random points of their run (each one costs a whole job here)


@pytest.mark.slow
def test_sigkill_at_random_points_keeps_the_active_version(world):
    from assistant.jobs import run as jobs
    settings, store, registry = world
    t0 = time.monotonic()
    first = _wait(store, jobs.start_job(settings, store, registry, "atlas", FAST))
    duration = time.monotonic() - t0
    assert first["status"] == "succeeded", first["error"]
    registry.activate("atlas", "v1", load=registry.version_path)   # setting up: the version exists
    rng = random.Random(5)
    for _ in range(KILLS):
        job_id = jobs.start_job(settings, store, registry, "atlas", FAST)
        time.sleep(rng.uniform(0, duration * 1.1))      # data prep, loading, training, eval, save, publish
        job = store.get_job(job_id)
        if job["pid"] and job["status"] == "running":
            os.killpg(job["pid"], signal.SIGKILL)
        job = _wait(store, job_id)
        assert job["status"] in ("failed", "succeeded")
        # what a restarted server does first
        jobs.recover_orphans(settings, store, registry)
        _listed_versions_are_complete(registry, "atlas")
        active = registry.active_version("atlas")
        assert active == "v1" or registry.read_card("atlas", active)["metrics"]["gate"]["promote"]
        # a staging folder stays only for the newest failed job that had finished training ("retry from
        # evaluation"), one per domain
        kept = [p.name for p in (settings.adapters_path / "atlas").glob(".staging-*")]
        failed = [j for j in store.list_jobs("atlas") if j["status"] == "failed"]
        newest_resumable = next((j for j in failed if resumable(j)), None)
        assert kept == ([f"{STAGING_PREFIX}{newest_resumable['job_id']}"] if newest_resumable else [])
    assert store.active_job() is None


def test_restart_fails_orphans_and_cleans_staging(world):
    """A server that died mid-job: its child may still run. The next start kills it, marks the job failed
    and removes its staging folder."""
    from assistant.jobs import run as jobs
    settings, store, registry = world
    job_id = jobs.start_job(settings, store, registry, "atlas", {**FAST, "epochs": 50})
    while store.get_job(job_id)["step"] < 1:
        time.sleep(0.1)
    pid = store.get_job(job_id)["pid"]
    assert list((settings.adapters_path / "atlas").glob(".staging-*"))
    assert jobs.recover_orphans(settings, store, registry) == [job_id]
    job = store.get_job(job_id)
    assert job["status"] == "failed" and job["error"] and not _alive(pid)
    assert not list((settings.adapters_path / "atlas").glob(".staging-*")) and registry.versions("atlas") == []
