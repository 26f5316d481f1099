"""Monitoring: what each domain and adapter version serves, how people rate it, how fast, and whether
the questions it gets still look like the data it was trained on.

`domain_metrics(workspace, domain)` computes, from the store (the Monitor tab, `GET /api/domains/{name}/metrics`):
- per adapter version: answers served, thumbs up / down and correction rates (per answer served, each
  answer counted once by its latest rating), latency and time-to-first-token percentiles;
- the same rates per time bucket (a timeline to plot);
- drift of the recent questions from the training questions (monitoring/drift.py);
- a retrain recommendation with its reasons, when the bad-answer rate of the active version or the drift
  of the latest questions crosses the thresholds of `MonitorSettings`.

`prometheus_text(workspace)` is `GET /metrics`, through the app's `Exporter` (prometheus_client): counters that
only go up (answers, ratings, corrections, responses that could not be logged), latency and time to first
token as histograms in seconds, and gauges for states (a broken domain, the active version, the bad-answer
rate, drift, the retrain recommendation). A scrape never embeds a question: the drift and quality gauges
come from a cache that a background thread refreshes.
"""

import logging
import math
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field

import numpy as np

from assistant.data.registry import check_name, version_key
from assistant.errors import NotFound
from assistant.monitoring.drift import domain_drift
from assistant.settings import BASE

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99)
MAX_TIMELINE_BUCKETS = 48          # auto bucket size keeps a timeline at most this long
NICE_BUCKETS_S = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)
EMPTY_SPAN_S = 3600.0              # the timeline span assumed when there are no answers yet
# Prometheus histogram bucket bounds, in seconds: CPU answers take seconds, GPU ones a fraction.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS_MS = tuple(b * 1000 for b in LATENCY_BUCKETS_S)   # the store logs milliseconds
TTFT_BUCKETS_MS = tuple(b * 1000 for b in TTFT_BUCKETS_S)
DRIFT_REFRESH_S = 60.0             # the drift and quality gauges are recomputed at least this often...
REFRESH_MIN_GAP_S = 5.0            # ...and at most this often, when scrapes see new answers or ratings
REFRESH_JOIN_S = 10.0              # how long closing waits for a refresh in progress
CACHED_GAUGES = {                  # computed by Exporter.refresh, read by the scrape
    "assistant_bad_answer_rate": "bad-answer rate of the active version (thumbs down or corrected)",
    "assistant_drift_ood_rate": "share of the latest questions unlike the training data",
    "assistant_drift_centroid_shift": "1 - cos(mean latest question, mean training question)",
    "assistant_retrain_recommended": "1 when a retrain is recommended",
    "assistant_monitor_refreshed_timestamp_seconds": "when the gauges above were computed (Unix time)",
}


@dataclass(frozen=True)
class MonitorSettings:
    lookback_seconds: float = field(default=30 * 86400, metadata={"help": "how far back the metrics look"})
    bucket_seconds: float | None = field(default=None, metadata={
        "help": "timeline bucket; None picks 1 min .. 1 week so the lookback spans at most "
                f"{MAX_TIMELINE_BUCKETS} buckets"})
    window_questions: int = field(default=20, metadata={
        "help": "the latest questions the current drift is measured on"})
    min_questions: int = field(default=5, metadata={"help": "fewer recent questions than this: no drift verdict"})
    ood_similarity: float = field(default=0.5, metadata={
        "help": "a question whose nearest training question is below this cosine is out of distribution"})
    ood_rate_threshold: float = field(default=0.5, metadata={
        "help": "retrain recommended when this share of the latest questions is out of distribution"})
    centroid_shift_threshold: float = field(default=0.35, metadata={
        "help": "retrain recommended when 1 - cos(mean recent question, mean training question) reaches this"})
    window_feedback: int = field(default=20, metadata={
        "help": "the latest rated answers of the active version the bad-answer rate is measured on"})
    min_feedback: int = field(default=5, metadata={"help": "fewer rated answers than this: no bad-rate verdict"})
    bad_rate_threshold: float = field(default=0.3, metadata={
        "help": "retrain recommended when this share of rated answers is thumbs down or corrected"})

    def __post_init__(self):
        for name in ("ood_similarity", "ood_rate_threshold", "centroid_shift_threshold", "bad_rate_threshold"):
            if not 0 <= getattr(self, name) <= 2:
                raise ValueError(f"monitoring setting {name}={getattr(self, name)}: use a value in [0, 1]")
        for name in ("window_questions", "min_questions", "window_feedback", "min_feedback"):
            if getattr(self, name) < 1:
                raise ValueError(f"monitoring setting {name} must be at least 1")
        if self.lookback_seconds <= 0 or (self.bucket_seconds is not None and self.bucket_seconds <= 0):
            raise ValueError("monitoring settings lookback_seconds and bucket_seconds must be positive")


