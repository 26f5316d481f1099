"""The OpenAI contract with `--engine vllm`: the same JSON-schema constraint, forced tool call, logprobs and n
reach a REAL vLLM server (its structured outputs), as do top_k, min_p, repetition_penalty and min_tokens,
and greedy answers equal the local engine's on the embedded SmolLM2 in float32. The session's one app and
vLLM server (tests/conftest.py's `vllm_app`)."""

from __future__ import annotations

import json

import httpx
import pytest

from helpers import make_serving

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

QUESTION = [{"role": "user", "content": "Describe Paris as JSON."}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                           "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}
ASKS = {
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}},
    "json_object": {"response_format": {"type": "json_object"}},
    "tool": {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    # vLLM's sampling extensions reach it: top_k 1 is greedy at any temperature, the same repetition penalty
    "extensions": {"temperature": 1.0, "seed": 1, "top_k": 1, "min_p": 0.1, "repetition_penalty": 1.3, "min_tokens": 4},
}


@pytest.fixture(scope="module")
def app(vllm_app):
    """The session's app on vLLM (tests/conftest.py): this file asks `base` only."""
    return vllm_app["url"]


def ask(url: str, **kw) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=300,
                   json={"model": "base", "messages": QUESTION, "temperature": 0, "max_tokens": 60, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"]


def test_structured_answers_equal_the_local_engine(app, tmp_path):
    got = {name: ask(app, **kw)[0]["message"] for name, kw in ASKS.items()}
    obj = json.loads(got["json_schema"]["content"])
    assert set(obj) == {"city", "population"} and isinstance(obj["population"], int)
    assert isinstance(json.loads(got["json_object"]["content"]), dict)
    call = got["tool"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and "city" in json.loads(call["arguments"])

    from fastapi.testclient import TestClient

    from assistant.server import build_app
    from assistant.settings import Settings
    local = make_serving(Settings(home=tmp_path, dtype="float32"))
    try:
        c = TestClient(build_app(local.workspace, local, with_ui=False))
        for name, kw in ASKS.items():
            r = c.post("/v1/chat/completions", json={"model": "base", "messages": QUESTION, "temperature": 0,
                                                     "max_tokens": 60, **kw})
            mine = r.json()["choices"][0]["message"]
            if name == "tool":
                assert mine["tool_calls"][0]["function"] == call
            else:
                assert mine["content"] == got[name]["content"], name
    finally:
        local.close()


def test_logprobs_and_n_through_vllm(app):
    [one] = ask(app, logprobs=True, top_logprobs=2, max_tokens=8)
    content = one["logprobs"]["content"]
    assert len(content) >= 1 and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    assert "".join(t["token"] for t in content) == one["message"]["content"]
    seeded = {"n": 2, "seed": 5, "temperature": 1.0, "max_tokens": 8}
    a, b = ask(app, **seeded), ask(app, **seeded)
    assert [c["message"]["content"] for c in a] == [c["message"]["content"] for c in b] and len(a) == 2
