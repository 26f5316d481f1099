"""App replicas on one PostgreSQL database (the embedded base on each; a private PostgreSQL server with fsync
on, started here unless BENCH_DATABASE_URL names one):

- feedback_writes_2_replicas_vs_1: acknowledged feedback per second (HTTP 201, committed in the database)
  through two `assistant serve` replicas ÷ through one, same database, same client load (CLIENTS
  concurrent keep-alive connections in CLIENT_PROCESSES processes, for WINDOW_S seconds each; each
  request is encoded once, so the clients cost little CPU). On a machine with few cores the replicas and
  PostgreSQL share them, which bounds the ratio: the CPU is printed.
- activation_propagation_s: the slowest, over ROUNDS activations alternately made on either replica, of the
  time from the activation call returning on one replica to the start of the first request the other
  answers with that version (that request's own answer time, which includes loading the adapter, is
  printed beside it as "until answered").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - the environment and thread policy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CLIENTS = 16
CLIENT_PROCESSES = 2
WINDOW_S = 15.0
RESPONSES = 4000
ROUNDS = 4
AUTH = ("bench", "bench-pw")


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text]
    return f"{model}, {os.cpu_count()} cores, flags: {','.join(flags) or 'none of avx2/avx512f/avx512_bf16/amx_bf16'}"


def _post(url: str, path: str, body: bytes) -> bytes:
    """One HTTP/1.1 keep-alive POST, encoded once: the load clients spend next to no CPU per request, so the
    replicas (not the clients) are what the rate measures on a machine with few cores."""
    import base64
    host = url.split("://", 1)[1]
    auth = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _connection(url, requests, stop_at) -> int:
    import asyncio
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    done = i = 0
    try:
        while time.time() < stop_at:
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            done += head.startswith(b"HTTP/1.1 201")
    finally:
        writer.close()
    return done


def _client(urls, ids, stop_at, out):
    import asyncio
    import json
    per_process = CLIENTS // CLIENT_PROCESSES

    async def main():
        jobs = []
        for k in range(per_process):
            url = urls[k % len(urls)]
            requests = [_post(url, "/api/feedback", json.dumps({"response_id": rid, "rating": "up",
                                                                  "user": f"u{k}"}).encode())
                        for rid in ids[k::per_process]]
            jobs.append(_connection(url, requests, stop_at))
        return sum(await asyncio.gather(*jobs))
    out.put(asyncio.run(main()))


def feedback_rate(urls, ids) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 1
    stop_at = start + WINDOW_S
    procs = [ctx.Process(target=_client, args=(urls, ids[i::CLIENT_PROCESSES], stop_at, out))
             for i in range(CLIENT_PROCESSES)]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return total / WINDOW_S


def _answer_version(url, model) -> str | None:
    import httpx
    r = httpx.post(url + "/v1/chat/completions", auth=AUTH, timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    return r.json().get("adapter_version")


def run() -> dict:
    import httpx

    from assistant.data.store import Store

    from helpers import random_lora_adapter, running_server, zipped
    from postgres_server import PostgresServer

    tmp = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    server = None
    url = os.environ.get("BENCH_DATABASE_URL")
    if not url:
        server = PostgresServer().start(fsync=True)
        url = server.new_database()
    try:
        store = Store(url)
        ids = [f"bench-{i}" for i in range(RESPONSES)]
        for rid in ids:
            store.log_response(id=rid, domain="base", adapter_version=None, model="base",
                               messages=[{"role": "user", "content": "q"}], answer="a", prompt_tokens=1,
                               completion_tokens=1, latency_ms=1.0, ttft_ms=None, finish_reason="stop")
        shared = tmp / "adapters"
        args = ["--database-url", url, "--adapters-dir", str(shared), "--auth", f"{AUTH[0]}:{AUTH[1]}",
                "--embedded-worker", "false"]
        env = {"ASSISTANT_SESSION_SECRET": "bench"}
        for name in ("a", "b"):
            (tmp / name).mkdir()
        with running_server(tmp / "a", *args, env=env, timeout=600) as (a, _), \
                running_server(tmp / "b", *args, env=env, timeout=600) as (b, _):
            one = feedback_rate([a], ids)
            two = feedback_rate([a, b], ids)

            from assistant.engine.model import ensure_embedded
            from assistant.settings import default_cache_dir
            base = ensure_embedded(default_cache_dir(), verify=False)
            httpx.post(a + "/api/domains", auth=AUTH, json={"name": "bench"}, timeout=60).raise_for_status()
            versions = []
            for seed in (1, 2):
                folder = random_lora_adapter(base, tmp / f"lora{seed}", rank=4, std=0.02, seed=seed)
                r = httpx.post(a + "/api/domains/bench/adapters", auth=AUTH, content=zipped(folder), timeout=300,
                               headers={"Content-Type": "application/zip"})
                r.raise_for_status()
                versions.append(r.json()["version"])
            worst = answered = 0.0
            for i in range(ROUNDS):
                on, other = (a, b) if i % 2 == 0 else (b, a)
                version = versions[i % 2]
                httpx.post(f"{on}/api/domains/bench/adapters/{version}/activate", auth=AUTH, json={},
                           timeout=300).raise_for_status()
                t0 = time.monotonic()
                while True:
                    started = time.monotonic()
                    if _answer_version(other, "bench") == version:
                        break
                    if started - t0 > 60:
                        raise RuntimeError("an activation did not reach the other replica in 60 s")
                worst = max(worst, started - t0)
                answered = max(answered, time.monotonic() - t0)
        common.print_table(f"replicas on one PostgreSQL ({cpu_flags()})", [
            ("feedback/s, 1 replica", f"{one:.1f}"), ("feedback/s, 2 replicas", f"{two:.1f}"),
            ("feedback_writes_2_replicas_vs_1", f"{two / one:.2f} (target >= 1.6)"),
            ("activation_propagation_s (worst)", f"{worst:.3f} (target <= 2)"),
            ("  until answered (worst)", f"{answered:.3f}")])
        return {"feedback_writes_2_replicas_vs_1": round(two / one, 3), "activation_propagation_s": round(worst, 3)}
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    print(run())
