"""A training job's process: settings across the process boundary, the child process started and
watched, the embedded worker's dispatch (one job at a time in this process), cancel, and the jobs whose
worker is gone failed (reap) at start and as workers poll. What the child runs is jobs.run_job."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

from assistant.data.stages import TERMINAL, overall_progress, pending_stages

log = logging.getLogger(__name__)

RETRY_HINT = "; the trained adapter is kept: retry from evaluation"
KILL_WAIT_SECONDS = 10.0        # how long cancel waits for the killed group to disappear...
KILL_POLL_SECONDS = 0.05        # ...checking this often
STAGING_PREFIX = ".staging-job-"   # + job id: the job's staging folder in its domain's adapter folder
ATTEMPT_SUFFIX = ".attempt-"       # + n: the staging folder of a job's n-th attempt (n >= 2)
JOB_LOG_DIR = "jobs"            # <state>/jobs/<job_id>.log : the child's stdout and stderr
KEPT_TRAINED_PER_DOMAIN = 1      # failed jobs' trained adapters kept per domain for "retry from evaluation"
SHARED_STAGING_GRACE_S = 3600   # with a shared database, staging folders younger than this may be another replica's

_cancelling: set[str] = set()   # jobs this process is cancelling (their exit is not a failure)

# ---------------------------------------------------------------------------------------------
# Settings across the process boundary
# ---------------------------------------------------------------------------------------------

_CHILD_SETTINGS = ("home", "state_dir", "adapters_dir", "cache_dir", "base_model", "quantization", "dtype", "device",
                   "train_device", "train_gpus")
_CHILD_GROUPS = ("canary", "curation", "gate", "train")   # the recipes' settings a job runs with


def _settings_json(settings) -> str:
    plain = {k: getattr(settings, k) for k in _CHILD_SETTINGS}
    return json.dumps({**{k: str(v) if isinstance(v, Path) else v for k, v in plain.items()},
                       **{k: getattr(settings, k) for k in _CHILD_GROUPS}})


def _settings_from_json(text: str):
    from assistant.settings import Settings
    d = json.loads(text)
    paths = {f.name for f in fields(Settings) if f.name in ("home", "state_dir", "adapters_dir", "cache_dir")}
    return Settings(**{k: Path(v) if k in paths else v for k, v in d.items()})


_running: set[str] = set()        # jobs this process's embedded worker runs (at most one)
ACTIVE = ("queued", "running")
_dispatch_lock = threading.Lock()


def dispatch(settings, store, registry, job_id: str | None = None) -> str | None:
    """The embedded worker: when this process runs no job, claim `job_id` (or the oldest queued job) and
    start its child process -> the job started, or None."""
    from assistant.cluster.members import worker_name
    with _dispatch_lock:
        for done in [j for j in _running if (store.get_job(j) or {"status": "gone"})["status"] not in ACTIVE]:
            _running.discard(done)     # it has ended; its process is only exiting
        if _running:
            return None
        job_id = store.claim_job(worker_name(), job_id) or (store.claim_job(worker_name()) if job_id else None)
        if job_id is None:
            return None
    return run_here(settings, store, registry, job_id)


def run_here(settings, store, registry, job_id: str, *extra: str) -> str:
    """Start a job this process claimed as its own child, counted as the embedded worker's job (`extra`: the
    child's arguments after the settings, e.g. --resume evaluate) -> the job id."""
    with _dispatch_lock:
        _running.add(job_id)
    try:
        _spawn(settings, store, registry, job_id, *extra)
    except BaseException:
        _running.discard(job_id)
        raise
    return job_id


def _spawn(settings, store, registry, job_id: str, *extra: str) -> None:
    """The job's child process (`extra`: its arguments after the settings, e.g. --resume evaluate)."""
    log_dir = Path(settings.state_path) / JOB_LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ASSISTANT_DATABASE_URL", None)   # the URL goes through the environment: a password stays out of `ps`
    env.update({"ASSISTANT_DATABASE_URL": settings.database_url} if settings.database_url else {})
    root = str(Path(__file__).resolve().parents[2])   # the folder that holds the assistant package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_dir / f"{job_id}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "assistant.jobs.run", job_id, _settings_json(settings), *extra],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)   # its own process group: cancel kills it all
    store.update_job(job_id, pid=proc.pid)
    threading.Thread(target=_watch, args=(settings, store, registry, job_id, proc), name=f"job-{job_id}",
                     daemon=True).start()
    if store.get_job(job_id)["status"] == "cancelled":  # cancelled before its pid was recorded
        _kill_group(proc.pid)


