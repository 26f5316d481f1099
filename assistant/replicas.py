"""Several `assistant serve` replicas on one PostgreSQL database and one shared adapters folder.

Each serving process runs one `ReplicaSync` thread (server.serve starts it), which keeps it in step with
the others through the database:

- **Activations are live everywhere within `PROPAGATION_BOUND_S`.** An activation or rollback on any
  replica is recorded (cluster/coordination.py) and NOTIFYs the others; a replica that hears it (or finds it when
  it polls, every `POLL_S`, should a notification be lost) drops its cached pointer and loads the version
  on its engine, so its next answer comes from it. The pointer itself is the `active` file in the shared
  adapters folder (data/registry.py), written by the replica that activated.
- **Activation requests from workers.** A training worker that is not beside a server asks for its
  version to go live (`request_activation`); the first replica to claim the request activates it as its
  Activate button would (validate, load on its engine, move the pointer) and records the outcome, which
  the worker waits for. With no replica claiming it within `CLAIM_WAIT_S`, the worker activates offline.
- **The embedded worker** (settings.embedded_worker): the replica claims queued jobs when it runs none
  (jobs.dispatch) and reaps the jobs of workers that died (workers.reap).
- **The insert-time near-duplicate index** lives in each replica's state folder; a replica rebuilds a
  domain's index from the database (the shared rows and embedding cache) before checking a new item when
  its index is older than `INDEX_MAX_AGE_S` (workspace._check_new), so items other replicas accepted count.

Answers, feedback and /metrics need nothing here: every replica reads and writes the same tables, and the
Prometheus counters are the database's totals (store.response_totals). Sign-in cookies work on every
replica given the same `--session-secret`.
"""

from __future__ import annotations

import logging
import threading
import time

from assistant.cluster.coordination import CHANNEL_ACTIVATIONS, CHANNEL_JOBS
from assistant.errors import AssistantError

log = logging.getLogger(__name__)

POLL_S = 1.0                  # without a notification, a replica looks at the database this often
PROPAGATION_BOUND_S = 2.0     # an activation on one replica is live on all within this (POLL_S + a load)
CLOCK_SLACK_S = 30.0          # activations re-read this far back (clocks of replicas differ, commits lag)
INDEX_MAX_AGE_S = 60.0        # a shared database: a near-duplicate index older than this is rebuilt first


def rebuild_index(curator, store, domain: str) -> None:
    """A domain's insert-time near-duplicate index, rebuilt from the database (the rows every replica wrote,
    the shared embedding cache), as a curation run keeps them."""
    from assistant.data.curation import run
    _, kept, _, vectors = run(store, domain, curator._embedder(), curator.options)
    curator._save_index(domain, [it["key"] for it in kept], vectors)


class ReplicaSync:
    """The thread that keeps one serving replica in step with the others (see the module docstring)."""

    def __init__(self, workspace, serving, *, poll_s: float = POLL_S):
        from assistant.cluster.members import Wakeup, WorkerLock
        self.workspace, self.serving, self.poll_s = workspace, serving, poll_s
        self.store = workspace.store
        self.lock = WorkerLock(self.store)        # alive: the jobs our embedded worker claims are ours
        self.wake = Wakeup(self.store, (CHANNEL_ACTIVATIONS, CHANNEL_JOBS))
        self._seen: dict[int, float] = {}
        self._since = time.time()
        self._last_reap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replica-sync", daemon=True)

    def start(self) -> "ReplicaSync":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_s * 5)
        self.wake.close()
        self.lock.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("keeping this replica in step failed")
            self.wake.wait(self.poll_s)

    def step(self) -> None:
        self._apply_activations()
        self._serve_requests()
        self._run_jobs()

    def _apply_activations(self) -> None:
        now = time.time()
        for row in self.store.activations_since(self._since - CLOCK_SLACK_S):
            if row["id"] in self._seen:
                continue
            self._seen[row["id"]] = now
            self.serving.refresh(row["domain"])
        self._since = now
        for aid in [a for a, t in self._seen.items() if now - t > 4 * CLOCK_SLACK_S]:
            del self._seen[aid]

    def _serve_requests(self) -> None:
        while (req := self.store.claim_activation(self.lock.name)) is not None:
            try:
                self.serving.activate(req["domain"], req["version"], user=f"worker request {req['id']}")
            except AssistantError as e:
                self.store.finish_activation(req["id"], "failed", e.message)
            except Exception as e:  # noqa: BLE001 - the worker gets a reason, the log the details
                log.exception("activating %s@%s for a worker failed", req["domain"], req["version"])
                self.store.finish_activation(req["id"], "failed", f"{type(e).__name__} on the serving replica")
            else:
                self.store.finish_activation(req["id"], "done")

    def _run_jobs(self) -> None:
        from assistant.jobs import run as jobs
        from assistant.jobs.workers import REAP_EVERY_S
        ws = self.workspace
        if time.monotonic() - self._last_reap >= REAP_EVERY_S:   # every replica watches for dead workers
            jobs.reap(ws.settings, self.store, ws.registry)
            self._last_reap = time.monotonic()
        if ws.settings.embedded_worker:
            jobs.dispatch(ws.settings, self.store, ws.registry)
