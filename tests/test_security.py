"""Safe to expose: auth on every mutating endpoint, --share refused without auth, body size limits, and
Gradio's file routes never serving the state dir or the adapters dir (a live server, real HTTP)."""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
from urllib.parse import quote

import httpx
import pytest

from helpers import running_server

pytestmark = pytest.mark.slow

API_KEY = "test-key-" + "k" * 16
USER, PASSWORD = "alice", "wonderland-7"
PATH_VALUES = {"name": "support", "version": "v1", "job_id": "0123456789abcdef", "user": USER, "key_id": "1",
               "response_id": "resp_0123456789abcdef"}


def _mutating_routes(openapi: dict) -> list[tuple[str, str]]:
    out = []
    for path, ops in openapi["paths"].items():
        for method in ops:
            if method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
                out.append((method.upper(), path.format(**PATH_VALUES)))
    return out


@pytest.fixture(scope="module")
def protected(tmp_path_factory, tiny_llama):
    home = tmp_path_factory.mktemp("secure-home")
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32", "--api-key", API_KEY,
                        "--auth", f"{USER}:{PASSWORD}") as (url, _):
        yield url


def test_every_mutating_endpoint_refuses_unauthenticated_calls(protected):
    c = httpx.Client(base_url=protected, timeout=30)
    routes = _mutating_routes(c.get("/api/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json())
    must = {("POST", "/v1/chat/completions"), ("POST", "/api/feedback"), ("POST", "/api/domains"),
            ("POST", "/api/domains/support/examples"), ("POST", "/api/domains/support/train"),
            ("POST", "/api/domains/support/adapters"), ("POST", "/api/domains/support/adapters/v1/activate"),
            ("DELETE", "/api/jobs/0123456789abcdef")}
    assert must <= set(routes), f"missing from the app: {must - set(routes)}"
    wrong_basic = "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode()
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": wrong_basic},
                        {"Authorization": "Basic !!notbase64"}):
            r = c.request(method, path, headers=headers, json={"name": "x", "model": "base", "messages": []})
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            assert "credentials" in r.json()["error"]["message"]
    # nothing was created by the refused calls
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert c.get("/api/domains", headers=good).json() == []
    # the same endpoints work with either credential
    assert c.post("/api/domains", json={"name": "support"}, headers=good).status_code == 201
    basic = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    r = c.post("/v1/chat/completions", headers=basic,
               json={"model": "support", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    # reads are protected too, and the metrics
    for path in ("/v1/models", "/api/domains", "/api/domains/support/metrics", "/metrics"):
        assert c.get(path).status_code == 401, path
    # the UI's own endpoints need a login
    assert c.get("/config").status_code == 401
    assert c.post("/gradio_api/queue/join", json={"fn_index": 0, "data": [], "session_hash": "x"}).status_code in (401, 403)


def test_request_size_is_limited(protected):
    from assistant.settings import MAX_REQUEST_BYTES
    big = b'{"model": "base", "messages": [{"role": "user", "content": "' + b"a" * (MAX_REQUEST_BYTES + 10) + b'"}]}'
    r = httpx.post(protected + "/v1/chat/completions", content=big, timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_share_without_auth_exits_with_a_clear_error(tmp_path):
    env = dict(os.environ, ASSISTANT_HOME=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "assistant.cli", "serve", "--share", "--port", "1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert p.returncode != 0
    assert "--share" in p.stderr and "--auth" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "data").exists()          # refused before touching any state


def _raw_get(url: str, target: str) -> bytes:
    """Send the request line exactly as written (clients normalise '..' and '%2e' away)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=15) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_file_routes_never_serve_state_or_adapters(tmp_path, tiny_llama):
    """An open server (no auth: the worst case) with sentinel files in the state dir and the adapters dir."""
    secret = secrets.token_hex(24).encode()
    with running_server(tmp_path, "--base-model", str(tiny_llama), "--dtype", "float32") as (url, _):
        httpx.post(url + "/api/domains", json={"name": "support"})
        state, adapters = tmp_path / "data", tmp_path / "adapters"
        targets = {state / "sentinel.txt": secret, adapters / "support" / "sentinel.txt": secret}
        for p, data in targets.items():
            p.write_bytes(data)
        db = (state / "assistant.db").read_bytes()[:100]   # the SQLite header ("SQLite format 3")
        leaks = []
        prefixes = ["/gradio_api/file=", "/file=", "/gradio_api/file/", "/gradio_api/proxy=", "/proxy=",
                    "/gradio_api/static/", "/static/", "/assets/", "/gradio_api/assets/", "/favicon.ico/",
                    "/gradio_api/stream/", "/"]
        payloads = []
        for f in [*targets, state / "assistant.db", adapters / "support" / "domain.toml"]:
            rel = os.path.relpath(f, tmp_path)
            payloads += [str(f), quote(str(f)), quote(quote(str(f), safe="")), rel, "./" + rel,
                         "../" * 12 + str(f).lstrip("/"), "..%2f" * 12 + quote(str(f).lstrip("/"), safe=""),
                         "%2e%2e/" * 12 + str(f).lstrip("/"), "/tmp/../" + str(f).lstrip("/"),
                         str(f).replace("/", "//"), str(f).replace("/", "\\"), str(f) + "%00.png",
                         f"{tmp_path}/data/../data/{f.name}" if f.parent == state else str(f)]
        for prefix in prefixes:
            for payload in payloads:
                target = prefix + payload
                if not target.startswith("/"):
                    continue
                resp = _raw_get(url, target.replace(" ", "%20"))
                if secret in resp or (db[:16] in resp and b"SQLite format 3" in resp):
                    leaks.append(target)
                # the same through a normalising client
                try:
                    body = httpx.get(url + target, timeout=15).content
                except httpx.HTTPError:
                    continue
                if secret in body or b"SQLite format 3" in body:
                    leaks.append("httpx " + target)
        assert not leaks, f"served a protected file: {leaks[:5]}"

        # The route itself works (so the refusals above are not vacuous): an uploaded file comes back.
        up = httpx.post(url + "/gradio_api/upload", files={"files": ("note.txt", b"hello upload")}, timeout=15)
        assert up.status_code == 200, up.text
        assert httpx.get(url + "/gradio_api/file=" + up.json()[0], timeout=15).content == b"hello upload"


def _all_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, the mounted Gradio UI's included."""
    from starlette.routing import Mount
    out = []

    def walk(routes, prefix=""):
        for r in routes:
            if isinstance(r, Mount):
                walk(getattr(r.app, "routes", None) or r.routes, prefix + r.path)
            elif hasattr(r, "original_router"):        # FastAPI's included routers
                walk(r.original_router.routes, prefix)
            elif hasattr(r, "path"):
                for m in sorted(getattr(r, "methods", None) or ["GET"]):
                    out.append((m, prefix + r.path))
    walk(app.routes)
    return out


def _fill(path: str) -> str:
    import re
    return re.sub(r"\{[^}]+\}", lambda m: PATH_VALUES.get(m.group(0)[1:-1].split(":")[0], "x"), path)


def test_every_route_of_the_app_and_its_ui_needs_credentials(tmp_path, tiny_llama):
    """--api-key alone (no --auth) protects the UI too: one check in front of every route."""
    from assistant.api.auth import PUBLIC_PATHS
    from assistant.server import build, build_app
    from assistant.settings import Settings
    workspace, serving = build(Settings(home=tmp_path / "walk", base_model=str(tiny_llama), dtype="float32",
                                        api_key=API_KEY))
    try:
        routes = _all_routes(build_app(workspace, serving))
    finally:
        serving.close()
    paths = {p for _, p in routes}
    assert {"/gradio_api/queue/join", "/gradio_api/upload", "/config", "/v1/chat/completions", "/metrics",
            "/api/domains/{name}/train"} <= paths, sorted(paths)   # the walk really reaches the UI's routes
    home = tmp_path / "home"
    home.mkdir()
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32", "--api-key", API_KEY) as (url, _):
        c = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
        wrong = [{}, {"Authorization": "Bearer wrong"},
                 {"Authorization": "Basic " + base64.b64encode(b"anyone:wrong").decode()},
                 {"Cookie": "assistant_session=eyJ4Ijp9.00"}]
        checked = 0
        for method, path in routes:
            if path.rstrip("/") in PUBLIC_PATHS:
                continue
            for headers in wrong:
                r = c.request(method, _fill(path), headers={"Accept": "application/json", **headers},
                              json={"model": "base", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
                if method != "HEAD":
                    assert "credentials" in r.json()["error"]["message"]
                checked += 1
        assert checked >= 4 * 80
        # public: the health check says only "ok"; the sign-in page
        assert c.get("/api/health").json() == {"status": "ok"}
        assert c.get("/", headers={"Accept": "text/html"}).headers["location"].startswith("/login")
        assert c.post("/login", data={"username": "x", "password": "wrong"}).status_code == 401
        # a browser signs in with the API key and then reaches the UI; an API client with the bearer key
        r = c.post("/login", data={"username": "alice", "password": API_KEY, "next": "/"})
        assert r.status_code == 303 and "assistant_session=" in r.headers["set-cookie"]
        session = httpx.Client(base_url=url, timeout=30, cookies=r.cookies)
        assert session.get("/").status_code == 200
        assert session.get("/config").status_code == 200
        assert c.get("/api/domains", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert c.post("/login", data={"username": "a", "password": API_KEY, "next": "//evil.example"}
                      ).headers["location"] == "/"
