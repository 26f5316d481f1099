"""Canary rollouts over HTTP on a running server (a tiny Llama, two imported adapter versions): a new version
answers a share of a domain's conversations beside the live one, each conversation stays on its arm, a
pinned `domain@vN` is never re-routed, and its users' ratings decide: raters who dislike the canary's
answers roll it back (the live version never moves), raters who prefer it promote it. A restart keeps a
running rollout, its counts and its assignment."""

from __future__ import annotations

import time

import httpx
import pytest

from helpers import random_lora_adapter, running_server, zipped

pytestmark = pytest.mark.slow

MIN_RATED = 8                       # ratings per arm before the rule may decide (--canary.min-rated)
MARGIN = 4                          # ratings past that within which a clear preference decides
FLAGS = ("--dtype", "float32", "--canary.min-rated", str(MIN_RATED))


def _setup(url: str, tiny_llama, tmp) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=60)
    assert c.post("/api/domains", json={"name": "support", "system_prompt": "You help."}).status_code == 201
    for seed in (1, 2):
        folder = random_lora_adapter(tiny_llama, tmp / f"v{seed}", std=0.05, seed=seed)
        r = c.post("/api/domains/support/adapters", content=zipped(folder), headers={"Content-Type": "application/zip"})
        assert r.status_code == 201, r.text
    assert c.post("/api/domains/support/adapters/v1/activate").status_code == 200
    return c


def ask(c: httpx.Client, question: str, model: str = "support", user: str | None = None, history=()) -> tuple[str, str]:
    """-> (response id, the version that answered)."""
    body = {"model": model, "max_tokens": 1, "temperature": 0,
            "messages": [*history, {"role": "user", "content": question}], **({"user": user} if user else {})}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["id"], r.json()["adapter_version"]


