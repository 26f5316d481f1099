"""`POST /v1/embeddings`, `GET /health` and the access log, over real HTTP to one running server (the 2-layer
Llama; the embedder is the packaged all-MiniLM-L6-v2), through other people's clients unchanged: the
`openai` client (base64, its default, and float) and LangChain's `OpenAIEmbeddings`. The vectors are the
embedder's own; a wrong field is a 400 naming it; every request leaves one access-log line (JSON here)
naming who, what, the status and the field at fault, and never a word of the body."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import openai
import pytest

from assistant.api.access import text_line
from assistant.api.embeddings import MAX_INPUTS
from assistant.data.embeddings import MODEL_ID, Embedder

from helpers import running_server

pytestmark = pytest.mark.slow

API_KEY = "embed-key-" + "e" * 16
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SECRET = "Quillfeather marmalade"   # in request bodies only: must never reach the server's log
DOCS = [f"{SECRET} is stored in the pantry.", "The cat sleeps on the warm windowsill.",
        "A kitten naps in the sunny window.", "Quarterly revenue rose by twelve percent."]
LOG_WAIT_S = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    home = tmp_path_factory.mktemp("embeddings-home")
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32", "--api-key", API_KEY,
                        "--access-log", "json") as (url, _):
        yield url, home / f"server-{url.rsplit(':', 1)[1]}.log"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """The embedder itself, in this process: what the server's vectors must equal."""
    return Embedder(MODEL_ID)


def access_lines(log_file, want) -> list[dict]:
    """The server's JSON access-log lines, once one satisfies `want` (a line is written as its answer ends)."""
    deadline = time.time() + LOG_WAIT_S
    while True:
        lines = [json.loads(x) for x in log_file.read_text().splitlines() if x.startswith('{"time"')]
        if any(want(x) for x in lines) or time.time() > deadline:
            return lines


def error_of(e: openai.APIStatusError) -> dict:
    return e.response.json()["error"]


def test_the_embedder_is_listed_and_health_is_open(server, client):
    models = {m.id: m for m in client.models.list().data}
    assert {"base", MODEL_ID} <= models.keys() and models[MODEL_ID].model_extra["type"] == "embedding"
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    anonymous = httpx.Client(base_url=server[0], timeout=30)
    assert anonymous.get("/health").status_code == 200 and anonymous.get("/health").json() == {"status": "ok"}
    assert anonymous.post("/v1/embeddings", json={"model": MODEL_ID, "input": "hi"}).status_code == 401
    with pytest.raises(openai.NotFoundError) as e:   # the embedding id on a chat route says what it is
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])
    assert "/v1/embeddings" in error_of(e.value)["message"]


def test_openai_client_base64_and_float_are_the_embedders_own_vectors(client, reference):
    raw = client.embeddings.with_raw_response.create(model=MODEL_ID, input=DOCS)   # the client asks for base64
    assert all(isinstance(d["embedding"], str) for d in raw.http_response.json()["data"])
    packed = raw.parse()
    plain = client.embeddings.create(model=MODEL_ID, input=DOCS, encoding_format="float", dimensions=384, user="u1")
    a = np.array([d.embedding for d in packed.data], np.float32)
    b = np.array([d.embedding for d in plain.data], np.float32)
    assert a.shape == (4, 384) and [d.index for d in plain.data] == [0, 1, 2, 3]
    assert np.abs(a - b).max() < 1e-6
    own = reference.embed(DOCS)
    assert (a * own).sum(axis=1).min() > 0.9999                       # cosine with the embedder's own: 1
    assert np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    sims = b @ b.T
    assert sims[1, 2] > 0.5 > max(sims[1, 3], sims[2, 3])            # cat/kitten close; revenue far
    assert plain.model == MODEL_ID
    assert plain.usage.prompt_tokens == plain.usage.total_tokens == sum(reference.token_counts(DOCS))
    one = client.embeddings.create(model=MODEL_ID, input=DOCS[1], encoding_format="float")
    assert len(one.data) == 1 and np.abs(np.array(one.data[0].embedding) - b[1]).max() < 1e-6


def test_langchain_embeddings_are_the_embedders_own(server, reference):
    from langchain_openai import OpenAIEmbeddings
    # check_embedding_ctx_length=False: otherwise LangChain sends tiktoken's (OpenAI's) token ids, which are
    # not this model's tokens, and this server refuses token arrays (see the last test)
    lc = OpenAIEmbeddings(model=MODEL_ID, base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0,
                          check_embedding_ctx_length=False)
    docs = np.array(lc.embed_documents(DOCS), np.float32)
    query = np.array(lc.embed_query("Where is the cat napping?"), np.float32)
    assert (docs * reference.embed(DOCS)).sum(axis=1).min() > 0.9999
    assert float(query @ reference.embed(["Where is the cat napping?"])[0]) > 0.9999
    assert int(np.argmax(docs @ query)) in (1, 2)


