"""The stages of a training job, as the job record shows them: curate -> train -> evaluate -> publish ->
activate, each with its own progress, elapsed time and an estimate of the time left. When the gate finds
that a trained version forgot general answers, the job trains again with a safer recipe: each such
attempt adds the stages "train N" and "evaluate N" before publish, the first of them with `why` (the
reason it was started, in words).

`get_job` returns `stage` (the current stage's name) and `stages`: a list, in order, of
    {"name", "status": "pending"|"running"|"done"|"failed"|"skipped", "done", "total", "progress" (0..1),
     "elapsed_s", "eta_s", "started_at", "finished_at" (epoch seconds or null), "detail" (the sub-step a
     running stage is in, e.g. "loading the base model", "tokenizing 12 rows", "first step", or "")}
and `progress` is the whole job's (stage weights below). `StageTracker` keeps them in the job row; a
heartbeat thread rewrites them every HEARTBEAT_S while a stage runs, so a job never sits silent (the
elapsed time and the estimate move even while one long step or one batch of answers runs). The estimate
of the time left is measured on completed units only (from the end of the first one, so loading and
warm-up do not count), and is given only once ETA_MIN_UNITS are done: before that it would swing.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

STAGES = ("curate", "train", "evaluate", "publish", "activate")
STAGE_STATUSES = ("pending", "running", "done", "failed", "skipped")
TERMINAL = ("succeeded", "failed", "cancelled")    # job statuses that no longer change
# Share of the whole job's progress bar per stage (about their share of the time on the embedded model).
STAGE_WEIGHTS = {"curate": 0.02, "train": 0.76, "evaluate": 0.18, "publish": 0.03, "activate": 0.01}
HEARTBEAT_S = 2.0               # the job row is rewritten at least this often while a stage runs
MIN_WRITE_INTERVAL_S = 0.5      # progress callbacks write no more often than this
ETA_MIN_UNITS = 3               # steps (or answers) done before a stage estimates its time left


def pending_stages(names=STAGES) -> list[dict]:
    return [{"name": n, "status": "pending", "done": 0, "total": 0, "progress": 0.0, "elapsed_s": 0.0,
             "eta_s": None, "started_at": None, "finished_at": None, "detail": ""} for n in names]


def attempt_stages(attempt: int) -> tuple[str, str]:
    """The names of an attempt's train and evaluate stages ("train", "evaluate" for the first)."""
    return ("train", "evaluate") if attempt == 1 else (f"train {attempt}", f"evaluate {attempt}")


def stage_weight(name: str) -> float:
    """A stage's weight; an attempt's stages weigh what the first attempt's do."""
    return STAGE_WEIGHTS.get(name.split(" ")[0], 0.0)


def overall_progress(stages: list[dict]) -> float:
    """The whole job's progress: each stage's weight times its own progress (done or skipped count 1), out of
    the weight of all its stages (an added attempt makes the remaining work larger, so the bar goes back)."""
    total = weights = 0.0
    for st in stages:
        share = 1.0 if st["status"] in ("done", "skipped") else st["progress"]
        total += stage_weight(st["name"]) * share
        weights += stage_weight(st["name"])
    return round(min(1.0, total / weights), 4) if weights else 0.0


