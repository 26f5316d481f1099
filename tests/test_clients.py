"""Other people's clients against a live `assistant serve` (the 2-layer Llama): the official `openai` client
and LangChain's ChatOpenAI, invoke, stream and batch, after one long answer (which grew the KV cache), with a
degenerate sampler among the requests. Every request is answered, and each greedy answer equals its solo run."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from helpers import running_server

pytestmark = pytest.mark.slow

QUESTIONS = ["Hi", "What is two plus two?", "Tell me a long story about a dragon who learns to paint, please.",
             "Why is the sky blue?", "List three fruits", "Who are you?", "Explain gravity to a child in detail.", "Ok"]
LENGTHS = [1, 40, 7, 90, 3, 25, 60, 12]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    home = tmp_path_factory.mktemp("clients-home")
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client, q, n, **kw):
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": q}], max_tokens=n,
                                       temperature=0, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


def long_answer(client):
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Talk"}], max_tokens=300,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 300


def test_openai_client_batch_after_a_long_answer_with_a_degenerate_sampler(client):
    alone = [ask(client, q, n) for q, n in zip(QUESTIONS, LENGTHS)]
    long_answer(client)
    with ThreadPoolExecutor(10) as pool:
        odd = pool.submit(client.chat.completions.create, model="base", max_tokens=20, temperature=1e-40, top_p=1e-30,
                          messages=[{"role": "user", "content": QUESTIONS[1]}])
        got = list(pool.map(lambda qn: ask(client, *qn), zip(QUESTIONS, LENGTHS)))
        odd = odd.result()
    assert got == alone
    assert odd.choices[0].message.content == ask(client, QUESTIONS[1], 20)[0]   # below the floors: greedy
    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": QUESTIONS[3]}],
                                            max_tokens=LENGTHS[3], temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == alone[3][0]


def test_langchain_invoke_stream_and_batch_after_a_long_answer(server, client):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(base_url=server + "/v1", api_key="unused", model="base", temperature=0, max_retries=0,
                     timeout=300)
    alone = [ask(client, q, n)[0] for q, n in zip(QUESTIONS, LENGTHS)]
    long_answer(client)
    assert llm.bind(max_tokens=LENGTHS[1]).invoke(QUESTIONS[1]).content == alone[1]
    assert "".join(c.content for c in llm.bind(max_tokens=LENGTHS[3]).stream(QUESTIONS[3])) == alone[3]
    batch = [llm.bind(max_tokens=n) for n in LENGTHS]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: batch[i].invoke(QUESTIONS[i]).content, range(8)))
    assert got == alone
    same_length = llm.bind(max_tokens=30).batch(QUESTIONS, config={"max_concurrency": 8})
    assert len(same_length) == 8 and all(isinstance(m.content, str) for m in same_length)