def rate_until_decided(c: httpx.Client, dislike: str) -> dict:
    """Ask new conversations and rate each answer: down when `dislike` gave it, up otherwise, until the
    rollout ends -> the rollout."""
    for i in range(400):
        rid, version = ask(c, f"Question number {i} about invoices?")
        c.post("/api/feedback", json={"response_id": rid, "rating": "down" if version == dislike else "up"})
        rollout = c.get("/api/domains/support/canary").json()
        deadline = time.monotonic() + 5
        while rollout["status"] == "running" and rollout["verdict"]["verdict"] in ("promote", "roll back") \
                and time.monotonic() < deadline:   # decided: the judge acts in the background
            time.sleep(0.05)
            rollout = c.get("/api/domains/support/canary").json()
        if rollout["status"] != "running":
            return rollout
    raise AssertionError(f"no verdict: {rollout}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    home = tmp_path_factory.mktemp("canary")
    with running_server(home, "--base-model", str(tiny_llama), *FLAGS) as (url, _):
        client = _setup(url, tiny_llama, home)
        client.home = home
        yield client


def test_a_canary_serves_its_share_and_each_conversation_stays_on_its_arm(server):
    c = server
    assert c.get("/api/domains/support/canary").json() is None
    bad = c.post("/api/domains/support/adapters/v2/canary", json={"share": 1.5})
    assert bad.status_code == 400 and "canary.share" in bad.text
    assert c.post("/api/domains/support/adapters/v1/canary").status_code == 409        # already live
    r = c.post("/api/domains/support/adapters/v2/canary", json={"share": 0.5})
    assert r.status_code == 200, r.text
    rollout = r.json()
    assert (rollout["status"], rollout["version"], rollout["baseline"], rollout["share"]) == ("running", "v2", "v1", 0.5)
    assert rollout["verdict"]["verdict"] == "wait" and f"{MIN_RATED} rated answers per arm" in rollout["verdict"]["next"]

    first = {q: ask(c, q) for q in (f"How do I pay bill {i}?" for i in range(30))}
    versions = [v for _, v in first.values()]
    assert set(versions) == {"v1", "v2"} and 5 <= versions.count("v2") <= 25, versions
    for q, (_, version) in list(first.items())[:10]:          # later turns of each conversation: same arm
        history = [{"role": "user", "content": q}, {"role": "assistant", "content": "..."}]
        assert ask(c, "And after that?", history=history)[1] == version
    assert len({ask(c, f"Anything {i}", user="ann")[1] for i in range(8)}) == 1   # a named user: one arm
    on_canary = next(q for q, (_, v) in first.items() if v == "v2")
    assert ask(c, on_canary, model="support@v1")[1] == "v1"   # a pinned version is never re-routed
    assert ask(c, "Plain base?", model="base")[1] is None
    assert c.post("/api/domains/support/adapters/v2/canary", json={"share": 0.25}).json()["share"] == 0.25
    assert c.post("/api/domains/support/adapters/v2/canary", json={"share": 0.5}).status_code == 200
    other = c.post("/api/domains/support/adapters/v1/canary")
    assert other.status_code == 409
    metrics = c.get("/metrics").text                                # each arm's answers are its version's
    assert 'assistant_canary_share{baseline="v1",domain="support",version="v2"} 0.5' in metrics
    assert 'assistant_answers_total{domain="support",version="v2"}' in metrics


def test_raters_who_dislike_the_canary_roll_it_back(server):
    c = server
    if c.get("/api/domains/support/canary").json()["status"] != "running":
        assert c.post("/api/domains/support/adapters/v2/canary", json={"share": 0.5}).status_code == 200
    rollout = rate_until_decided(c, dislike="v2")
    assert rollout["status"] == "rolled back", rollout
    assert "worse" in rollout["verdict"]["why"]
    assert MIN_RATED <= rollout["arms"]["canary"]["rated"] <= MIN_RATED + MARGIN
    assert rollout["arms"]["current"]["rated"] <= MIN_RATED + 3 * MARGIN
    domains = {d["name"]: d for d in c.get("/api/domains").json()}
    assert domains["support"]["active_version"] == "v1"                              # the pointer never moved
    assert {ask(c, f"After the rollback {i}?")[1] for i in range(10)} == {"v1"}
    card = next(a["card"] for a in c.get("/api/domains/support/adapters").json() if a["version"] == "v2")
    assert card["canary"]["outcome"] == "roll back" and card["canary"]["against"] == "v1"


def test_raters_who_prefer_the_canary_promote_it(server):
    c = server
    assert c.post("/api/domains/support/adapters/v2/canary", json={"share": 0.5}).status_code == 200
    rollout = rate_until_decided(c, dislike="v1")
    assert rollout["status"] == "promoted" and "better" in rollout["verdict"]["why"], rollout
    deadline = time.monotonic() + 30
    while c.get("/api/domains").json()[0]["active_version"] != "v2" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {d["name"]: d for d in c.get("/api/domains").json()}["support"]["active_version"] == "v2"
    assert {ask(c, f"After the promotion {i}?")[1] for i in range(10)} == {"v2"}
    assert c.delete("/api/domains/support/canary").status_code == 404                # none runs now


def test_the_adapters_tab_shows_the_rollout_and_its_plots(server):
    """The panel's view, through a Workspace opened beside the server (the handler the tab calls)."""
    from assistant.settings import Settings
    from assistant.ui.canary import canary_view
    from assistant.workspace import Workspace
    summary, rates, sure, _ = canary_view(Workspace(Settings(home=server.home)), "support")
    assert "**promoted**" in summary and "| canary | v2 |" in summary and "Verdict: promote" in summary
    assert set(rates["arm"]) == {"canary", "live now"} and rates["bad answers"].between(0, 1).all()
    assert set(sure["line"]) == {"canary worse", "roll back", "promote"} and sure["ratings"].max() >= 2 * MIN_RATED


def test_a_restart_keeps_a_running_rollout(tmp_path, tiny_llama):
    with running_server(tmp_path, "--base-model", str(tiny_llama), *FLAGS) as (url, _):
        c = _setup(url, tiny_llama, tmp_path)
        started = c.post("/api/domains/support/adapters/v2/canary", json={"share": 0.5}).json()
        asked = {q: ask(c, q) for q in (f"Before the restart {i}?" for i in range(12))}
        for rid, _ in asked.values():
            c.post("/api/feedback", json={"response_id": rid, "rating": "up"})
        before = c.get("/api/domains/support/canary").json()
    with running_server(tmp_path, "--base-model", str(tiny_llama), *FLAGS) as (url, _):
        c = httpx.Client(base_url=url, timeout=60)
        after = c.get("/api/domains/support/canary").json()
        assert after["id"] == started["id"] and after["status"] == "running" and after["arms"] == before["arms"]
        assert all(ask(c, q)[1] == v for q, (_, v) in asked.items())               # the same arm as before
        stopped = c.delete("/api/domains/support/canary").json()
        assert stopped["status"] == "stopped" and "stopped it" in stopped["verdict"]["why"]
        assert {ask(c, q)[1] for q in asked} == {"v1"}


# A gate that passes whatever the tiny model learned: this test is about where a passed version goes.
PASSING_GATE = {"min_corrections_match": 0.0, "min_taught_match": 0.0, "max_eval_loss_ratio": 1000.0,
                "max_eval_match_drop": 1.0, "max_general_nll_ratio": 1000.0, "min_general_embedding_similarity": -1.0,
                "min_retention": 0.0, "max_leakage": 1.0, "probes": 4, "probe_max_new_tokens": 4, "max_new_tokens": 4}


def test_a_retrain_set_to_release_as_a_canary_goes_out_beside_the_live_version(tiny_settings, tiny_llama, tmp_path):
    """`release: canary` (a training setting; `--train.release canary` the server's default): the job
    publishes the version the gate passed and sends it out at `--canary.share`; the live version stays."""
    import dataclasses

    from assistant.data.registry import Registry
    from assistant.data.store import Store
    from assistant.jobs import run as jobs

    from invented_facts import FACTS, SYSTEM_PROMPT, chat
    settings = dataclasses.replace(tiny_settings, gate=PASSING_GATE, canary={"share": 0.3})
    store, registry = Store(settings.db_path), Registry(settings.adapters_path)
    registry.create_domain("atlas", SYSTEM_PROMPT, "invented facts")
    store.add_examples("atlas", [{"messages": chat(q, a)} for q, a, _, _ in FACTS])
    live = random_lora_adapter(tiny_llama, tmp_path / "live", std=0.01)
    assert registry.publish("atlas", live, {"imported": True}) == "v1"
    registry.activate("atlas", "v1", load=lambda *_: None)
    fast = {"rank": 4, "alpha": 8, "learning_rate": 0.02, "epochs": 1, "batch_size": 4, "max_seq_len": 128,
            "retries": 0, "augment": 0, "replay": 0, "release": "canary"}
    job_id = jobs.start_job(settings, store, registry, "atlas", fast)
    deadline = time.monotonic() + 300
    while (job := store.get_job(job_id))["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job["status"] == "succeeded" and job["promoted"] is True, (job["error"], job["log"])
    assert "v2 is out as a canary to 30%" in job["log"] and registry.active_version("atlas") == "v1"
    from assistant.data.rollouts import Rollouts
    rollout = Rollouts(store).running("atlas")
    assert (rollout["version"], rollout["baseline"], rollout["share"]) == ("v2", "v1", 0.3)
    with pytest.raises(Exception, match="release must be live or canary"):
        jobs.start_job(settings, store, registry, "atlas", {**fast, "release": "soon"})
