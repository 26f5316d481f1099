"""Training workers: processes that claim queued jobs from the shared database and run them.

    assistant worker --database-url postgresql://... --adapters-dir /shared/adapters --train-device cuda:0

A worker claims the oldest queued job (cluster/coordination.py: `FOR UPDATE SKIP LOCKED`, so each job runs once),
runs it in its own process with its own `--train-device`/`--train-gpus` (jobs.run_job: progress, losses
and the log go to the database, where every replica's UI reads them), publishes into the shared adapters
folder, and asks the serving side to activate (remote.activate -> replicas.py). One job at a time per
worker; the database allows one queued-or-running job per domain. `assistant serve` runs an embedded worker
(jobs.dispatch: one child process per job), so one machine needs nothing else.

**A worker that dies** (kill -9, a lost machine): its liveness lock ends with its database session
(cluster/members.py), and `jobs.reap`, run by every worker and replica as it polls, marks its job **failed** with
the reason and removes its staging folder. A job is not re-queued behind the user's back (it may be what
killed the worker); publishing is an atomic rename, so nothing half-published is ever listed; a job process
whose owner is gone stops before publishing (jobs.run_job checks that its job is still running).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

POLL_S = 1.0                  # a worker without notifications looks for queued jobs this often
REAP_EVERY_S = 5.0            # how often an idle worker or replica looks for jobs of dead workers


def run_worker(settings, store, registry, *, stop: threading.Event | None = None, max_jobs: int | None = None) -> int:
    """`assistant worker` (Workspace.work): claim and run jobs until `stop` is set (or `max_jobs` have run)
    -> how many ran."""
    from assistant.cluster.coordination import CHANNEL_JOBS
    from assistant.cluster.members import Wakeup, WorkerLock
    from assistant.engine.threads import use_all_cores
    from assistant.jobs import run as jobs
    lock, wake = WorkerLock(store), Wakeup(store, (CHANNEL_JOBS,))
    stop = stop or threading.Event()
    use_all_cores()   # this process only trains (see assistant/engine/threads.py)
    log.info("worker %s: waiting for jobs in %s", lock.name, store.describe())
    ran, last_reap = 0, 0.0
    try:
        while not stop.is_set() and (max_jobs is None or ran < max_jobs):
            if time.monotonic() - last_reap >= REAP_EVERY_S:
                jobs.reap(settings, store, registry)
                last_reap = time.monotonic()
            job_id = store.claim_job(lock.name)
            if job_id is None:
                wake.wait(POLL_S)
                continue
            log.info("worker %s: running job %s", lock.name, job_id)
            job = jobs.run_job(settings, store, registry, job_id)
            log.info("worker %s: job %s %s", lock.name, job_id, job["status"])
            ran += 1
    finally:
        wake.close()
        lock.release()
    return ran
