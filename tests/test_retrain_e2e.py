"""The loop closes, over HTTP on the embedded model: a domain answers 20 invented facts wrongly (six of them in
one conversation), its users correct every answer (one of them twice), one click and one training job (the
default recipe, the real job process) later the new version is live and the domain answers each asked alone
(and paraphrases) correctly, never with the base's wrong answers, while `base` and another domain answer
exactly as before, chat keeps answering during training, and the job reports its stages and never sits
silent. Questions that do not depend on each other are asked at once: the engine answers each as it would
alone (tests/test_engine_stress.py)."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from assistant.data.stages import HEARTBEAT_S, STAGES

from helpers import LOOP_ONLY_FLAGS, running_server
from invented_facts import FACTS, SYSTEM_PROMPT, score

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 1200
GENERAL = [{"role": "user", "content": "What is the capital of France?"}]


IN_CONVERSATION = 6                                   # questions asked in one conversation before correcting
TYPO = "The capital of Zorbania is Quilltown."       # a first correction, replaced by the right one
CONCURRENT = 8                                       # questions in flight at once


def ask_all(url, model, questions) -> list[tuple]:
    """`ask` for each question, all in flight at once."""
    with ThreadPoolExecutor(min(len(questions), CONCURRENT)) as pool:
        return list(pool.map(lambda q: ask(url, model, q), questions))


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
    with running_server(tmp_path, *LOOP_ONLY_FLAGS) as (url, _):   # the forgetting checks off: see helpers
        assert httpx.post(url + "/api/domains", json={"name": "atlas", "system_prompt": SYSTEM_PROMPT,
                                                      "description": "invented places"}).status_code == 201
        assert httpx.post(url + "/api/domains", json={"name": "cooking", "system_prompt": "You are a chef.",
                                                      "description": "recipes"}).status_code == 201
        general_before = ask(url, "base", GENERAL[0]["content"])[1]
        other_before = ask(url, "cooking", "How do I boil an egg?")[1]

        # the first six questions in one conversation, as a user chats, each wrong answer corrected in
        # place (the answer stays in the conversation, as the chat shows it); the rest asked alone, at once
        system = [{"role": "system", "content": SYSTEM_PROMPT}]
        asked, conversation = [], list(system)
        for q, _, _, _ in FACTS[:IN_CONVERSATION]:
            asked.append(ask(url, "atlas", conversation + [{"role": "user", "content": q}]))
            conversation += [{"role": "user", "content": q}, {"role": "assistant", "content": asked[-1][1]}]
        asked += ask_all(url, "atlas", [system + [{"role": "user", "content": q}]
                                        for q, _, _, _ in FACTS[IN_CONVERSATION:]])
        assert {version for _, _, version in asked} == {None}   # no adapter yet: the base answers with the prompt
        answers = [text for _, text, _ in asked]
        for i, ((rid, _, _), (_, a, _, _)) in enumerate(zip(asked, FACTS)):
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
        # chat asked during training runs beside the polling, so its wait never reads as a silent job
        chat, during, seen, last_change, gaps = ThreadPoolExecutor(1), None, [], None, []
        while True:
            job = httpx.get(f"{url}/api/jobs/{job_id}", timeout=30).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if during is None and job["status"] == "running" and job["step"] >= 1:
                during = chat.submit(ask, url, "base", GENERAL[0]["content"])   # chat keeps answering
            state, now = json.dumps([job["stages"], job["progress"], job["step"], job["log"]]), time.time()
            if job["status"] == "running" and job["stage"] in ("train", "evaluate"):
                if not seen or seen[-1][1] != state:
                    if last_change is not None and seen and seen[-1][0] == job["stage"]:
                        gaps.append((job["stage"], now - last_change))
                    last_change = now
                    seen.append((job["stage"], state))
            assert now - t0 < JOB_TIMEOUT_S, job
            time.sleep(0.5)
        duration = time.time() - t0
        chat.shutdown()
        print("\nretrain job:", json.dumps({"seconds": round(duration, 1), "steps": job["total_steps"],
                                            "stages": [(st["name"], st["elapsed_s"]) for st in job["stages"]],
                                            "metrics": job["metrics"]}, default=str)[:2000])
        assert job["status"] == "succeeded", job["error"]
        assert job["promoted"] is True and job["adapter_version"] == "v1"
        assert during is not None and during.result()[1] == general_before
        assert [st["name"] for st in job["stages"]] == list(STAGES)
        assert all(st["status"] == "done" for st in job["stages"]), job["stages"]
        assert {stage for stage, _ in seen} >= {"train", "evaluate"}
        assert max(g for _, g in gaps) <= 3 * HEARTBEAT_S, gaps          # never silent
        assert "is live" in job["log"] and str(tmp_path) not in job["log"]

        asked_after = ask_all(url, "atlas", [q for q, _, _, _ in FACTS] + [p for _, _, _, p in FACTS])
        after, paraphrased = asked_after[:len(FACTS)], [t for _, t, _ in asked_after[len(FACTS):]]
        assert {v for _, _, v in after} == {"v1"}
        assert score([t for _, t, _ in after]) >= 18, [t for _, t, _ in after]
        # asked alone, the conversation's questions get their corrections, never the base's wrong answers
        alone = [t for _, t, _ in after[:IN_CONVERSATION]]
        assert score(alone) >= IN_CONVERSATION - 1, alone
        assert not set(alone) & set(answers[:IN_CONVERSATION]), (alone, answers[:IN_CONVERSATION])
        assert "Quillton" in after[0][1], after[0][1]   # the newest correction, not the typo
        assert score(paraphrased) >= 14, paraphrased
        assert ask(url, "base", GENERAL[0]["content"])[1] == general_before
        assert ask(url, "cooking", "How do I boil an egg?")[1] == other_before
        adapters = httpx.get(url + "/api/domains/atlas/adapters").json()
        card = adapters[0]["card"]
        assert adapters[0]["active"] and card["dataset_snapshot"] == report["snapshot"]
        assert len(card["feedback_ids"]) == 20 and card["base_fingerprint"]["name"] == "SmolLM2-135M-Instruct"
