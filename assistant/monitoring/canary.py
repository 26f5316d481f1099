"""The canary's verdict: do the people who rated a new version's answers like it less, or more, than the
version everyone else gets? Read after every rating, it promotes, rolls back, or waits.

Each arm's bad-answer rate is a rate of thumbs down (corrections included) per rated answer. With a
uniform prior, an arm's rate after `bad` of `rated` is Beta(1 + bad, 1 + rated - bad); the two posteriors,
approximated as normals (scipy's normal CDF), give the probability that the canary's rate is the higher
one. The verdict:

- **roll back** when that probability passes `CanarySettings.confidence` (the canary is worse),
- **promote** when it falls below 1 - confidence (the canary is better),
- **wait** until both arms have `min_rated` rated answers, and while neither bound is crossed,
- **inconclusive** once the canary arm reached `max_rated` rated answers or the rollout ran `max_hours`:
  it keeps its share and an editor decides.

Looking after every rating makes a fixed 95% bound wrong far more often than 5% of the time; the bound
here (0.999, about 3.1 standard errors) was chosen by simulating repeated looks up to `max_rated`
(benchmarks/bench_canary.py): with the same version on both arms, about 4% of rollouts end in a decision,
and a 10-point difference in bad-answer rate is found after a median of fewer than 200 rated answers of
the canary arm at a 20% share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from assistant.errors import InvalidSetting

VERDICTS = ("wait", "promote", "roll back", "inconclusive")
WAIT, PROMOTE, ROLL_BACK, INCONCLUSIVE = range(len(VERDICTS))


@dataclass(frozen=True)
class CanarySettings:
    """How a canary rollout is run and judged (flags --canary.*)."""
    share: float = 0.2            # of a domain's conversations the canary answers
    min_rated: int = 30           # rated answers each arm needs before any verdict
    max_rated: int = 500          # rated answers of the canary arm after which the rollout is inconclusive
    max_hours: float = 168.0      # a rollout older than this is inconclusive (an editor decides)
    confidence: float = 0.999     # posterior probability that one arm is worse, to decide

    def __post_init__(self):
        if not 0 < self.share < 1:
            raise InvalidSetting(f"canary.share={self.share}: give a share between 0 and 1 (0.2 = one "
                                 "conversation in five)", param="canary.share")
        if self.min_rated < 1 or self.max_rated < self.min_rated:
            raise InvalidSetting(f"canary.min_rated={self.min_rated}, canary.max_rated={self.max_rated}: both at "
                                 "least 1, and max_rated no smaller than min_rated", param="canary.max_rated")
        if self.max_hours <= 0:
            raise InvalidSetting(f"canary.max_hours={self.max_hours}: give a positive number of hours",
                                 param="canary.max_hours")
        if not 0.5 < self.confidence < 1:
            raise InvalidSetting(f"canary.confidence={self.confidence}: give a probability between 0.5 and 1",
                                 param="canary.confidence")


@dataclass(frozen=True)
class Arm:
    """One arm's rated answers: `rated` answers with a rating, `bad` of them rated down."""
    rated: int
    bad: int

    @property
    def rate(self) -> float | None:
        return self.bad / self.rated if self.rated else None


def p_canary_worse(baseline_rated, baseline_bad, canary_rated, canary_bad):
    """The posterior probability that the canary's bad-answer rate is above the baseline's: each arm's rate
    is Beta(1 + bad, 1 + rated - bad), the two approximated as normals. Numbers or numpy arrays (many
    rollouts at once: the simulation in benchmarks/bench_canary.py and the tests)."""
    def posterior(rated, bad):
        a, b = 1 + bad, 1 + rated - bad
        return a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    (mb, vb), (mc, vc) = posterior(baseline_rated, baseline_bad), posterior(canary_rated, canary_bad)
    return ndtr((mc - mb) / np.sqrt(vb + vc))


