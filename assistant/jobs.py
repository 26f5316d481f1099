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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AssistantError, Conflict, NotFound
from .job_process import (  # noqa: F401 - cancel_job, dispatch, reap, recover_orphans: used as `jobs.` by the shells
    RETRY_HINT,
    _curated,
    _settings_from_json,
    cancel_job,
    dispatch,
    prune_kept,
    reap,
    recover_orphans,
    resumable,
    run_here,
    staging_path,
)
from .stages import TERMINAL, StageTracker, overall_progress
from .threads import use_all_cores

log = logging.getLogger(__name__)

JOB_NICENESS = 10               # the child yields the CPU to the server, so chat stays responsive


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
    from .training import MAX_BATCH_SIZE, MIN_EXAMPLES, TrainSettings
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
    from .preference import for_job
    preference = for_job(settings, store, domain, snap, ts.method, MIN_EXAMPLES)   # DatasetTooSmall: what is missing
    if preference["methods"] != ["sft"]:       # a preference phase feeds chosen and rejected rows together
        from dataclasses import replace
        check_job_memory(settings, replace(ts, batch_size=min(2 * ts.batch_size, MAX_BATCH_SIZE)), free_bytes)
    feedback_ids = sorted({fid for it in snap.items if it.get("removed") is None
                           for fid in it.get("feedback_ids") or []})
    defaults = TrainSettings().to_dict()
    requested = {k: v for k, v in ts.to_dict().items() if v != defaults[k]}   # what differs from the recipe's
    return {"training": ts.to_dict(), "requested": requested, "snapshot": snap.hash,
            "feedback_ids": feedback_ids, "n_train": n_train,
            "n_eval": snap.report.get("eval", 0), "curate_seconds": round(curate_seconds, 2),
            "n_corrections": snap.report.get("sources", {}).get("correction", 0), "preference": preference,
            "methods": preference["methods"], "data_summary": preference["summary"]}


def start_job(settings, store, registry, domain: str, train_settings: dict | None = None) -> str:
    """Queue a training job for `domain` (a worker runs it: this process's embedded one when it is free);
    returns the job id. Raises DatasetTooSmall (422), Conflict (409, a job of the domain is active) or
    AssistantError (bad settings)."""
    record = _prepare(settings, store, registry, domain, train_settings)
    if store.kind == "postgresql":   # a worker on another machine reads the snapshot from the database
        store.put_snapshot_file(domain, record["snapshot"], _snapshot_path(settings, domain, record["snapshot"]).read_bytes())
        if record.get("preference"):   # and the rated answers prepared for it
            from .preference import _path, shared_name
            digest = record["preference"]["hash"]
            store.put_snapshot_file(domain, shared_name(digest), _path(settings, domain, digest).read_bytes())
    job_id = store.create_job(domain, record)
    _curated(store, job_id, record)
    store.notify_jobs(job_id)
    if settings.embedded_worker:
        dispatch(settings, store, registry, job_id)
    return job_id


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
        rows, plan = _preference_plan(settings, domain, record, rows, store)
        if resume == "evaluate":
            staging, trained = staging_path(registry.root, job), True
            kept = (job.get("metrics") or {}).get("trained")
            if not kept or not (staging / "adapter_model.safetensors").is_file():
                trained = False
                raise AssistantError("this job's trained adapter is no longer there: start training again")
            base = _load(settings)
            result = _Trained(**kept)
        else:
            if record.get("data_summary"):
                store.update_job(job_id, log=f"data: {record['data_summary']}\n")
            staging = registry.new_staging(domain, tag=f"job-{job_id}")
            base, result = _train(settings, store, job_id, rows, record, staging, tracker, on_step, plan)
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
        _preference_margins(registry, domain, base, staging, plan, before, after, gate_settings)
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
                "training": {"methods": result.methods, "data": (record.get("preference") or {}).get("counts"),
                             "summary": record.get("data_summary"), "phases": result.phases},
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
                prune_kept(store, registry.root, domain)
        if not isinstance(e, Exception):
            raise
    finally:
        tracker.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return store.get_job(job_id)


def _preference_plan(settings, domain: str, record: dict, rows: list[dict], store=None):
    """(the rows SFT and the gate see, the PreferencePlan or None). Rated answers held out for the
    preference margin are left out of every method's training."""
    entry = record.get("preference")
    if not entry:
        return rows, None
    from .preference import load_for_job
    from .preference_train import PreferencePlan
    data = load_for_job(settings, domain, entry, store)
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


def _train(settings, store, job_id: str, rows, record: dict, staging: Path, tracker, on_step, plan=None):
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
                           processes=settings.train_gpus, note=lambda text: tracker.note("train", text),
                           preference=plan)
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
    methods: list = field(default_factory=lambda: ["sft"])
    phases: list = field(default_factory=list)

    @classmethod
    def of(cls, result) -> "_Trained":
        return cls(result.summary(), result.settings, result.fingerprint, result.seconds, list(result.methods),
                   list(result.phases))

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
    run_here(settings, store, registry, job_id, "--resume", "evaluate")


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
