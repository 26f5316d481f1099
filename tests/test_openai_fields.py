"""The fields OpenAI clients send by default, and the completions details, on a live `assistant serve` (the
2-layer Llama) through the official `openai` client, LiteLLM and plain HTTP: the informational fields are
accepted (`safety_identifier` recorded as the user), a null for any optional field is its default, vLLM's
sampling extensions (top_k, min_p, repetition_penalty, min_tokens) act, legacy `functions` answer in the
legacy shape, prompts as token ids, `logprobs: 0`, usage details and continuous usage, the seed's bounds.
In process: rows of one batch with different extensions each give the answer they give alone, and the
repetition penalty and min_tokens equal transformers' rules."""

from __future__ import annotations

import json
import os
import sqlite3

import httpx
import openai
import pytest
import torch

from assistant.api.openai_schema import ChatRequest, CompletionRequest
from assistant.engine.chat_options import build_requests
from assistant.engine.engine import Engine, Request
from assistant.engine.model import load_base
from assistant.settings import Settings
from assistant.vllm.requests import vllm_options

from helpers import ids_for, running_server

pytestmark = pytest.mark.slow
Q = [{"role": "user", "content": "Hello there"}]
PROMPT = "Once upon a time"
WEATHER = {"name": "get_weather", "description": "The weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}
BIAS = 5.0             # a logit_bias that makes the tiny model's greedy answer repeat one token
STREAM_USAGE = {"include_usage": True, "continuous_usage_stats": True}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama):
    home = tmp_path_factory.mktemp("fields-home")
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32") as (url, _):
        yield url, home


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_llama))


def post(url: str, path: str, status: int = 200, **body) -> dict:
    r = httpx.post(url + path, json={"model": "base", **body}, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def chat(url: str, **body) -> dict:
    return post(url, "/v1/chat/completions", **{"messages": Q, **body})


def events(url: str, path: str, **body) -> list[dict]:
    with httpx.stream("POST", url + path, json={"model": "base", "stream": True, **body}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def refused(url: str, path: str, param: str, **body) -> None:
    err = post(url, path, 400, **body)["error"]
    assert err["param"] == param and param in err["message"], err


# Informational fields, nulls, seed ------------------------------------------------------------

def test_informational_fields_change_nothing_and_safety_identifier_is_the_user(served, client):
    server, home = served
    plain = client.chat.completions.create(model="base", messages=Q, max_tokens=8)
    r = client.chat.completions.create(
        model="base", messages=Q, max_tokens=8, store=True, metadata={"run": "fields", "team": "qa"},
        service_tier="auto", reasoning_effort="low", verbosity="low", safety_identifier="sid-7",
        prompt_cache_key="cache-1", parallel_tool_calls=False)
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    with sqlite3.connect(home / "data" / "assistant.db") as db:
        assert db.execute('SELECT "user" FROM responses WHERE id = ?', (r.id,)).fetchone() == ("sid-7",)
        assert db.execute('SELECT "user" FROM responses WHERE id = ?', (plain.id,)).fetchone() == (None,)
    text = client.completions.create(model="base", prompt=PROMPT, max_tokens=6).choices[0].text
    same = client.completions.create(model="base", prompt=PROMPT, max_tokens=6, extra_body={
        "store": False, "metadata": {"k": "v"}, "service_tier": "default", "reasoning_effort": "none",
        "verbosity": "high", "safety_identifier": "sid-8", "prompt_cache_key": "p"})
    assert same.choices[0].text == text
    streamed = client.chat.completions.create(model="base", messages=Q, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True, "include_obfuscation": False})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain.choices[0].message.content
    refused(server, "/v1/chat/completions", "metadata", messages=Q, metadata={str(i): "x" for i in range(17)})
    refused(server, "/v1/chat/completions", "reasoning_effort", messages=Q, reasoning_effort="maximal")
    refused(server, "/v1/chat/completions", "not_a_field", messages=Q, not_a_field=1)   # unknown: still refused


def test_a_null_for_every_optional_field_is_its_default(server):
    nulls = {name: None for name, f in ChatRequest.model_fields.items() if not f.is_required()}
    assert set(nulls) >= {"stream", "n", "logprobs", "ignore_eos", "stream_options", "top_k", "store"}
    want = chat(server, max_tokens=6)["choices"][0]["message"]["content"]
    got = chat(server, **{**nulls, "max_tokens": 6}, messages=[{"role": "user", "content": "Hello there", "name": None}])
    assert got["choices"][0]["message"]["content"] == want
    streamed = events(server, "/v1/chat/completions", messages=Q, max_tokens=6, stream_options={"include_usage": None})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed) == want
    nulls = {name: None for name, f in CompletionRequest.model_fields.items() if not f.is_required()}
    assert {"echo", "logprobs"} <= set(nulls)
    want = post(server, "/v1/completions", prompt=PROMPT, max_tokens=6)["choices"][0]["text"]
    assert post(server, "/v1/completions", **{**nulls, "max_tokens": 6}, prompt=PROMPT)["choices"][0]["text"] == want
    refused(server, "/v1/chat/completions", "model", messages=Q, model=None)   # a required field's null is not


