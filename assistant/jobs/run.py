"""Training jobs: the training recipe run in a child process, so a crash or an out-of-memory kill can't take
the server down and chat keeps answering while it trains.

    start_job   (server)  memory check (422) -> curate (writes the snapshot) -> size check (422) ->
                          store.create_job (409 if one of the domain is active) -> queued -> dispatch
    dispatch    (server)  the embedded worker: when this process runs no job, claim the oldest queued one
                          and spawn its child (jobs/workers.py: `assistant worker` claims and runs them too)
    run_job     (child)   running -> snapshot rows -> train into a staging folder -> evaluate (the serving
                          engine, gate/verdict.py's verdict) -> publish -> activate if the gate passes (through the
                          server when one runs: cluster/remote.py; `release: canary`: out as a canary) -> succeeded
    cancel_job  (server)  SIGKILL the child's process group -> cancelled, staging removed
    reap                  jobs claimed by a worker or server that died -> failed, staging removed (at start too)

The job record shows its stages (curate -> train -> evaluate -> publish -> activate), each with progress and
time left (data/stages.py). Log lines are shown to users: they never name a server path. The staging folder
is named after the job (`<adapters>/<domain>/.staging-job-<id>`), so cleanup needs no path from the log.

The child is `python -m assistant.jobs.run JOB_ID SETTINGS_JSON` in its own session (its own process group).
The database enforces one active job; status, progress and the loss history live there (they survive a
reload and a restart). Publishing is the registry's fsync + atomic rename: a kill at any point leaves a
complete new version or a `.staging-*` folder that is never listed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from assistant.data.stages import TERMINAL, StageTracker, attempt_stages, overall_progress
from assistant.engine.threads import use_all_cores
from assistant.errors import AssistantError, Conflict, NotFound
from assistant.jobs import release
from assistant.jobs.attempts import Attempt, Trained, best, forgot, why_retry
from assistant.jobs.process import (  # noqa: F401 - cancel_job, dispatch, reap, recover_orphans: used as `jobs.` by the shells
    RETRY_HINT,
    _curated,
    _settings_from_json,
    attempt_tag,
    cancel_job,
    dispatch,
    kept_attempt,
    prune_kept,
    reap,
    recover_orphans,
    resumable,
    run_here,
    staging_path,
)
from assistant.settings import group_settings

log = logging.getLogger(__name__)

JOB_NICENESS = 10               # the child yields the CPU to the server, so chat stays responsive
ANSWER_CACHE_DIR = "answers"   # in the cache folder: replay and probe answers kept between jobs (data/answer_cache.py)


# ---------------------------------------------------------------------------------------------
# Preparing a job (in the server): the dataset check and the job row
# ---------------------------------------------------------------------------------------------

def _prepare(settings, store, registry, domain: str, train_settings,
             free_bytes: float | None = None) -> dict:
    """Check memory, curate, check the size: the job's `settings` record, or an error for the caller.
    `train_settings`: a TrainSettings (checked where they entered), or overrides of the server's defaults
    that are checked here, once (`TrainSettings.of`). `free_bytes`: device memory free for the job (None:
    measured on CUDA, no check on CPU)."""
    from assistant.data.curation import curate
    from assistant.training.memory import check_job_memory
    from assistant.training.recipe import MAX_BATCH_SIZE, MIN_EXAMPLES, TrainSettings
    registry.get_domain(domain)
    ts = TrainSettings.of(train_settings, settings.train)   # InvalidSetting (400) names the field
    from assistant.jobs.limits import engine_limits
    engine_limits(settings).check(ts.rank, ts.target_modules, what="this training job's adapter")   # 422 now
    active = store.active_job(domain)
    if active is not None:  # cheap early answer; create_job is what really enforces it
        from assistant.errors import Conflict
        raise Conflict(f"job {active['job_id']} ({active['domain']}) is already training: wait for it to "
                       "finish or cancel it")
    check_job_memory(settings, ts, free_bytes)   # InsufficientMemory (422) names the numbers and what to lower
    t0 = time.monotonic()
    snap = curate(store, domain, settings)
    curate_seconds = time.monotonic() - t0
    n_train = snap.report.get("train", 0)
    from assistant.data.preference import for_job
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
            from assistant.data.preference import _path, shared_name
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
            from assistant.files import atomic_write_bytes
            path.parent.mkdir(parents=True, exist_ok=True)   # curated by a replica on another machine
            atomic_write_bytes(path, content)
    if not path or not Path(path).is_file():
        raise AssistantError(f"the dataset snapshot of {domain!r} is missing: curate it again and retrain")
    from assistant.data.curation import read_snapshot
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
    `resume="evaluate"`, the adapter the job trained (kept in its staging folder) is evaluated and published.

    When the gate blocks a trained version for forgetting (retention or leakage), the job trains again with a
    safer recipe (training.safer_recipe), at most `retries` times, each attempt its own train and evaluate
    stages. It publishes the first attempt that passes, or, when none does, the best blocked one with every
    attempt's verdict in its card. An attempt that fails never loses the earlier ones: the best of those is
    published instead."""
    from assistant.training.recipe import TrainingStopped, TrainSettings, safer_recipe

    job = store.get_job(job_id)
    domain, record = job["domain"], job["settings"]
    attempts: list[Attempt] = []     # trained and evaluated, in order; their folders are removed at the end
    current = None                    # the attempt being trained or evaluated
    trained = False      # once True, a later failure keeps the staging folder (retry from evaluation)
    tracker = StageTracker(store, job_id, job["stages"])
    store.update_job(job_id, status="running", pid=os.getpid(), started_at=time.time(),
                     log="retrying from evaluation\n" if resume else "started\n")
    try:
        rows = _read_rows(settings, record, store, domain)
        rows, plan = _preference_plan(settings, domain, record, rows, store)
        gate_settings = group_settings(settings, "gate")
        ts = TrainSettings.from_record(record["training"])
        retries = ts.retries
        if resume == "evaluate":
            current = _kept_attempt(settings, registry, job)
            trained = True
        elif record.get("data_summary"):
            store.update_job(job_id, log=f"data: {record['data_summary']}\n")
        why = ""
        while True:
            if current is None:
                number = attempts[-1].number + 1 if attempts else 1
                current = Attempt(number, ts, why, registry.new_staging(domain, tag=attempt_tag(job_id, number)))
            try:
                if current.result is None:
                    current.base, current.result = _train(settings, store, job_id, rows, record, current, tracker,
                                                          on_step, plan)
                    store.update_job(job_id, metrics={"train": current.result.summary(),
                                                      "trained": current.trained_record()})
                    trained = True
                _evaluate(settings, store, registry, job_id, domain, rows, plan, current, tracker, gate_settings)
            except Exception as e:
                if not attempts or isinstance(e, TrainingStopped):
                    raise
                _attempt_failed(store, job_id, tracker, current, e, settings)   # the earlier attempts stand
                current = None
                break
            attempts.append(current)
            current = None
            last = attempts[-1]
            if last.verdict["promote"] or last.number > retries or not forgot(last.verdict):
                break
            ts = safer_recipe(last.ts, last.result.epochs)
            why = why_retry(last, ts)
            store.update_job(job_id, log=f"attempt {last.number} was blocked; {why}\n")
            tracker.add_attempt(last.number + 1, why)

        chosen = best(attempts)
        metrics = {**chosen.metrics, "attempts": [a.summary() for a in attempts]}
        verdict, promote = chosen.verdict, chosen.verdict["promote"]
        if len(attempts) > 1 and not promote:
            verdict = {**verdict, "summary": f"None of {len(attempts)} attempts passed; the best, attempt "
                                             f"{chosen.number}, is published. {verdict['summary']}"}
            metrics["gate"] = verdict
        store.update_job(job_id, metrics=metrics)
        card = {"base_fingerprint": chosen.result.fingerprint, "dataset_snapshot": record.get("snapshot"),
                "feedback_ids": record.get("feedback_ids", []), "training_settings": chosen.result.settings,
                "training": {"methods": chosen.result.methods, "data": (record.get("preference") or {}).get("counts"),
                             "summary": record.get("data_summary"), "phases": chosen.result.phases,
                             "attempt": chosen.number},
                "metrics": metrics, "job_id": job_id, "domain": domain}
        if store.get_job(job_id)["status"] == "cancelled":
            raise TrainingStopped("cancelled before publishing")
        for a in attempts:            # only the chosen attempt's folder is published; the others go now
            if a is not chosen:
                shutil.rmtree(a.staging, ignore_errors=True)
        current = chosen               # a failure from here on keeps it for "retry from evaluation"
        tracker.start("publish")
        version = registry.publish(domain, chosen.staging, card)
        current = None
        tracker.finish("publish")
        store.update_job(job_id, adapter_version=version, log=f"published {domain}@{version}"
                         + (f" (attempt {chosen.number})" if len(attempts) > 1 else "") + "\n")
        if promote:
            tracker.start("activate")
            if ts.release == "canary" and registry.active_version(domain) is not None:
                end = release.send_out(settings, store, registry, domain, version, job_id)
            else:
                where = release.activate(settings, registry, domain, version, chosen.base.model, chosen.result.fingerprint,
                                  store=store)
                end = f"{domain}@{version} is live" + (" (activated by the server)" if where != "offline" else "") + "\n"
            tracker.finish("activate")
        else:
            tracker.finish("activate", status="skipped")
            end = f"{domain}@{version} was not activated: {verdict['summary']}\n"
        tracker.close()
        store.update_job(job_id, status="succeeded", progress=1.0, stage=None, stages=tracker.snapshot(),
                         promoted=promote, finished_at=time.time(), log=end)
        attempts = []
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
            keep = (trained and isinstance(e, Exception) and current is not None and current.staging is not None
                    and current.staging.is_dir())
            store.update_job(job_id, status="failed", finished_at=time.time(),
                             error=_user_text(where + message, settings) + (RETRY_HINT if keep else ""))
            if keep:
                if current.result is not None:
                    store.update_job(job_id, metrics={**(store.get_job(job_id).get("metrics") or {}),
                                                      "trained": current.trained_record()})
                current = None   # finished work is kept for "retry from evaluation"
                prune_kept(store, registry.root, domain)
        if not isinstance(e, Exception):
            raise
    finally:
        tracker.close()
        for a in attempts + ([current] if current is not None else []):
            if a.staging is not None:
                shutil.rmtree(a.staging, ignore_errors=True)
    return store.get_job(job_id)


