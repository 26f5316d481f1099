"""A job's training attempts: the recipe each ran with and why, what it kept (`Trained`, enough for a retry
from evaluation), which attempt a job publishes (`best`), and why the next one runs (`why_retry`).

A job whose first attempt the gate blocks for forgetting (retention, leakage: gate.FORGETTING) trains again
with `training.safer_recipe`; a block for anything else (it did not learn, it got worse) is final, since a
gentler recipe would not mend it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Trained:
    """What evaluation and the version's card need of a TrainResult (kept in the job's metrics for a retry)."""
    summary_: dict
    settings: dict
    fingerprint: dict
    seconds: float
    methods: list = field(default_factory=lambda: ["sft"])
    phases: list = field(default_factory=list)

    @classmethod
    def of(cls, result) -> "Trained":
        return cls(result.summary(), result.settings, result.fingerprint, result.seconds, list(result.methods),
                   list(result.phases))

    def summary(self) -> dict:
        return self.summary_


@dataclass
class Attempt:
    """One training attempt of a job: its recipe, why it ran, its folder, and once done its result and the
    gate's verdict."""
    number: int
    ts: object                     # TrainSettings
    why: str
    staging: Path | None
    result: object = None          # TrainResult or Trained
    base: object = None
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    verdict: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def trained_record(self) -> dict:
        return {**Trained.of(self.result).__dict__, "attempt": self.number}

    def summary(self) -> dict:
        """What the job record and the card keep of this attempt."""
        ret = self.after.get("retention") or {}
        s = self.result.settings
        return {"attempt": self.number, "why": self.why or "the recipe as asked",
                "recipe": {"learning_rate": s.get("learning_rate"), "epochs": self.result.summary().get("epochs"),
                           "rank": s.get("rank"), "replay": s.get("replay")},
                "promote": bool(self.verdict.get("promote")), "summary": self.verdict.get("summary"),
                "failed": [c["name"] for c in self.verdict.get("checks") or () if c["decides"] and not c["passed"]],
                "retention": ret.get("retention"), "n_kept": ret.get("n_kept"),
                "n_reference_right": ret.get("n_reference_right"), "n_leaked": ret.get("n_leaked"),
                "taught_match": self.after.get("taught_match"), "corrections_match": self.after.get("corrections_match")}


def forgot(verdict: dict) -> bool:
    """Did the gate block for forgetting (what a safer recipe can mend)?"""
    from assistant.gate.verdict import FORGETTING
    return any(c["name"] in FORGETTING and c["decides"] and not c["passed"] for c in verdict.get("checks") or ())


def why_retry(last: "Attempt", ts) -> str:
    ret = last.after.get("retention") or {}
    failed = [c for c in last.verdict.get("checks") or () if c["decides"] and not c["passed"]]
    what = []
    for c in failed:
        if c["name"] == "retention":
            what.append(f"it lost {len(ret.get('lost') or [])} of {ret.get('n_reference_right')} general answers")
        elif c["name"] == "leakage":
            what.append(f"taught words turned up in {ret.get('n_leaked')} general answers")
        else:
            what.append(c["label"])
    return (f"attempt {last.number + 1} trains with a safer recipe because {' and '.join(what)}: learning rate "
            f"{ts.learning_rate:.2g}, {ts.epochs} epoch{'s' if ts.epochs != 1 else ''}, LoRA alpha {ts.alpha}, every "
            "self-replay prompt")


def best(attempts: list["Attempt"]) -> "Attempt":
    """The first attempt that passed, else the blocked one with the fewest failed checks and the most
    general answers kept (the earlier on a tie)."""
    passed = [a for a in attempts if a.verdict["promote"]]
    if passed:
        return passed[0]

    def key(a):
        failed = sum(1 for c in a.verdict.get("checks") or () if c["decides"] and not c["passed"])
        return failed, -((a.after.get("retention") or {}).get("retention") or 0.0), a.number
    return min(attempts, key=key)
