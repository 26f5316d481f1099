"""Training jobs: the training recipe run in a child process, so a crash or an out-of-memory kill can't take
the server down and chat keeps answering while it trains.

    start_job   (server)  memory check (422) -> curate (writes the snapshot) -> size check (422) ->
                          store.create_job (409 if one is active) -> spawn
    run_job     (child)   running -> snapshot rows -> train into a staging folder -> evaluate (the serving
                          engine, gate.py's verdict) -> publish -> activate if the gate passes -> succeeded
    cancel_job  (server)  SIGKILL the child's process group -> cancelled, staging removed
    recover_orphans       at server start: jobs left queued/running by a dead server -> failed, staging removed

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
from dataclasses import fields
from pathlib import Path

from .errors import AssistantError
from .stages import TERMINAL, StageTracker, overall_progress, pending_stages
from .threads import use_all_cores

log = logging.getLogger(__name__)

KILL_WAIT_SECONDS = 10.0        # how long cancel waits for the killed group to disappear...
KILL_POLL_SECONDS = 0.05        # ...checking this often
STAGING_PREFIX = ".staging-job-"   # + job id: the job's staging folder in its domain's adapter folder
JOB_LOG_DIR = "jobs"            # <state>/jobs/<job_id>.log : the child's stdout and stderr
JOB_NICENESS = 10               # the child yields the CPU to the server, so chat stays responsive

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

def _prepare(settings, store, registry, domain: str, train_settings: dict | None,
             free_bytes: float | None = None) -> dict:
    """Validate settings, check memory, curate, check the size: the job's `settings` record, or an error
    for the caller. `free_bytes`: device memory free for the job (None: measured on CUDA, no check on CPU)."""
    from .curation import curate
    from .memory import check_job_memory
    from .training import MAX_BATCH_SIZE, MIN_EXAMPLES, TrainSettings
    registry.get_domain(domain)
    try:
        if train_settings is not None and not isinstance(train_settings, dict):
            raise ValueError("training settings must be an object of name: value pairs")
        ts = TrainSettings.from_dict({**settings.train, **(train_settings or {})})   # the server's defaults first
    except (TypeError, ValueError) as e:
        raise AssistantError(str(e), param="settings") from None
    active = store.active_job()
    if active is not None:  # cheap early answer; create_job is what really enforces it
        from .errors import Conflict
        raise Conflict(f"job {active['job_id']} ({active['domain']}) is already training: wait for it to "
                       "finish or cancel it")
    check_job_memory(settings, ts, free_bytes)   # InsufficientMemory (422) names the numbers and what to lower
    t0 = time.monotonic()
    snap = curate(store, domain, settings)
    curate_seconds = time.monotonic() - t0
    n_train = snap.report.get("train", 0)
    from .preference import for_job
    preference = for_job(settings, store, domain, snap, ts.method, MIN_EXAMPLES)   # DatasetTooSmall: what is missing
    if preference["methods"] != ["sft"]:       # a preference phase feeds chosen and rejected rows together
        from dataclasses import replace
        check_job_memory(settings, replace(ts, batch_size=min(2 * ts.batch_size, MAX_BATCH_SIZE)), free_bytes)
    feedback_ids = sorted({fid for it in snap.items if it.get("removed") is None
                           for fid in it.get("feedback_ids") or []})
    return {"training": ts.to_dict(), "requested": dict(train_settings or {}), "snapshot": snap.hash,
            "feedback_ids": feedback_ids, "n_train": n_train,
            "n_eval": snap.report.get("eval", 0), "curate_seconds": round(curate_seconds, 2),
            "n_corrections": snap.report.get("sources", {}).get("correction", 0), "preference": preference,
            "methods": preference["methods"], "data_summary": preference["summary"]}


def start_job(settings, store, registry, domain: str, train_settings: dict | None = None) -> str:
    """Queue a training job for `domain` and start its child process; returns the job id.
    Raises DatasetTooSmall (422), Conflict (409, another job is active) or AssistantError (bad settings)."""
    record = _prepare(settings, store, registry, domain, train_settings)
    job_id = store.create_job(domain, record)
    _curated(store, job_id, record)
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


def recover_orphans(settings, store, registry) -> list[str]:
    """At server start: a job still queued/running belongs to a server that died. Kill what is left of
    its process group, mark it failed, and remove staging folders. Returns the ids marked failed."""
    failed = []
    for job in store.list_jobs():
        if job["status"] not in ("queued", "running"):
            continue
        if _is_job_process(job.get("pid"), job["job_id"]):
            _kill_group(job["pid"])
        _remove_staging(registry.root, job)
        store.update_job(job["job_id"], status="failed", finished_at=time.time(), stage=None,
                         stages=_stages_ended(job),
                         error="the server restarted while this job ran: start training again")
        failed.append(job["job_id"])
    registry.cleanup_staging()
    return failed


# ---------------------------------------------------------------------------------------------
# The job itself (in the child, or inline for the CLI)
# ---------------------------------------------------------------------------------------------

def _read_rows(settings, record: dict, store, domain: str) -> list[dict]:
    """The job's snapshot rows. Its path is derived from the hash (the job record, which users see, holds
    no server path); records of older jobs may still carry `snapshot_path`."""
    path = record.get("snapshot_path") or (store.latest_snapshot(domain) or {}).get("path")
    if record.get("snapshot"):
        path = Path(settings.state_path) / "snapshots" / domain / f"{record['snapshot']}.jsonl"
    if not path or not Path(path).is_file():
        raise AssistantError(f"the dataset snapshot of {domain!r} is missing: curate it again and retrain")
    from .curation import read_snapshot
    return read_snapshot(path)


def _user_text(text: str, settings) -> str:
    """`text` with the server's folders taken out (job logs and errors are shown to users)."""
    for folder in sorted({str(settings.adapters_path), str(settings.state_path), str(settings.home)}, key=len,
                         reverse=True):
        if folder and folder != ".":
            text = text.replace(folder, "<server folder>")
    return text