def _version(v) -> str:
    return v or BASE


def _percentiles(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {f"p{p}": None for p in PERCENTILES}
    arr = np.percentile(np.asarray(vals, dtype=np.float64), PERCENTILES)
    return {f"p{p}": round(float(x), 1) for p, x in zip(PERCENTILES, arr)}


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def bucket_size(span_s: float, settings: MonitorSettings) -> float:
    if settings.bucket_seconds:
        return float(settings.bucket_seconds)
    for b in NICE_BUCKETS_S:
        if span_s / b <= MAX_TIMELINE_BUCKETS:
            return float(b)
    return float(NICE_BUCKETS_S[-1])


# The metrics -----------------------------------------------------------------------------------------
def domain_metrics(workspace, domain: str, settings: MonitorSettings | None = None, now: float | None = None) -> dict:
    """Everything the Monitor tab and `GET /api/domains/{name}/metrics` show for one domain."""
    if settings is None:
        from assistant.settings import group_settings
        settings = group_settings(workspace.settings, "monitor")
    if not workspace.registry.exists(check_name(domain)):
        raise NotFound(f"no domain {domain!r}: create it first (POST /api/domains or the Adapters tab)")
    now = time.time() if now is None else now
    since = now - settings.lookback_seconds
    responses = workspace.store.list_responses(domain, since=since)
    feedback = workspace.store.list_feedback(domain)
    latest: dict[str, dict] = {}          # response id -> latest rating and whether it was ever corrected
    for f in feedback:                     # ordered by feedback id: the last one wins
        entry = latest.setdefault(f["response_id"], {"rating": None, "corrected": False, "at": 0.0})
        entry["rating"] = f["rating"]
        entry["corrected"] = entry["corrected"] or bool(f["correction"])
        entry["at"] = f["created_at"]

    span = (now - responses[0]["created_at"]) if responses else EMPTY_SPAN_S
    bucket = bucket_size(max(span, 1.0), settings)

    per_version: dict[str, dict] = {}
    timeline: dict[tuple[float, str], dict] = {}
    for r in responses:
        v = _version(r["adapter_version"])
        fb = latest.get(r["id"], {})
        pv = per_version.setdefault(v, {"adapter_version": v, "answers": 0, "rated": 0, "up": 0, "down": 0,
                                        "corrections": 0, "_lat": [], "_ttft": []})
        b = math.floor(r["created_at"] / bucket) * bucket
        tb = timeline.setdefault((b, v), {"bucket_start": b, "adapter_version": v, "answers": 0, "up": 0,
                                          "down": 0, "corrections": 0})
        for d in (pv, tb):
            d["answers"] += 1
            d["up"] += fb.get("rating") == "up"
            d["down"] += fb.get("rating") == "down"
            d["corrections"] += bool(fb.get("corrected"))
        pv["rated"] += fb.get("rating") is not None
        pv["_lat"].append(r["latency_ms"])
        pv["_ttft"].append(r["ttft_ms"])

    versions = []
    for v in sorted(per_version, key=lambda x: (x != BASE, 0 if x == BASE else version_key(x))):
        pv = per_version[v]
        versions.append({"adapter_version": v, "answers": pv["answers"], "rated": pv["rated"], "up": pv["up"],
                         "down": pv["down"], "corrections": pv["corrections"],
                         "up_rate": _rate(pv["up"], pv["answers"]), "down_rate": _rate(pv["down"], pv["answers"]),
                         "correction_rate": _rate(pv["corrections"], pv["answers"]),
                         "latency_ms": _percentiles(pv["_lat"]), "ttft_ms": _percentiles(pv["_ttft"])})
    rows = []
    for _key, tb in sorted(timeline.items()):
        rows.append({**tb, "up_rate": _rate(tb["up"], tb["answers"]), "down_rate": _rate(tb["down"], tb["answers"]),
                     "correction_rate": _rate(tb["corrections"], tb["answers"])})

    drift = domain_drift(workspace, domain, responses, bucket, settings)
    active = workspace.registry.active_version(domain)
    quality = _quality(responses, latest, active, settings)
    recommendation = _recommend(quality, drift, settings)
    job = workspace.store.active_job()
    if job is not None and job["domain"] == domain and recommendation["retrain"]:
        # a retrain of this domain is already under way: say so instead of suggesting another
        recommendation = {**recommendation, "retrain": False, "training_job": job["job_id"],
                          "reason": f"a retrain is already running (job {job['job_id']}, {job['status']}): "
                                    "the suggestion comes back if its version does not fix "
                                    + "; ".join(recommendation["reasons"])}
    return {"domain": domain, "generated_at": now, "active_version": active or None,
            "answers": len(responses), "bucket_seconds": bucket,
            "latency_ms": _percentiles([r["latency_ms"] for r in responses]),
            "versions": versions, "timeline": rows, "quality": quality, "drift": drift,
            "recommendation": recommendation, "settings": asdict(settings)}


def _quality(responses: list[dict], latest: dict, active: str | None, settings: MonitorSettings) -> dict:
    """Bad-answer rate of the active version over its latest rated answers."""
    mine = [r for r in responses if r["adapter_version"] == active and r["id"] in latest]
    mine.sort(key=lambda r: latest[r["id"]]["at"])
    window = mine[-settings.window_feedback:]
    bad = sum(latest[r["id"]]["rating"] == "down" or latest[r["id"]]["corrected"] for r in window)
    return {"adapter_version": _version(active), "rated": len(window), "bad": bad,
            "bad_rate": _rate(bad, len(window))}


def _recommend(quality: dict, drift: dict, settings: MonitorSettings) -> dict:
    reasons = []
    if quality["rated"] >= settings.min_feedback and quality["bad_rate"] >= settings.bad_rate_threshold:
        reasons.append(f"{quality['bad']} of the last {quality['rated']} rated answers of "
                       f"{quality['adapter_version']} were thumbs down or corrected "
                       f"({quality['bad_rate']:.0%} >= {settings.bad_rate_threshold:.0%})")
    cur = drift.get("current")
    if cur and cur["questions"] >= settings.min_questions:
        if cur["ood_rate"] >= settings.ood_rate_threshold:
            reasons.append(f"{cur['ood_rate']:.0%} of the last {cur['questions']} questions are unlike the training "
                           f"data (nearest training question below cosine {settings.ood_similarity}; "
                           f"threshold {settings.ood_rate_threshold:.0%})")
        if cur["centroid_shift"] >= settings.centroid_shift_threshold:
            reasons.append(f"the questions moved away from the training data (centroid shift "
                           f"{cur['centroid_shift']:.2f} >= {settings.centroid_shift_threshold})")
    needed = max(0, settings.min_feedback - quality["rated"])
    if reasons:
        return {"retrain": True, "reasons": reasons, "ratings_needed": needed,
                "reason": "retrain recommended: " + "; ".join(reasons) +
                          ". Review the new questions and corrections in the Data tab, then retrain."}
    if needed:
        rate = "" if quality["bad_rate"] is None else f" (bad-answer rate so far {quality['bad_rate']:.0%})"
        return {"retrain": False, "reasons": [], "ratings_needed": needed,
                "reason": f"not enough ratings yet: {quality['rated']} of {quality['adapter_version']}'s answers "
                          f"are rated{rate}; {needed} more needed before the bad-answer rate counts"}
    return {"retrain": False, "reasons": [], "ratings_needed": 0,
            "reason": "no retrain needed: ratings and questions are within thresholds"}


# Prometheus ------------------------------------------------------------------------------------------
@dataclass
class _Served:
    """Running totals of one (domain, version): answers, and latency and time-to-first-token histograms."""
    answers: int = 0
    latency_s: float = 0.0
    latency_le: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    ttft_count: int = 0
    ttft_s: float = 0.0
    ttft_le: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS_S))


