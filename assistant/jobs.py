"""Training jobs: the training recipe run in a child process, so a crash or an out-of-memory kill can't take
the server down and chat keeps answering while it trains.

    start_job   (server)  memory check (422) -> curate -> size check (422) -> store.create_job (409 if one
                          is active) -> spawn
    run_job     (child)   running -> snapshot rows -> train into a staging folder -> evaluate -> publish
                          -> activate if the gate passes -> succeeded, with metrics
    cancel_job  (server)  SIGKILL the child's process group -> cancelled, staging removed
    recover_orphans       at server start: jobs left queued/running by a dead server -> failed, staging removed

The child is `python -m assistant.jobs JOB_ID SETTINGS_JSON` in its own session (its own process group).
The database enforces one active job; status, progress and the loss history live there, so they survive
a browser reload and a server restart. Publishing is the registry's fsync + atomic rename: a kill at any
point leaves either a complete new version or a `.staging-*` folder that is never listed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

from .errors import AssistantError, DatasetTooSmall
from .threads import use_all_cores

TERMINAL = ("succeeded", "failed", "cancelled")
KILL_WAIT_SECONDS = 10.0        # how long cancel waits for the killed group to disappear
TRAIN_SHARE = 0.8               # of the progress bar: training; evaluation and publishing take the rest
STAGING_TAG = "staging "        # log line naming the job's staging folder (for cleanup after a kill)
JOB_LOG_DIR = "jobs"            # <state>/jobs/<job_id>.log : the child's stdout and stderr
JOB_NICENESS = 10               # the child yields the CPU to the server, so chat stays responsive

_cancelling: set[str] = set()   # jobs this process is cancelling (their exit is not a failure)


# ---------------------------------------------------------------------------------------------
# Settings across the process boundary
# ---------------------------------------------------------------------------------------------

_CHILD_SETTINGS = ("home", "state_dir", "adapters_dir", "cache_dir", "base_model", "quantization", "dtype", "device")


def _settings_json(settings) -> str:
    return json.dumps({k: str(getattr(settings, k)) for k in _CHILD_SETTINGS})


def _settings_from_json(text: str):
    from .settings import Settings
    d = json.loads(text)
    paths = {f.name for f in fields(Settings) if f.name in ("home", "state_dir", "adapters_dir", "cache_dir")}
    return Settings(**{k: Path(v) if k in paths else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------
# Preparing a job (in the server): the dataset check and the job row
# ---------------------------------------------------------------------------------------------

def _prepare(settings, store, registry, domain: str, train_settings: dict | None,
             free_bytes: float | None = None) -> dict:
    """Validate settings, check memory, curate, check the size: the job's `settings` record, or an error
    for the caller. `free_bytes`: device memory free for the job (None: measured on CUDA, no check on CPU)."""
    from .curation import curate
    from .memory import check_job_memory
    from .training import MIN_EXAMPLES, TrainSettings
    registry.get_domain(domain)
    try:
        ts = TrainSettings.from_dict(train_settings)
    except (TypeError, ValueError) as e:
        raise AssistantError(str(e), param="settings") from None
    active = store.active_job()
    if active is not None:  # cheap early answer; create_job is what really enforces it
        from .errors import Conflict
        raise Conflict(f"job {active['job_id']} ({active['domain']}) is already training: wait for it to "
                       "finish or cancel it")
    check_job_memory(settings, ts, free_bytes)   # InsufficientMemory (422) names the numbers and what to lower
    snap = curate(store, domain, settings)
    n_train = snap.report.get("train", 0)
    if snap.report.get("kept", 0) < MIN_EXAMPLES:
        raise DatasetTooSmall(f"domain {domain!r} has {snap.report.get('kept', 0)} usable examples after curation; "
                              f"training needs at least {MIN_EXAMPLES}: add examples or corrections")
    feedback_ids = sorted({fid for it in snap.items if it.get("removed") is None
                           for fid in it.get("feedback_ids") or []})
    return {"training": ts.to_dict(), "requested": dict(train_settings or {}), "snapshot": snap.hash,
            "snapshot_path": str(snap.path), "feedback_ids": feedback_ids, "n_train": n_train,
            "n_eval": snap.report.get("eval", 0)}


def start_job(settings, store, registry, domain: str, train_settings: dict | None = None) -> str:
    """Queue a training job for `domain` and start its child process; returns the job id.
    Raises DatasetTooSmall (422), Conflict (409, another job is active) or AssistantError (bad settings)."""
    record = _prepare(settings, store, registry, domain, train_settings)
    job_id = store.create_job(domain, record)
    log_dir = Path(settings.state_path) / JOB_LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_dir / f"{job_id}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "assistant.jobs", job_id, _settings_json(settings)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)   # its own process group: cancel kills it all
    store.update_job(job_id, pid=proc.pid)
    threading.Thread(target=_watch, args=(store, registry, job_id, proc), name=f"job-{job_id}", daemon=True).start()
    if store.get_job(job_id)["status"] == "cancelled":  # cancelled before its pid was recorded
        _kill_group(proc.pid)
    return job_id


def _watch(store, registry, job_id: str, proc) -> None:
    """Reap the child; a child that died without saying how it ended (crash, OOM kill) failed."""
    code = proc.wait()
    job = store.get_job(job_id)
    if job is None or job["status"] in TERMINAL or job_id in _cancelling:
        return
    why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    hint = " (out of memory? try a smaller batch_size or max_seq_len)" if code == -signal.SIGKILL else ""
    _remove_staging(job)
    store.update_job(job_id, status="failed", error=f"the training process ended unexpectedly: {why}{hint}",
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
        time.sleep(0.05)


def _staging_of(job: dict) -> list[Path]:
    return [Path(line[len(STAGING_TAG):].strip()) for line in (job.get("log") or "").splitlines()
            if line.startswith(STAGING_TAG)]


def _remove_staging(job: dict) -> None:
    for path in _staging_of(job):
        if path.name.startswith(".staging-"):
            shutil.rmtree(path, ignore_errors=True)


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
        job = store.get_job(job_id)
        _remove_staging(job)
    finally:
        _cancelling.discard(job_id)
    return store.get_job(job_id)


def _is_own_child(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1] == str(os.getpid())
    except (OSError, IndexError):
        return False


def recover_orphans(settings, store, registry) -> list[str]:
    """At server start: a job still queued/running belongs to a server that died. Kill what is left of
    its process group, mark it failed, and remove staging folders. Returns the ids marked failed."""
    failed = []
    for job in store.list_jobs():
        if job["status"] not in ("queued", "running"):
            continue
        if _is_job_process(job.get("pid"), job["job_id"]):
            _kill_group(job["pid"])
        _remove_staging(job)
        store.update_job(job["job_id"], status="failed", finished_at=time.time(),
                         error="the server restarted while this job ran: start training again")
        failed.append(job["job_id"])
    registry.cleanup_staging()
    return failed


# ---------------------------------------------------------------------------------------------
# The job itself (in the child, or inline for the CLI)
# ---------------------------------------------------------------------------------------------

def _read_rows(record: dict, store, domain: str) -> list[dict]:
    path = record.get("snapshot_path") or (store.latest_snapshot(domain) or {}).get("path")
    if not path or not Path(path).is_file():
        raise AssistantError(f"the dataset snapshot of {domain!r} is missing: curate it again and retrain")
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run_job(settings, store, registry, job_id: str, on_step=None) -> dict:
    """Everything a job does, start to end; returns the job record. Errors mark the job failed."""
    from . import evaluation
    from .training import TrainingStopped, TrainSettings, _load, train_adapter

    job = store.get_job(job_id)
    domain, record = job["domain"], job["settings"]
    staging = None
    store.update_job(job_id, status="running", pid=os.getpid(), started_at=time.time(), log="started\n")
    try:
        rows = _read_rows(record, store, domain)
        system_prompt = registry.get_domain(domain).system_prompt
        staging = registry.new_staging(domain)
        store.update_job(job_id, log=f"{STAGING_TAG}{staging}\n")
        base = _load(settings)
        store.update_job(job_id, log=f"loaded {base.describe()}\n")
        ts = TrainSettings.from_dict(record.get("training"))

        def progress(step, total, loss):
            store.update_job(job_id, step=step, total_steps=total, loss=loss, progress=TRAIN_SHARE * step / total)
            store.add_job_loss(job_id, step, loss)
            if on_step is not None:
                on_step(step, total, loss)

        def stopped():
            return store.get_job(job_id)["status"] == "cancelled"

        result = train_adapter(base, rows, staging, ts, progress=progress, should_stop=stopped)
        store.update_job(job_id, log=f"trained: {json.dumps(result.summary())}\n", progress=TRAIN_SHARE)
        gate_settings = evaluation.GateSettings()
        before, after = evaluation.before_after(result.model, result.tokenizer, rows, gate_settings, system_prompt)
        promote, reasons = evaluation.gate(before, after, gate_settings)
        metrics = {"train": result.summary(), "before": evaluation.summary(before),
                   "after": evaluation.summary(after), "gate": {"promote": promote, "reasons": reasons}}
        store.update_job(job_id, progress=0.95, metrics=metrics, log="evaluated: " + "; ".join(reasons) + "\n")
        card = {"base_fingerprint": result.fingerprint, "dataset_snapshot": record.get("snapshot"),
                "feedback_ids": record.get("feedback_ids", []), "training_settings": result.settings,
                "metrics": metrics, "job_id": job_id, "domain": domain}
        if stopped():
            raise TrainingStopped("cancelled before publishing")
        version = registry.publish(domain, staging, card)
        staging = None
        if promote:
            registry.activate(domain, version)
        store.update_job(job_id, status="succeeded", progress=1.0, adapter_version=version, promoted=promote,
                         finished_at=time.time(),
                         log=f"published {domain}@{version}" + (" and activated it\n" if promote else
                                                                 " (not activated: see the gate)\n"))
    except TrainingStopped as e:
        store.update_job(job_id, log=f"stopped: {e}\n")
    except KeyboardInterrupt:
        store.update_job(job_id, status="cancelled", finished_at=time.time(), log="interrupted\n")
        raise
    except BaseException as e:  # noqa: BLE001 - any failure ends the job, with its message
        if store.get_job(job_id)["status"] not in TERMINAL:
            message = e.message if isinstance(e, AssistantError) else f"{type(e).__name__}: {e}"
            store.update_job(job_id, status="failed", error=message, finished_at=time.time())
        if not isinstance(e, Exception):
            raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return store.get_job(job_id)


def run_job_inline(settings, store, registry, domain: str, train_settings: dict | None = None) -> dict:
    """Blocking, in this process, with a progress bar (the CLI): same checks, same job record."""
    from tqdm import tqdm
    record = _prepare(settings, store, registry, domain, train_settings)
    job_id = store.create_job(domain, record)
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
    return job


def main(argv: list[str] | None = None) -> int:
    from .registry import Registry
    from .store import Store
    job_id, settings_json = (argv or sys.argv[1:])[:2]
    try:
        os.nice(JOB_NICENESS)
    except OSError:
        pass
    settings = _settings_from_json(settings_json)
    store, registry = Store(settings.db_path), Registry(settings.adapters_path)
    use_all_cores()   # this process only trains (see assistant/threads.py)
    job = run_job(settings, store, registry, job_id)
    return 0 if job["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