def _attempt_failed(store, job_id: str, tracker, attempt: Attempt, error: Exception, settings) -> None:
    """A later attempt failed: its stage is marked so, its folder goes; the job publishes an earlier one."""
    log.exception("job %s: attempt %d failed", job_id, attempt.number)
    tracker.fail_running()
    if attempt.staging is not None:
        shutil.rmtree(attempt.staging, ignore_errors=True)
    message = error.message if isinstance(error, AssistantError) else "an unexpected error (see the server log)"
    store.update_job(job_id, log=_user_text(f"attempt {attempt.number} failed: {message}; the best earlier "
                                            "attempt is published instead\n", settings))


def _kept_attempt(settings, registry, job: dict) -> Attempt:
    """The attempt a failed job kept, for "retry from evaluation"."""
    from assistant.training.recipe import _load
    kept = dict((job.get("metrics") or {}).get("trained") or {})
    number = int(kept.pop("attempt", 1))
    staging = staging_path(registry.root, job, number)
    if not kept or not (staging / "adapter_model.safetensors").is_file():
        raise AssistantError("this job's trained adapter is no longer there: start training again")
    from assistant.training.recipe import TrainSettings
    attempt = Attempt(number, TrainSettings.from_record(kept["settings"]), "", staging)
    attempt.base, attempt.result = _load(settings), Trained(**kept)
    return attempt


