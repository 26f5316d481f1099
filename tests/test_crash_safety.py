"""Crash safety of the store behind a live server: `kill -9` a server that is taking feedback,
20 times at random moments, and every feedback the API acknowledged (201) is in the database afterwards,
exactly as sent, with `PRAGMA integrity_check` ok; and 8 concurrent writers through the API never see
"database is locked".

Restart cost: a cold `python -m assistant.cli serve` spends most of its start importing torch,
transformers and gradio (about 8 s on an idle 2-core box, ~20 s on a loaded one), so 20 cold restarts
would take minutes. Round 0 is a real cold `assistant serve` subprocess (`running_server`); rounds 1-19
are forked from a "zygote" process that imported those libraries once and never opens the database:
each child runs the same `assistant.cli.main(["serve", ...])` in its own session, opens the SQLite
database itself (recovering whatever the previous kill left in the WAL) and is SIGKILLed like the cold one.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from helpers import free_port, running_server

pytestmark = pytest.mark.slow

ROUNDS = 20
SEED = 20240604
FEEDBACK_THREADS = 6
KILL_DELAY_S = (0.05, 1.2)      # how long after the feedback threads start the server is SIGKILLed
START_TIMEOUT_S = 90

ZYGOTE = r'''
import os, sys, tempfile, threading, traceback
from pathlib import Path
proto = os.fdopen(os.dup(1), "w", buffering=1)      # the reply channel; fd 1 becomes stderr (the log)
os.dup2(2, 1)
tiny = sys.argv[1]
import tqdm
tqdm.tqdm.monitor_interval = 0                      # no monitor thread: nothing may hold a lock at fork
import gradio, uvicorn, fastapi                     # noqa: F401 - the slow imports, done once
import assistant.cli, assistant.server, assistant.serving  # noqa: F401 - the import is the check
import assistant.api.routes, assistant.ui  # noqa: F401
from assistant.engine.model import load_base
from assistant.settings import Settings
with tempfile.TemporaryDirectory() as d:            # warms transformers' lazy imports; no database here
    load_base(Settings(home=Path(d), base_model=tiny, dtype="float32"), verbose=False)
if threading.active_count() != 1:
    proto.write(f"error threads {threading.enumerate()}\n")
    sys.exit(1)
proto.write("ready\n")
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "start":
        port, log = args
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                os.setsid()
                proto_fd = proto.fileno()
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.close(proto_fd)
                rc = assistant.cli.main(["serve", "--port", port, "--base-model", tiny, "--dtype", "float32"])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(rc or 0)
        proto.write(f"{pid}\n")
    elif cmd == "wait":
        _, status = os.waitpid(int(args[0]), 0)
        proto.write(f"{status}\n")
'''


class Zygote:
    """A process that imported the server's libraries once and forks `assistant serve` children."""

    def __init__(self, home: Path, tiny: Path):
        self.home = home
        self.log = open(home / "zygote.log", "w")
        env = dict(os.environ, ASSISTANT_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(tiny)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=str(home),
                                     text=True, bufsize=1, start_new_session=True)

    def _ask(self, line: str | None = None) -> str:
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply or reply.startswith("error"):
            raise RuntimeError(f"zygote: {reply!r}\n{(self.home / 'zygote.log').read_text()[-3000:]}")
        return reply

    def ready(self) -> None:
        if self._ask() != "ready":
            raise RuntimeError("zygote did not start")

    def start(self) -> tuple[str, int, Path]:
        """Fork a server; wait for /api/health -> (url, pid, log)."""
        port = free_port()
        log = self.home / f"server-{port}.log"
        pid = int(self._ask(f"start {port} {log}"))
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if _is_dead(pid):
                raise RuntimeError(f"forked server exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    return url, pid, log
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                os.killpg(pid, signal.SIGKILL)
                raise RuntimeError(f"forked server did not start in {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    def wait(self, pid: int) -> int:
        """Reap a child; its raw wait status."""
        return int(self._ask(f"wait {pid}"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _is_dead(pid: int) -> bool:
    """Gone or a zombie (the zygote reaps its children only when asked, so a pid is never reused under us)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _chat(client: httpx.Client, url: str, text: str) -> str:
    r = client.post(url + "/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["id"]


class FeedbackLoad:
    """Threads posting feedback as fast as the server answers, until the connection fails."""

    def __init__(self, url: str, response_ids: list[str], rng: random.Random, round_no: int):
        self.url, self.response_ids, self.round_no = url, list(response_ids), round_no
        self.seeds = [rng.random() for _ in range(FEEDBACK_THREADS)]
        self.acked: dict[int, tuple] = {}           # feedback id -> (response_id, rating, correction, reason)
        self.duplicate_ids: list[int] = []
        self.unexpected: list[tuple[int, str]] = []  # non-201 answers while the server was alive
        self.interrupted = 0                         # requests cut off mid-flight by the kill
        self.refused = 0                             # requests that found the server already gone
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in self.seeds]

    def _run(self, seed: float) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=30) as client:
            while True:
                token = f"r{self.round_no}-{uuid.uuid4().hex}"
                rid = rng.choice(self.response_ids)
                rating = rng.choice(("up", "down"))
                correction = f"corrected answer {token}" if rng.random() < 0.5 else None
                body = {"response_id": rid, "rating": rating, "correction": correction, "reason": token,
                        "user": token}   # one person per post: each is a record of its own
                try:
                    r = client.post(self.url + "/api/feedback", json=body)
                except httpx.ConnectError:
                    with self.lock:
                        self.refused += 1
                    return
                except httpx.TransportError:
                    with self.lock:
                        self.interrupted += 1
                    return
                with self.lock:
                    if r.status_code == 201:
                        fid = r.json()["id"]
                        if fid in self.acked:
                            self.duplicate_ids.append(fid)
                        self.acked[fid] = (rid, rating, correction, token)
                    else:
                        self.unexpected.append((r.status_code, r.text[:300]))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a feedback thread hung after the server was killed"


def _feedback_round(url: str, kill, response_ids: list[str], rng: random.Random, round_no: int) -> FeedbackLoad:
    load = FeedbackLoad(url, response_ids, rng, round_no)
    delay = rng.uniform(*KILL_DELAY_S)
    load.start()
    time.sleep(delay)
    kill()
    load.join()
    return load


def test_kill_9_while_taking_feedback_loses_no_acknowledged_row(home, tiny_llama):
    rng = random.Random(SEED)
    db = home / "data" / "assistant.db"
    acked: dict[int, tuple] = {}
    acked_round: dict[int, int] = {}
    responses: list[str] = []
    problems: list[str] = []
    interrupted = refused = 0
    t0 = time.time()

    zygote = Zygote(home, tiny_llama)       # boots (imports) while round 0 runs on a cold server
    try:
        for round_no in range(ROUNDS):
            with RoundServer(round_no, home, tiny_llama, zygote) as (url, kill, check_killed):
                with httpx.Client(timeout=60) as client:
                    for i in range(4 if round_no == 0 else 1):
                        responses.append(_chat(client, url, f"round {round_no} question {i}: what is {i}+{round_no}?"))
                load = _feedback_round(url, kill, responses, rng, round_no)
                check_killed()
            for fid, row in load.acked.items():
                if fid in acked:
                    problems.append(f"round {round_no}: feedback id {fid} acknowledged again (first in round "
                                    f"{acked_round[fid]}): the id of an acknowledged row was reused")
                acked[fid] = row
                acked_round[fid] = round_no
            if load.duplicate_ids:
                problems.append(f"round {round_no}: ids acknowledged twice: {load.duplicate_ids}")
            if load.unexpected:
                problems.append(f"round {round_no}: non-201 answers from a live server: {load.unexpected[:3]}")
            interrupted += load.interrupted
            refused += load.refused
            if round_no == 0:
                zygote.ready()
    finally:
        zygote.close()

    # The database as the last kill left it, opened cold (WAL recovery happens here).
    con = sqlite3.connect(db)
    try:
        integrity = [r[0] for r in con.execute("PRAGMA integrity_check")]
        fk = con.execute("PRAGMA foreign_key_check").fetchall()
        rows = {r[0]: tuple(r[1:]) for r in con.execute(
            "SELECT id, response_id, rating, correction, reason FROM feedback")}
        logged = {r[0] for r in con.execute("SELECT id FROM responses")}
    finally:
        con.close()

    missing = sorted(fid for fid in acked if fid not in rows)
    wrong = sorted(fid for fid in acked if fid in rows and rows[fid] != acked[fid])
    lost_responses = [rid for rid in responses if rid not in logged]
    print(f"\n{ROUNDS} kills in {time.time() - t0:.1f}s: {len(acked)} acknowledged feedback, {len(rows)} rows, "
          f"{interrupted} posts cut off mid-flight, {refused} refused after the kill, {len(responses)} responses")
    assert integrity == ["ok"], integrity
    assert not fk, f"foreign key violations: {fk[:5]}"
    assert not missing, (f"{len(missing)} acknowledged feedback rows lost, e.g. "
                         f"{[(f, acked_round[f], acked[f]) for f in missing[:5]]}")
    assert not wrong, f"acknowledged rows changed: {[(f, acked[f], rows[f]) for f in wrong[:5]]}"
    assert not lost_responses, f"answered responses missing from the log: {lost_responses[:5]}"
    assert not problems, "\n".join(problems[:10])
    assert len(acked) >= 10 * ROUNDS, f"only {len(acked)} acknowledged posts: the load never got going"
    assert interrupted > 0, "no kill ever landed while a feedback post was in flight"


class RoundServer:
    """Round 0: a cold `assistant serve` subprocess; later rounds: a server forked by the zygote.
    Yields (url, kill, check_killed)."""

    def __init__(self, round_no: int, home: Path, tiny: Path, zygote: Zygote):
        self.round_no, self.home, self.tiny, self.zygote = round_no, home, tiny, zygote

    def __enter__(self):
        if self.round_no == 0:
            self.cm = running_server(self.home, "--base-model", str(self.tiny), "--dtype", "float32",
                                     timeout=START_TIMEOUT_S + 60)
            url, proc = self.cm.__enter__()

            def kill():
                os.killpg(proc.pid, signal.SIGKILL)

            def check_killed():
                proc.wait(30)
                assert proc.returncode == -signal.SIGKILL, f"round 0 server ended with {proc.returncode}"
            return url, kill, check_killed
        self.cm = None
        url, pid, log = self.zygote.start()
        self.pid, self.reaped = pid, False

        def kill():
            os.killpg(pid, signal.SIGKILL)

        def check_killed():
            status = self.zygote.wait(pid)
            self.reaped = True
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"round {self.round_no} server was not killed by SIGKILL (status {status}):\n"
                f"{log.read_text()[-2000:]}")
        return url, kill, check_killed

    def __exit__(self, *exc):
        if self.cm is not None:
            return self.cm.__exit__(*exc)
        if not self.reaped:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.zygote.wait(self.pid)
        return False


WRITERS = 8
OPS_PER_WRITER = 24


def test_eight_concurrent_writers_never_see_database_is_locked(home, tiny_llama):
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32") as (url, proc):
        with httpx.Client(timeout=60) as client:
            rids = [_chat(client, url, f"question {i}") for i in range(4)]
            r = client.post(url + "/api/domains", json={"name": "shared", "system_prompt": "Be brief."})
            assert r.status_code == 201, r.text
        barrier = threading.Barrier(WRITERS)
        results: list[tuple[int, str, int, str]] = []
        expected = {"feedback": 0, "examples": 0, "domains": 1}
        lock = threading.Lock()

        def writer(k: int) -> None:
            rng = random.Random(SEED + k)
            mine = {"feedback": 0, "examples": 0, "domains": 0}
            with httpx.Client(timeout=120) as c:
                barrier.wait()
                for i in range(OPS_PER_WRITER):
                    op = ("feedback", "domain", "examples", "examples_own")[(i + k) % 4]
                    if op == "feedback":
                        r = c.post(url + "/api/feedback", json={
                            "response_id": rng.choice(rids), "rating": rng.choice(("up", "down")),
                            "correction": f"writer {k} op {i}", "reason": "concurrency",
                            "user": f"writer {k} op {i}"})   # one person per post: a record each
                        mine["feedback"] += r.status_code == 201
                    elif op == "domain":
                        r = c.post(url + "/api/domains", json={"name": f"w{k}-{i}", "description": f"writer {k}"})
                        mine["domains"] += r.status_code == 201
                    else:
                        name = "shared" if op == "examples" or i < 2 else f"w{k}-{i - 2}"  # made 2 ops ago
                        examples = [{"messages": [{"role": "user", "content": f"writer {k} op {i} q{j}"},
                                                  {"role": "assistant", "content": f"answer {j}"}]}
                                    for j in range(20)]
                        r = c.post(url + f"/api/domains/{name}/examples", json={"examples": examples})
                        if r.status_code == 201:
                            mine["examples"] += r.json()["added"]
                    with lock:
                        results.append((k, op, r.status_code, r.text))
            with lock:
                for key, n in mine.items():
                    expected[key] += n

        t0 = time.time()
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(WRITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        elapsed = time.time() - t0
        assert not any(t.is_alive() for t in threads), "a writer hung"

    locked = [x for x in results if "database is locked" in x[3].lower()]
    failed = [x for x in results if x[2] != 201]
    print(f"\n{len(results)} concurrent writes by {WRITERS} writers in {elapsed:.1f}s")
    assert not locked, f"'database is locked' reached a user: {locked[:3]}"
    assert not failed, f"{len(failed)} writes not acknowledged with 201: {failed[:3]}"
    assert len(results) == WRITERS * OPS_PER_WRITER

    con = sqlite3.connect(home / "data" / "assistant.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == expected["feedback"]
        assert con.execute("SELECT COUNT(*) FROM examples").fetchone()[0] == expected["examples"]
    finally:
        con.close()
