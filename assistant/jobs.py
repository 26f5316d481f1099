"""Training jobs: the training recipe run in a child process, so a crash or an out-of-memory kill can't take
the server down and chat keeps answering while it trains.

    start_job   (server)  memory check (422) -> curate (writes the snapshot) -> size check (422) ->
                          store.create_job (409 if one of the domain is active) -> queued -> dispatch
    dispatch    (server)  the embedded worker: when this process runs no job, claim the oldest queued one
                          and spawn its child (workers.py: `assistant worker` claims and runs them too)
    run_job     (child)   running -> snapshot rows -> train into a staging folder -> evaluate (the serving
                          engine, gate.py's verdict) -> publish -> activate if the gate passes -> succeeded
                          (activation goes through the serving process when one runs: remote.py)
    cancel_job  (server)  SIGKILL the child's process group -> cancelled, staging removed
    reap                  jobs claimed by a worker or server that died -> failed, staging removed (at start too)

The job record shows its stages (curate -> train -> evaluate -> publish -> activate), each with its own
progress and time estimate (stages.py). Log lines are shown to users: they never name a server path. The
staging folder is named after the job (`<adapters>/<domain>/.staging-job-<id>`), so cleanup needs no path
from the log.

The child is `python -m assistant.jobs JOB_ID SETTINGS_JSON` in its own session (its own process group).
The database enforces one active job; status, progress and the loss history live there, so they survive
a browser reload and a server restart. Publishing is the registry's fsync + atomic rename: a kill at any
point leaves either a complete new version or a `.staging-*` folder that is never listed.
"""

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
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import AssistantError, Conflict, DatasetTooSmall, NotFound
from .stages import TERMINAL, StageTracker, overall_progress, pending_stages
from .threads import use_all_cores

log = logging.getLogger(__name__)

RETRY_HINT = "; the trained adapter is kept: retry from evaluation"
KILL_WAIT_SECONDS = 10.0        # how long cancel waits for the killed group to disappear...
KILL_POLL_SECONDS = 0.05        # ...checking this often
STAGING_PREFIX = ".staging-job-"   # + job id: the job's staging folder in its domain's adapter folder
JOB_LOG_DIR = "jobs"            # <state>/jobs/<job_id>.log : the child's stdout and stderr
JOB_NICENESS = 10               # the child yields the CPU to the server, so chat stays responsive
SHARED_STAGING_GRACE_S = 3600   # with a shared database, staging folders younger than this may be another replica's

_cancelling: set[str] = set()   # jobs this process is cancelling (their exit is not a failure)


# ---------------------------------------------------------------------------------------------
# Settings across the process boundary
# ---------------------------------------------------------------------------------------------

_CHILD_SETTINGS = ("home", "state_dir", "adapters_dir", "cache_dir", "base_model", "quantization", "dtype", "device",
                   "train_device", "train_gpus")
_CHILD_GROUPS = ("curation", "gate", "train")   # the recipes' settings a job runs with


def _settings_json(settings) -> str:
    plain = {k: getattr(settings, k) for k in _CHILD_SETTINGS}
    return json.dumps({**{k: str(v) if isinstance(v, Path) else v for k, v in plain.items()},
                       **{k: getattr(settings, k) for k in _CHILD_GROUPS}})


