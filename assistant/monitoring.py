"""Monitoring: what each domain and adapter version serves, how people rate it, how fast, and whether
the questions it gets still look like the data it was trained on.

`domain_metrics(service, domain)` computes, from the store:
- per adapter version: answers served, thumbs up / down and correction rates (per answer served, each
  answer counted once by its latest rating), latency and time-to-first-token percentiles;
- the same rates per time bucket (a timeline to plot);
- drift: the MiniLM embeddings of recent user questions against the questions of the training snapshot
  (the one the active adapter's card names, else the domain's latest curated snapshot). Two numbers per
  window: the centroid shift (1 - cosine between the two mean vectors) and the out-of-distribution rate
  (share of questions whose nearest training question, by FAISS inner product, is below a cosine);
- a retrain recommendation with its reasons, when the bad-answer rate of the active version or the drift
  of the latest questions crosses the thresholds of `MonitorSettings`.

`build_metrics_routes(service)` serves it as JSON (`GET /api/domains/{name}/metrics`) and in the
Prometheus text format (`GET /metrics`).
"""

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .settings import BASE

PERCENTILES = (50, 90, 99)
MAX_TIMELINE_BUCKETS = 48          # auto bucket size keeps a timeline at most this long
NICE_BUCKETS_S = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)


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


def _question(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1].strip() if users else ""


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


# Reference (training) questions --------------------------------------------------------------------
_ref_cache: dict[tuple[str, str], tuple[np.ndarray, object]] = {}
_ref_lock = threading.Lock()


def _snapshot_for(service, domain: str) -> tuple[str | None, list[dict] | None]:
    """(hash, rows) of the snapshot the active adapter was trained on (from its card), else of the latest
    written one, else of the domain's data as curation would take it now (computed, nothing written)."""
    from .curation import read_snapshot
    folder = service.settings.state_path / "snapshots" / domain
    active = service.registry.active_version(domain)
    if active:
        h = service.registry.read_card(domain, active).get("dataset_snapshot")   # written by jobs.run_job
        if isinstance(h, str) and (folder / f"{h}.jsonl").is_file():
            return h, read_snapshot(folder / f"{h}.jsonl")
    latest = service.store.latest_snapshot(domain)
    if latest and Path(latest["path"]).is_file():
        return latest["hash"], read_snapshot(latest["path"])
    preview = service.preview(domain)
    return (preview.hash, preview.rows) if preview.rows else (None, None)


def _read_only_cache(service):
    """Embeddings already cached are reused; new ones are not stored: reading metrics writes nothing."""
    from .dedup import ReadOnlyCache
    return ReadOnlyCache(service.store)


def _embedder():
    from .curation import default_embedder
    return default_embedder()


def _reference(service, domain: str):
    """(snapshot hash, centroid, FAISS index of the training questions) or (None, None, None)."""
    h, rows = _snapshot_for(service, domain)
    if h is None:
        return None, None, None
    with _ref_lock:
        cached = _ref_cache.get((str(service.settings.state_path), domain))
        if cached and cached[0] == h:
            return h, cached[1], cached[2]
    questions = [q for q in (_question(r["messages"]) for r in rows) if q]
    if not questions:
        return None, None, None
    from .embeddings import VectorIndex
    vecs = _embedder().embed(questions, cache=_read_only_cache(service))
    index = VectorIndex(vecs.shape[1])
    index.add(vecs)
    centroid = vecs.mean(axis=0)
    with _ref_lock:
        _ref_cache[(str(service.settings.state_path), domain)] = (h, centroid, index)
    return h, centroid, index


def drift_of(vectors: np.ndarray, centroid: np.ndarray, index, settings: MonitorSettings) -> dict:
    """Centroid shift and out-of-distribution rate of a set of question vectors against the reference."""
    if len(vectors) == 0:
        return {"questions": 0, "centroid_shift": None, "ood_rate": None}
    mean = vectors.mean(axis=0)
    denom = float(np.linalg.norm(mean) * np.linalg.norm(centroid)) or 1.0
    shift = 1.0 - float(mean @ centroid) / denom
    sims, _ = index.search(vectors, 1)
    ood = float(np.mean(sims[:, 0] < settings.ood_similarity))
    return {"questions": int(len(vectors)), "centroid_shift": round(shift, 4), "ood_rate": round(ood, 4)}