def test_seed_is_a_signed_64_bit_integer(server):
    for seed in (2 ** 63 - 1, -2 ** 63):
        chat(server, max_tokens=2, temperature=1.0, seed=seed)
    for seed in (2 ** 63, -2 ** 63 - 1, 2 ** 64 - 1):
        refused(server, "/v1/chat/completions", "seed", messages=Q, max_tokens=2, seed=seed)


# Sampling extensions ---------------------------------------------------------------------------

def test_sampling_extensions_through_the_openai_client(client, tok):
    def ask(**kw):
        r = client.chat.completions.create(model="base", messages=Q, max_tokens=16, **kw)
        return r.choices[0].message.content
    greedy = ask(temperature=0)
    assert ask(temperature=1.0, seed=3, extra_body={"top_k": 1, "min_p": 0.05, "repetition_penalty": 1.0}) == greedy
    sampled = [ask(temperature=1.5, seed=s, extra_body={"top_k": 50, "min_p": 0.01}) for s in (4, 4, 5)]
    assert sampled[0] == sampled[1] != greedy and sampled[0] != sampled[2]
    # a greedy answer pushed into repeating one token, and the repetition penalty undoing it
    first = tok(greedy, add_special_tokens=False)["input_ids"][0]
    repetitive = client.chat.completions.create(model="base", messages=Q, max_tokens=24, logit_bias={str(first): BIAS},
                                                logprobs=True)
    penalized = client.chat.completions.create(model="base", messages=Q, max_tokens=24, logit_bias={str(first): BIAS},
                                               logprobs=True, extra_body={"repetition_penalty": 2.0})
    kinds = [len({t.token for t in r.choices[0].logprobs.content}) for r in (repetitive, penalized)]
    assert kinds[0] < 16 < kinds[1], kinds
    assert penalized.choices[0].message.content != repetitive.choices[0].message.content


def test_litellm_sends_top_k_and_min_p(server, client):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")   # else it fetches a price list from the internet
    import litellm
    greedy = client.chat.completions.create(model="base", messages=Q, max_tokens=12).choices[0].message.content
    r = litellm.completion(model="openai/base", api_base=server + "/v1", api_key="x", messages=Q, max_tokens=12,
                           temperature=1.0, seed=9, top_k=1, min_p=0.1)
    assert r.choices[0].message.content == greedy   # top_k 1 reached the server: greedy at temperature 1
    r = litellm.completion(model="openai/base", api_base=server + "/v1", api_key="x", messages=Q, max_tokens=12,
                           temperature=0, repetition_penalty=1.0, metadata={"app": "test"})
    assert r.choices[0].message.content == greedy


def test_min_tokens_holds_off_the_end_and_stop_strings(server, tok):
    end = {str(tok.eos_token_id): 100}
    ended = chat(server, max_tokens=20, logit_bias=end)
    assert ended["usage"]["completion_tokens"] == 0 and ended["choices"][0]["finish_reason"] == "stop"
    held = chat(server, max_tokens=20, logit_bias=end, min_tokens=5)
    assert held["usage"]["completion_tokens"] == 5 and held["choices"][0]["finish_reason"] == "stop"
    text = post(server, "/v1/completions", prompt=PROMPT, max_tokens=20, logit_bias=end, min_tokens=3)
    assert text["usage"]["completion_tokens"] == 3
    plain = chat(server, max_tokens=12)["choices"][0]["message"]["content"]
    stop = plain[:3]
    assert chat(server, max_tokens=12, stop=[stop])["choices"][0]["message"]["content"] == ""
    late = chat(server, max_tokens=12, stop=[stop], min_tokens=4)
    assert late["usage"]["completion_tokens"] >= 4 and late["choices"][0]["message"]["content"].startswith(stop)
    refused(server, "/v1/chat/completions", "min_tokens", messages=Q, max_tokens=4, min_tokens=5)
    refused(server, "/v1/chat/completions", "repetition_penalty", messages=Q, repetition_penalty=0)
    refused(server, "/v1/chat/completions", "top_k", messages=Q, top_k=-2)


