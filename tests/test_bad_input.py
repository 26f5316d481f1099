"""Wrong input never reaches Python's own error text: a table of wrong types and values sent to every
mutating endpoint of a live server. Each gets a 4xx whose message names the field, and nothing changes:
no row, no file, no version."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from helpers import running_server

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "hi"}]
CHAT = {"model": "base", "messages": HI, "max_tokens": 2}
EXAMPLE = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}

# (method, path, body (a JSON value, or raw bytes), what the message must name)
CASES = [
    ("POST", "/v1/chat/completions", {**CHAT, "model": 5}, "model"),
    ("POST", "/v1/chat/completions", {**CHAT, "model": ["base"]}, "model"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "boss", "content": "x"}]}, "role"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": {"a": 1}}]}, "content"),
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": "lots"}, "max_tokens"),
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 10 ** 30}, "max_tokens"),
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": -1}, "max_tokens"),
    ("POST", "/v1/chat/completions", b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], '
                                     b'"temperature": NaN}', "temperature"),
    ("POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
    ("POST", "/v1/chat/completions", {**CHAT, "temperature": 1e308 * 10}, "temperature"),
    ("POST", "/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p"),
    ("POST", "/v1/chat/completions", {**CHAT, "seed": "x"}, "seed"),
    ("POST", "/v1/chat/completions", {**CHAT, "seed": 10 ** 40}, "seed"),
    ("POST", "/v1/chat/completions", {**CHAT, "stop": 5}, "stop"),
    ("POST", "/v1/chat/completions", {**CHAT, "stop": [1, 2]}, "stop"),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": [1]}, "stream_options"),
    ("POST", "/v1/chat/completions", {**CHAT, "n": 99}, "n"),
    ("POST", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("POST", "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("POST", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("POST", "/v1/chat/completions", {**CHAT, "response_format": {"type": "banana"}}, "response_format"),
    ("POST", "/v1/chat/completions", {**CHAT, "logit_bias": {"x": 1}}, "logit_bias"),
    ("POST", "/v1/completions", {"model": "base", "prompt": "a", "suffix": "b"}, "suffix"),
    ("POST", "/v1/chat/completions", {**CHAT, "seed": 2 ** 63}, "seed"),
    ("POST", "/v1/chat/completions", {**CHAT, "top_k": -2}, "top_k"),
    ("POST", "/v1/chat/completions", {**CHAT, "min_p": 1.5}, "min_p"),
    ("POST", "/v1/chat/completions", {**CHAT, "repetition_penalty": 0}, "repetition_penalty"),
    ("POST", "/v1/chat/completions", {**CHAT, "min_tokens": 3}, "min_tokens"),
    ("POST", "/v1/chat/completions", {**CHAT, "metadata": {"k": 5}}, "metadata"),
    ("POST", "/v1/chat/completions", {**CHAT, "service_tier": "gold"}, "service_tier"),
    ("POST", "/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}], "tools": []}, "functions"),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    ("POST", "/v1/chat/completions", {**CHAT, "model": None}, "model"),
    ("POST", "/v1/completions", {"model": "base", "prompt": [10 ** 9]}, "prompt"),
    ("POST", "/v1/completions", {"model": "base", "prompt": [[1], "a"]}, "prompt"),
    ("POST", "/v1/chat/completions", [CHAT], "object"),
    ("POST", "/v1/chat/completions", b"{not json", "JSON"),
    ("POST", "/api/feedback", {"response_id": 5, "rating": "up"}, "response_id"),
    ("POST", "/api/feedback", {"response_id": "chatcmpl-nope", "rating": "up"}, "response"),
    ("POST", "/api/feedback", {"response_id": "RID", "rating": "meh"}, "rating"),
    ("POST", "/api/feedback", {"response_id": "RID", "rating": "down", "correction": 5}, "correction"),
    ("POST", "/api/feedback", {"response_id": "RID", "rating": "down", "reason": ["x"]}, "reason"),
    ("POST", "/api/domains", {"name": 5}, "name"),
    ("POST", "/api/domains", {"name": "Bad Name"}, "name"),
    ("POST", "/api/domains", {"name": "x" * 65}, "name"),
    ("POST", "/api/domains", {"name": "fresh", "system_prompt": ["x"]}, "system_prompt"),
    ("POST", "/api/domains", {"name": "fresh", "description": {"a": 1}}, "description"),
    ("POST", "/api/domains", {"name": "support"}, "exists"),
    ("POST", "/api/domains/support/examples", {"examples": "x"}, "examples"),
    ("POST", "/api/domains/support/examples", {"examples": [1, 2]}, "examples"),
    ("POST", "/api/domains/support/examples", {"examples": {"messages": 1}}, "examples"),
    ("POST", "/api/domains/support/examples", {"examples": []}, "examples"),
    ("POST", "/api/domains/support/examples", {"examples": [{"messages": [{"role": "user", "content": "q"}]}]},
     "assistant"),
    ("POST", "/api/domains/Bad/examples", {"examples": [EXAMPLE]}, "name"),
    ("POST", "/api/domains/nowhere/examples", {"examples": [EXAMPLE]}, "nowhere"),
    ("POST", "/api/domains/support/train", {"epochs": "lots"}, "epochs"),
    ("POST", "/api/domains/support/train", {"epochs": 1e9}, "epochs"),
    ("POST", "/api/domains/support/train", {"epochs": 10 ** 12}, "epochs"),
    ("POST", "/api/domains/support/train", b'{"learning_rate": NaN}', "learning_rate"),
    ("POST", "/api/domains/support/train", {"rank": -1}, "rank"),
    ("POST", "/api/domains/support/train", {"rank": True}, "rank"),
    ("POST", "/api/domains/support/train", {"batch_size": 10 ** 20}, "batch_size"),
    ("POST", "/api/domains/support/train", {"target_modules": "q_proj"}, "target_modules"),
    ("POST", "/api/domains/support/train", {"warp_speed": 9}, "warp_speed"),
    ("POST", "/api/domains/support/train", [1], "object"),
    ("POST", "/api/domains/support/adapters/v0/activate", None, "version"),
    ("POST", "/api/domains/support/adapters/latest/activate", None, "version"),
    ("POST", "/api/domains/support/adapters/v99/activate", None, "v99"),
    ("POST", "/api/domains/support/adapters", b"this is not a zip", "zip"),
    ("DELETE", "/api/jobs/nope", None, "job"),
]

PYTHON_TEXT = ("Traceback", "not supported between", "object has no attribute", "NoneType", "TypeError",
               "ValueError", "KeyError", "has no len", "/tmp/", "site-packages", "Errno")


def state_of(home: Path) -> dict:
    """Everything a request could change: every table's rows and every file under the home folder."""
    with sqlite3.connect(home / "data" / "assistant.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = {t: db.execute(f"SELECT * FROM {t}").fetchall() for t in tables if t != "sqlite_sequence"}
    files = sorted(str(p.relative_to(home)) for p in home.rglob("*")
                   if p.is_file() and not p.name.startswith(("assistant.db", "server-")))
    return {"rows": rows, "files": files}


def test_wrong_values_get_a_clear_4xx_and_change_nothing(tmp_path, tiny_llama):
    home = tmp_path / "home"
    home.mkdir()
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32") as (url, _):
        c = httpx.Client(base_url=url, timeout=60)
        assert c.post("/api/domains", json={"name": "support"}).status_code == 201
        assert c.post("/api/domains/support/examples", json={"examples": [EXAMPLE] * 3}).status_code == 201
        rid = c.post("/v1/chat/completions", json=CHAT).json()["id"]
        before = state_of(home)
        failures = []
        for method, path, body, names in CASES:
            if isinstance(body, bytes):
                kw = {"content": body, "headers": {"Content-Type": "application/json"}}
            elif body is None:
                kw = {}
            else:
                kw = {"content": json.dumps(body).replace('"RID"', json.dumps(rid)),
                      "headers": {"Content-Type": "application/json"}}
            r = c.request(method, path, **kw)
            message = r.json().get("error", {}).get("message", "") if r.headers.get("content-type", "").startswith(
                "application/json") else r.text
            if not 400 <= r.status_code < 500 or names.lower() not in message.lower() or any(
                    t in message for t in PYTHON_TEXT):
                failures.append((method, path, body if not isinstance(body, bytes) else body[:60], r.status_code,
                                 message[:200]))
        assert not failures, "\n".join(map(str, failures))
        assert state_of(home) == before
