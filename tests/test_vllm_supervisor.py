"""The managed vLLM server's supervisor gives up instead of restarting forever: a server that dies each time
it comes up (a crash loop), or one that will not start again, ends in state "failed" with a reason a person
can read, and no further starts. The child is a small stand-in HTTP server started exactly as vLLM is (same
command line, own process group, /health polled over HTTP); a real vLLM's restart is tested through the
app (test_vllm_serving.py), where a crash loop would take many minutes of starts."""

from __future__ import annotations

import sys
import time

import pytest

from assistant.vllm import server as managed_vllm
from assistant.vllm.server import ManagedVllm

# Reads --port from vLLM's arguments; counts its starts in a file; serves /health for LIVE_S, then exits 1.
# From start FAIL_FROM on it exits at once (a server that will not start again).
STAND_IN = """#!{python}
import http.server, os, sys, threading, time
starts = os.environ["STAND_IN_STARTS"]
with open(starts, "a") as f:
    f.write("start\\n")
n = len(open(starts).read().split())
if n >= int(os.environ.get("STAND_IN_FAIL_FROM", "1000000")):
    sys.exit(1)
port = int(sys.argv[sys.argv.index("--port") + 1])

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass

httpd = http.server.HTTPServer(("127.0.0.1", port), Health)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
time.sleep(float(os.environ["STAND_IN_LIVE_S"]))
os._exit(1)
"""
WAIT_S = 60


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    script = tmp_path / "stand-in-vllm"
    script.write_text(STAND_IN.format(python=sys.executable))
    script.chmod(0o755)
    starts = tmp_path / "starts"
    monkeypatch.setenv("STAND_IN_STARTS", str(starts))
    monkeypatch.setattr(managed_vllm, "RESTART_BACKOFF", (0.1,))     # the policy, not the waiting, is under test
    monkeypatch.setattr(managed_vllm, "SUPERVISE_INTERVAL", 0.1)
    restarted = []
    server = ManagedVllm(tmp_path / "base", tmp_path / "logs", python=str(script),
                         on_restart=lambda: restarted.append(time.monotonic()))
    server.restarted, server.starts = restarted, starts
    yield server
    server.stop()


def _wait_for_failed(server) -> None:
    deadline = time.monotonic() + WAIT_S
    while server.state != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.state == "failed", (server.state, server.restarts)


def _starts(server) -> int:
    return len(server.starts.read_text().split())


def test_a_server_that_dies_each_time_it_comes_up_is_given_up(stand_in, monkeypatch):
    monkeypatch.setenv("STAND_IN_LIVE_S", "0.6")
    stand_in.start()
    assert stand_in.state == "ready"
    _wait_for_failed(stand_in)
    assert stand_in.restarts == managed_vllm.CRASH_LOOP_RESTARTS == len(stand_in.restarted)
    assert "given up" in stand_in.failure and "10 minutes" in stand_in.failure
    assert "/" not in stand_in.failure                     # no server path in what people read
    n = _starts(stand_in)
    assert n == 1 + managed_vllm.CRASH_LOOP_RESTARTS
    time.sleep(2)
    assert _starts(stand_in) == n and stand_in.proc.poll() is not None   # no start after giving up, none left
    stand_in.stop()
    assert stand_in.state == "failed"                       # stopping keeps the reason


def test_a_server_that_will_not_start_again_is_given_up_after_the_capped_attempts(stand_in, monkeypatch):
    monkeypatch.setenv("STAND_IN_LIVE_S", "0.6")
    monkeypatch.setenv("STAND_IN_FAIL_FROM", "2")           # the first start works, every later one exits at once
    stand_in.start()
    _wait_for_failed(stand_in)
    assert stand_in.restarts == 0 and stand_in.restarted == []
    assert f"{managed_vllm.RESTART_ATTEMPTS} restarts in a row failed" in stand_in.failure
    n = _starts(stand_in)
    assert n == 1 + managed_vllm.RESTART_ATTEMPTS
    time.sleep(2)
    assert _starts(stand_in) == n


def test_a_server_that_recovers_is_restarted_and_stays_ready(stand_in, monkeypatch):
    monkeypatch.setenv("STAND_IN_LIVE_S", "0.6")
    stand_in.start()
    monkeypatch.setenv("STAND_IN_LIVE_S", "3600")           # the restarted server keeps running
    deadline = time.monotonic() + WAIT_S
    while not stand_in.restarted and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stand_in.restarts == 1 and stand_in.state == "ready" and stand_in.failure is None
    stand_in.stop()
    assert stand_in.state == "stopped" and stand_in.proc.poll() is not None
