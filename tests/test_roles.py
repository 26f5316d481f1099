"""Many people, one assistant: stored users with roles, personal keys, ownership of ratings, review before
training, forged cards, quotas, sessions that end and the audit log, over real HTTP to a running server
(a tiny Llama), with the official `openai` client under a personal key and HTTP Basic for stored users."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import httpx
import openai
import pytest

from assistant.ui.adapters import show_card
from assistant.ui.data import approve_pending

from helpers import random_lora_adapter, running_server, zipped

pytestmark = pytest.mark.slow

API_KEY = "roles-key-" + "r" * 16
PASSWORD = "correct-horse-9"
PEOPLE = {"ulla": ("user", []), "uma": ("user", []), "quinn": ("user", []), "eddie": ("editor", ["support"]),
          "ada": ("admin", [])}
ADMIN = {"Authorization": f"Bearer {API_KEY}"}
PER_MINUTE = 8      # the people below send fewer chat requests than this in a minute, except quinn
RANK = {"public": -1, "user": 0, "editor": 1, "admin": 2}


def basic(name: str, password: str = PASSWORD) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    home = tmp_path_factory.mktemp("roles-home")
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32", "--api-key", API_KEY,
                        "--user-requests-per-minute", str(PER_MINUTE)) as (url, _):
        c = httpx.Client(base_url=url, timeout=60)
        for domain in ("support", "other"):
            assert c.post("/api/domains", headers=ADMIN, json={"name": domain}).status_code == 201
        for name, (role, domains) in PEOPLE.items():
            r = c.post("/api/users", headers=ADMIN, json={"name": name, "password": PASSWORD, "role": role,
                                                          "domains": domains})
            assert r.status_code == 201, r.text
        yield url, home


@pytest.fixture(scope="module")
def client(server):
    return httpx.Client(base_url=server[0], timeout=60)


def _workspace(server):
    """The server's workspace, opened beside it (one SQLite file): for the UI's handlers called directly."""
    from assistant.settings import Settings
    from assistant.workspace import Workspace
    return Workspace(Settings(home=server[1]))


def _chat(client, headers, model="support", content="Hi") -> str:
    r = client.post("/v1/chat/completions", headers=headers, json={"model": model, "max_tokens": 3,
                                                                   "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    return r.json()["id"]


# A request each route answers without changing anything when the role allows it (a 404 or a 422 from the
# route itself), so the table below can call every route as every role.
PATH_VALUES = {"name": "support", "version": "v99", "job_id": "0123456789abcdef", "model_id": "base",
               "key_id": "999999", "user": "nobody", "response_id": "resp_nope"}
BODIES = {"/api/domains": {"name": "not a name!"}, "/api/domains/{name}/train": {"epochs": -1},
          "/api/domains/{name}/examples": {"examples": "none"}, "/api/feedback": {"response_id": "nope", "rating": "up"},
          "/api/feedback/withdraw": {"response_id": "nope"}, "/api/users": {"name": "x"},
          "/api/domains/{name}/review": {"keys": ["feedback:999999"], "status": "approved"},
          "/api/keys": {"label": 3}, "/api/users/{user}/password": {"password": "short"},
          "/v1/chat/completions": {"model": "base", "messages": []}, "/v1/completions": {"model": "base"},
          "/v1/responses": {"model": "base"}}


def test_every_route_has_a_rule_and_every_role_gets_what_it_says(client):
    from assistant.people.permissions import RULES
    spec = client.get("/api/openapi.json", headers=ADMIN).json()
    routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
    assert len(routes) >= 30
    missing = [r for r in routes if r not in RULES]
    assert not missing, f"routes without a rule in permissions.RULES: {missing}"
    callers = {"anonymous": ({}, None)} | {n: (basic(n), role) for n, (role, _) in PEOPLE.items() if n != "quinn"}
    for method, path in routes:
        rule = RULES[(method, path)]
        for who, (headers, role) in callers.items():
            for domain in ("support", "other") if "{name}" in path else ("support",):
                own = {"user": who} if path == "/api/users/{user}/password" else {}   # one's own password
                url = path.format(**{**PATH_VALUES, "name": domain, **own})
                r = client.request(method, url, headers=headers, json=BODIES.get(path))
                if rule.role == "public":
                    assert r.status_code == 200, (method, url, who, r.text)
                    continue
                if role is None:
                    assert r.status_code == 401, (method, url, who, r.status_code)
                    continue
                denied = RANK[role] < RANK[rule.role] or (
                    rule.scoped and role == "editor" and domain not in PEOPLE[who][1])
                if denied:
                    assert r.status_code == 403, (method, url, who, r.status_code, r.text)
                    err = r.json()["error"]
                    assert err["code"] == "permission_denied" and err["type"] == "permission_error"
                else:
                    assert r.status_code not in (401, 403), (method, url, who, r.status_code, r.text)
    # the routes answered, the people are all still there
    assert {u["name"] for u in client.get("/api/users", headers=ADMIN).json()} == set(PEOPLE)


def test_a_personal_key_works_with_the_openai_client_until_it_is_revoked(client, server):
    made = client.post("/api/keys", headers=basic("ulla"), json={"label": "laptop"})
    assert made.status_code == 201
    key = made.json()["key"]
    listed = client.get("/api/keys", headers=basic("ulla")).json()
    assert [k["label"] for k in listed] == ["laptop"] and all("key" not in k and "hash" not in k for k in listed)
    assert client.get("/api/keys", headers=basic("uma")).json() == []          # someone else's keys are not listed
    oa = openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0)
    answer = oa.chat.completions.create(model="support", messages=[{"role": "user", "content": "Hello"}], max_tokens=3)
    assert answer.id and answer.choices[0].message.content is not None
    me = client.get("/api/me", headers={"Authorization": f"Bearer {key}"}).json()
    assert (me["name"], me["role"], me["via"]) == ("ulla", "user", "key")
    with pytest.raises(openai.PermissionDeniedError):     # a user's key has a user's powers
        oa.post("/../api/domains", body={"name": "mine"}, cast_to=object)
    assert client.delete(f"/api/keys/{made.json()['id']}", headers=basic("uma")).status_code == 404   # not hers
    assert client.delete(f"/api/keys/{made.json()['id']}", headers=basic("ulla")).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        oa.chat.completions.create(model="support", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def test_ratings_belong_to_who_signed_in(client):
    mine = _chat(client, basic("ulla"), content="What is a refund?")
    assert client.post("/api/feedback", headers=basic("uma"), json={"response_id": mine, "rating": "down"}
                       ).status_code == 404                      # another user's answer is not hers to rate
    as_other = client.post("/api/feedback", headers=basic("ulla"),
                           json={"response_id": mine, "rating": "up", "user": "uma"})
    assert as_other.status_code == 403 and as_other.json()["error"]["param"] == "user"
    assert client.post("/api/feedback", headers=basic("ulla"), json={"response_id": mine, "rating": "up"}
                       ).status_code == 201
    # the key holder naming "ulla" as its end user neither changes nor withdraws her rating
    client.post("/api/feedback", headers=ADMIN, json={"response_id": mine, "rating": "down", "user": "ulla"})
    assert client.post("/api/feedback/withdraw", headers=basic("uma"), json={"response_id": mine}).status_code == 200
    hers = client.get("/api/feedback", headers=basic("ulla")).json()
    assert [(f["response_id"], f["rating"]) for f in hers] == [(mine, "up")]
    assert client.get("/api/feedback", headers=basic("uma")).json() == []
    assert {f["rating"] for f in client.get("/api/feedback", headers=ADMIN).json() if f["response_id"] == mine} \
        == {"up", "down"}


def test_a_stored_response_is_read_and_continued_by_its_owner_only(client):
    r = client.post("/v1/responses", headers=basic("ulla"), json={"model": "base", "input": "Hi",
                                                                   "max_output_tokens": 3})
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    assert client.get(f"/v1/responses/{rid}", headers=basic("ulla")).json()["id"] == rid
    assert client.get(f"/v1/responses/{rid}", headers=basic("uma")).status_code == 404   # as if it did not exist
    cont = client.post("/v1/responses", headers=basic("uma"), json={"model": "base", "input": "More",
                                                                    "previous_response_id": rid, "max_output_tokens": 3})
    assert cont.status_code == 404 and cont.json()["error"]["param"] == "previous_response_id"
    assert client.delete(f"/v1/responses/{rid}", headers=basic("uma")).status_code == 404
    assert client.get(f"/v1/responses/{rid}", headers=ADMIN).status_code == 200
    assert client.post("/api/feedback", headers=basic("ulla"), json={"response_id": rid, "rating": "up"}
                       ).status_code == 201                     # rated like any of her answers
    assert client.delete(f"/v1/responses/{rid}", headers=basic("ulla")).json()["deleted"] is True
    assert client.get(f"/v1/responses/{rid}", headers=basic("ulla")).status_code == 404


def test_a_users_correction_waits_for_review_before_it_can_train(client, server):
    rid = _chat(client, basic("uma"), content="How long do refunds take?")
    correction = "Refunds take five working days."
    assert client.post("/api/feedback", headers=basic("uma"), json={"response_id": rid, "rating": "down",
                                                                    "correction": correction}).status_code == 201

    def exported():
        r = client.get("/api/domains/support/dataset/export", headers=basic("eddie"))
        return [json.loads(line)["messages"][-1]["content"] for line in r.text.splitlines()]

    assert correction not in exported()
    queue = client.get("/api/domains/support/review?status=pending", headers=basic("eddie")).json()
    [item] = [q for q in queue if q["messages"][-1]["content"] == correction]
    assert client.get("/api/domains/support/dataset", headers=basic("eddie")).json()["removed"]["pending"] >= 1
    assert client.post("/api/domains/support/review", headers=basic("ulla"),
                       json={"keys": [item["key"]], "status": "approved"}).status_code == 403
    assert client.post("/api/domains/support/review", headers=basic("eddie"),
                       json={"keys": [item["key"]], "status": "approved"}).json()["reviewed"] == 1
    assert correction in exported()
    # a second one, approved with every other pending item from the Data tab
    rid = _chat(client, basic("uma"), content="Can I pay by card?")
    client.post("/api/feedback", headers=basic("uma"), json={"response_id": rid, "rating": "down",
                                                             "correction": "Yes, every major card works."})
    assert "Yes, every major card works." not in exported()
    assert "approved 1 pending item" in approve_pending(_workspace(server), "support")   # the Data tab's button
    assert "Yes, every major card works." in exported()
    # an editor's own correction is trusted at once
    rid = _chat(client, basic("eddie"), content="Do you ship abroad?")
    client.post("/api/feedback", headers=basic("eddie"), json={"response_id": rid, "rating": "down",
                                                               "correction": "We ship to every EU country."})
    assert "We ship to every EU country." in exported()
    audit = client.get("/api/audit", headers=ADMIN).json()
    assert any(a["who"] == "eddie" and a["action"] == "POST /api/domains/{name}/review" for a in audit)


def test_an_uploaded_card_brings_its_description_only(client, server, tiny_llama, tmp_path):
    folder = random_lora_adapter(tiny_llama, tmp_path / "forged", std=0.01)
    (folder / "card.json").write_text(json.dumps({
        "description": "A support adapter.", "job_id": "0" * 16, "metrics": {"gate": {"promote": True}},
        "gate": {"promote": True, "summary": "passed every check"}, "override": {"by": "ada"}, "created_by": "ada"}))
    r = client.post("/api/domains/support/adapters", headers={**basic("eddie"), "Content-Type": "application/zip"},
                    content=zipped(folder))
    assert r.status_code == 201, r.text
    [card] = [a["card"] for a in client.get("/api/domains/support/adapters", headers=ADMIN).json()
              if a["version"] == r.json()["version"]]
    assert card["description"] == "A support adapter." and card["imported"] is True and card["imported_by"] == "eddie"
    assert not {"job_id", "metrics", "gate", "override", "created_by"} & set(card)
    version = r.json()["version"]
    assert client.post(f"/api/domains/support/adapters/{version}/activate", headers=basic("eddie"),
                       json={"override": True}).status_code == 200
    [entry] = client.get(f"/api/audit?target={version}", headers=ADMIN).json()
    assert entry["who"] == "eddie" and entry["domain"] == "support" and entry["action"].endswith("/activate")
    shown, _ = show_card(_workspace(server), "support", version)   # the card in the Adapters tab
    assert "eddie" in shown and "activated (API)" in shown
    assert any(a["who"] == "eddie" and a["action"] == "POST /api/domains/{name}/adapters"
               for a in client.get("/api/audit?domain=support", headers=ADMIN).json())


def test_a_users_requests_per_minute_are_capped_before_any_engine_work(client):
    for _ in range(PER_MINUTE):
        _chat(client, basic("quinn"))
    r = client.post("/v1/chat/completions", headers=basic("quinn"),
                    json={"model": "support", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    _chat(client, basic("eddie"))                  # editors are not counted


def test_sign_out_and_a_password_change_end_sessions_and_failed_sign_ins_back_off(client, server):
    def sign_in(name, password):
        return client.post("/login", data={"username": name, "password": password, "next": "/"},
                           follow_redirects=False)

    r = sign_in("uma", PASSWORD)
    assert r.status_code == 303
    cookie = {"Cookie": f"assistant_session={r.cookies['assistant_session']}"}
    assert client.get("/api/me", headers=cookie).json()["name"] == "uma"
    client.get("/logout", headers=cookie, follow_redirects=False)
    assert client.get("/api/me", headers=cookie).status_code == 401        # the copied cookie is dead too

    cookie = {"Cookie": f"assistant_session={sign_in('uma', PASSWORD).cookies['assistant_session']}"}
    assert client.post("/api/users/uma/password", headers=basic("uma"),
                       json={"password": "a-new-secret-1"}).status_code == 200
    assert client.get("/api/me", headers=cookie).status_code == 401
    assert client.get("/api/me", headers=basic("uma")).status_code == 401
    assert client.get("/api/me", headers=basic("uma", "a-new-secret-1")).json()["role"] == "user"

    for _ in range(5):
        assert sign_in("uma", "wrong-password").status_code == 401
    refused = sign_in("uma", "a-new-secret-1")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 60


def test_the_cli_adds_a_user_the_running_server_knows_at_once(client, server):
    url, home = server
    import os
    env = dict(os.environ, ASSISTANT_HOME=str(home))
    out = subprocess.run([sys.executable, "-m", "assistant.cli", "users", "add", "carl", "--role", "editor",
                          "--domains", "other", "--password-stdin"], input="carl-password-1\n", text=True,
                         capture_output=True, env=env, cwd=str(home), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "carl-password-1" not in out.stdout + out.stderr
    me = client.get("/api/me", headers=basic("carl", "carl-password-1")).json()
    assert (me["role"], me["domains"]) == ("editor", ["other"])
    bad = subprocess.run([sys.executable, "-m", "assistant.cli", "users", "add", "dora", "--password-stdin"],
                         input="short\n", text=True, capture_output=True, env=env, cwd=str(home), timeout=120)
    assert bad.returncode == 2 and "password" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.browser
def test_in_the_browser_a_user_sees_chat_only_and_an_editor_every_tab(server, tmp_path):
    import browser_story
    if not browser_story.CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    url, _ = server
    seen = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(browser_story.CHROMIUM), args=browser_story.CHROMIUM_ARGS)
        try:
            for name, width in (("ulla", 1400), ("eddie", 390)):
                page = browser.new_context(viewport={"width": width, "height": 900}).new_page()
                page.set_default_timeout(30_000)
                page.goto(url + "/")                                  # redirected to the sign-in page
                page.fill("#username", name)
                page.fill("#password", PASSWORD)
                page.click("#login")
                page.wait_for_selector("#tab-chat-button, button:has-text('Chat')")
                page.wait_for_timeout(1500)                            # the role's view is applied on load
                seen[name] = {t.inner_text().strip() for t in page.locator("[role=tab]").all() if t.is_visible()}
                page.screenshot(path=str(tmp_path / f"roles-{name}-{width}.png"))
        finally:
            browser.close()
    assert "Chat" in seen["ulla"] and not {"Adapters", "Data", "Train", "Monitor"} & seen["ulla"], seen
    assert {"Chat", "Adapters", "Data", "Train", "Monitor"} <= seen["eddie"], seen


def test_a_user_calling_an_editors_ui_event_directly_is_refused(server):
    from gradio_client import Client
    url, _ = server
    ui = Client(url + "/", auth=("ulla", PASSWORD), verbose=False)
    with pytest.raises(Exception) as refused:
        ui.predict("by-a-user", "", "", "base", api_name="/create_from_adapters")
    assert "editor role is needed" in str(refused.value)
    editor = Client(url + "/", auth=("eddie", PASSWORD), verbose=False)
    editor.predict("ui-made", "", "", "base", api_name="/create_from_adapters")
    made = [d["name"] for d in httpx.get(url + "/api/domains", headers=ADMIN).json()]
    assert "ui-made" in made
    audit = httpx.get(url + "/api/audit", headers=ADMIN).json()
    assert any(a["who"] == "eddie" and a["action"] == "UI create_from_adapters" and "ui-made" in a["detail"]["values"]
               for a in audit)


def test_on_postgresql_a_session_ended_on_one_replica_is_refused_by_the_other(tmp_path, tiny_llama, postgres_url):
    common = ["--database-url", postgres_url, "--adapters-dir", str(tmp_path / "shared"), "--base-model",
              str(tiny_llama), "--dtype", "float32", "--api-key", API_KEY, "--embedded-worker", "false"]
    env = {"ASSISTANT_SESSION_SECRET": "one-secret-for-every-replica"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with running_server(tmp_path / "a", *common, env=env, timeout=300) as (a, _), \
            running_server(tmp_path / "b", *common, env=env, timeout=300) as (b, _):
        A, B = httpx.Client(base_url=a, timeout=60), httpx.Client(base_url=b, timeout=60)
        assert A.post("/api/users", headers=ADMIN, json={"name": "pia", "password": PASSWORD, "role": "editor",
                                                         "domains": ["support"]}).status_code == 201
        assert B.get("/api/me", headers=basic("pia")).json()["domains"] == ["support"]   # one directory

        def signed_in():
            r = A.post("/login", data={"username": "pia", "password": PASSWORD, "next": "/"}, follow_redirects=False)
            return {"Cookie": f"assistant_session={r.cookies['assistant_session']}"}

        cookie = signed_in()
        assert B.get("/api/me", headers=cookie).json()["name"] == "pia"
        A.get("/logout", headers=cookie, follow_redirects=False)
        assert B.get("/api/me", headers=cookie).status_code == 401
        cookie = signed_in()
        assert B.post("/api/users/pia/password", headers=basic("pia"), json={"password": "another-one-2"}
                      ).status_code == 200
        assert A.get("/api/me", headers=cookie).status_code == 401
        assert A.get("/api/audit", headers=ADMIN).json()[0]["action"] == "password changed"
