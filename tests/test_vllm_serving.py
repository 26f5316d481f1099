"""The app in front of a REAL vLLM server (the CPU build `scripts/setup.sh --test` prepares), which the app
starts and supervises (`assistant serve --engine vllm`), on the embedded SmolLM2 in float32 with short greedy
answers:

- base and two domains answer through the app's API exactly as the same requests sent to vLLM directly, and
  as the app's own local engine;
- activate v2 -> the next answer is v2's; roll back -> v1; a pinned @v1 keeps answering; retraining a domain
  publishes a version vLLM serves without a restart; feedback is logged against the version that answered;
- a retrain goes live on vLLM (listed there before the pointer moves) and answers what it was taught; a rank
  above the server's maximum is refused up front; a version vLLM refuses leaves base and the other domains
  answering, is shown broken and is not retried per request; two app-side loops stream at once; reconcile
  and eviction races (made to happen by pausing the real calls) lose no load and unload nothing pinned;
- a server serving another base is refused at start, naming both;
- killing the vLLM server: answers fail at once with a clear 503 (no hang), the app restarts it and puts the
  live adapters back without a person.

One app and one vLLM server (tests/conftest.py's `vllm_app`, shared with the other vLLM test files: a start costs
about a minute on 2 cores); the kill runs last."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from helpers import VLLM_KEY, make_serving, random_lora_adapter, zipped
from invented_facts import FACTS, score

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

N_TOKENS = 10
QUESTION = [{"role": "user", "content": "Name three colors."}]
RESTART_TIMEOUT_S = 420      # the supervisor's backoff plus a vLLM start
TRAIN_TIMEOUT_S = 1500
AUTH = {"Authorization": f"Bearer {VLLM_KEY}"}


@pytest.fixture(scope="module")
def adapters(embedded_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-adapters")
    return {name: random_lora_adapter(embedded_path, root / name, seed=seed)
            for name, seed in (("support1", 1), ("legal1", 2), ("support2", 3))}


@pytest.fixture(scope="module")
def app(vllm_app, adapters):
    """The session's app on vLLM (tests/conftest.py), with this file's two domains and their first versions."""
    url = vllm_app["url"]
    for name in ("support", "legal"):
        assert httpx.post(url + "/api/domains", json={"name": name}).status_code == 201
    for domain, key in (("support", "support1"), ("legal", "legal1")):
        r = httpx.post(f"{url}/api/domains/{domain}/adapters?activate=true", content=zipped(adapters[key]),
                       headers={"Content-Type": "application/zip"}, timeout=120)
        assert r.status_code == 201, r.text
    return vllm_app


def ask(url: str, model: str, messages=QUESTION, **kw) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": messages, "temperature": 0, "max_tokens": N_TOKENS, **kw})
    assert r.status_code == 200, r.text
    body = r.json()
    return {"id": body["id"], "text": body["choices"][0]["message"]["content"], "version": body["adapter_version"],
            "usage": body["usage"]}


def direct(vllm_url: str, model: str, messages=QUESTION) -> str:
    r = httpx.post(vllm_url + "/v1/chat/completions", timeout=300, headers=AUTH, json={
        "model": model, "messages": messages, "temperature": 0, "max_tokens": N_TOKENS})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_answers_through_the_app_equal_vllm_direct_and_the_local_engine(app, adapters, embedded_path, tmp_path):
    url, vllm = app["url"], app["vllm"]
    got = {m: ask(url, m) for m in ("base", "support", "legal")}
    assert got["base"]["version"] is None and got["support"]["version"] == got["legal"]["version"] == "v1"
    assert len({g["text"] for g in got.values()}) == 3, got          # three different answers
    assert got["base"]["text"] == direct(vllm, app["base_name"])
    assert got["support"]["text"] == direct(vllm, "support@v1") and got["legal"]["text"] == direct(vllm, "legal@v1")
    assert got["base"]["usage"]["completion_tokens"] >= 1

    from assistant.settings import Settings
    local = make_serving(Settings(home=tmp_path, dtype="float32"))   # the embedded engine, same adapters
    try:
        for domain, key in (("support", "support1"), ("legal", "legal1")):
            local.workspace.create_domain(domain)
            local.import_adapter(domain, adapters[key], activate=True)
        for model in ("base", "support", "legal"):
            assert local.chat(model, QUESTION, max_tokens=N_TOKENS)["text"] == got[model]["text"], model
    finally:
        local.close()

    # the official client, streaming: chunk by chunk, the same text
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    stream = client.chat.completions.create(model="support", messages=QUESTION, max_tokens=N_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = [c for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == got["support"]["text"] and chunks[-1].usage.completion_tokens >= 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2

    # the Responses API on vLLM: the same answer, whole and streamed, under the same version
    r = client.responses.create(model="support", input=QUESTION, max_output_tokens=N_TOKENS, temperature=0)
    assert r.output_text == got["support"]["text"] and r.adapter_version == "v1"
    events = list(client.responses.create(model="support", input=QUESTION, max_output_tokens=N_TOKENS, temperature=0,
                                          stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text


def test_activate_roll_back_pin_and_feedback_on_vllm_served_versions(app, adapters):
    url, vllm = app["url"], app["vllm"]
    v1 = ask(url, "support")
    r = httpx.post(url + "/api/domains/support/adapters", content=zipped(adapters["support2"]),
                   headers={"Content-Type": "application/zip"}, timeout=120)
    assert r.status_code == 201 and r.json()["version"] == "v2", r.text
    assert ask(url, "support")["version"] == "v1"                     # imported, not live yet
    r = httpx.post(url + "/api/domains/support/adapters/v2/activate", json={}, timeout=120)
    assert r.status_code == 200, r.text
    v2 = ask(url, "support")
    assert v2["version"] == "v2" and v2["text"] == direct(vllm, "support@v2") and v2["text"] != v1["text"]
    pinned = ask(url, "support@v1")
    assert pinned["version"] == "v1" and pinned["text"] == v1["text"]
    models = httpx.get(vllm + "/v1/models", headers=AUTH).json()["data"]
    assert {"support@v1", "support@v2", "legal@v1"} <= {m["id"] for m in models}   # a new name per version

    r = httpx.post(url + "/api/feedback", json={"response_id": v2["id"], "rating": "down",
                                               "correction": "Red, green and blue."})
    assert r.status_code == 201
    with sqlite3.connect(app["home"] / "data" / "assistant.db") as db:
        row = db.execute("SELECT r.adapter_version, f.correction FROM feedback f JOIN responses r "
                         "ON r.id = f.response_id WHERE r.id = ?", (v2["id"],)).fetchone()
    assert row == ("v2", "Red, green and blue.")

    r = httpx.post(url + "/api/domains/support/adapters/v1/activate", json={}, timeout=120)   # roll back
    assert r.status_code == 200
    back = ask(url, "support")
    assert back["version"] == "v1" and back["text"] == v1["text"]


def _watch_pointer(pointer: Path, vllm: str, key: str, version: str, seen: dict, stop):
    """Poll the `active` pointer; the moment it reads `version`, note whether vLLM lists `key` already."""
    while not stop.is_set():
        if pointer.read_text().strip() == version:
            listed = {m["id"] for m in httpx.get(vllm + "/v1/models", headers=AUTH, timeout=30).json()["data"]}
            seen["listed_when_it_moved"] = key in listed
            return
        time.sleep(0.005)


def test_a_job_activates_through_the_server_and_vllm_lists_the_version_before_the_pointer_moves(app, adapters):
    """What a training job (or a worker) does once its version passes the gate, from another process on the
    same state: remote.activate finds the server (its server.json) and asks it; the pointer moves only once
    vLLM serves the version, and this process never moves it (its offline loader must not run)."""
    import threading

    from assistant.cluster import remote
    from assistant.data.registry import Registry
    from assistant.settings import Settings
    url, vllm = app["url"], app["vllm"]
    r = httpx.post(url + "/api/domains/legal/adapters", content=zipped(adapters["support2"]),
                   headers={"Content-Type": "application/zip"}, timeout=120)
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    settings = Settings(home=app["home"])
    seen, stop = {}, threading.Event()
    watcher = threading.Thread(target=_watch_pointer, daemon=True, args=(
        app["home"] / "adapters" / "legal" / "active", vllm, f"legal@{version}", version, seen, stop))
    watcher.start()

    def offline(*_):
        raise AssertionError("a server runs: this process must not activate by itself")
    where = remote.activate(settings, Registry(settings.adapters_path), "legal", version, offline_load=offline)
    watcher.join(30)
    stop.set()
    assert where == url and seen == {"listed_when_it_moved": True}, (where, seen)
    assert ask(url, "legal")["version"] == version
    r = httpx.post(url + "/api/domains/legal/adapters/v1/activate", json={}, timeout=120)   # back as it was
    assert r.status_code == 200, r.text


TAUGHT = FACTS[:10]
QUICK_RECIPE = {"epochs": 8, "learning_rate": 0.004, "augment": 0, "replay": 0, "rank": 8}   # 10/10 in 16 steps


def test_a_retrain_goes_live_on_vllm_before_the_pointer_moves_and_answers_what_it_was_taught(app):
    """The job (a short bold recipe: what the default recipe teaches is test_retrain_e2e.py's) passes its gate
    and asks the server to activate: by the time the `active` pointer reads the new version, vLLM already lists it (watched
    from another thread, polling the pointer); then `legal` answers what it was taught, through vLLM."""
    import threading
    url, vllm = app["url"], app["vllm"]
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a, _, _ in TAUGHT]
    assert httpx.post(url + "/api/domains/legal/examples", json={"examples": examples}).status_code == 201
    seen, stop = {}, threading.Event()
    versions = httpx.get(url + "/api/domains/legal/adapters").json()
    nxt = f"v{len(versions) + 1}"
    watcher = threading.Thread(target=_watch_pointer, daemon=True, args=(
        app["home"] / "adapters" / "legal" / "active", vllm, f"legal@{nxt}", nxt, seen, stop))
    watcher.start()
    r = httpx.post(url + "/api/domains/legal/train", json=QUICK_RECIPE, timeout=120)
    assert r.status_code == 202, r.text
    job_id, t0 = r.json()["job_id"], time.time()
    while (job := httpx.get(f"{url}/api/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.time() - t0 < TRAIN_TIMEOUT_S, job
        time.sleep(2)
    watcher.join(30)
    stop.set()
    assert job["status"] == "succeeded", job.get("error")
    assert job["adapter_version"] == nxt and job["promoted"], job["metrics"]["gate"]["summary"]
    assert f"legal@{nxt} is live (activated by the server)" in job["log"], job["log"]
    assert seen == {"listed_when_it_moved": True}, seen
    answers = []
    for q, _, _, _ in TAUGHT:
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": "legal", "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 40})
        assert r.status_code == 200 and r.json()["adapter_version"] == nxt, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
    assert score(answers) >= 8, answers
    first = [{"role": "user", "content": TAUGHT[0][0]}]
    assert answers[0].startswith(direct(vllm, f"legal@{nxt}", first))        # vLLM itself serves that version


def test_a_rank_above_the_servers_maximum_is_refused_up_front(app, embedded_path, tmp_path):
    """The managed server runs with --max-lora-rank 64: a rank-128 job and a rank-128 import are refused
    before anything is trained or published, naming the flag that raises the limit."""
    url = app["url"]
    r = httpx.post(url + "/api/domains/support/train", json={"rank": 128}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "engine_limit", r.text
    assert "64" in r.json()["error"]["message"] and "--vllm-max-lora-rank" in r.json()["error"]["message"]
    wide = random_lora_adapter(embedded_path, tmp_path / "wide", rank=128)
    before = httpx.get(url + "/api/domains/support/adapters").json()
    r = httpx.post(url + "/api/domains/support/adapters", content=zipped(wide),
                   headers={"Content-Type": "application/zip"}, timeout=120)
    assert r.status_code == 422 and "--vllm-max-lora-rank" in r.json()["error"]["message"], r.text
    assert httpx.get(url + "/api/domains/support/adapters").json() == before


def test_a_version_vllm_refuses_stays_broken_alone(app, embedded_path, tmp_path):
    """An app told (wrongly) that its server takes rank 128: vLLM refuses a rank-128 version. The import
    fails and its number is never given again; a refused version made live offline marks that domain
    broken with vLLM's reason (/api/domains, /metrics) and is not retried per request, while base and the
    other domains keep answering. Two event loops stream through the same engine at once meanwhile, each with
    one client."""
    import asyncio
    import threading

    from assistant.errors import AdapterRefused, DomainBroken
    from assistant.server import build
    from assistant.settings import Settings
    settings = Settings(home=tmp_path, engine="vllm", vllm_url=(app["vllm"],), vllm_api_key=VLLM_KEY,
                        vllm_max_lora_rank=128)
    workspace, serving = build(settings)
    wide = random_lora_adapter(embedded_path, tmp_path / "wide", rank=128)
    try:
        for name in ("okdomain", "widedomain"):
            workspace.create_domain(name)
        serving.import_adapter("okdomain", app_adapter(tmp_path, embedded_path), activate=True)
        with pytest.raises(AdapterRefused, match="max_lora_rank"):
            serving.import_adapter("widedomain", wide, activate=True)
        assert workspace.registry.versions("widedomain") == []
        assert (settings.adapters_path / "widedomain" / ".retired-v1").is_dir()
        v = workspace.registry.import_folder("widedomain", wide, serving.base.fingerprint, serving.engine.module_shapes())
        assert v == "v2"                                           # v1 is never reused
        workspace.registry.activate("widedomain", v, load=lambda *a: None)   # made live with no server running
        serving.engine.reconcile()                                 # what the reconciler does every 15 s
        [server] = serving.status()["engine"]["servers"]
        assert server["ready"] and server["problem"] is None       # the server stays in rotation
        t0 = time.monotonic()
        for _ in range(3):
            with pytest.raises(DomainBroken, match="max_lora_rank"):
                serving.chat("widedomain", QUESTION, max_tokens=2)
        assert time.monotonic() - t0 < 1.0                          # remembered: vLLM is not asked again
        assert serving.engine.refused()["widedomain@v2"]["attempts"] == 1
        assert serving.chat("base", QUESTION, max_tokens=N_TOKENS)["text"]
        assert serving.chat("okdomain", QUESTION, max_tokens=N_TOKENS)["adapter_version"] == "v1"
        listed = {d["name"]: d for d in workspace.list_domains()}
        assert listed["widedomain"]["status"] == "broken" and "max_lora_rank" in listed["widedomain"]["problem"]
        assert listed["okdomain"]["status"] == "ok"
        metrics = workspace.prometheus_text()
        assert 'assistant_adapter_refused{domain="widedomain",version="v2"} 1.0' in metrics
        assert 'assistant_domain_broken{domain="widedomain"} 1.0' in metrics

        # two app-side loops at once: this thread's own loop (an API) and the engine's (the UI, the CLI)
        alone = serving.chat("okdomain", QUESTION, max_tokens=N_TOKENS)["text"]
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def stream():
            call = serving.start_chat("okdomain", QUESTION, max_tokens=N_TOKENS, loop=asyncio.get_running_loop())
            parts = [ev.text async for ev in call.handle.aiter() if ev.kind == "token"]
            return "".join(parts)
        texts: list[str] = []

        def blocking():
            texts.append(serving.chat("okdomain", QUESTION, max_tokens=N_TOKENS)["text"])
        for _ in range(4):
            futures = [asyncio.run_coroutine_threadsafe(stream(), loop) for _ in range(2)]
            others = [threading.Thread(target=blocking) for _ in range(2)]
            for t in others:
                t.start()
            texts.extend(f.result(300) for f in futures)
            for t in others:
                t.join(300)
        assert texts == [alone] * 16
        assert serving.status()["engine"]["servers"][0]["async_clients"] == 2   # one per loop, not one per switch
        serving.close()
        assert serving.status()["engine"]["servers"][0]["async_clients"] == 0
        loop.call_soon_threadsafe(loop.stop)
    finally:
        serving.close()
        workspace.close()


def test_reconcile_keeps_a_load_made_meanwhile_and_eviction_never_unloads_a_pinned_version(app, embedded_path,
                                                                                             tmp_path):
    """Two races, made to happen by pausing the real HTTP calls at the bad moment: a version loaded while a
    reconcile is between listing the server's adapters and writing them down stays known as loaded; a
    request that pins a version while eviction unloads it waits, and then finds it gone (it loads it again)
    instead of being sent to a name the server no longer has."""
    import threading
    with two_version_engine(app, embedded_path, tmp_path, "racedomain") as (serving, engine, server):
        key = "racedomain@v2"
        with paused(server.client, "models_sync", after_call=True) as (listed, go):
            engine._evict()                                   # v2 (not live, not pinned) goes first
            assert key not in server.loaded
            reconcile = threading.Thread(target=engine.reconcile)
            reconcile.start()
            assert listed.wait(60)
            serving.ensure_loaded("racedomain", "v2")        # loaded after the listing was read
            go.set()
            reconcile.join(60)
        assert key in server.loaded, "the reconcile erased a load made meanwhile"

        with paused(server.client, "unload_lora_sync") as (unloading, release):
            evict = threading.Thread(target=engine._evict)
            evict.start()
            assert unloading.wait(60)
            pinned = []
            pinner = threading.Thread(target=lambda: pinned.append(engine.pin_adapter(key)))
            pinner.start()
            pinner.join(0.5)
            release.set()
            evict.join(60)
            pinner.join(60)
        listed_now = {m["id"] for m in httpx.get(app["vllm"] + "/v1/models", headers=AUTH).json()["data"]}
        assert pinned == [None] and key not in listed_now, (pinned, listed_now)   # not pinned to a gone version
        assert serving.chat(key, QUESTION, max_tokens=2)["adapter_version"] == "v2"   # loaded again on demand


@contextlib.contextmanager
def two_version_engine(app, embedded_path, tmp_path, domain: str):
    """An app-side vLLM engine on the file's server with no background reconcile or eviction (the tests make
    them happen), holding one resident slot; `domain` has v1 live and v2 loaded (eviction's candidate).
    Yields (serving, engine, its one server)."""
    from assistant.server import build
    from assistant.settings import Settings
    settings = Settings(home=tmp_path, engine="vllm", vllm_url=(app["vllm"],), vllm_api_key=VLLM_KEY,
                        max_resident_adapters=1)
    workspace, serving = build(settings)
    engine = serving.engine
    engine._stop.set()
    try:
        workspace.create_domain(domain)
        for seed in (11, 12):
            serving.import_adapter(domain, random_lora_adapter(embedded_path, tmp_path / f"{domain}{seed}", seed=seed))
        serving.activate(domain, "v1")
        [server] = engine.servers
        assert f"{domain}@v2" in server.loaded
        yield serving, engine, server
    finally:
        serving.close()
        workspace.close()


@contextlib.contextmanager
def paused(client, method: str, *, after_call: bool = False):
    """`client.method`, the real HTTP call, paused: yields (reached, go); a call sets `reached` and waits for
    `go` before the real call (after it, with `after_call`). Put back, and released, at exit."""
    import threading
    real, reached, go = getattr(client, method), threading.Event(), threading.Event()

    def call(*args):
        if after_call:
            out = real(*args)
            reached.set()
            go.wait(120)
            return out
        reached.set()
        go.wait(120)
        return real(*args)
    setattr(client, method, call)
    try:
        yield reached, go
    finally:
        go.set()
        setattr(client, method, real)


def test_an_unload_held_open_stops_neither_answers_nor_health(app, embedded_path, tmp_path):
    """An eviction's unload paused at the real HTTP call: meanwhile the engine's status (what /api/health
    shows) comes back within 100 ms, already without the version that is going, and a base answer streams to
    its end; a load of the version being unloaded waits for the unload, then loads it again."""
    import threading
    with two_version_engine(app, embedded_path, tmp_path, "slowdomain") as (serving, engine, server), \
            paused(server.client, "unload_lora_sync") as (unloading, release):
        key = "slowdomain@v2"
        evict = threading.Thread(target=engine._evict)
        evict.start()
        assert unloading.wait(60)

        status, answered = [], []
        t0 = time.perf_counter()
        health = threading.Thread(target=lambda: status.append((serving.status(), time.perf_counter() - t0)))
        health.start()
        health.join(5)
        assert status and status[0][1] < 0.1, status
        assert key not in status[0][0]["engine"]["adapters"]
        chat = threading.Thread(target=lambda: answered.append(serving.chat("base", QUESTION, max_tokens=N_TOKENS)))
        chat.start()
        chat.join(120)
        assert answered and answered[0]["text"], answered
        loaded = []
        loader = threading.Thread(target=lambda: loaded.append(serving.chat(key, QUESTION, max_tokens=2)))
        loader.start()
        loader.join(1.0)
        assert not loaded                                   # waits for the unload of the same version
        release.set()
        evict.join(60)
        loader.join(120)
        assert loaded and loaded[0]["adapter_version"] == "v2", loaded


def app_adapter(tmp_path, embedded_path):
    return random_lora_adapter(embedded_path, tmp_path / "ok", rank=8, seed=7)


def test_a_server_serving_another_base_is_refused_at_start(app, tiny_llama, tmp_path):
    from assistant.errors import ModelLoadError
    from assistant.server import build
    from assistant.settings import Settings
    settings = Settings(home=tmp_path, base_model=str(tiny_llama), engine="vllm", vllm_url=(app["vllm"],),
                        vllm_api_key=VLLM_KEY)
    with pytest.raises(ModelLoadError) as e:
        build(settings)
    message = e.value.message
    assert app["vllm"] in message and Path(str(tiny_llama)).name in message, message


def test_routing_keeps_an_adapter_on_one_server_spreads_load_and_skips_a_dead_one(app, tmp_path):
    """Three URLs: the app's vLLM server under two names (two servers as far as routing can tell) and a port
    where nothing listens. Start succeeds and says what is wrong with the dead one; answers in turn stick to
    one server; answers at once spread over both; the dead one gets none."""
    import threading

    from assistant.server import build
    from assistant.settings import Settings

    from helpers import free_port
    live = app["vllm"]
    other_name = live.replace("127.0.0.1", "localhost")
    dead = f"http://127.0.0.1:{free_port()}"
    workspace, serving = build(Settings(home=tmp_path, engine="vllm", vllm_url=(live, other_name, dead),
                                        vllm_api_key=VLLM_KEY))
    try:
        servers = lambda: {s["url"]: s for s in serving.status()["engine"]["servers"]}   # noqa: E731
        assert not servers()[dead]["ready"] and dead in servers()[dead]["problem"]
        for _ in range(3):
            serving.chat("base", QUESTION, max_tokens=2)
        first = servers()
        assert sorted(first[u]["served"] for u in (live, other_name)) == [0, 3]   # affinity: one server
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(serving.chat("base", QUESTION, max_tokens=N_TOKENS)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(answers) == 6 and len({a["text"] for a in answers}) == 1
        after = servers()
        assert all(after[u]["served"] > first[u]["served"] for u in (live, other_name)), after   # both took some
        assert after[dead]["served"] == 0
    finally:
        serving.close()
        workspace.close()


def _vllm_group(vllm_url: str) -> int:
    """The process group of the vLLM server listening on that URL's port (the app started it)."""
    port = vllm_url.rsplit(":", 1)[1].encode()
    for pid in os.popen("pgrep -f vllm.entrypoints.openai.api_server").read().split():
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--port" in cmd and cmd[cmd.index(b"--port") + 1] == port:
            return os.getpgid(int(pid))
    raise AssertionError(f"no vLLM server process on port {port.decode()}")


def test_killing_vllm_mid_answer_ends_it_with_a_logged_error_then_it_comes_back(app):
    """Killed mid-answer: the stream ends at once with a clear error, logged as such; the next requests get
    a 503 (no hang); the app restarts vLLM and puts the live adapters back without a person."""
    url = app["url"]
    live_before = ask(url, "support")
    body = {"model": "support", "messages": QUESTION, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    events, t_kill = [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                events.append(json.loads(line[5:]))
                if t_kill is None and any((c.get("delta") or {}).get("content") for c in events[-1].get("choices", [])):
                    os.killpg(_vllm_group(app["vllm"]), signal.SIGKILL)
                    t_kill = time.time()
    assert t_kill is not None and time.time() - t_kill < 30
    error = events[-1].get("error")
    assert error and "vLLM" in error["message"] and "Traceback" not in json.dumps(events), events[-3:]
    rid = events[0]["id"]
    with sqlite3.connect(app["home"] / "data" / "assistant.db") as db:
        assert db.execute("SELECT finish_reason, adapter_version FROM responses WHERE id = ?",
                          (rid,)).fetchone() == ("error", "v1")

    t0 = time.time()
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "support", "messages": QUESTION, "temperature": 0, "max_tokens": N_TOKENS})
    assert r.status_code == 503 and time.time() - t0 < 10, r.text
    assert r.json()["error"]["code"] == "engine_unavailable" and "Traceback" not in r.text
    deadline = time.time() + RESTART_TIMEOUT_S
    while True:
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": "support", "messages": QUESTION, "temperature": 0, "max_tokens": N_TOKENS})
        if r.status_code == 200:
            break
        assert r.status_code == 503 and time.time() < deadline, r.text
        time.sleep(3)
    assert r.json()["choices"][0]["message"]["content"] == live_before["text"]   # same adapter, reloaded
    assert r.json()["adapter_version"] == "v1"