def verdicts(baseline_rated, baseline_bad, canary_rated, canary_bad, settings: CanarySettings, hours=0.0):
    """The verdict of each rollout, as an index into VERDICTS (numbers or numpy arrays): the one rule."""
    p = p_canary_worse(baseline_rated, baseline_bad, canary_rated, canary_bad)
    enough = (np.minimum(baseline_rated, canary_rated) >= settings.min_rated)
    ended = (np.asarray(canary_rated) >= settings.max_rated) | (np.asarray(hours) >= settings.max_hours)
    return np.select([~enough, p >= settings.confidence, p <= 1 - settings.confidence, ended],
                     [WAIT, ROLL_BACK, PROMOTE, INCONCLUSIVE], WAIT)


def decide(baseline: Arm, canary: Arm, settings: CanarySettings, hours: float = 0.0) -> dict:
    """The verdict on a rollout so far -> {"verdict", "p_worse", "why", "next"}: `why` says it in words,
    `next` what would change it."""
    verdict = VERDICTS[int(verdicts(baseline.rated, baseline.bad, canary.rated, canary.bad, settings, hours))]
    p = float(p_canary_worse(baseline.rated, baseline.bad, canary.rated, canary.bad))
    rates = (f"bad answers: canary {_pct(canary.rate)} of {canary.rated} rated, "
             f"current {_pct(baseline.rate)} of {baseline.rated}")
    need = settings.min_rated
    if verdict == "roll back":
        return {"verdict": verdict, "p_worse": p, "next": "",
                "why": f"people rate the canary worse ({rates}; {_sure(p)} sure it is worse)"}
    if verdict == "promote":
        return {"verdict": verdict, "p_worse": p, "next": "",
                "why": f"people rate the canary better ({rates}; {_sure(1 - p)} sure it is better)"}
    if verdict == "inconclusive":
        limit = (f"{settings.max_rated} rated canary answers" if canary.rated >= settings.max_rated
                 else f"{settings.max_hours:g} hours")
        return {"verdict": verdict, "p_worse": p, "next": "an editor promotes or rolls it back",
                "why": f"no clear difference after {limit} ({rates})"}
    if min(baseline.rated, canary.rated) < need:
        return {"verdict": verdict, "p_worse": p, "why": f"too few ratings yet ({rates})",
                "next": f"a verdict needs {need} rated answers per arm: {max(need - canary.rated, 0)} more on "
                        f"the canary, {max(need - baseline.rated, 0)} more on the current version"}
    return {"verdict": verdict, "p_worse": p, "why": f"no clear difference yet ({rates})",
            "next": f"rolled back when {settings.confidence:.1%} sure the canary is worse, promoted when as sure "
                    f"it is better (now {p:.1%} that it is worse)"}


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def _sure(p: float) -> str:
    return "more than 99.99%" if p > 0.9999 else f"{p:.2%}"


def simulate(baseline_rate: float, canary_rate: float, settings: CanarySettings, runs: int,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`runs` rollouts at once, rated one answer at a time (the canary's with probability `settings.share`,
    bad with each arm's rate), the rule read after every rating until it decides or the canary arm reaches
    max_rated -> (each rollout's verdict index, the canary's rated answers when it was reached)."""
    rng = np.random.default_rng(seed)
    rated, bad = np.zeros((2, runs)), np.zeros((2, runs))          # [baseline, canary] x runs
    verdict, at = np.full(runs, WAIT), np.zeros(runs)
    while (open_ := verdict == WAIT).any():
        canary = rng.random(runs) < settings.share
        is_bad = rng.random(runs) < np.where(canary, canary_rate, baseline_rate)
        arm = canary.astype(int)
        np.add.at(rated, (arm[open_], np.flatnonzero(open_)), 1)
        np.add.at(bad, (arm[open_ & is_bad], np.flatnonzero(open_ & is_bad)), 1)
        now = verdicts(rated[0], bad[0], rated[1], bad[1], settings)
        newly = open_ & (now != WAIT)
        verdict[newly], at[newly] = now[newly], rated[1][newly]
    return verdict, at