def _evaluate(settings, store, registry, job_id: str, domain: str, rows, plan, attempt: Attempt, tracker,
              gate_settings) -> None:
    """The evaluate stage of `attempt`: its before/after metrics, the gate's verdict and the job's metrics."""
    from assistant.gate import evaluation
    _, stage = attempt_stages(attempt.number)
    base = attempt.base
    base.model.eval()
    tracker.start(stage)
    active = registry.active_version(domain)
    tracker.note(stage, f"the base{', ' + active + ' (live)' if active else ''} and the new version answer the "
                        "held-out, corrected and general questions")
    before, after = evaluation.evaluate_adapter(
        base, attempt.staging, rows, gate_settings, registry.get_domain(domain).system_prompt,
        progress=lambda done, total: tracker.advance(stage, done, total),
        reference_dir=registry.version_path(domain, active) if active else None,
        cache_dir=Path(settings.cache_dir).expanduser() / ANSWER_CACHE_DIR)
    _preference_margins(registry, domain, base, attempt.staging, plan, before, after, gate_settings)
    verdict = evaluation.verdict(before, after, gate_settings)
    result = attempt.result
    attempt.before, attempt.after, attempt.verdict = before, after, verdict
    attempt.metrics = {"train": result.summary(), "before": evaluation.summary(before),
                       "after": evaluation.summary(after), "gate": verdict,
                       "eval_vs_train_time": round(after["eval_seconds"] / result.seconds, 3) if result.seconds else None,
                       "trained": attempt.trained_record()}
    tracker.finish(stage)
    store.update_job(job_id, metrics=attempt.metrics,
                     log=f"evaluated{' attempt ' + str(attempt.number) if attempt.number > 1 else ''}: "
                         f"{verdict['summary']}\n")


