"""Past one app process, against a real PostgreSQL server: two `assistant serve` replicas and one
`assistant worker` on one database and one shared adapters folder, each replica with its own state folder.

- an answer served by replica A takes feedback through replica B; a sign-in cookie from A works on B;
  B's /metrics counts what A served (the database's totals);
- a retrain started on A is claimed and run by the worker (its progress read through B), and the version it
  publishes goes live on A and on B through the serving side; an activation on A and going back on B are
  live on the other replica within replicas.PROPAGATION_BOUND_S;
- kill -9 of the worker mid-job: a replica marks the job failed with the reason; nothing is published, no
  staging folder is left;
- kill -9 of replica A in the middle of a streamed answer: B keeps answering, and takes feedback on what A
  served before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from assistant.replicas import PROPAGATION_BOUND_S

from helpers import random_lora_adapter, running_server, zipped
from invented_facts import FACTS, SYSTEM_PROMPT, chat

pytestmark = pytest.mark.slow   # two servers, a worker and a training job: minutes here
AUTH = ("ann", "pw-ann")
FAST = {"rank": 4, "alpha": 8, "learning_rate": 0.02, "epochs": 2, "batch_size": 4, "max_seq_len": 128}
LENIENT_GATE = """[gate]
min_corrections_match = 0.0
min_taught_match = 0.0
max_eval_loss_ratio = 1000.0
max_eval_match_drop = 1.0
max_general_nll_ratio = 1000.0
min_general_embedding_similarity = -1.0
"""
JOB_TIMEOUT_S = 900
REAP_BOUND_S = 30.0           # workers.REAP_EVERY_S + a poll, with a loaded machine's slack


def _wait(fn, timeout, what, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s")


def _chat(url, model="atlas", question="What is the capital of Zorbania?", **kw):
    r = httpx.post(url + "/v1/chat/completions", auth=AUTH, timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 8, **kw})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_llama, postgres_server):
    root = tmp_path_factory.mktemp("cluster")
    url = postgres_server.new_database()
    shared = root / "shared-adapters"
    config = root / "gate.toml"
    config.write_text(LENIENT_GATE)
    common = ["--database-url", url, "--adapters-dir", str(shared), "--base-model", str(tiny_llama),
              "--dtype", "float32"]
    env = {"ASSISTANT_SESSION_SECRET": "one-secret-for-every-replica"}
    serve = [*common, "--auth", f"{AUTH[0]}:{AUTH[1]}", "--embedded-worker", "false"]
    for name in ("a", "b", "w"):
        (root / name).mkdir()
    with running_server(root / "a", *serve, env=env, timeout=300) as (a, proc_a), \
            running_server(root / "b", *serve, env=env, timeout=300) as (b, proc_b):
        log = open(root / "w" / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "assistant.cli", "worker", *common, "--config", str(config)],
                                  cwd=root / "w", stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "ASSISTANT_HOME": str(root / "w"), "PYTHONUNBUFFERED": "1"})
        try:
            yield {"a": a, "b": b, "proc_a": proc_a, "worker": worker, "shared": shared, "root": root,
                   "tiny": tiny_llama}
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
            log.close()
    postgres_server.drop_database(url)


def _propagation(url, version, timeout=30.0) -> tuple[float, float]:
    """Seconds from now (an activation just returned on another replica) until a request to `url` is answered
    by `version`: to the start of that request (propagation: its own answer time is not) and to its answer."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        started = time.monotonic()
        if _chat(url)["adapter_version"] == version:
            return started - t0, time.monotonic() - t0
    raise AssertionError(f"{url} did not serve {version} within {timeout}s")