# The metrics -----------------------------------------------------------------------------------------
def domain_metrics(service, domain: str, settings: MonitorSettings | None = None, now: float | None = None) -> dict:
    """Everything the Monitor tab and `GET /api/domains/{name}/metrics` show for one domain."""
    settings = settings or MonitorSettings()
    service.require_domain(domain)
    now = time.time() if now is None else now
    since = now - settings.lookback_seconds
    responses = service.store.list_responses(domain, since=since)
    feedback = service.store.list_feedback(domain)
    latest: dict[str, dict] = {}          # response id -> latest rating and whether it was ever corrected
    for f in feedback:                     # ordered by feedback id: the last one wins
        entry = latest.setdefault(f["response_id"], {"rating": None, "corrected": False, "at": 0.0})
        entry["rating"] = f["rating"]
        entry["corrected"] = entry["corrected"] or bool(f["correction"])
        entry["at"] = f["created_at"]

    span = (now - responses[0]["created_at"]) if responses else 3600.0
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
    for v in sorted(per_version, key=lambda x: (x != BASE, int(x[1:]) if x[1:].isdigit() else 0)):
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

    drift = _drift(service, domain, responses, bucket, settings)
    active = service.active_version(domain)
    quality = _quality(responses, latest, active, settings)
    recommendation = _recommend(quality, drift, settings)
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


def _drift(service, domain: str, responses: list[dict], bucket: float, settings: MonitorSettings) -> dict:
    snapshot, centroid, index = _reference(service, domain)
    out = {"snapshot": snapshot, "reference_questions": len(index) if index is not None else 0,
           "window_questions": settings.window_questions, "current": None, "timeline": []}
    if snapshot is None:
        out["note"] = "no curated training data yet: add examples or feedback, then curate"
        return out
    asked = [(r["created_at"], _question(r["messages"])) for r in responses]
    asked = [(t, q) for t, q in asked if q]
    if not asked:
        return out
    vecs = _embedder().embed([q for _, q in asked], cache=_read_only_cache(service))
    out["current"] = drift_of(vecs[-settings.window_questions:], centroid, index, settings)
    buckets: dict[float, list[int]] = {}
    for i, (t, _) in enumerate(asked):
        buckets.setdefault(math.floor(t / bucket) * bucket, []).append(i)
    out["timeline"] = [{"bucket_start": b, **drift_of(vecs[idx], centroid, index, settings)}
                       for b, idx in sorted(buckets.items())]
    return out


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
def _label(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(service, settings: MonitorSettings | None = None) -> str:
    lines: list[str] = []
    families = {
        "assistant_answers_total": ("counter", "answers served in the lookback window"),
        "assistant_feedback_total": ("counter", "answers by latest rating"),
        "assistant_corrections_total": ("counter", "answers with a correction"),
        "assistant_latency_ms": ("gauge", "answer latency percentiles"),
        "assistant_ttft_ms": ("gauge", "time to first token percentiles"),
        "assistant_bad_answer_rate": ("gauge", "bad-answer rate of the active version"),
        "assistant_drift_ood_rate": ("gauge", "share of recent questions unlike the training data"),
        "assistant_drift_centroid_shift": ("gauge", "1 - cos(mean recent question, mean training question)"),
        "assistant_retrain_recommended": ("gauge", "1 when a retrain is recommended"),
        "assistant_domain_broken": ("gauge", "1 when the domain cannot serve (see GET /api/domains)"),
        "assistant_response_log_failures_total": ("counter", "answers that could not be logged"),
    }
    samples: dict[str, list[str]] = {k: [] for k in families}
    samples["assistant_response_log_failures_total"].append(
        f"assistant_response_log_failures_total {getattr(service, 'log_failures', 0)}")
    for d in service.registry.list_domains():
        dl = f'domain="{_label(d.name)}"'
        samples["assistant_domain_broken"].append(f"assistant_domain_broken{{{dl}}} {int(d.problem is not None)}")
        m = domain_metrics(service, d.name, settings)
        for v in m["versions"]:
            vl = f'{dl},version="{_label(v["adapter_version"])}"'
            samples["assistant_answers_total"].append(f"assistant_answers_total{{{vl}}} {v['answers']}")
            for rating in ("up", "down"):
                samples["assistant_feedback_total"].append(
                    f'assistant_feedback_total{{{vl},rating="{rating}"}} {v[rating]}')
            samples["assistant_corrections_total"].append(f"assistant_corrections_total{{{vl}}} {v['corrections']}")
            for key, fam in (("latency_ms", "assistant_latency_ms"), ("ttft_ms", "assistant_ttft_ms")):
                for p in PERCENTILES:
                    val = v[key][f"p{p}"]
                    if val is not None:
                        samples[fam].append(f'{fam}{{{vl},quantile="{p / 100:g}"}} {val}')
        if m["quality"]["bad_rate"] is not None:
            samples["assistant_bad_answer_rate"].append(f"assistant_bad_answer_rate{{{dl}}} {m['quality']['bad_rate']}")
        cur = m["drift"].get("current")
        if cur and cur["questions"]:
            samples["assistant_drift_ood_rate"].append(f"assistant_drift_ood_rate{{{dl}}} {cur['ood_rate']}")
            samples["assistant_drift_centroid_shift"].append(
                f"assistant_drift_centroid_shift{{{dl}}} {cur['centroid_shift']}")
        samples["assistant_retrain_recommended"].append(
            f"assistant_retrain_recommended{{{dl}}} {int(m['recommendation']['retrain'])}")
    for name, (kind, help_) in families.items():
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n"
