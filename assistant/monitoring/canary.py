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

`Canary` is a serving process's side of it: which version answers a conversation while a rollout runs
(`on_canary`: a hash of the rollout and the conversation, below the share), and, after each rating, the
verdict acted on in the background (promote: activate the canary; roll back: end it; the store's
compare-and-set picks the one replica that acts). `report` and `timeline` are what the API and the
Adapters tab show.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.special import betaincinv, ndtr

from assistant.errors import InvalidSetting

log = logging.getLogger(__name__)

VERDICTS = ("wait", "promote", "roll back", "inconclusive")
WAIT, PROMOTE, ROLL_BACK, INCONCLUSIVE = range(len(VERDICTS))
INTERVAL_MASS = 0.9           # an arm's rate is shown with its 90% credible interval
TIMELINE_POINTS = 60          # at most this many points in a rollout's plots
ROLLOUT_CACHE_S = 1.0         # how long a serving process trusts what it read of a domain's running rollout


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


# A domain's rollout, as the serving process runs it ---------------------------------------------------
def conversation_key(messages: list[dict] | None, prompt: str | None, user: str | None) -> str:
    """What keeps one person's conversation on one arm: the user the request names, or else the
    conversation's first user turn (every later request of the conversation repeats it)."""
    if user:
        return f"user:{user}"
    if prompt is not None:
        return f"prompt:{prompt}"
    first = next((m.get("content") for m in messages or () if m.get("role") == "user"), "")
    return "conversation:" + (first if isinstance(first, str) else json.dumps(first, sort_keys=True))


