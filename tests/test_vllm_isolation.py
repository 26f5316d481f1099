"""Through `--engine vllm` (a REAL vLLM server the app starts): a degenerate sampler (temperature 1e-40, top_p
1e-30) never turns into an error for the requests beside it, and itself gets an answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
QUESTIONS = ["Name three colors.", "What is two plus two?", "Say hello.", "Name a river.", "Count to five.", "Hi"]


def ask(url, q, **kw):
    body = {"model": "base", "messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=300)


def test_a_degenerate_sampler_beside_others_through_the_proxy(vllm_app):
    url = vllm_app["url"]       # the session's app on vLLM (tests/conftest.py): asked `base` only
    alone = [ask(url, q).json()["choices"][0]["message"]["content"] for q in QUESTIONS]
    with ThreadPoolExecutor(8) as pool:
        odd = [pool.submit(ask, url, QUESTIONS[0], temperature=t, top_p=p, seed=3)
               for t, p in ((1e-40, 1.0), (5e-324, 1e-30), (2.0, 1e-30))]
        got = list(pool.map(lambda q: ask(url, q), QUESTIONS))
    assert [r.status_code for r in got] == [200] * len(QUESTIONS), [r.text for r in got]
    assert [r.json()["choices"][0]["message"]["content"] for r in got] == alone
    for f in odd:
        r = f.result()
        assert r.status_code == 200, r.text
