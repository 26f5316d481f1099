"""The OpenAI-compatible API on a live `assistant serve` with the embedded SmolLM2, driven by the
official `openai` client and plain HTTP."""

import json
import sqlite3
import time

import httpx
import openai
import pytest

from helpers import running_server

pytestmark = pytest.mark.slow
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_path):
    home = tmp_path_factory.mktemp("api-home")
    with running_server(home) as (url, proc):
        yield url, home


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def db_row(home, rid, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with sqlite3.connect(home / "data" / "assistant.db") as c:
            c.row_factory = sqlite3.Row
            row = c.execute("SELECT * FROM responses WHERE id = ?", (rid,)).fetchone()
        if row is not None:
            return dict(row)
        time.sleep(0.1)
    return None


def test_paris_non_streaming(client, server):
    r = client.chat.completions.create(model="base", messages=FRANCE, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0
    row = db_row(server[1], r.id)
    assert row is not None and "Paris" in row["answer"] and json.loads(row["messages"])[-1] == FRANCE[0]


def test_paris_streaming(client):
    stream = client.chat.completions.create(model="base", messages=FRANCE, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0


def test_greedy_is_deterministic(client):
    msgs = [{"role": "user", "content": "Write one sentence about the sea."}]
    answers = {client.chat.completions.create(model="base", messages=msgs, temperature=0, max_tokens=30)
               .choices[0].message.content for _ in range(3)}
    assert len(answers) == 1


def test_seeded_sampling_repeats(client):
    msgs = [{"role": "user", "content": "Name a color."}]
    a, b = (client.chat.completions.create(model="base", messages=msgs, temperature=1.0, seed=42, max_tokens=15)
            .choices[0].message.content for _ in range(2))
    assert a == b


def test_unknown_model_is_404_with_openai_error(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-domain", messages=FRANCE)
    body = e.value.body
    assert body["code"] == "model_not_found" and "does not exist" in body["message"]


def test_over_long_input_is_4xx_with_message(client):
    long = [{"role": "user", "content": "word " * 6000} for _ in range(3)]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=long)
    assert "tokens" in e.value.body["message"] and "shorten" in e.value.body["message"]


def test_bad_bodies_are_rejected(server):
    url = server[0] + "/v1/chat/completions"
    assert httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.post(url, json={"model": "base", "messages": "hi"}).status_code == 400
    assert httpx.post(url, json={"model": "base", "messages": [{"role": "wizard", "content": "x"}]}).status_code == 400
    assert httpx.post(url, json={"model": "base", "messages": FRANCE, "max_tokens": -1}).status_code == 400
    assert httpx.post(url, json={"model": "base", "messages": FRANCE, "temperature": "hot"}).status_code == 400


def test_client_disconnect_stops_generation(server):
    url, home = server
    body = {"model": "base", "stream": True, "max_tokens": 2000, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]}
    rid = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for n, line in enumerate(r.iter_lines()):
            if line.startswith("data: {"):
                rid = rid or json.loads(line[6:])["id"]
            if n > 10:
                break  # leaving the block closes the connection
    row = db_row(home, rid)
    assert row is not None, "the cancelled response was not logged"
    assert row["finish_reason"] == "cancelled"
    assert row["completion_tokens"] < 200


def test_feedback_is_attached_to_the_response(client, server):
    url = server[0]
    r = client.chat.completions.create(model="base", messages=FRANCE, temperature=0)
    ok = httpx.post(url + "/api/feedback", json={"response_id": r.id, "rating": "down", "reason": "too short",
                                                 "correction": "Paris, on the Seine."})
    assert ok.status_code == 201 and isinstance(ok.json()["id"], int)
    assert httpx.post(url + "/api/feedback", json={"response_id": "nope", "rating": "up"}).status_code == 404
    assert httpx.post(url + "/api/feedback", json={"response_id": r.id, "rating": "meh"}).status_code == 400
    again = httpx.post(url + "/api/feedback", json={"response_id": r.id, "rating": "down",
                                                    "correction": "Paris."})
    assert again.status_code == 201 and again.json()["id"] == ok.json()["id"]   # updated in place


def test_domain_without_adapter_answers_with_base_and_its_system_prompt(client, server):
    url, home = server
    r = httpx.post(url + "/api/domains", json={"name": "geo", "system_prompt": "You are a geography tutor.",
                                              "description": "geography"})
    assert r.status_code == 201
    assert "geo" in [m.id for m in client.models.list().data]
    out = client.chat.completions.create(model="geo", messages=FRANCE, temperature=0)
    row = db_row(home, out.id)
    assert row["domain"] == "geo" and row["adapter_version"] is None
    assert json.loads(row["messages"])[0] == {"role": "system", "content": "You are a geography tutor."}
    listed = httpx.get(url + "/api/domains").json()
    assert [d for d in listed if d["name"] == "geo"][0]["active_version"] is None


def test_a_token_chunk_is_the_json_of_a_chunk():
    """The stream writes token chunks from a template made once per response: the same text as
    serializing each chunk, for any text (quotes, newlines, non-ASCII)."""
    from types import SimpleNamespace

    from assistant.api.openai import _chunk, _sse, _token_chunks
    call = SimpleNamespace(id="chatcmpl-1", created=1, target=SimpleNamespace(model='support "x"', version="v2"))
    token = _token_chunks(call)
    for text in ("Paris", 'a "quoted"\nline', "é ü 中", "", "\\"):
        assert token(text) == _sse(_chunk(call, {"content": text}))
        assert json.loads(token(text)[len("data: "):])["choices"][0]["delta"] == {"content": text}