def _watch(settings, store, registry, job_id: str, proc) -> None:
    """Reap the child; a child that died without saying how it ended (crash, OOM kill) failed. Then the
    embedded worker takes the next queued job."""
    code = proc.wait()
    try:
        _ended(store, registry, job_id, code)
    finally:
        _running.discard(job_id)
    try:
        dispatch(settings, store, registry)
    except Exception:  # noqa: BLE001 - the next poll tries again
        log.exception("could not start the next queued job")


def published_by(registry, job: dict) -> tuple[str, dict] | None:
    """(the version a job published before it died, its card) or None: its card names the job. A job killed
    between publishing and activating leaves a complete version that is not live: what ended it says so."""
    for version in reversed(registry.versions(job["domain"])):
        card = registry.read_card(job["domain"], version)
        if card.get("job_id") == job["job_id"]:
            return version, card
    return None


def _published_unactivated(store, registry, job: dict, why: str) -> bool:
    """Mark `job` failed as one that published and died before activating -> whether it had published."""
    found = published_by(registry, job)
    if found is None:
        return False
    version, card = found
    promote = ((card.get("metrics") or {}).get("gate") or {}).get("promote")
    then = (f"it passed the gate but is not live: activate {job['domain']}@{version} in the Adapters tab "
            f"(or `assistant adapters activate {job['domain']} {version}`)" if promote
            else "the gate did not promote it, so it stays inactive")
    store.update_job(job["job_id"], status="failed", adapter_version=version, promoted=False, stage=None,
                     stages=_stages_ended(job), finished_at=time.time(),
                     error=f"{why} after publishing {job['domain']}@{version}, before making it live: {then}")
    return True


def _ended(store, registry, job_id: str, code: int) -> None:
    job = store.get_job(job_id)
    if job is None or job["status"] in TERMINAL or job_id in _cancelling:
        return
    why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    if _published_unactivated(store, registry, job, f"the training process ended unexpectedly ({why})"):
        return
    hint = " (out of memory? try a smaller batch_size or max_seq_len)" if code == -signal.SIGKILL else ""
    if resumable(job):
        hint += RETRY_HINT
    else:
        _remove_staging(registry.root, job)
    store.update_job(job_id, status="failed", error=f"the training process ended unexpectedly: {why}{hint}",
                     stage=None, stages=_stages_ended(job),
                     finished_at=time.time())
    prune_kept(store, registry.root, job["domain"])


# ---------------------------------------------------------------------------------------------
# Cancel and recover
# ---------------------------------------------------------------------------------------------

def _is_job_process(pid: int | None, job_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, TypeError):
        return False
    return b"assistant.jobs.run" in cmdline and job_id.encode() in cmdline