def _settings_from_json(text: str):
    from .settings import Settings
    d = json.loads(text)
    paths = {f.name for f in fields(Settings) if f.name in ("home", "state_dir", "adapters_dir", "cache_dir")}
    return Settings(**{k: Path(v) if k in paths else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------
# Preparing a job (in the server): the dataset check and the job row
# ---------------------------------------------------------------------------------------------

def _prepare(settings, store, registry, domain: str, train_settings,
             free_bytes: float | None = None) -> dict:
    """Check memory, curate, check the size: the job's `settings` record, or an error for the caller.
    `train_settings`: a TrainSettings (checked where they entered), or overrides of the server's defaults
    that are checked here, once (`TrainSettings.of`). `free_bytes`: device memory free for the job (None:
    measured on CUDA, no check on CPU)."""
    from .curation import curate
    from .memory import check_job_memory
    from .training import MIN_EXAMPLES, TrainSettings
    registry.get_domain(domain)
    ts = TrainSettings.of(train_settings, settings.train)   # InvalidSetting (400) names the field
    from .limits import engine_limits
    engine_limits(settings).check(ts.rank, ts.target_modules, what="this training job's adapter")   # 422 now
    active = store.active_job(domain)
    if active is not None:  # cheap early answer; create_job is what really enforces it
        from .errors import Conflict
        raise Conflict(f"job {active['job_id']} ({active['domain']}) is already training: wait for it to "
                       "finish or cancel it")
    check_job_memory(settings, ts, free_bytes)   # InsufficientMemory (422) names the numbers and what to lower
    t0 = time.monotonic()
    snap = curate(store, domain, settings)
    curate_seconds = time.monotonic() - t0
    n_train = snap.report.get("train", 0)
    if snap.report.get("kept", 0) < MIN_EXAMPLES:
        raise DatasetTooSmall(f"domain {domain!r} has {snap.report.get('kept', 0)} usable examples after curation; "
                              f"training needs at least {MIN_EXAMPLES}: add examples or corrections")
    feedback_ids = sorted({fid for it in snap.items if it.get("removed") is None
                           for fid in it.get("feedback_ids") or []})
    defaults = TrainSettings().to_dict()
    requested = {k: v for k, v in ts.to_dict().items() if v != defaults[k]}   # what differs from the recipe's
    return {"training": ts.to_dict(), "requested": requested, "snapshot": snap.hash,
            "feedback_ids": feedback_ids, "n_train": n_train,
            "n_eval": snap.report.get("eval", 0), "curate_seconds": round(curate_seconds, 2),
            "n_corrections": snap.report.get("sources", {}).get("correction", 0)}


def start_job(settings, store, registry, domain: str, train_settings: dict | None = None) -> str:
    """Queue a training job for `domain` (a worker runs it: this process's embedded one when it is free);
    returns the job id. Raises DatasetTooSmall (422), Conflict (409, a job of the domain is active) or
    AssistantError (bad settings)."""
    record = _prepare(settings, store, registry, domain, train_settings)
    if store.kind == "postgresql":   # a worker on another machine reads the snapshot from the database
        store.put_snapshot_file(domain, record["snapshot"], _snapshot_path(settings, domain, record["snapshot"]).read_bytes())
    job_id = store.create_job(domain, record)
    _curated(store, job_id, record)
    store.notify_jobs(job_id)
    if settings.embedded_worker:
        dispatch(settings, store, registry, job_id)
    return job_id


_running: set[str] = set()        # jobs this process's embedded worker runs (at most one)
ACTIVE = ("queued", "running")
_dispatch_lock = threading.Lock()


def dispatch(settings, store, registry, job_id: str | None = None) -> str | None:
    """The embedded worker: when this process runs no job, claim `job_id` (or the oldest queued job) and
    start its child process -> the job started, or None."""
    from .cluster import worker_name
    with _dispatch_lock:
        for done in [j for j in _running if (store.get_job(j) or {"status": "gone"})["status"] not in ACTIVE]:
            _running.discard(done)     # it has ended; its process is only exiting
        if _running:
            return None
        job_id = store.claim_job(worker_name(), job_id) or (store.claim_job(worker_name()) if job_id else None)
        if job_id is None:
            return None
        _running.add(job_id)
    try:
        _spawn(settings, store, registry, job_id)
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
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_dir / f"{job_id}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "assistant.jobs", job_id, _settings_json(settings), *extra],
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


def _ended(store, registry, job_id: str, code: int) -> None:
    job = store.get_job(job_id)
    if job is None or job["status"] in TERMINAL or job_id in _cancelling:
        return
    why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    hint = " (out of memory? try a smaller batch_size or max_seq_len)" if code == -signal.SIGKILL else ""
    if resumable(job):
        hint += RETRY_HINT
    else:
        _remove_staging(registry.root, job)
    store.update_job(job_id, status="failed", error=f"the training process ended unexpectedly: {why}{hint}",
                     stage=None, stages=_stages_ended(job),
                     finished_at=time.time())


# ---------------------------------------------------------------------------------------------
# Cancel and recover
# ---------------------------------------------------------------------------------------------

def _is_job_process(pid: int | None, job_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, TypeError):
        return False
    return b"assistant.jobs" in cmdline and job_id.encode() in cmdline


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


def staging_path(adapters_root, job: dict) -> Path:
    """The job's staging folder, derived from its id (never logged: log lines are shown to users)."""
    return Path(adapters_root) / job["domain"] / f"{STAGING_PREFIX}{job['job_id']}"


def resumable(job: dict) -> bool:
    """True when the job's training finished (its adapter is in the staging folder): a failure after it
    keeps that folder, and the job can retry from evaluation."""
    return any(st["name"] == "train" and st["status"] == "done" for st in job.get("stages") or ())


def _remove_staging(adapters_root, job: dict) -> None:
    shutil.rmtree(staging_path(adapters_root, job), ignore_errors=True)


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
    from .errors import NotFound
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
    from .cluster import owner_alive
    failed = []
    for owned in store.owned_jobs():
        alive = (owner_alive(store, owned["worker"], self_is_stale=at_start) if owned["worker"] is not None
                 else not at_start)   # running under no worker's name: left by an older version of the app
        job = None if alive else store.get_job(owned["job_id"])
        if job is not None and job["status"] in ACTIVE:
            if _is_job_process(job.get("pid"), job["job_id"]):   # what is left of it, when it ran here
                _kill_group(job["pid"])
            keep = resumable(job)   # its training finished: the adapter stays for "retry from evaluation"
            if not keep:
                _remove_staging(registry.root, job)
            store.update_job(job["job_id"], status="failed", finished_at=time.time(), stage=None,
                             stages=_stages_ended(job), error="the worker running this job stopped (its process "
                             "ended) before the job finished: nothing was published"
                             + (RETRY_HINT if keep else "; start training again"))
            failed.append(job["job_id"])
    return failed


def recover_orphans(settings, store, registry) -> list[str]:
    """At server start: `reap(at_start=True)`, a restart named in the error, and leftover staging folders
    removed (not those of running jobs). Jobs still queued for a worker stay queued -> the ids failed."""
    failed = reap(settings, store, registry, at_start=True)
    for job_id in failed:
        keep = resumable(store.get_job(job_id))
        store.update_job(job_id, error="the server restarted while this job ran"
                         + (RETRY_HINT if keep else ": start training again"))
    running = {f"{STAGING_PREFIX}{j['job_id']}" for j in store.list_jobs()
               if j["status"] in ("queued", "running") or (j["status"] == "failed" and resumable(j))}
    # a shared adapters folder: another replica may be importing right now; its staging is young
    registry.cleanup_staging(keep=running, older_than_s=SHARED_STAGING_GRACE_S if store.kind == "postgresql" else 0)
    return failed


# ---------------------------------------------------------------------------------------------
# The job itself (in the child, or inline for the CLI)
# ---------------------------------------------------------------------------------------------

def _read_rows(settings, record: dict, store, domain: str) -> list[dict]:
    """The job's snapshot rows. Its path is derived from the hash (the job record, which users see, holds
    no server path); records of older jobs may still carry `snapshot_path`."""
    path = record.get("snapshot_path") or (store.latest_snapshot(domain) or {}).get("path")
    if record.get("snapshot"):
        path = _snapshot_path(settings, domain, record["snapshot"])
        if not path.is_file() and (content := store.get_snapshot_file(domain, record["snapshot"])) is not None:
            from .files import atomic_write_bytes
            path.parent.mkdir(parents=True, exist_ok=True)   # curated by a replica on another machine
            atomic_write_bytes(path, content)
    if not path or not Path(path).is_file():
        raise AssistantError(f"the dataset snapshot of {domain!r} is missing: curate it again and retrain")
    from .curation import read_snapshot
    return read_snapshot(path)


def _snapshot_path(settings, domain: str, snapshot_hash: str) -> Path:
    return Path(settings.state_path) / "snapshots" / domain / f"{snapshot_hash}.jsonl"


def _user_text(text: str, settings) -> str:
    """`text` with the server's folders taken out (job logs and errors are shown to users)."""
    for folder in sorted({str(settings.adapters_path), str(settings.state_path), str(settings.home)}, key=len,
                         reverse=True):
        if folder and folder != ".":
            text = text.replace(folder, "<server folder>")
    return text


def run_job(settings, store, registry, job_id: str, on_step=None, *, resume: str | None = None) -> dict:
    """Everything a job does, start to end; returns the job record. Errors mark the job failed. With
    `resume="evaluate"`, the adapter the job trained (kept in its staging folder) is evaluated and published."""
    from . import evaluation
    from .training import TrainingStopped, _load

    job = store.get_job(job_id)
    domain, record = job["domain"], job["settings"]
    staging = None
    trained = False      # once True, a later failure keeps the staging folder (retry from evaluation)
    tracker = StageTracker(store, job_id, job["stages"])
    store.update_job(job_id, status="running", pid=os.getpid(), started_at=time.time(),
                     log="retrying from evaluation\n" if resume else "started\n")
    try:
        rows = _read_rows(settings, record, store, domain)
        system_prompt = registry.get_domain(domain).system_prompt
        if resume == "evaluate":
            staging, trained = staging_path(registry.root, job), True
            kept = (job.get("metrics") or {}).get("trained")
            if not kept or not (staging / "adapter_model.safetensors").is_file():
                trained = False
                raise AssistantError("this job's trained adapter is no longer there: start training again")
            base = _load(settings)
            result = _Trained(**kept)
        else:
            staging = registry.new_staging(domain, tag=f"job-{job_id}")
            base, result = _train(settings, store, job_id, rows, record, staging, tracker, on_step)
            store.update_job(job_id, metrics={"train": result.summary(), "trained": _Trained.of(result).__dict__})
            trained = True
        base.model.eval()

        tracker.start("evaluate")
        tracker.note("evaluate", "the base and the new version answer the held-out and corrected questions")
        from .settings import group_settings
        gate_settings = group_settings(settings, "gate")
        before, after = evaluation.evaluate_adapter(
            base, staging, rows, gate_settings, system_prompt,
            progress=lambda done, total: tracker.advance("evaluate", done, total))
        verdict = evaluation.verdict(before, after, gate_settings)
        promote = verdict["promote"]
        metrics = {"train": result.summary(), "before": evaluation.summary(before),
                   "after": evaluation.summary(after), "gate": verdict,
                   "eval_vs_train_time": round(after["eval_seconds"] / result.seconds, 3) if result.seconds else None,
                   "trained": _Trained.of(result).__dict__}
        tracker.finish("evaluate")
        store.update_job(job_id, metrics=metrics, log=f"evaluated: {verdict['summary']}\n")
        card = {"base_fingerprint": result.fingerprint, "dataset_snapshot": record.get("snapshot"),
                "feedback_ids": record.get("feedback_ids", []), "training_settings": result.settings,
                "metrics": metrics, "job_id": job_id, "domain": domain}
        if store.get_job(job_id)["status"] == "cancelled":
            raise TrainingStopped("cancelled before publishing")
        tracker.start("publish")
        version = registry.publish(domain, staging, card)
        staging = None
        tracker.finish("publish")
        store.update_job(job_id, adapter_version=version, log=f"published {domain}@{version}\n")
        if promote:
            tracker.start("activate")
            where = _activate(settings, registry, domain, version, base.model, result.fingerprint, store=store)
            tracker.finish("activate")
            end = f"{domain}@{version} is live" + (" (activated by the server)" if where != "offline" else "") + "\n"
        else:
            tracker.finish("activate", status="skipped")
            end = f"{domain}@{version} was not activated: {verdict['summary']}\n"
        tracker.close()
        store.update_job(job_id, status="succeeded", progress=1.0, stage=None, stages=tracker.snapshot(),
                         promoted=promote, finished_at=time.time(), log=end)
    except TrainingStopped as e:
        tracker.close()
        store.update_job(job_id, log=f"stopped: {e}\n")
    except KeyboardInterrupt:
        tracker.close()
        store.update_job(job_id, status="cancelled", finished_at=time.time(), log="interrupted\n")
        raise
    except BaseException as e:  # noqa: BLE001 - any failure ends the job, with its message
        stage = tracker.current
        tracker.fail_running()
        tracker.close()
        log.exception("job %s failed", job_id)
        if store.get_job(job_id)["status"] not in TERMINAL:
            message = e.message if isinstance(e, AssistantError) else f"{type(e).__name__}: {e}"
            where = f"{stage} failed: " if stage and trained else ""
            keep = trained and isinstance(e, Exception) and staging is not None and staging.is_dir()
            store.update_job(job_id, status="failed", finished_at=time.time(),
                             error=_user_text(where + message, settings) + (RETRY_HINT if keep else ""))
            if keep:
                staging = None   # finished work is kept for "retry from evaluation"
        if not isinstance(e, Exception):
            raise
    finally:
        tracker.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return store.get_job(job_id)


def _train(settings, store, job_id: str, rows, record: dict, staging: Path, tracker, on_step):
    """The train stage: (the base, the TrainResult), the adapter saved in `staging`."""
    from .training import TrainSettings, _load, train_adapter
    ts = TrainSettings.from_record(record["training"])
    tracker.start("train")
    tracker.note("train", "loading the base model")
    base = _load(settings)
    store.update_job(job_id, log=f"loaded {base.describe()}\n")

    def progress(step, total, loss):
        store.update_job(job_id, step=step, total_steps=total, loss=loss)
        store.add_job_loss(job_id, step, loss)
        tracker.advance("train", step, total)
        if step == 1:
            tracker.note("train", "training")
        if on_step is not None:
            on_step(step, total, loss)

    def stopped():   # cancelled, or failed because the worker running it is gone (reap)
        return store.get_job(job_id)["status"] != "running"

    if settings.train_gpus > 1:
        store.update_job(job_id, log=f"training in {settings.train_gpus} processes\n")
    result = train_adapter(base, rows, staging, ts, progress=progress, should_stop=stopped,
                           processes=settings.train_gpus, note=lambda text: tracker.note("train", text))
    tracker.finish("train")
    store.update_job(job_id, log=f"trained: {json.dumps(result.summary())}\n")
    result.model.unload()            # LoRA layers out: the engine loads the adapter from its folder
    return base, result


@dataclass
class _Trained:
    """What evaluation and the version's card need of a TrainResult (kept in the job's metrics for a retry)."""
    summary_: dict
    settings: dict
    fingerprint: dict
    seconds: float

    @classmethod
    def of(cls, result) -> "_Trained":
        return cls(result.summary(), result.settings, result.fingerprint, result.seconds)

    def summary(self) -> dict:
        return self.summary_


def retry_job(settings, store, registry, job_id: str, *, inline: bool = False) -> None:
    """Resume a failed job from evaluation, with the adapter its training left in the staging folder: in a
    child process, or here and blocking with `inline` (the CLI)."""
    job = store.get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id[:64]!r}")
    if job["status"] != "failed" or not resumable(job) or not (job.get("metrics") or {}).get("trained") \
            or not (staging_path(registry.root, job) / "adapter_model.safetensors").is_file():
        raise Conflict("only a failed job whose training finished (and whose adapter was kept) can retry from "
                       "evaluation: start training again")
    stages = [st if st["name"] in ("curate", "train") else {**st, "status": "pending", "done": 0, "total": 0,
                                                                 "progress": 0.0, "eta_s": None, "started_at": None,
                                                                 "finished_at": None, "elapsed_s": 0.0}
              for st in job["stages"]]
    from .cluster import worker_name
    # claimed by this process at once (no other worker takes it and starts it from scratch); Conflict (409)
    # when another job of the domain is active
    store.update_job(job_id, status="queued", error=None, finished_at=None, stages=stages, worker=worker_name(),
                     progress=overall_progress(stages))
    if inline:
        run_job(settings, store, registry, job_id, resume="evaluate")
        return
    with _dispatch_lock:
        _running.add(job_id)
    _spawn(settings, store, registry, job_id, "--resume", "evaluate")


def _activate(settings, registry, domain: str, version: str, model, fingerprint: dict, store=None) -> str:
    """Make the published version live through the one activation path (remote.activate): a server running
    on this state activates it as a click would (validate, load on its engine and every vLLM server, then
    move the pointer); the job never moves the pointer itself then. With no server running, it is validated
    here against the base the job trained on, its weights read back, and the pointer moved offline.
    Returns where it was done (the server's URL or "offline")."""
    from . import remote
    from .errors import ServerRefused

    def load(name: str, v: str) -> None:
        import torch
        from safetensors.torch import load_file

        from .registry import ADAPTER_WEIGHTS, validate_adapter
        shapes = {n.removesuffix(".base_layer"): (m.in_features, m.out_features)
                  for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        folder = registry.version_path(name, v)
        validate_adapter(folder, fingerprint, shapes)
        load_file(str(folder / ADAPTER_WEIGHTS), device="cpu")

    try:
        return remote.activate(settings, registry, domain, version, offline_load=load, store=store)
    except ServerRefused as e:
        raise AssistantError(f"{domain}@{version} was published but did not go live: {e.message}") from None


def run_job_inline(settings, store, registry, domain: str, train_settings=None) -> dict:
    """Blocking, in this process, with a progress bar (the CLI): same checks, same job record."""
    from tqdm import tqdm

    from .cluster import WorkerLock
    record = _prepare(settings, store, registry, domain, train_settings)
    job_id = store.create_job(domain, record)
    store.claim_job((lock := WorkerLock(store)).name, job_id)   # ours: a reaper can tell when we are gone
    _curated(store, job_id, record)
    bar = tqdm(total=None, desc=f"training {domain}", unit="step")

    def on_step(step, total, loss):
        bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.refresh()

    try:
        job = run_job(settings, store, registry, job_id, on_step=on_step)
    except KeyboardInterrupt:
        job = store.get_job(job_id)
    finally:
        bar.close()
        lock.release()
    return job


def main(argv: list[str] | None = None) -> int:
    from .registry import Registry
    from .store import Store
    args = argv or sys.argv[1:]
    job_id, settings_json = args[:2]
    resume = args[3] if len(args) >= 4 and args[2] == "--resume" else None
    try:
        os.nice(JOB_NICENESS)
    except OSError:
        pass
    settings = _settings_from_json(settings_json)
    store, registry = Store(settings.database), Registry(settings.adapters_path)
    use_all_cores()   # this process only trains (see assistant/threads.py)
    job = run_job(settings, store, registry, job_id, resume=resume)
    return 0 if job["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