def on_canary(rollout: dict, key: str) -> bool:
    """Whether the conversation `key` is answered by the rollout's canary: a hash of the rollout and the key
    below its share, so the assignment is the same on every replica and for every turn."""
    digest = hashlib.sha256(f"{rollout['id']}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < rollout["share"]


def report(rollouts, rollout: dict | None, settings: CanarySettings) -> dict | None:
    """A rollout as people read it: versions, share, status, each arm's rated and bad answers, and the
    rule's verdict now (a running one) or the one that ended it."""
    if rollout is None:
        return None
    arms = rollouts.arms(rollout)
    (b_rated, b_bad), (c_rated, c_bad) = arms[rollout["baseline"]], arms[rollout["version"]]
    hours = ((rollout["ended_at"] or time.time()) - rollout["started_at"]) / 3600
    verdict = decide(Arm(b_rated, b_bad), Arm(c_rated, c_bad), settings, hours) \
        if rollout["status"] == "running" or not rollout["verdict"] else rollout["verdict"]
    return {"id": rollout["id"], "domain": rollout["domain"], "version": rollout["version"],
            "baseline": rollout["baseline"], "share": rollout["share"], "status": rollout["status"],
            "started_at": rollout["started_at"], "ended_at": rollout["ended_at"], "hours": round(hours, 3),
            "arms": {"canary": _arm(rollout["version"], c_rated, c_bad), "current": _arm(rollout["baseline"], b_rated, b_bad)},
            "verdict": verdict}


def timeline(rollouts, rollout: dict, points: int = TIMELINE_POINTS) -> list[dict]:
    """How the two arms' bad-answer rates and the rule's certainty moved, rating by rating (at most `points`
    evenly spread, the last one always) -> [{"ratings", "canary", "current", "p_worse"}]: what the
    rollout's plots draw."""
    counts = {"canary": [0, 0], "current": [0, 0]}
    out = []
    ratings = [(v, bad) for v, bad in rollouts.ratings(rollout) if v in (rollout["version"], rollout["baseline"])]
    step = max(1, -(-len(ratings) // points))
    for i, (version, bad) in enumerate(ratings, 1):
        arm = counts["canary" if version == rollout["version"] else "current"]
        arm[0] += 1
        arm[1] += bad
        if i % step and i != len(ratings):
            continue
        (c_rated, c_bad), (b_rated, b_bad) = counts["canary"], counts["current"]
        out.append({"ratings": i, "canary": c_bad / c_rated if c_rated else None,
                    "current": b_bad / b_rated if b_rated else None,
                    "p_worse": float(p_canary_worse(b_rated, b_bad, c_rated, c_bad))})
    return out


def _arm(version: str | None, rated: int, bad: int) -> dict:
    low, high = interval(rated, bad)
    return {"version": version, "rated": rated, "bad": bad, "bad_rate": bad / rated if rated else None,
            "interval": [round(low, 4), round(high, 4)]}


def interval(rated: int, bad: int, mass: float = INTERVAL_MASS) -> tuple[float, float]:
    """The central `mass` of the arm's posterior Beta(1 + bad, 1 + rated - bad): where its bad-answer rate
    likely is."""
    a, b = 1 + bad, 1 + rated - bad
    return float(betaincinv(a, b, (1 - mass) / 2)), float(betaincinv(a, b, (1 + mass) / 2))


class Canary:
    """A serving process's side of canary rollouts: which version answers a conversation, and, after each
    rating, the verdict acted on (once: the store's compare-and-set decides which replica acts)."""

    def __init__(self, workspace):
        self.workspace = workspace
        self.rollouts = workspace.rollouts
        self._cache: dict[str, tuple[float, dict | None]] = {}
        self._judge = ThreadPoolExecutor(1, thread_name_prefix="canary-judge")   # ratings judged in order

    def close(self) -> None:
        self._judge.shutdown(wait=True)

    def settings(self, **overrides) -> CanarySettings:
        return self.workspace.canary_settings(**overrides)

    def running(self, domain: str) -> dict | None:
        """The domain's running rollout, re-read at most every ROLLOUT_CACHE_S (a rollout started or ended on
        another replica is seen within that)."""
        now = time.monotonic()
        cached = self._cache.get(domain)
        if cached is None or now - cached[0] > ROLLOUT_CACHE_S:
            cached = (now, self.rollouts.running(domain))
            self._cache[domain] = cached
        return cached[1]

    def version_for(self, domain: str, messages, prompt: str | None, user: str | None) -> str | None:
        """The canary version when this conversation is on the canary arm of a running rollout, else None."""
        rollout = self.running(domain)
        if rollout is None or not on_canary(rollout, conversation_key(messages, prompt, user)):
            return None
        return rollout["version"]

    def start(self, domain: str, version: str, baseline: str | None, share: float | None, by: str | None) -> dict:
        """Out as a canary (the caller loaded it first), or a new share for the one running."""
        settings = self.settings(**({"share": share} if share is not None else {}))
        running = self.rollouts.running(domain)
        if running is not None and running["version"] == version:
            self.rollouts.set_share(running["id"], settings.share)
        else:
            self.rollouts.start(domain, version, baseline, settings.share, by)
        self._cache.pop(domain, None)
        return self.workspace.canary(domain)

    def end(self, domain: str, status: str, why: str) -> dict | None:
        """End the running rollout (an editor stopped it, or activated a version): -> its report."""
        rollout = self.rollouts.running(domain)
        self._cache.pop(domain, None)
        if rollout is None:
            return None
        verdict = {"verdict": status, "why": why, "next": "", "p_worse": None}
        if self.rollouts.end(rollout["id"], status, verdict):
            self._note(rollout, verdict)
        return self.workspace.canary(domain)

    def rated(self, response_id: str, activate) -> None:
        """A rating arrived: judge the rollout it counts for, in the background (`activate(domain, version,
        override)` makes a promoted canary live)."""
        self._judge.submit(self._judge_now, response_id, activate)

    def _judge_now(self, response_id: str, activate) -> None:
        try:
            response = self.workspace.store.get_response(response_id)
            rollout = self.rollouts.running(response["domain"]) if response else None
            if rollout is None or response["adapter_version"] not in (rollout["version"], rollout["baseline"]):
                return
            verdict = report(self.rollouts, rollout, self.settings())["verdict"]
            status = {"promote": "promoted", "roll back": "rolled back"}.get(verdict["verdict"])
            if status is None:
                if verdict["verdict"] != (rollout["verdict"] or {}).get("verdict"):
                    self.rollouts.record_verdict(rollout["id"], verdict)
                return
            if not self.rollouts.end(rollout["id"], status, verdict):
                return                                     # another replica ended it first
            self._cache.pop(rollout["domain"], None)
            self._note(rollout, verdict)
            log.info("canary %s@%s %s: %s", rollout["domain"], rollout["version"], status, verdict["why"])
            if status == "promoted":
                blocked = self.workspace.registry.gate_verdict(rollout["domain"], rollout["version"]).get("promote") is False
                activate(rollout["domain"], rollout["version"], blocked)
        except Exception:  # noqa: BLE001 - the next rating judges again; chat never waits on this
            log.exception("could not judge the canary of response %s", response_id)

    def _note(self, rollout: dict, verdict: dict) -> None:
        try:
            self.workspace.registry.record_canary(rollout["domain"], rollout["version"],
                                                  {"outcome": verdict["verdict"], "why": verdict["why"],
                                                   "against": rollout["baseline"], "share": rollout["share"]})
        except Exception:  # noqa: BLE001 - the rollout's record keeps the verdict either way
            log.exception("could not note the canary's end in the card of %s@%s", rollout["domain"], rollout["version"])
