"""Every answer and rating records who authenticated (the API key holder or the signed-in user) apart from
the `user` the request body names; with per-person sign-in the signed-in user is the one the per-user cap
counts, so a body's `user` cannot spread one person's data under many names."""

from __future__ import annotations

import base64
import sqlite3

import httpx

from helpers import running_server

API_KEY = "principal-test-key"
BOB = "Basic " + base64.b64encode(b"bob:bobs-password").decode()


def test_the_principal_is_recorded_apart_from_the_bodys_user_and_counted_by_the_cap(home, tiny_llama):
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32", "--api-key", API_KEY,
                        "--auth", "bob:bobs-password") as (url, _):
        key = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.post(url + "/api/domains", json={"name": "ops"}, headers=key).status_code == 201
        ids = {}
        for who, headers, body_user in (("app", key, "alice"), ("bob1", {"Authorization": BOB}, "mallory"),
                                        ("bob2", {"Authorization": BOB}, "trudy")):
            r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60, json={
                "model": "ops", "messages": [{"role": "user", "content": f"Question of {who}?"}], "max_tokens": 3,
                "user": body_user})
            assert r.status_code == 200, r.text
            ids[who] = r.json()["id"]
            r = httpx.post(url + "/api/feedback", headers=headers, json={
                "response_id": ids[who], "rating": "down", "correction": f"The answer for {who}.",
                "user": body_user + "-rater"})
            assert r.status_code == 201, r.text
    with sqlite3.connect(home / "data" / "assistant.db") as db:
        rows = dict(((i, (u, p)) for i, u, p in db.execute("SELECT id, user, principal FROM responses")))
        rated = {r: (u, p) for r, u, p in db.execute("SELECT response_id, user, principal FROM feedback")}
    assert rows[ids["app"]] == ("alice", "api-key") and rows[ids["bob1"]] == ("mallory", "bob")
    assert rated[ids["app"]] == ("alice-rater", "api-key") and rated[ids["bob2"]] == ("trudy-rater", "bob")

    from assistant.data.store import Store
    counted = {c["response_id"]: c["user"] for c in Store(home / "data" / "assistant.db").candidates("ops")}
    assert counted == {ids["app"]: "alice-rater", ids["bob1"]: "bob", ids["bob2"]: "bob"}
