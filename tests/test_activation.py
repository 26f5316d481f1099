"""One path to live: with a server running on the state, a training job and the CLI's `adapters activate|
import` and `train` ask that server (which loads the version on its engine before the pointer moves); the job
process never moves the pointer then. With no server, the CLI works offline; a server file left by a dead
server is ignored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from helpers import running_server
from invented_facts import FACTS, SYSTEM_PROMPT, chat

TINY_TRAIN = ("--train.rank", "4", "--train.alpha", "8", "--train.learning-rate", "0.02", "--train.epochs", "1",
              "--train.batch-size", "4", "--train.max-seq-len", "128", "--train.augment", "0", "--train.replay", "0")
GATE_OPEN = ("--gate.min-corrections-match", "0", "--gate.min-taught-match", "0", "--gate.max-eval-loss-ratio", "1000",
             "--gate.max-eval-match-drop", "1", "--gate.max-general-nll-ratio", "1000",
             "--gate.min-general-embedding-similarity", "-1",   # a tiny random model never passes the real gate
             "--gate.probes", "8")                               # and knows none of its general probe questions


APP_PY = str(Path(__file__).resolve().parent.parent / "app.py")


def cli(home, *args):
    env = dict(os.environ, ASSISTANT_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "assistant.cli", *args], capture_output=True, text=True, env=env,
                          cwd=str(home), timeout=600)


@pytest.mark.slow   # a server and a training job process: about a minute here
def test_jobs_and_the_cli_activate_through_the_running_server(home, tiny_llama, two_fact_adapters):
    """The server started as `python app.py` (its command line never says "assistant"): found all the same."""
    model = ("--base-model", str(tiny_llama), "--dtype", "float32")
    with running_server(home, *model, *GATE_OPEN, timeout=300, command=(APP_PY,)) as (url, proc):
        server_file = home / "data" / "server.json"
        info = json.loads(server_file.read_text())
        assert info["pid"] == proc.pid and info["url"] == url and oct(server_file.stat().st_mode)[-3:] == "600"
        assert httpx.post(url + "/api/domains", json={"name": "atlas", "system_prompt": SYSTEM_PROMPT}).status_code == 201

        r = cli(home, "adapters", "import", "atlas", "--path", str(two_fact_adapters[0]), *model)
        assert r.returncode == 0 and f"as atlas@v1 on the server at {url}" in r.stdout, r.stderr[-2000:]
        r = cli(home, "adapters", "activate", "atlas", "v1", *model)
        assert r.returncode == 0 and url in r.stdout, r.stderr[-2000:]
        assert httpx.post(url + "/v1/chat/completions", json={"model": "atlas", "messages": chat("Hi?"),
                                                              "max_tokens": 2}).json()["adapter_version"] == "v1"
        r = cli(home, "adapters", "activate", "atlas", "v7", *model)   # the server's own error, passed on
        assert r.returncode == 2 and "v7" in r.stderr and "Traceback" not in r.stderr

        examples = [{"messages": chat(q, a)} for q, a, _, _ in FACTS]
        assert httpx.post(url + "/api/domains/atlas/examples", json={"examples": examples}).status_code == 201
        r = cli(home, "train", "atlas", *model, *TINY_TRAIN)   # the server runs the job, the CLI follows it
        assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
        job = json.loads(r.stdout)
        assert job["status"] == "succeeded" and job["promoted"] and job["adapter_version"] == "v2"
        log = httpx.get(f"{url}/api/jobs/{job['job_id']}").json()["log"]
        assert "atlas@v2 is live (activated by the server)" in log, log
        assert (home / "adapters" / "atlas" / "active").read_text().strip() == "v2"
        assert httpx.post(url + "/v1/chat/completions", json={"model": "atlas", "messages": chat("Hi?"),
                                                              "max_tokens": 2}).json()["adapter_version"] == "v2"
    assert not server_file.exists()                       # removed when the server stopped


def test_without_a_server_the_cli_works_offline_and_ignores_a_stale_server_file(home, tiny_llama, two_fact_adapters):
    model = ("--base-model", str(tiny_llama), "--dtype", "float32")
    assert cli(home, "adapters", "create", "atlas", *model[:0]).returncode == 0
    (home / "data").mkdir(exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (home / "data" / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": dead.pid, "token": "x"}))
    r = cli(home, "adapters", "import", "atlas", "--path", str(two_fact_adapters[1]), "--activate", *model)
    assert r.returncode == 0 and "as atlas@v1 (active)" in r.stdout and "server" not in r.stdout, r.stderr[-2000:]
    assert (home / "adapters" / "atlas" / "active").read_text().strip() == "v1"
    assert not (home / "data" / "server.json").exists()
    # the pid now belongs to another process (one whose command line even says "assistant"), and nothing
    # listens at the URL: the file's server is gone, at once (no wait for a server that never answers)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)  # assistant serve"])
    try:
        (home / "data" / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": other.pid,
                                                               "token": "x"}))
        r = cli(home, "adapters", "activate", "atlas", "v1", *model)
        assert r.returncode == 0 and "server" not in r.stdout, (r.stdout, r.stderr[-2000:])
        assert not (home / "data" / "server.json").exists()
    finally:
        other.kill()
        other.wait()