def _preference_plan(settings, domain: str, record: dict, rows: list[dict], store=None):
    """(the rows SFT and the gate see, the PreferencePlan or None). Rated answers held out for the
    preference margin are left out of every method's training."""
    entry = record.get("preference")
    if not entry:
        return rows, None
    from assistant.data.preference import load_for_job
    from assistant.training.preference import PreferencePlan
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
    from assistant.gate.preference import margins
    active = registry.active_version(domain)
    m = margins(base, staging, registry.version_path(domain, active) if active else None, heldout, gate.max_seq_len)
    before["preference_margin"], after["preference_margin"] = m["current"], m["new"]
    after["n_preference_heldout"], after["preference_reference"] = m["n"], active or "the base"


def _train(settings, store, job_id: str, rows, record: dict, attempt: Attempt, tracker, on_step, plan=None):
    """The train stage of `attempt`: (the base, the TrainResult), the adapter saved in its staging folder.
    The loss curve of a later attempt continues the steps of the earlier ones."""
    from assistant.training.recipe import _load, train_adapter
    ts, staging = attempt.ts, attempt.staging
    stage, _ = attempt_stages(attempt.number)
    tracker.start(stage)
    tracker.note(stage, "loading the base model")
    base = _load(settings)
    store.update_job(job_id, log=f"loaded {base.describe()}\n")
    offset = store.get_job(job_id).get("step") or 0 if attempt.number > 1 else 0

    def progress(step, total, loss):
        store.update_job(job_id, step=offset + step, total_steps=offset + total, loss=loss)
        store.add_job_loss(job_id, offset + step, loss)
        tracker.advance(stage, step, total)
        if step == 1:
            tracker.note(stage, "training")
        if on_step is not None:
            on_step(step, total, loss)

    def stopped():   # cancelled, or failed because the worker running it is gone (reap)
        return store.get_job(job_id)["status"] != "running"

    if settings.train_gpus > 1:
        store.update_job(job_id, log=f"training in {settings.train_gpus} processes\n")
    result = train_adapter(base, rows, staging, ts, progress=progress, should_stop=stopped,
                           processes=settings.train_gpus, note=lambda text: tracker.note(stage, text),
                           preference=plan, cache_dir=Path(settings.cache_dir).expanduser() / ANSWER_CACHE_DIR)
    tracker.finish(stage)
    store.update_job(job_id, log=f"trained{' attempt ' + str(attempt.number) if attempt.number > 1 else ''}: "
                                 f"{json.dumps(result.summary())}\n")
    result.model.unload()            # LoRA layers out: the engine loads the adapter from its folder
    return base, result


def retry_job(settings, store, registry, job_id: str, *, inline: bool = False) -> None:
    """Resume a failed job from evaluation, with the adapter its training left in the staging folder: in a
    child process, or here and blocking with `inline` (the CLI)."""
    job = store.get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id[:64]!r}")
    attempt = kept_attempt(job)
    if job["status"] != "failed" or not resumable(job) or not (job.get("metrics") or {}).get("trained") \
            or not (staging_path(registry.root, job, attempt) / "adapter_model.safetensors").is_file():
        raise Conflict("only a failed job whose training finished (and whose adapter was kept) can retry from "
                       "evaluation: start training again")
    names = [st["name"] for st in job["stages"]]
    evaluate = attempt_stages(attempt)[1]
    cut = names.index(evaluate) if evaluate in names else len(names)   # that attempt's evaluation and after
    stages = [st if i < cut else {**st, "status": "pending", "done": 0, "total": 0, "progress": 0.0, "eta_s": None,
                                  "started_at": None, "finished_at": None, "elapsed_s": 0.0}
              for i, st in enumerate(job["stages"])]
    from assistant.cluster.members import worker_name
    # claimed by this process at once (no other worker takes it and starts it from scratch); Conflict (409)
    # when another job of the domain is active
    store.update_job(job_id, status="queued", error=None, finished_at=None, stages=stages, worker=worker_name(),
                     progress=overall_progress(stages))
    if inline:
        run_job(settings, store, registry, job_id, resume="evaluate")
        return
    run_here(settings, store, registry, job_id, "--resume", "evaluate")


def run_job_inline(settings, store, registry, domain: str, train_settings=None) -> dict:
    """Blocking, in this process, with a progress bar (the CLI): same checks, same job record."""
    from tqdm import tqdm

    from assistant.cluster.members import WorkerLock
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
    from assistant.data.registry import Registry
    from assistant.data.store import Store
    args = argv or sys.argv[1:]
    job_id, settings_json = args[:2]
    resume = args[3] if len(args) >= 4 and args[2] == "--resume" else None
    try:
        os.nice(JOB_NICENESS)
    except OSError:
        pass
    settings = _settings_from_json(settings_json)
    store, registry = Store(settings.database), Registry(settings.adapters_path)
    use_all_cores()   # this process only trains (see assistant/engine/threads.py)
    job = run_job(settings, store, registry, job_id, resume=resume)
    return 0 if job["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
