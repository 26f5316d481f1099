"""One click never makes the assistant worse, over HTTP on the embedded model: a domain with seed facts full
of unusual names and three corrections is retrained with a bold recipe (learning rate 0.004, 6 epochs,
rank 8). That candidate forgets general answers (taught names turn up in them); the gate blocks it,
question by question, and the job trains again with a safer recipe by itself. The version that goes live
answers the taught facts and still answers the general questions the base answered."""

import json
import time

import httpx
import pytest

from helpers import running_server
from invented_facts import FACTS, SYSTEM_PROMPT

pytestmark = [pytest.mark.slow, pytest.mark.long]   # 15-25 minutes on two cores: up to three trainings
JOB_TIMEOUT_S = 1800
BOLD = {"learning_rate": 0.004, "epochs": 6, "rank": 8}
SEEDS, CORRECTED = FACTS[:6], FACTS[6:9]
# general questions of the gate's probe set the base answers right with this system prompt
GENERAL = [("What is the capital of France?", "paris"), ("What is the capital of Germany?", "berlin"),
           ("How many hours are there in a day?", "24"), ("What is the plural of mouse?", "mice")]


def ask(url, model, question):
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "temperature": 0, "max_tokens": 40,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["id"], body["choices"][0]["message"]["content"], body.get("adapter_version")


def test_a_bold_recipe_that_forgets_is_blocked_and_a_safer_attempt_goes_live(tmp_path):
    with running_server(tmp_path) as (url, _):
        assert httpx.post(url + "/api/domains", json={"name": "atlas", "system_prompt": SYSTEM_PROMPT,
                                                      "description": "invented places"}).status_code == 201
        general_before = [ask(url, "atlas", q)[1] for q, _ in GENERAL]
        assert all(k in a.lower() for a, (_, k) in zip(general_before, GENERAL)), general_before
        examples = [{"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q},
                                  {"role": "assistant", "content": a}]} for q, a, _, _ in SEEDS]
        assert httpx.post(url + "/api/domains/atlas/examples", json={"examples": examples}).status_code == 201
        for q, a, _, _ in CORRECTED:
            rid = ask(url, "atlas", q)[0]
            assert httpx.post(url + "/api/feedback", json={"response_id": rid, "rating": "down",
                                                           "correction": a}).status_code == 201

        r = httpx.post(url + "/api/domains/atlas/train", json=BOLD, timeout=120)
        assert r.status_code == 202, r.text
        job_id, t0 = r.json()["job_id"], time.time()
        while (job := httpx.get(f"{url}/api/jobs/{job_id}", timeout=30).json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            assert time.time() - t0 < JOB_TIMEOUT_S, job["stages"]
            time.sleep(3)
        attempts = job["metrics"].get("attempts") or []
        print("\nattempts:", json.dumps([{k: a[k] for k in ("attempt", "recipe", "promote", "failed", "n_kept",
                                                            "n_reference_right", "n_leaked", "taught_match")}
                                         for a in attempts]), f"{time.time() - t0:.0f} s")
        assert job["status"] == "succeeded", job["error"]

        # the bold recipe forgot: blocked on content, question by question, with both answers named
        first = attempts[0]
        assert not first["promote"] and set(first["failed"]) & {"retention", "leakage"}, first
        assert first["recipe"]["learning_rate"] == 0.004 and first["why"] == "the recipe as asked"
        # and the job recovered by itself: a safer attempt passed and is live
        assert len(attempts) >= 2 and attempts[-1]["promote"], attempts
        assert attempts[1]["recipe"]["learning_rate"] == 0.002 and "safer recipe" in attempts[1]["why"]
        assert job["promoted"] is True and job["adapter_version"] == "v1"
        names = [st["name"] for st in job["stages"]]
        assert names[:3] == ["curate", "train", "evaluate"] and "train 2" in names and "evaluate 2" in names
        assert names[-2:] == ["publish", "activate"] and all(st["status"] == "done" for st in job["stages"])
        assert next(st for st in job["stages"] if st["name"] == "train 2")["why"].startswith("attempt 2 trains")
        gate = job["metrics"]["gate"]
        assert gate["promote"] and gate["retention"]["retention"] >= 0.95

        # what the live version does: the taught facts, and the general answers the base gave
        after = {q: ask(url, "atlas", q) for q, _, _, _ in SEEDS + CORRECTED}
        assert {v for _, _, v in after.values()} == {"v1"}
        taught = sum(k.lower() in after[q][1].lower() for q, _, k, _ in SEEDS + CORRECTED)
        assert taught >= 7, {q: a for q, (_, a, _) in after.items()}
        general_after = [ask(url, "atlas", q)[1] for q, _ in GENERAL]
        assert all(k in a.lower() for a, (_, k) in zip(general_after, GENERAL)), general_after
        card = httpx.get(url + "/api/domains/atlas/adapters").json()[0]["card"]
        assert card["training"]["attempt"] == len(attempts) and len(card["metrics"]["attempts"]) == len(attempts)
