"""The one path to live, seen from a process that is not the server: a training job's process, a worker,
the CLI. Whoever serves is the only one that moves an `active` pointer.

    activate(settings, registry, domain, version, offline_load=...)   <- the entry point for jobs and workers

- **A server runs on this state** (`assistant serve` writes `<state>/server.json` when it starts and removes
  it when it stops: its URL, its pid and a random control token, readable by this user only): the call
  is the server's own activate route, exactly what the Activate button does: validate -> load on its
  engine (with `--engine vllm`, every vLLM server) -> move the pointer. When the server refuses (a vLLM
  server refused the adapter, the gate did not pass, ...), this raises the server's error, its message
  and HTTP status unchanged. The calling process never moves the pointer.
- **No server runs** (`assistant train` alone, or the server died): `offline_load(domain, version)`
  validates the version here and the registry moves the pointer; nothing serves it yet, and a server that
  starts later loads the live versions before it answers.

`find_server` also serves the CLI's `adapters activate|import` and `train`, which go through a running
server the same way (see cli.py).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from assistant.errors import ServerRefused

log = logging.getLogger(__name__)

SERVER_FILE = "server.json"       # in the state folder while `assistant serve` runs
ACTIVATE_TIMEOUT_S = 600.0        # a load on every vLLM server of a large adapter can take minutes
REQUEST_TIMEOUT_S = 60.0
STARTING_WAIT_S = 30.0            # a server whose process lives but that does not answer yet: how long to wait
POLL_S = 0.5
JOB_POLL_S = 1.0                  # how often the CLI asks a server how its job is doing


@dataclass(frozen=True)
class RunningServer:
    """A server running on this state, as its server file describes it."""
    url: str
    pid: int
    token: str

    def request(self, method: str, path: str, *, json_body: dict | None = None, content: bytes | None = None,
                headers: dict | None = None, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """One call to the server's API -> its JSON body; an error answer raises ServerRefused with the
        server's own message and status."""
        h = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        try:
            resp = httpx.request(method, self.url + path, json=json_body, content=content, headers=h, timeout=timeout)
        except httpx.HTTPError as e:
            raise ServerRefused(f"the server at {self.url} did not answer ({type(e).__name__}): is it still running?",
                                status=503) from None
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code >= 400:
            err = body.get("error") if isinstance(body, dict) else None
            message = err.get("message") if isinstance(err, dict) else resp.text[:300]
            raise ServerRefused(message or f"HTTP {resp.status_code}", status=resp.status_code,
                                param=err.get("param") if isinstance(err, dict) else None)
        return body

    def activate(self, domain: str, version: str, *, override: bool = False) -> dict:
        return self.request("POST", f"/api/domains/{domain}/adapters/{version}/activate",
                            json_body={"override": override}, timeout=ACTIVATE_TIMEOUT_S)


    def import_adapter(self, domain: str, path: str | Path, *, activate: bool = False) -> str:
        """Upload a zip (or a folder, zipped here) as the domain's next version -> its name."""
        path = Path(path)
        data = path.read_bytes() if path.is_file() else _zip_folder(path)
        body = self.request("POST", f"/api/domains/{domain}/adapters" + ("?activate=true" if activate else ""),
                            content=data, headers={"Content-Type": "application/zip"}, timeout=ACTIVATE_TIMEOUT_S)
        return body["version"]

    def train(self, domain: str, train_settings: dict | None = None, *, on_update=None) -> dict:
        """Start a training job on the server and follow it to its end -> the job record.
        `on_update(job)` is called at each poll (a progress bar)."""
        job_id = self.request("POST", f"/api/domains/{domain}/train", json_body=train_settings or {})["job_id"]
        while True:
            job = self.request("GET", f"/api/jobs/{job_id}")
            if on_update is not None:
                on_update(job)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(JOB_POLL_S)


def _zip_folder(folder: Path) -> bytes:
    import io
    import zipfile
    if not folder.is_dir():
        raise ServerRefused(f"{folder.name!r} is neither a zip nor a folder: name a PEFT LoRA adapter", status=422)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                z.write(f, f.name)
    return buf.getvalue()


def server_file(settings) -> Path:
    return Path(settings.state_path) / SERVER_FILE


def announce(settings, url: str) -> str:
    """Called by `assistant serve` once it listens: write the server file -> the control token to accept."""
    token = secrets.token_urlsafe(32)
    path = server_file(settings)
    tmp = path.with_name(f".{SERVER_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)   # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"url": url, "pid": os.getpid(), "token": token}))
    os.replace(tmp, path)
    return token


def withdraw(settings) -> None:
    """Called by `assistant serve` when it stops: remove its server file (only its own)."""
    path = server_file(settings)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (whatever its command line: `assistant serve`, `python app.py`, ...)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers_as(server: RunningServer) -> bool | None:
    """True: the server at the file's URL holds the file's token; False: something else answers there, or
    nothing listens (the file is written once its server listens, so its server is gone); None: no answer
    yet (busy or starting)."""
    try:
        r = httpx.get(server.url + "/api/health", headers={"Authorization": f"Bearer {server.token}"}, timeout=2)
    except httpx.ConnectError:
        return False
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None if r.status_code >= 500 else False
    try:
        return r.json().get("control") is True
    except ValueError:
        return False


def find_server(settings) -> RunningServer | None:
    """The server running on this state, or None. A server is its file's when its process lives and the
    server at the file's URL holds the file's token; a file left by a server that is gone is ignored (and
    removed); a server that does not answer yet is waited for."""
    path = server_file(settings)
    try:
        info = json.loads(path.read_text())
        server = RunningServer(str(info["url"]).rstrip("/"), int(info["pid"]), str(info["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if server.pid == os.getpid():
        return None               # the server itself: it activates directly
    deadline = time.monotonic() + STARTING_WAIT_S
    while _alive(server.pid):
        ours = _answers_as(server)
        if ours:
            return server
        if ours is False:
            break
        if time.monotonic() >= deadline:
            raise ServerRefused(f"a server (pid {server.pid}) runs on this state but does not answer at "
                                f"{server.url}: stop it, or wait until it answers", status=503)
        time.sleep(POLL_S)
    log.info("ignoring a server file left by a server that is gone (pid %s)", server.pid)
    if _same_file(path, info):
        path.unlink(missing_ok=True)
    return None


def _same_file(path: Path, info: dict) -> bool:
    """Whether the server file still says what was read (a server that started meanwhile wrote its own)."""
    try:
        return json.loads(path.read_text()) == info
    except (OSError, ValueError):
        return False


def activate(settings, registry, domain: str, version: str, *, offline_load, override: bool = False,
             store=None) -> str:
    """Make `domain@version` live through the one path (see the module docstring). Returns where it was
    done: the server's URL, "replica" (a serving replica on the shared database: replicas.py), or "offline".
    Raises the server's error when it refuses."""
    server = find_server(settings)
    if server is not None:
        server.activate(domain, version, override=override)
        log.info("%s@%s activated by the server at %s", domain, version, server.url)
        return server.url
    if store is not None and store.kind == "postgresql":
        from assistant.cluster.members import request_activation, worker_name
        if request_activation(store, domain, version, by=worker_name()):
            log.info("%s@%s activated by a serving replica", domain, version)
            return "replica"
    registry.activate(domain, version, load=offline_load)
    if store is not None:
        store.record_activation(domain, version, by="offline")
    return "offline"
