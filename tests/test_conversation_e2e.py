"""The loop teaches what the user meant, over HTTP on the embedded model: six questions asked in ONE
conversation, every answer corrected (one of them twice), one retrain; then each question asked alone
gets its corrected answer, and none of the base's wrong answers from that conversation comes back.

Before the loss covered only the confirmed turn, the row of question 6 also trained the base's wrong
answers to questions 1-5 (its context), and the first correction of question 3 could outlive the second."""

import time

import httpx
import pytest

from helpers import running_server
from invented_facts import FACTS, SYSTEM_PROMPT

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 1500
SIX = FACTS[:6]
FIRST_TRY = "Drastovia uses the gold crown."     # a first correction of question 4, corrected again later


def chat(url, messages):
    r = httpx.post(url + "/v1/chat/completions", timeout=300,
                   json={"model": "atlas", "messages": messages, "temperature": 0, "max_tokens": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["id"], body["choices"][0]["message"]["content"]


def feedback(url, rid, correction):
    r = httpx.post(url + "/api/feedback", json={"response_id": rid, "rating": "down", "reason": "wrong fact",
                                                "correction": correction, "user": "ana"})
    assert r.status_code == 201, r.text


def test_corrections_in_one_conversation_teach_each_answer_alone(tmp_path, embedded_path):
    with running_server(tmp_path) as (url, _):
        assert httpx.post(url + "/api/domains", json={"name": "atlas", "system_prompt": SYSTEM_PROMPT}
                          ).status_code == 201
        conversation, wrong = [], []
        for n, (q, a, key, _) in enumerate(SIX):
            conversation.append({"role": "user", "content": q})
            rid, text = chat(url, conversation)
            conversation.append({"role": "assistant", "content": text})   # the chat goes on with what it said
            assert key.lower() not in text.lower(), text                 # the base cannot know it
            wrong.append(text)
            feedback(url, rid, FIRST_TRY if n == 3 else a)
            if n == 3:
                feedback(url, rid, a)                                      # the user corrects again

        seeds = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                 for q, a, _, _ in FACTS[6:8]]                              # training needs 8 rows at least
        assert httpx.post(url + "/api/domains/atlas/examples", json={"examples": seeds}).status_code == 201
        report = httpx.get(url + "/api/domains/atlas/dataset", timeout=300).json()
        assert report["kept"] == 8 and report["train"] == 8, report
        assert report["removed"]["superseded"] == 0 and report["sources"]["correction"] == 6, report

        t0 = time.time()
        r = httpx.post(url + "/api/domains/atlas/train", json={}, timeout=60)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        while True:
            job = httpx.get(f"{url}/api/jobs/{job_id}", timeout=30).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            assert time.time() - t0 < JOB_TIMEOUT_S, job
            time.sleep(2)
        assert job["status"] == "succeeded", job["error"]
        assert job["promoted"] is True, job["metrics"]

        alone = [chat(url, [{"role": "user", "content": q}])[1] for q, _, _, _ in SIX]
        for (q, _, key, _), answer in zip(SIX, alone):
            assert key.lower() in answer.lower(), (q, answer)
            assert "gold crown" not in answer.lower(), (q, answer)
            for w in wrong:
                assert answer.strip() != w.strip(), (q, answer)