def _buckets(bounds: tuple[float, ...], le: list[int], count: int) -> list[tuple[str, int]]:
    return [(f"{b:g}", n) for b, n in zip(bounds, le)] + [("+Inf", count)]


class Exporter:
    """The Prometheus view of one app, in a `CollectorRegistry` of its own (several apps share a process in
    tests). `workspace` is the app's Workspace (anything with `.store`, `.registry`, `.settings` and `.log_failures`)
    (responses that could not be logged); it is held weakly.

    A scrape (`text()`) reads: the counters and histograms from the store, summing only rows logged since the
    previous scrape; domain states from the registry; the drift and quality gauges from a cache. It never
    embeds a question. The cache is filled by `refresh()`, in a background thread every `refresh_s` seconds
    (sooner when a scrape saw new answers or ratings, but at most once per REFRESH_MIN_GAP_S), and only for
    domains with something new since their last computation. `refresh_s=None`: no thread (call `refresh`)."""

    def __init__(self, workspace, settings: MonitorSettings | None = None, *,
                 refresh_s: float | None = DRIFT_REFRESH_S):
        from prometheus_client import CollectorRegistry
        self.settings = settings or MonitorSettings()
        self.refresh_s = refresh_s
        self._workspace = weakref.ref(workspace, self._workspace_gone)
        self._lock = threading.Lock()
        self._served: dict[tuple[str, str], _Served] = {}
        self._ratings: dict[tuple[str, str, str], list[int]] = {}   # (domain, version, rating) -> [ratings, corrections]
        self._marks = (0, 0)                                           # last response row, last rating event summed
        self._gauges: dict[str, tuple[tuple, dict]] = {}             # domain -> (activity key, gauge values)
        self._stop, self._wake = threading.Event(), threading.Event()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._thread = None
        if refresh_s is not None:
            self._wake.set()                                           # the first refresh runs at once
            self._thread = threading.Thread(target=self._loop, name="metrics-refresh", daemon=True)
            self._thread.start()

    def text(self) -> str:
        from prometheus_client import generate_latest
        return generate_latest(self.registry).decode("utf-8")

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=REFRESH_JOIN_S)

    def _workspace_gone(self, _ref) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh_s)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the gauges keep their last values; the next round tries again
                log.exception("refreshing the monitoring gauges failed")
            self._stop.wait(REFRESH_MIN_GAP_S)

    # Totals from the store ------------------------------------------------------------------------
    def _sum_new(self, store) -> bool:
        """Add the responses and ratings logged since the last call to the totals; True when there were any."""
        with self._lock:
            last_r, served = store.response_totals(self._marks[0], LATENCY_BUCKETS_MS, TTFT_BUCKETS_MS)
            last_f, rated = store.feedback_totals(self._marks[1])
            for r in served:
                t = self._served.setdefault((r["domain"], _version(r["adapter_version"])), _Served())
                t.answers += r["answers"]
                t.latency_s += (r["latency_ms_sum"] or 0.0) / 1000
                t.ttft_count += r["ttft_count"]
                t.ttft_s += r["ttft_ms_sum"] / 1000
                t.latency_le = [a + b for a, b in zip(t.latency_le, r["latency_le"])]
                t.ttft_le = [a + b for a, b in zip(t.ttft_le, r["ttft_le"])]
            for r in rated:
                c = self._ratings.setdefault((r["domain"], _version(r["adapter_version"]), r["rating"]), [0, 0])
                c[0] += r["ratings"]
                c[1] += r["corrections"] or 0
            new = (last_r, last_f) != self._marks
            self._marks = (last_r, last_f)
            return new

    def _activity(self, workspace, domain) -> tuple:
        """What changes when a domain's drift or quality can have changed."""
        with self._lock:
            answers = sum(t.answers for (d, _), t in self._served.items() if d == domain.name)
            ratings = sum(c[0] for (d, _, _), c in self._ratings.items() if d == domain.name)
        snapshot = (workspace.store.latest_snapshot(domain.name) or {}).get("hash")
        return answers, ratings, domain.active_version, snapshot

    def refresh(self) -> list[str]:
        """Recompute the drift and quality gauges of every domain with new answers, ratings, active version or
        training snapshot since its last computation (this embeds questions) -> the domains recomputed."""
        workspace = self._workspace()
        if workspace is None:
            return []
        self._sum_new(workspace.store)
        done = []
        for domain in workspace.registry.list_domains():
            key = self._activity(workspace, domain)
            with self._lock:
                if self._gauges.get(domain.name, ((),))[0] == key:
                    continue
            try:
                m = domain_metrics(workspace, domain.name, self.settings)
            except Exception:  # noqa: BLE001 - one domain's failure leaves the others' gauges fresh
                log.exception("monitoring %s failed: its gauges keep their last values", domain.name)
                continue
            cur = m["drift"].get("current") or {}
            values = {"assistant_bad_answer_rate": m["quality"]["bad_rate"],
                      "assistant_drift_ood_rate": cur.get("ood_rate"),
                      "assistant_drift_centroid_shift": cur.get("centroid_shift"),
                      "assistant_retrain_recommended": int(m["recommendation"]["retrain"]),
                      "assistant_monitor_refreshed_timestamp_seconds": m["generated_at"]}
            with self._lock:
                self._gauges[domain.name] = (key, values)
            done.append(domain.name)
        return done

    # The scrape -----------------------------------------------------------------------------------
    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        workspace = self._workspace()
        if workspace is None:
            return
        try:
            if self._sum_new(workspace.store):
                self._wake.set()                   # new answers or ratings: the refresher looks soon
        except Exception:  # noqa: BLE001 - the rest still reports (log failures, broken domains); totals hold
            log.exception("reading the serving totals for /metrics failed: they keep their last values")
        dv = ["domain", "version"]
        answers = CounterMetricFamily("assistant_answers", "answers served", labels=dv)
        ratings = CounterMetricFamily("assistant_feedback", "ratings given (a changed rating counts again)",
                                      labels=[*dv, "rating"])
        corrections = CounterMetricFamily("assistant_corrections", "ratings that came with a correction", labels=dv)
        latency = HistogramMetricFamily("assistant_latency_seconds", "time from request to last token", labels=dv)
        ttft = HistogramMetricFamily("assistant_ttft_seconds", "time from request to first token", labels=dv)
        with self._lock:
            for (d, v), t in sorted(self._served.items()):
                answers.add_metric([d, v], t.answers)
                latency.add_metric([d, v], _buckets(LATENCY_BUCKETS_S, t.latency_le, t.answers), t.latency_s)
                ttft.add_metric([d, v], _buckets(TTFT_BUCKETS_S, t.ttft_le, t.ttft_count), t.ttft_s)
            per_version: dict[tuple[str, str], int] = {}
            for (d, v, rating), (n, corrected) in sorted(self._ratings.items()):
                ratings.add_metric([d, v, rating], n)
                per_version[(d, v)] = per_version.get((d, v), 0) + corrected
            for (d, v), n in sorted(per_version.items()):
                corrections.add_metric([d, v], n)
            cached = {d: values for d, (_, values) in self._gauges.items()}
        yield from (answers, ratings, corrections, latency, ttft)
        yield CounterMetricFamily("assistant_response_log_failures", "answers that could not be logged",
                                  value=getattr(workspace, "log_failures", 0))
        broken = GaugeMetricFamily("assistant_domain_broken", "1 when the domain cannot serve (see GET /api/domains)",
                                   labels=["domain"])
        active = GaugeMetricFamily("assistant_active_version", "number N of the active version vN (0: base weights)",
                                   labels=["domain"])
        states = {name: GaugeMetricFamily(name, help_, labels=["domain"]) for name, help_ in CACHED_GAUGES.items()}
        refused = GaugeMetricFamily("assistant_adapter_refused", "1 for each version the serving engine refused to "
                                    "load (retried with backoff; the reason is in GET /api/domains)", labels=dv)
        canary = GaugeMetricFamily("assistant_canary_share", "share of the domain's conversations a running canary "
                                   "answers; its answers and ratings are those of its version", labels=[*dv, "baseline"])
        refusals = getattr(workspace, "engine_refusals", dict)()
        for key in sorted(refusals):
            refused.add_metric(list(key.partition("@")[::2]), 1)
        for domain in workspace.registry.list_domains():
            active_refused = f"{domain.name}@{domain.active_version}" in refusals
            broken.add_metric([domain.name], int(domain.problem is not None or active_refused))
            active.add_metric([domain.name], version_key(domain.active_version) if domain.active_version else 0)
            if (rollout := workspace.rollouts.running(domain.name)) is not None:
                canary.add_metric([domain.name, rollout["version"], rollout["baseline"] or BASE], rollout["share"])
            for name, value in cached.get(domain.name, {}).items():
                if value is not None:
                    states[name].add_metric([domain.name], value)
        yield from (broken, active, refused, canary, *states.values())


_exporters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_exporters_lock = threading.Lock()


def exporter_for(workspace, settings: MonitorSettings | None = None) -> Exporter:
    """The app's one `Exporter`, made on first use (`settings` count then); it goes with the workspace."""
    with _exporters_lock:
        exporter = _exporters.get(workspace)
        if exporter is None:
            exporter = _exporters[workspace] = Exporter(workspace, settings)
        return exporter


def prometheus_text(workspace, settings: MonitorSettings | None = None) -> str:
    """`GET /metrics`: the Prometheus text exposition of the app's metrics (see `Exporter`)."""
    return exporter_for(workspace, settings).text()


def close_exporter(workspace) -> None:
    """Stop the app's refresh thread (when the app closes); a later scrape starts a new one."""
    with _exporters_lock:
        exporter = _exporters.pop(workspace, None)
    if exporter is not None:
        exporter.close()
