"""The loop closes, over HTTP on the embedded model: a domain answers 20 invented facts wrongly (six of them in
one conversation), its users correct every answer (one of them twice), one training job later the domain
answers each asked alone (and paraphrases) correctly, never with the base's wrong answers, while
`base` and another domain answer exactly as before, and chat keeps answering during training."""

import json
import time

import httpx
import pytest

from helpers import running_server
from invented_facts import FACTS, SYSTEM_PROMPT, score

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 1200
# These tests check that corrections and seeds are learned (the taught and corrections checks decide). The
# retention and leakage checks are off here: on the embedded model the default recipe on these 20 facts leaks
# taught names into a few general answers, so the gate blocks it and the job retries (several trainings);
# tests/test_gate_recovers.py (-m long) and tests/test_retention.py cover those checks.
LOOP_ONLY = {"min_retention": 0.0, "max_leakage": 1.0}
LOOP_ONLY_FLAGS = ("--gate.min-retention", "0", "--gate.max-leakage", "1")
GENERAL = [{"role": "user", "content": "What is the capital of France?"}]


IN_CONVERSATION = 6                                   # questions asked in one conversation before correcting
TYPO = "The capital of Zorbania is Quilltown."       # a first correction, replaced by the right one


def ask(url, model, question, system=None):
    """-> (response id, answer, adapter version); `question` is a text or a whole conversation."""
    msgs = question if isinstance(question, list) else (
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}])
    r = httpx.post(url + "/v1/chat/completions", timeout=300,
                   json={"model": model, "messages": msgs, "temperature": 0, "max_tokens": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["id"], body["choices"][0]["message"]["content"], body.get("adapter_version")


def test_corrections_train_a_new_version_that_answers_them(tmp_path, embedded_path):
    with running_server(tmp_path, *LOOP_ONLY_FLAGS) as (url, _):
        assert httpx.post(url + "/api/domains", json={"name": "atlas", "system_prompt": SYSTEM_PROMPT,
                                                      "description": "invented places"}).status_code == 201
        assert httpx.post(url + "/api/domains", json={"name": "cooking", "system_prompt": "You are a chef.",
                                                      "description": "recipes"}).status_code == 201
        general_before = ask(url, "base", GENERAL[0]["content"])[1]
        other_before = ask(url, "cooking", "How do I boil an egg?")[1]

        # the first six questions in one conversation, as a user chats, each wrong answer corrected in
        # place (the answer stays in the conversation, as the chat shows it); the rest asked alone
        answers, conversation = [], [{"role": "system", "content": SYSTEM_PROMPT}]
        for i, (q, a, _, _) in enumerate(FACTS):
            history = conversation if i < IN_CONVERSATION else [{"role": "system", "content": SYSTEM_PROMPT}]
            rid, text, version = ask(url, "atlas", history + [{"role": "user", "content": q}])
            assert version is None   # no adapter yet: the base answers with the domain's prompt
            answers.append(text)
            if i < IN_CONVERSATION:
                conversation += [{"role": "user", "content": q}, {"role": "assistant", "content": text}]
            if i == 0:   # a first correction with a typo, corrected again: the newest correction is taught
                r = httpx.post(url + "/api/feedback", json={"response_id": rid, "rating": "down",
                                                            "reason": "wrong fact", "correction": TYPO})
                assert r.status_code == 201
            r = httpx.post(url + "/api/feedback", json={"response_id": rid, "rating": "down",
                                                        "reason": "wrong fact", "correction": a})
            assert r.status_code == 201
        assert score(answers) <= 2, answers

        report = httpx.get(url + "/api/domains/atlas/dataset", timeout=300).json()
        assert report["kept"] == 20 and report["train"] == 20, report
        export = httpx.get(url + "/api/domains/atlas/dataset/export", timeout=300)
        rows = [json.loads(line) for line in export.text.splitlines() if line.strip()]
        taught = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant" and m.get("weight", 1)]
        assert sorted(taught) == sorted(a for _, a, _, _ in FACTS)   # each row teaches its correction alone
        assert TYPO not in export.text

        t0 = time.time()
        r = httpx.post(url + "/api/domains/atlas/train", json={}, timeout=60)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert httpx.post(url + "/api/domains/atlas/train", json={}, timeout=60).status_code == 409
        during = None
        while True:
            job = httpx.get(f"{url}/api/jobs/{job_id}", timeout=30).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if during is None and job["status"] == "running" and job["step"] >= 1:
                during = ask(url, "base", GENERAL[0]["content"])[1]   # chat keeps answering
            assert time.time() - t0 < JOB_TIMEOUT_S, job
            time.sleep(2)
        duration = time.time() - t0
        print("\nretrain job:", json.dumps({"seconds": round(duration, 1), "steps": job["total_steps"],
                                            "metrics": job["metrics"]}, default=str)[:2000])
        assert job["status"] == "succeeded", job["error"]
        assert job["promoted"] is True and job["adapter_version"] == "v1"
        assert during == general_before

        after = [ask(url, "atlas", q) for q, _, _, _ in FACTS]
        assert {v for _, _, v in after} == {"v1"}
        assert score([t for _, t, _ in after]) >= 18, [t for _, t, _ in after]
        # asked alone, the conversation's questions get their corrections, never the base's wrong answers
        alone = [t for _, t, _ in after[:IN_CONVERSATION]]
        assert score(alone) >= IN_CONVERSATION - 1, alone
        assert not set(alone) & set(answers[:IN_CONVERSATION]), (alone, answers[:IN_CONVERSATION])
        assert "Quillton" in after[0][1], after[0][1]   # the newest correction, not the typo
        paraphrased = [ask(url, "atlas", p)[1] for _, _, _, p in FACTS]
        assert score(paraphrased) >= 14, paraphrased
        assert ask(url, "base", GENERAL[0]["content"])[1] == general_before
        assert ask(url, "cooking", "How do I boil an egg?")[1] == other_before
        adapters = httpx.get(url + "/api/domains/atlas/adapters").json()
        card = adapters[0]["card"]
        assert adapters[0]["active"] and card["dataset_snapshot"] == report["snapshot"]
        assert len(card["feedback_ids"]) == 20 and card["base_fingerprint"]["name"] == "SmolLM2-135M-Instruct"


def test_ten_seeded_facts_one_click_go_live_and_are_answered(home, embedded_path):
    """A new user's first retrain through the real job code path (child process, default recipe): ten
    distinct seeded facts, one click, the gate passes honestly, the new version goes live and answers all
    ten (greedy, through the serving engine). The job reports its stages and never sits silent."""
    from assistant import jobs
    from assistant.engine import Engine
    from assistant.model import load_base
    from assistant.registry import Registry
    from assistant.settings import Settings
    from assistant.stages import HEARTBEAT_S, STAGES
    from assistant.store import Store

    from invented_facts import chat

    settings = Settings(home=home, gate=LOOP_ONLY).ensure_dirs()
    store, registry = Store(settings.db_path), Registry(settings.adapters_path)
    registry.create_domain("atlas", SYSTEM_PROMPT, "invented places")
    store.add_examples("atlas", [{"messages": chat(q, a)} for q, a, _, _ in FACTS[:10]])

    job_id = jobs.start_job(settings, store, registry, "atlas", {})
    seen, last_change, gaps, t0 = [], None, [], time.monotonic()
    while True:
        job = store.get_job(job_id)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        state = json.dumps([job["stages"], job["progress"], job["step"], job["log"]])
        now = time.monotonic()
        if job["status"] == "running" and job["stage"] in ("train", "evaluate"):
            if not seen or seen[-1][1] != state:
                if last_change is not None and seen and seen[-1][0] == job["stage"]:
                    gaps.append((job["stage"], now - last_change))
                last_change = now
                seen.append((job["stage"], state))
        assert now - t0 < JOB_TIMEOUT_S, job
        time.sleep(0.25)
    print("\njob:", json.dumps({"seconds": round(time.monotonic() - t0, 1), "stages": job["stages"],
                                 "gate": job["metrics"].get("gate"),
                                 "eval_vs_train_time": job["metrics"].get("eval_vs_train_time")})[:3000])
    assert job["status"] == "succeeded", (job["error"], job["log"])
    assert job["promoted"] is True, job["metrics"]["gate"]
    assert registry.active_version("atlas") == job["adapter_version"] == "v1"
    assert [st["name"] for st in job["stages"]] == list(STAGES)
    assert all(st["status"] == "done" for st in job["stages"]), job["stages"]
    assert {s for s, _ in seen} >= {"train", "evaluate"}
    assert max(g for _, g in gaps) <= 3 * HEARTBEAT_S, gaps          # never silent
    assert "is live" in job["log"] and str(settings.adapters_path) not in job["log"]

    base = load_base(settings, verbose=False)
    engine = Engine(base)
    try:
        engine.load_adapter("atlas@v1", registry.version_path("atlas", "v1"))
        answers = [engine.generate(chat(q), adapter="atlas@v1", max_new_tokens=40, temperature=0.0)
                   for q, _, _, _ in FACTS[:10]]
    finally:
        engine.close()
    assert sum(key.lower() in a.lower() for a, (_, _, key, _) in zip(answers, FACTS)) == 10, answers