def run_job(settings, store, registry, job_id: str, on_step=None) -> dict:
    """Everything a job does, start to end; returns the job record. Errors mark the job failed."""
    from . import evaluation
    from .training import TrainingStopped, TrainSettings, _load, train_adapter

    job = store.get_job(job_id)
    domain, record = job["domain"], job["settings"]
    staging = None
    tracker = StageTracker(store, job_id, job["stages"])
    store.update_job(job_id, status="running", pid=os.getpid(), started_at=time.time(), log="started\n")
    try:
        rows = _read_rows(settings, record, store, domain)
        system_prompt = registry.get_domain(domain).system_prompt
        ts = TrainSettings.from_dict(record.get("training"))
        rows, plan = _preference_plan(settings, domain, record, rows)
        if record.get("data_summary"):
            store.update_job(job_id, log=f"data: {record['data_summary']}\n")
        tracker.start("train")
        tracker.note("train", "loading the base model")
        staging = registry.new_staging(domain, tag=f"job-{job_id}")
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

        def stopped():
            return store.get_job(job_id)["status"] == "cancelled"

        if settings.train_gpus > 1:
            store.update_job(job_id, log=f"training in {settings.train_gpus} processes\n")
        result = train_adapter(base, rows, staging, ts, progress=progress, should_stop=stopped,
                               processes=settings.train_gpus, note=lambda text: tracker.note("train", text),
                               preference=plan)
        tracker.finish("train")
        store.update_job(job_id, log=f"trained: {json.dumps(result.summary())}\n")
        result.model.unload()            # LoRA layers out: the engine loads the adapter from its folder
        base.model.eval()

        tracker.start("evaluate")
        tracker.note("evaluate", "the base and the new version answer the held-out and corrected questions")
        from .settings import group_settings
        gate_settings = group_settings(settings, "gate")
        before, after = evaluation.evaluate_adapter(
            base, staging, rows, gate_settings, system_prompt,
            progress=lambda done, total: tracker.advance("evaluate", done, total))
        _preference_margins(registry, domain, base, staging, plan, before, after, gate_settings)
        verdict = evaluation.verdict(before, after, gate_settings)
        promote = verdict["promote"]
        metrics = {"train": result.summary(), "before": evaluation.summary(before),
                   "after": evaluation.summary(after), "gate": verdict,
                   "eval_vs_train_time": round(after["eval_seconds"] / result.seconds, 3) if result.seconds else None}
        tracker.finish("evaluate")
        store.update_job(job_id, metrics=metrics, log=f"evaluated: {verdict['summary']}\n")
        card = {"base_fingerprint": result.fingerprint, "dataset_snapshot": record.get("snapshot"),
                "feedback_ids": record.get("feedback_ids", []), "training_settings": result.settings,
                "training": {"methods": result.methods, "data": (record.get("preference") or {}).get("counts"),
                             "summary": record.get("data_summary"), "phases": result.phases},
                "metrics": metrics, "job_id": job_id, "domain": domain}
        if stopped():
            raise TrainingStopped("cancelled before publishing")
        tracker.start("publish")
        version = registry.publish(domain, staging, card)
        staging = None
        tracker.finish("publish")
        store.update_job(job_id, adapter_version=version, log=f"published {domain}@{version}\n")
        if promote:
            tracker.start("activate")
            _activate(registry, domain, version, base.model, result.fingerprint)
            tracker.finish("activate")
            end = f"{domain}@{version} is live\n"
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
        tracker.fail_running()
        tracker.close()
        log.exception("job %s failed", job_id)
        if store.get_job(job_id)["status"] not in TERMINAL:
            message = e.message if isinstance(e, AssistantError) else f"{type(e).__name__}: {e}"
            store.update_job(job_id, status="failed", error=_user_text(message, settings), finished_at=time.time())
        if not isinstance(e, Exception):
            raise
    finally:
        tracker.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return store.get_job(job_id)