def test_a_wrong_field_is_a_400_naming_it(server, client):
    cases = [({"dimensions": 128}, 400, "dimensions"), ({"input": [[101, 7592, 102]]}, 400, "input"),
             ({"input": [7592, 2088]}, 400, "input"), ({"input": []}, 400, "input"),
             ({"input": ["fine", 3.5]}, 400, "input"), ({"input": ["x"] * (MAX_INPUTS + 1)}, 400, "input"),
             ({"input": ["ok", "word " * 300]}, 400, "input"), ({"encoding_format": "int8"}, 400, "encoding_format"),
             ({"model": "base"}, 404, "model"), ({"dimension": 384}, 400, "dimension")]
    for change, status, param in cases:
        body = {"model": MODEL_ID, "input": SECRET, **change}
        r = httpx.post(server[0] + "/v1/embeddings", json=body, headers=AUTH, timeout=60)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (change, r.text)
    r = httpx.post(server[0] + "/v1/embeddings", json={"model": "base", "input": "x"}, headers=AUTH, timeout=60)
    assert MODEL_ID in r.json()["error"]["message"]                   # it says which id embeds
    r = httpx.post(server[0] + "/v1/embeddings", json={"model": MODEL_ID, "input": ["ok", "word " * 300]}, headers=AUTH)
    assert "input[1]" in r.json()["error"]["message"] and "tokens" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL_ID, input=[[101, 7592, 102]])
    assert error_of(e.value)["param"] == "input" and "token arrays" in error_of(e.value)["message"]


def test_each_request_has_one_access_line_without_its_body(server, client):
    url, log_file = server
    ok = httpx.post(url + "/v1/embeddings", json={"model": MODEL_ID, "input": [SECRET, "two"]},
                    headers={**AUTH, "X-Request-ID": "trace-ok-1"}, timeout=60)
    bad = httpx.post(url + "/v1/embeddings", json={"model": MODEL_ID, "input": SECRET, "dimensions": 7},
                     headers={**AUTH, "X-Request-ID": "trace-bad-1"}, timeout=60)
    refused = httpx.post(url + "/v1/embeddings", json={"model": MODEL_ID, "input": SECRET, "temperature": 1},
                         headers={**AUTH, "X-Request-ID": "trace-bad-2"}, timeout=60)
    nobody = httpx.post(url + "/v1/embeddings", json={"model": MODEL_ID, "input": SECRET},
                        headers={"X-Request-ID": "trace-401"}, timeout=60)
    assert (ok.status_code, bad.status_code, refused.status_code, nobody.status_code) == (200, 400, 400, 401)
    assert ok.headers["x-request-id"] == "trace-ok-1"
    assert httpx.get(url + "/", headers=AUTH, timeout=60).status_code == 200          # the UI's page: DEBUG only
    assert httpx.get(url + "/health", timeout=60).status_code == 200
    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": SECRET}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_headers={"X-Request-ID": "trace-stream"})
    usage = [c.usage for c in stream if c.usage][0]
    lines = access_lines(log_file, lambda x: x["request_id"] == "trace-stream")
    by_id = {x["request_id"]: x for x in lines}
    line = by_id["trace-ok-1"]
    assert {k: line[k] for k in ("principal", "method", "path", "route", "model", "status", "tokens")} == {
        "principal": "api-key", "method": "POST", "path": "/v1/embeddings", "route": "/v1/embeddings",
        "model": MODEL_ID, "status": 200, "tokens": ok.json()["usage"]["total_tokens"]}
    assert line["latency_ms"] > 0 and "param" not in line
    assert by_id["trace-bad-1"]["status"] == 400 and by_id["trace-bad-1"]["param"] == "dimensions"
    assert "384" in by_id["trace-bad-1"]["error"] and by_id["trace-bad-1"]["model"] == MODEL_ID
    assert by_id["trace-bad-2"]["param"] == "temperature" and by_id["trace-bad-2"]["model"] == MODEL_ID
    assert by_id["trace-401"]["status"] == 401 and by_id["trace-401"]["principal"] is None
    streamed = by_id["trace-stream"]                                  # written when the stream ended
    assert (streamed["route"], streamed["model"], streamed["tokens"]) == ("/v1/chat/completions", "base",
                                                                         usage.total_tokens)
    assert any(x["path"] == "/health" and x["principal"] is None for x in lines)
    assert not any(x["path"] == "/" for x in lines)
    assert SECRET not in log_file.read_text() and "Quillfeather" not in log_file.read_text()
    text = text_line({**line, "path": "/v1/x\nforged=1", "error": "two words"})   # the default format
    assert "\n" not in text and 'path="/v1/x\\nforged=1"' in text and 'error="two words"' in text
    assert text.startswith("request_id=trace-ok-1 principal=api-key method=POST")