def _kill_group(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it when it is our own child (otherwise our watcher thread does)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(KILL_POLL_SECONDS)


def attempt_tag(job_id: str, attempt: int = 1) -> str:
    """The staging folder name of a job's attempt, less the registry's `.staging-` prefix."""
    return f"job-{job_id}" + (f"{ATTEMPT_SUFFIX}{attempt}" if attempt > 1 else "")


def staging_path(adapters_root, job: dict, attempt: int = 1) -> Path:
    """The staging folder of a job's attempt, derived from its id (never logged: log lines are shown to
    users). Attempt 1 trains in `.staging-job-<id>`, later ones in `.staging-job-<id>.attempt-<n>`."""
    return Path(adapters_root) / job["domain"] / f".staging-{attempt_tag(job['job_id'], attempt)}"


def kept_attempt(job: dict) -> int:
    """The attempt whose trained adapter a failed job kept (the one "retry from evaluation" resumes)."""
    return int(((job.get("metrics") or {}).get("trained") or {}).get("attempt") or 1)


def resumable(job: dict) -> bool:
    """True when the job's training finished (its adapter is in the staging folder): a failure after it
    keeps that folder, and the job can retry from evaluation."""
    return any(st["name"].split(" ")[0] == "train" and st["status"] == "done" for st in job.get("stages") or ())


def _remove_staging(adapters_root, job: dict) -> None:
    first = staging_path(adapters_root, job)
    shutil.rmtree(first, ignore_errors=True)
    for later in first.parent.glob(f"{first.name}{ATTEMPT_SUFFIX}*"):
        shutil.rmtree(later, ignore_errors=True)


def kept_staging(store, domain: str | None = None) -> set[str]:
    """Staging folder names that stay: those of queued and running jobs, and per domain the trained adapters
    of its newest failed jobs (KEPT_TRAINED_PER_DOMAIN) for "retry from evaluation". Older failures' go, so
    repeated failures do not fill the disk; retrying one of those says to start training again."""
    names, kept = set(), {}
    for j in store.list_jobs(domain):                      # newest first
        if j["status"] in ("queued", "running"):
            names.add(f"{STAGING_PREFIX}{j['job_id']}")
        elif j["status"] == "failed" and resumable(j) and kept.get(j["domain"], 0) < KEPT_TRAINED_PER_DOMAIN:
            kept[j["domain"]] = kept.get(j["domain"], 0) + 1
            names.add(f"{STAGING_PREFIX}{j['job_id']}")
    return names


def prune_kept(store, adapters_root, domain: str) -> None:
    """After a job of `domain` failed: remove its failed jobs' staging folders that kept_staging lets go."""
    keep = kept_staging(store, domain)
    for j in store.list_jobs(domain):
        if j["status"] == "failed" and f"{STAGING_PREFIX}{j['job_id']}" not in keep:
            _remove_staging(adapters_root, j)


def _stages_ended(job: dict) -> list[dict]:
    """A job's stages after it ended early (killed, cancelled, orphaned): the running stage failed."""
    return [{**st, "status": "failed", "eta_s": None} if st["status"] == "running" else st
            for st in job.get("stages") or pending_stages()]


def _curated(store, job_id: str, record: dict) -> None:
    """The curate stage ran in the server before the job existed: record it as done."""
    stages = pending_stages()
    now, took = time.time(), record.get("curate_seconds", 0.0)
    stages[0].update(status="done", progress=1.0, elapsed_s=took, eta_s=0.0, started_at=round(now - took, 3),
                     finished_at=round(now, 3))
    store.update_job(job_id, stage=None, stages=stages, progress=overall_progress(stages))


def cancel_job(settings, store, job_id: str) -> dict:
    """Cancel a queued or running job: kill its process group, mark it cancelled, remove its staging.
    A job that already ended is left as it is."""
    from assistant.errors import NotFound
    job = store.get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    if job["status"] in TERMINAL:
        return job
    _cancelling.add(job_id)
    try:
        store.update_job(job_id, status="cancelled", finished_at=time.time(), log="cancelled by request\n")
        if _is_job_process(job.get("pid"), job_id) or job.get("pid") and _is_own_child(job["pid"]):
            _kill_group(job["pid"])
        job = store.get_job(job_id)           # after the kill: the child's last progress write is in
        store.update_job(job_id, stage=None, stages=_stages_ended(job))
        _remove_staging(settings.adapters_path, job)
    finally:
        _cancelling.discard(job_id)
    return store.get_job(job_id)


def _is_own_child(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1] == str(os.getpid())
    except (OSError, IndexError):
        return False


def reap(settings, store, registry, *, at_start: bool = False) -> list[str]:
    """Mark failed the claimed jobs whose worker is gone (cluster.owner_alive; `at_start`: also those under
    this process's own name, left by an earlier process of the same pid) -> their ids. Not re-queued: the
    job may be what killed its worker. Every worker and replica runs this as it polls."""
    from assistant.cluster.members import owner_alive
    failed = []
    for owned in store.owned_jobs():
        alive = (owner_alive(store, owned["worker"], self_is_stale=at_start) if owned["worker"] is not None
                 else not at_start)   # running under no worker's name: left by an older version of the app
        job = None if alive else store.get_job(owned["job_id"])
        if job is not None and job["status"] in ACTIVE:
            if _is_job_process(job.get("pid"), job["job_id"]):   # what is left of it, when it ran here
                _kill_group(job["pid"])
            failed.append(job["job_id"])
            if _published_unactivated(store, registry, job, "the worker running this job stopped"):
                continue
            keep = resumable(job)   # its training finished: the adapter stays for "retry from evaluation"
            if not keep:
                _remove_staging(registry.root, job)
            store.update_job(job["job_id"], status="failed", finished_at=time.time(), stage=None,
                             stages=_stages_ended(job), error="the worker running this job stopped (its process "
                             "ended) before the job finished: nothing was published"
                             + (RETRY_HINT if keep else "; start training again"))
            prune_kept(store, registry.root, job["domain"])
    return failed


def recover_orphans(settings, store, registry) -> list[str]:
    """At server start: `reap(at_start=True)`, a restart named in the error, and leftover staging folders
    removed (not those of running jobs). Jobs still queued for a worker stay queued -> the ids failed."""
    failed = reap(settings, store, registry, at_start=True)
    for job_id in failed:
        job = store.get_job(job_id)
        if job.get("adapter_version"):        # it published: the message already says what to do
            continue
        keep = resumable(job)
        store.update_job(job_id, error="the server restarted while this job ran"
                         + (RETRY_HINT if keep else ": start training again"))
    # a shared adapters folder: another replica may be importing right now; its staging is young
    registry.cleanup_staging(keep=kept_staging(store), older_than_s=SHARED_STAGING_GRACE_S if store.kind == "postgresql" else 0)
    return failed