class StageTracker:
    """Progress of one job's stages, written to its row (`store.update_job(stage=, stages=, progress=)`)."""

    def __init__(self, store, job_id: str, stages: list[dict] | None = None):
        self.store, self.job_id = store, job_id
        self.stages = {st["name"]: dict(st) for st in (stages or pending_stages())}   # in order
        self.current: str | None = None
        self._t0: dict[str, float] = {}
        self._first: dict[str, tuple[float, int]] = {}    # stage -> (when its first unit was done, units then)
        self._last_write = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"stages-{job_id}", daemon=True)
        self._beat.start()

    # Changes -----------------------------------------------------------------------------------
    def add_attempt(self, attempt: int, why: str) -> None:
        """Add attempt `attempt`'s train and evaluate stages before publish; `why` says why it runs."""
        names = attempt_stages(attempt)
        with self._lock:
            new = {}
            for name, st in self.stages.items():
                if name == "publish":
                    for n, st_ in zip(names, pending_stages(names)):
                        new[n] = {**st_, "why": why if n == names[0] else ""}
                new[name] = st
            self.stages = new
        self.write(force=True)

    def start(self, name: str, total: int = 0) -> None:
        with self._lock:
            self.current = name
            self._t0[name] = time.monotonic()
            self._first.pop(name, None)
            self.stages[name].update(status="running", done=0, total=int(total), progress=0.0, elapsed_s=0.0,
                                     eta_s=None, started_at=round(time.time(), 3), finished_at=None, detail="")
        self.write(force=True)

    def note(self, name: str, detail: str) -> None:
        """The sub-step a running stage is in (shown beside its bar at once)."""
        with self._lock:
            self.stages[name]["detail"] = detail
            self._times(name)
        self.write(force=True)

    def advance(self, name: str, done: int, total: int | None = None) -> None:
        with self._lock:
            st = self.stages[name]
            if total is not None:
                st["total"] = int(total)
            st["done"] = int(done)
            st["progress"] = round(min(1.0, done / st["total"]), 4) if st["total"] else 0.0
            if done > 0 and name not in self._first:
                self._first[name] = (time.monotonic(), int(done))
            self._times(name)
        self.write()

    def finish(self, name: str, status: str = "done", elapsed_s: float | None = None) -> None:
        with self._lock:
            st = self.stages[name]
            if status == "done":
                st.update(progress=1.0, done=max(st["done"], st["total"]))
            if elapsed_s is not None:
                st["elapsed_s"] = round(elapsed_s, 1)
            elif name in self._t0:
                st["elapsed_s"] = round(time.monotonic() - self._t0[name], 1)
            st.update(status=status, eta_s=0.0 if status == "done" else None, finished_at=round(time.time(), 3),
                      detail="")
            if self.current == name:
                self.current = None
        self.write(force=True)

    def fail_running(self) -> None:
        """The job ended badly: the running stage failed, the ones after it never ran."""
        with self._lock:
            for st in self.stages.values():
                if st["status"] == "running":
                    st.update(status="failed", eta_s=None, finished_at=round(time.time(), 3))
                    if st["name"] in self._t0:
                        st["elapsed_s"] = round(time.monotonic() - self._t0[st["name"]], 1)
            self.current = None
        self.write(force=True)

    def close(self) -> None:
        self._stop.set()
        self._beat.join(timeout=HEARTBEAT_S * 2)

    # Times and writes --------------------------------------------------------------------------
    def _times(self, name: str) -> None:
        st = self.stages[name]
        if name not in self._t0:
            return
        now = time.monotonic()
        st["elapsed_s"] = round(now - self._t0[name], 1)
        st["eta_s"] = None
        if name in self._first and st["total"] and st["done"] >= ETA_MIN_UNITS:
            t1, n1 = self._first[name]
            if st["done"] > n1:
                per_unit = (now - t1) / (st["done"] - n1)
                st["eta_s"] = round(per_unit * max(0, st["total"] - st["done"]), 1)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [dict(st) for st in self.stages.values()]

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < MIN_WRITE_INTERVAL_S:
            return
        self._last_write = now
        stages = self.snapshot()
        try:
            self.store.update_job(self.job_id, stage=self.current, stages=stages,
                                  progress=overall_progress(stages))
        except Exception as e:  # noqa: BLE001 - progress is best effort; the job goes on
            log.warning("could not record the stages of job %s: %s", self.job_id, e)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                if self.current is not None:
                    self._times(self.current)
            if self.current is not None:
                self.write(force=True)


def public_gate(metrics: dict | None) -> dict | None:
    """The gate's verdict as the job record shows it at its top level: {"passed", "summary", "checks":
    [{"name", "passed", "value", "bound", "explanation"}]} (the full verdict stays in metrics.gate)."""
    gate = (metrics or {}).get("gate")
    if not isinstance(gate, dict) or "promote" not in gate:
        return None
    checks = []
    for c in gate.get("checks") or []:
        if isinstance(c, dict):
            words = [w for w in (c.get("meaning"), c.get("advice")) if w and not c.get("passed")]
            checks.append({"name": c.get("name"), "passed": bool(c.get("passed")), "value": c.get("value"),
                           "bound": c.get("bound"), "explanation": " ".join(words) or c.get("label") or ""})
    return {"passed": bool(gate["promote"]), "summary": gate.get("summary") or "; ".join(gate.get("reasons") or []),
            "checks": checks}