def test_the_extensions_reach_vllm_only_when_set():
    asked = Request(prompt_ids=[1], top_k=5, min_p=0.1, repetition_penalty=1.2, min_tokens=3)
    assert vllm_options(asked, 100) == {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 3}
    assert vllm_options(Request(prompt_ids=[1], top_k=100), 100) == vllm_options(Request(prompt_ids=[1]), 100) == {}


# Legacy functions ------------------------------------------------------------------------------

def test_legacy_functions_answer_in_the_legacy_shape(server, client):
    ask = dict(model="base", messages=Q, max_tokens=40, functions=[WEATHER], function_call={"name": "get_weather"})
    r = client.chat.completions.create(**ask)
    choice = r.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments)["city"] in ("Paris", "Rome")
    chunks = list(client.chat.completions.create(**ask, stream=True))
    calls = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert [(f.name, f.arguments) for f in calls] == [("get_weather", choice.message.function_call.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["function_call"]
    turns = Q + [{"role": "assistant", "content": None, "function_call": choice.message.function_call.model_dump()},
                 {"role": "function", "name": "get_weather", "content": "sunny"}]
    after = client.chat.completions.create(model="base", messages=turns, max_tokens=6, functions=[WEATHER],
                                           function_call="none")
    assert after.choices[0].message.function_call is None and after.choices[0].finish_reason in ("stop", "length")
    refused(server, "/v1/chat/completions", "functions", messages=Q, functions=[WEATHER],
            tools=[{"type": "function", "function": WEATHER}])
    refused(server, "/v1/chat/completions", "function_call", messages=Q, function_call="auto")
    refused(server, "/v1/chat/completions", "function_call", messages=Q, functions=[WEATHER],
            function_call={"name": "get_time"})


# Completions details ---------------------------------------------------------------------------

def test_prompts_as_token_ids(server, client, tok):
    ids = tok(PROMPT)["input_ids"]
    text = client.completions.create(model="base", prompt=PROMPT, max_tokens=8)
    by_ids = client.completions.create(model="base", prompt=ids, max_tokens=8)
    assert by_ids.choices[0].text == text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    two = client.completions.create(model="base", prompt=[ids, ids], max_tokens=8, echo=True)
    assert [c.text for c in two.choices] == [tok.decode(ids) + text.choices[0].text] * 2
    assert two.usage.prompt_tokens == 2 * len(ids) and two.usage.prompt_tokens_details.cached_tokens == 0
    refused(server, "/v1/completions", "prompt", prompt=[len(tok) + 5])
    refused(server, "/v1/completions", "prompt", prompt=[1, "a"])
    refused(server, "/v1/completions", "prompt", prompt=[[1], []])


def test_logprobs_zero_gives_the_chosen_token(client):
    r = client.completions.create(model="base", prompt=PROMPT, max_tokens=6, logprobs=0, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(top == {t: v} and v <= 0 for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    two = client.completions.create(model="base", prompt=PROMPT, max_tokens=6, logprobs=2,
                                    extra_body={"ignore_eos": True}).choices[0].logprobs
    assert two.tokens == lp.tokens and two.token_logprobs == lp.token_logprobs
    assert all(len(top) == 2 and top[t] == v and max(top.values()) == v   # greedy: the chosen is the likeliest
               for t, v, top in zip(two.tokens, two.token_logprobs, two.top_logprobs))


def test_continuous_usage_stats_on_every_chunk(server):
    for path, body, text in (("/v1/chat/completions", {"messages": Q}, lambda c: c["delta"].get("content")),
                             ("/v1/completions", {"prompt": PROMPT}, lambda c: c["text"])):
        chunks = events(server, path, **body, n=2, max_tokens=8, ignore_eos=True, stream_options=STREAM_USAGE)
        assert all("usage" in c for c in chunks)
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 16 and chunks[-1]["choices"] == []
        assert len({c["usage"]["prompt_tokens"] for c in chunks}) == 1
        sent = 0
        for c in chunks:   # each text chunk carries at least one token, counted in the usage it carries
            sent += sum(1 for ch in c["choices"] if text(ch))
            assert c["usage"]["completion_tokens"] >= sent
        only_last = events(server, path, **body, max_tokens=4, stream_options={"include_usage": True})
        assert [c for c in only_last if c.get("usage")] == only_last[-1:]
        assert only_last[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}


# In process: mixed rows equal solo rows --------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_llama):
    base = load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False)
    e = Engine(base, max_batch=8)
    yield e
    e.close()


@pytest.fixture(scope="module")
def kinds(engine) -> list[tuple[list[int], dict]]:
    """(prompt ids, Request settings) of rows that differ in every extension (and greedy, seeded, min_tokens)."""
    eos = engine.tokenizer.eos_token_id
    hello = ids_for(engine, "Hello there")
    first = engine.generate(prompt_ids=hello, max_new_tokens=1, ignore_eos=True)
    first = engine.tokenizer(first, add_special_tokens=False)["input_ids"][0]
    return [(ids_for(engine, q), kw) for q, kw in [
        ("Hello there", {}),
        ("Hello there", {"repetition_penalty": 2.0, "logit_bias": {first: BIAS}}),
        ("Tell me about cats", {"temperature": 1.0, "seed": 11, "top_k": 5}),
        ("Tell me about cats", {"temperature": 0.8, "seed": 12, "min_p": 0.2, "top_p": 0.9}),
        ("Write a poem", {"temperature": 1.0, "seed": 13, "top_k": 1}),
        ("Write a poem", {"temperature": 1.3, "seed": 14, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.2}),
        ("Why is the sky blue?", {"min_tokens": 6, "logit_bias": {eos: 30.0}}),
        ("Why is the sky blue?", {"temperature": 1.0, "seed": 15, "min_tokens": 4, "logit_bias": {eos: 3.0}}),
    ]]


def fresh(kinds, **change) -> list[Request]:
    return [Request(prompt_ids=list(ids), max_new_tokens=10, **{**kw, **change}) for ids, kw in kinds]


def answers(handles) -> list[tuple]:
    for h in handles:
        h.result()
    return [(h.req.generated, h.req.text, h.req.finish_reason) for h in handles]


def test_mixed_rows_each_answer_as_alone(engine, kinds):
    alone = [answers([engine.submit(r)])[0] for r in fresh(kinds)]
    assert alone[4] == answers([engine.submit(fresh(kinds[4:5], temperature=0.0, seed=None, top_k=0)[0])])[0]   # top_k 1
    assert len(alone[6][0]) == 6 and alone[6][2] == "stop"     # min_tokens held off a forced end
    assert alone[1][0] != answers([engine.submit(fresh(kinds[1:2], repetition_penalty=1.0)[0])])[0][0]
    assert answers([engine.submit(r) for r in fresh(kinds)]) == alone
    assert answers([engine.submit(r) for r in fresh(kinds)[::-1]]) == alone[::-1]
    group = dict(max_tokens=10, temperature=1.2, seed=5, top_k=8, min_p=0.1, repetition_penalty=1.3, min_tokens=2)
    cats = kinds[2][0]
    mixed = engine.submit_group(build_requests(cats, 3, None, None, None, adapter=None, **group)[0])
    mixed += [engine.submit(r) for r in fresh(kinds)[:4]]
    solo = build_requests(cats, 3, None, None, None, adapter=None, **group)[0]
    assert answers(mixed)[:3] == [answers([engine.submit(r)])[0] for r in solo]


def test_repetition_penalty_and_min_tokens_follow_transformers(engine, kinds):
    model, (ids, kw) = engine.model, kinds[1]
    (tok, bias), = kw["logit_bias"].items()
    eos = sorted(engine.eos)
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=2.0,
                              sequence_bias={(tok,): bias}, eos_token_id=None, pad_token_id=0)[0][len(ids):].tolist()
        ended = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=7,
                               sequence_bias={(eos[-1],): 30.0}, eos_token_id=eos, pad_token_id=0)[0][len(ids):].tolist()
    h = engine.submit(Request(prompt_ids=ids, max_new_tokens=24, ignore_eos=True, repetition_penalty=2.0,
                              logit_bias={tok: bias}))
    h.result()
    assert h.req.generated == want and len(set(want)) > len(set(answers([engine.submit(Request(
        prompt_ids=ids, max_new_tokens=24, ignore_eos=True, logit_bias={tok: bias}))])[0][0]))
    h = engine.submit(Request(prompt_ids=ids, max_new_tokens=24, min_tokens=7, logit_bias={eos[-1]: 30.0}))
    h.result()
    assert h.req.generated + [eos[-1]] == ended and len(h.req.generated) == 7