def _preference_plan(settings, domain: str, record: dict, rows: list[dict]):
    """(the rows SFT and the gate see, the PreferencePlan or None). Rated answers held out for the
    preference margin are left out of every method's training."""
    entry = record.get("preference")
    if not entry:
        return rows, None
    from .preference import load_for_job
    from .preference_train import PreferencePlan
    data = load_for_job(settings, domain, entry)
    held = data.heldout_keys()
    return [r for r in rows if r.get("key") not in held], PreferencePlan(data, list(entry["methods"]))


def _preference_margins(registry, domain: str, base, staging, plan, before: dict, after: dict, gate) -> None:
    """The held-out preference margins of the current version (before) and the new one (after), for the gate."""
    heldout = plan.data.heldout() if plan is not None else []
    if not heldout:
        if plan is not None:
            after["preference_skipped"] = "too few rated answers of each kind to hold some out"
        return
    from .preference_eval import margins
    active = registry.active_version(domain)
    m = margins(base, staging, registry.version_path(domain, active) if active else None, heldout, gate.max_seq_len)
    before["preference_margin"], after["preference_margin"] = m["current"], m["new"]
    after["n_preference_heldout"], after["preference_reference"] = m["n"], active or "the base"


def _activate(registry, domain: str, version: str, model, fingerprint: dict) -> None:
    """Make the published version live through the registry's one activation path: it is validated against
    the base the job trained on and its weights are read back before the pointer moves."""
    import torch
    from safetensors.torch import load_file

    from .registry import ADAPTER_WEIGHTS, validate_adapter

    shapes = {name.removesuffix(".base_layer"): (m.in_features, m.out_features)
              for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def load(name: str, v: str) -> None:
        folder = registry.version_path(name, v)
        validate_adapter(folder, fingerprint, shapes)
        load_file(str(folder / ADAPTER_WEIGHTS), device="cpu")

    registry.activate(domain, version, load=load)


def run_job_inline(settings, store, registry, domain: str, train_settings: dict | None = None) -> dict:
    """Blocking, in this process, with a progress bar (the CLI): same checks, same job record."""
    from tqdm import tqdm
    record = _prepare(settings, store, registry, domain, train_settings)
    job_id = store.create_job(domain, record)
    _curated(store, job_id, record)
    tqdm.write(f"{domain}: {record['data_summary']}")     # what the data supports and which methods run
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
