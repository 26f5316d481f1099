"""How app replicas and training workers that share one database know who is alive and wake each other:
worker names and their liveness locks, LISTEN wakeups, and a worker's request that a serving replica
activate a version (the one activation path, from another machine). Used by jobs/run.py, jobs/workers.py,
replicas.py and cluster/remote.py; imports none of them.

**Liveness.** Each worker, and each `serve` (its embedded worker), is named "host:pid" and, on PostgreSQL,
holds a session advisory lock on its name for its whole life (`WorkerLock`). PostgreSQL drops the lock the
moment the process's connection closes (a kill -9 closes it; a machine that vanishes is found by TCP
keepalives within about `KEEPALIVE_S`), so `owner_alive` can tell a dead worker's job from a live one's.
On SQLite (one machine) the owner's pid says whether it lives.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time

from assistant.errors import AssistantError

log = logging.getLogger(__name__)

KEEPALIVE_S = 30              # TCP keepalive on the lock connection: a vanished machine's lock drops after ~this
CLAIM_WAIT_S = 15.0           # a worker's activation request nobody claimed in this long: activate offline
DONE_WAIT_S = 600.0           # ...and one claimed: how long to wait for the replica's verdict
CLAIMANT_CHECK_S = 5.0        # how often a waiting worker checks that the replica that claimed its request lives
REQUEST_POLL_S = 0.2


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for a worker's name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class WorkerLock:
    """This process's claim to be alive as a worker (PostgreSQL: a session advisory lock; SQLite: nothing,
    the pid is checked). Held until `release` or the process ends."""

    def __init__(self, store):
        self.name = worker_name()
        self.conn = None
        if store.kind == "postgresql":
            self.conn = store.db.connect(keepalives=1, keepalives_idle=KEEPALIVE_S // 3,
                                         keepalives_interval=KEEPALIVE_S // 6, keepalives_count=3)
            self.conn.execute("SELECT pg_advisory_lock(%s)", (_lock_key(self.name),))

    def release(self) -> None:
        if self.conn is not None:
            self.conn.close()          # closing the session releases its locks
            self.conn = None


def owner_alive(store, worker: str, *, self_is_stale: bool = False) -> bool:
    """Whether the worker named `worker` still runs. `self_is_stale`: a process starting up owns nothing yet,
    so a job recorded under its own name (a reused pid) is a dead one's."""
    if worker == worker_name():
        return not self_is_stale
    if store.kind == "postgresql":
        key = _lock_key(worker)
        with store.db.connect() as conn:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
            if got:
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return not got
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True                    # SQLite lives on one machine: another host's worker cannot be checked
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")


class Wakeup:
    """Waits for a notification on some channels (PostgreSQL LISTEN) or for `timeout`, whichever is first."""

    def __init__(self, store, channels: tuple[str, ...]):
        self.conn = None
        if store.kind == "postgresql":
            try:
                self.conn = store.db.connect()
                for channel in channels:
                    self.conn.execute(f"LISTEN {channel}")
            except Exception:  # noqa: BLE001 - polling still works
                log.exception("LISTEN failed: polling only")
                self.conn = None

    def wait(self, timeout: float) -> list[str]:
        """-> the payloads received (empty on a timeout)."""
        if self.conn is None:
            time.sleep(timeout)
            return []
        try:
            return [n.payload for n in self.conn.notifies(timeout=timeout, stop_after=1)]
        except Exception:  # noqa: BLE001 - the connection broke: poll from now on
            log.exception("the LISTEN connection broke: polling only")
            self.conn = None
            return []

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def request_activation(store, domain: str, version: str, *, by: str) -> bool:
    """A worker asks the serving replicas to activate domain@version -> True once one did; False when none
    claimed the request in time, or the replica that claimed it stopped (the caller activates offline).
    Raises the replica's refusal, or that a live claimant did not finish within DONE_WAIT_S. Every wait is
    bounded: a claim records its claimant, whose liveness is checked every CLAIMANT_CHECK_S."""
    aid = store.record_activation(domain, version, status="requested", by=by)
    deadline, checked, claimed = time.monotonic() + CLAIM_WAIT_S, time.monotonic(), False
    while True:
        row = store.get_activation(aid)
        if row["status"] == "done":
            return True
        if row["status"] == "failed":
            raise AssistantError(f"the serving replica refused to activate {domain}@{version}: {row['error']}")
        now = time.monotonic()
        if row["status"] == "claimed":
            if not claimed:
                claimed, deadline = True, now + DONE_WAIT_S
            if now - checked >= CLAIMANT_CHECK_S:
                checked = now
                if not owner_alive(store, row.get("claimed_by") or ""):
                    if store.finish_activation(aid, "failed", "the serving replica that took it stopped",
                                               only_from="claimed"):
                        log.warning("the replica that claimed %s@%s stopped: activating offline", domain, version)
                        return False
                    continue
            if now >= deadline and store.finish_activation(
                    aid, "failed", f"not finished within {DONE_WAIT_S:.0f} s", only_from="claimed"):
                raise AssistantError(f"the serving replica took the activation of {domain}@{version} but did not "
                                     f"finish it within {DONE_WAIT_S / 60:.0f} minutes; activate it from the "
                                     "Adapters tab")
        elif now >= deadline and store.finish_activation(aid, "failed", "no serving replica answered",
                                                         only_from="requested"):
            return False
        time.sleep(REQUEST_POLL_S)