def _job(url, job_id):
    r = httpx.get(f"{url}/api/jobs/{job_id}", auth=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_feedback_cookies_metrics_retrain_and_activation_across_replicas(cluster):
    a, b, shared = cluster["a"], cluster["b"], cluster["shared"]
    r = httpx.post(a + "/api/domains", auth=AUTH, json={"name": "atlas", "system_prompt": SYSTEM_PROMPT}, timeout=30)
    assert r.status_code == 201, r.text
    assert "atlas" in [m["id"] for m in httpx.get(b + "/v1/models", auth=AUTH, timeout=30).json()["data"]]

    answer = _chat(a, "base")                                            # served and logged by A...
    r = httpx.post(b + "/api/feedback", auth=AUTH, timeout=30,          # ...rated through B
                   json={"response_id": answer["id"], "rating": "down", "correction": "Quillton."})
    assert r.status_code == 201, r.text

    login = httpx.post(a + "/login", data={"username": AUTH[0], "password": AUTH[1]}, timeout=30)
    cookie = login.cookies.get("assistant_session")
    assert login.status_code == 200 and cookie                         # an API client (no form `next`)
    r = httpx.get(b + "/api/domains", cookies={"assistant_session": cookie}, timeout=30)
    assert r.status_code == 200, "a sign-in on A works on B"

    metrics = httpx.get(b + "/metrics", auth=AUTH, timeout=30).text
    assert 'assistant_answers_total{domain="base",version="base"} 1.0' in metrics, metrics[:3000]
    assert 'assistant_feedback_total{domain="base",rating="down",version="base"} 1.0' in metrics

    # a retrain started on A, run by the worker, followed through B, live on A and B
    r = httpx.post(a + "/api/domains/atlas/examples", auth=AUTH, timeout=60,
                   json={"examples": [{"messages": chat(q, ans)} for q, ans, _, _ in FACTS]})
    assert r.status_code == 201, r.text
    r = httpx.post(a + "/api/domains/atlas/train", auth=AUTH, json=FAST, timeout=300)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = _wait(lambda: (j := _job(b, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                JOB_TIMEOUT_S, "the worker finishes the job", every=1.0)
    assert job["status"] == "succeeded", (job["error"], job["log"])
    assert job["worker"] and job["pid"] == cluster["worker"].pid          # the worker ran it, not a replica
    assert job["promoted"] and "activated by the server" in job["log"], job["log"]
    for url in (a, b):
        assert _chat(url)["adapter_version"] == "v1"
    assert (shared / "atlas" / "active").read_text().strip() == "v1"

    # an activation on A is live on B within the bound; going back to v1 on B is live on A within it
    adapter = random_lora_adapter(cluster["tiny"], cluster["root"] / "imported", rank=4, std=0.05)
    r = httpx.post(a + "/api/domains/atlas/adapters", auth=AUTH, content=zipped(adapter), timeout=120,
                   headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    r = httpx.post(f"{a}/api/domains/atlas/adapters/{version}/activate", auth=AUTH, json={"override": True},
                   timeout=120)
    assert r.status_code == 200, r.text
    took_ab = _propagation(b, version)
    r = httpx.post(f"{b}/api/domains/atlas/adapters/v1/activate", auth=AUTH, json={}, timeout=120)
    assert r.status_code == 200, r.text
    took_ba = _propagation(a, "v1")
    print(json.dumps({"activation_propagation_s": {"a_to_b": round(took_ab[0], 3), "b_to_a": round(took_ba[0], 3)},
                      "until_answered_s": {"a_to_b": round(took_ab[1], 3), "b_to_a": round(took_ba[1], 3)}}))
    assert took_ab[0] <= PROPAGATION_BOUND_S and took_ba[0] <= PROPAGATION_BOUND_S


def test_a_worker_killed_mid_job_leaves_it_failed_and_nothing_published(cluster):
    a, b, shared, worker = cluster["a"], cluster["b"], cluster["shared"], cluster["worker"]
    before = sorted(p.name for p in (shared / "atlas").iterdir() if p.name.startswith("v"))
    r = httpx.post(b + "/api/domains/atlas/train", auth=AUTH, json={**FAST, "epochs": 50}, timeout=300)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    _wait(lambda: _job(a, job_id)["step"] >= 1, JOB_TIMEOUT_S, "the worker trains", every=0.5)
    assert list((shared / "atlas").glob(".staging-*"))
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    job = _wait(lambda: (j := _job(a, job_id))["status"] == "failed" and j, REAP_BOUND_S, "the job is marked failed")
    assert "worker" in job["error"] and "start training again" in job["error"], job["error"]
    assert sorted(p.name for p in (shared / "atlas").iterdir() if p.name.startswith("v")) == before
    assert not list((shared / "atlas").glob(".staging-*"))
    r = httpx.post(a + "/api/domains/atlas/train", auth=AUTH, json=FAST, timeout=300)
    assert r.status_code == 202, "the domain is free for the next job"
    assert httpx.delete(f"{a}/api/jobs/{r.json()['job_id']}", auth=AUTH, timeout=60).status_code == 200


def test_replica_killed_mid_stream_while_the_other_keeps_answering(cluster):
    a, b, proc_a = cluster["a"], cluster["b"], cluster["proc_a"]
    earlier = _chat(a, "base", "Name a colour.")
    body = {"model": "base", "messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    chunks = 0
    with httpx.stream("POST", a + "/v1/chat/completions", auth=AUTH, json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks == 5:
                os.killpg(proc_a.pid, signal.SIGKILL)       # A dies in the middle of this answer
                break
    proc_a.wait(30)
    for i in range(3):
        assert _chat(b, "base", f"Question {i}?")["choices"][0]["message"]["content"] is not None
    r = httpx.post(b + "/api/feedback", auth=AUTH, json={"response_id": earlier["id"], "rating": "up"}, timeout=30)
    assert r.status_code == 201, r.text
    with pytest.raises(httpx.HTTPError):
        httpx.get(a + "/api/health", timeout=2)
