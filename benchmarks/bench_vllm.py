"""The app as a proxy in front of vLLM: what it costs to go through it.

Starts `assistant serve --engine vllm` (which starts and supervises a local vLLM server) on the embedded
model, then streams the same requests interleaved, one through the app and one straight to the vLLM server,
and prints:

- `vllm_proxy_vs_direct`: streamed tokens/s through the app ÷ straight from vLLM (bar: >= 0.95);
- `vllm_ttft_overhead_ms`: median time to first token through the app minus straight (bar: <= 30).

On a CPU build of vLLM, tokens are slow (a few per second on 2 cores), so the proxy's per-token work is a
small share; on a GPU server the same two numbers say the same thing with tokens 50x faster."""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_eval import cpu_flags

from common import print_table

ROUNDS = 6                 # interleaved pairs (app, direct)
MAX_TOKENS = 48            # per answer, with ignore_eos: every answer has the same length
START_TIMEOUT_S = 600
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to paint."}]
VLLM_KEY = secrets.token_urlsafe(24)   # the app gives it to the vLLM server it starts; direct requests send it


def _start_app(home: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, ASSISTANT_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               ASSISTANT_VLLM_API_KEY=VLLM_KEY)
    log = open(home / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "assistant.cli", "serve", "--port", str(port), "--engine", "vllm",
                             "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(home),
                            start_new_session=True)
    deadline = time.time() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the app exited:\n" + (home / "app.log").read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError("the app did not start:\n" + (home / "app.log").read_text()[-3000:])
        time.sleep(0.5)


def _stream(url: str, model: str) -> tuple[float, float]:
    """(seconds to the first content, tokens/s after it) of one streamed answer of MAX_TOKENS tokens."""
    body = {"model": model, "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    headers = {"Authorization": f"Bearer {VLLM_KEY}"}   # the app ignores it (it is open), vLLM needs it
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first - t0, (tokens - 1) / (last - first)


def run() -> dict:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as home:
        proc = _start_app(Path(home), port)
        try:
            app = f"http://127.0.0.1:{port}"
            health = httpx.get(app + "/api/health").json()
            vllm, served = health["engine"]["servers"][0]["url"], health["base_model"]
            _stream(app, "base")
            _stream(vllm, served)                    # warm both paths
            app_runs, direct_runs = [], []
            for _ in range(ROUNDS):
                app_runs.append(_stream(app, "base"))
                direct_runs.append(_stream(vllm, served))
        finally:
            proc.terminate()
            proc.wait(60)
    ttft = lambda runs: statistics.median(r[0] for r in runs) * 1000   # noqa: E731
    rate = lambda runs: statistics.median(r[1] for r in runs)           # noqa: E731
    ratios = {"vllm_proxy_vs_direct": round(rate(app_runs) / rate(direct_runs), 3),
              "vllm_ttft_overhead_ms": round(ttft(app_runs) - ttft(direct_runs), 1)}
    print_table(f"vLLM behind the app (embedded model, fp32, {MAX_TOKENS} tokens x {ROUNDS} interleaved; "
                f"CPU flags: {cpu_flags()})", [
                    ("tokens/s through the app", f"{rate(app_runs):.2f}"),
                    ("tokens/s straight from vLLM", f"{rate(direct_runs):.2f}"),
                    ("TTFT through the app (ms)", f"{ttft(app_runs):.0f}"),
                    ("TTFT straight from vLLM (ms)", f"{ttft(direct_runs):.0f}"),
                    ("vllm_proxy_vs_direct (bar >= 0.95)", f"{ratios['vllm_proxy_vs_direct']}"),
                    ("vllm_ttft_overhead_ms (bar <= 30)", f"{ratios['vllm_ttft_overhead_ms']}")])
    return ratios
