"""The Monitor tab: a headline that follows the numbers (retrain suggested and why, or how many more
ratings are needed), per-version quality and latency, and charts of answers, ratings and drift."""

from __future__ import annotations

import logging
from datetime import datetime

import gradio as gr

from assistant.errors import AssistantError
from assistant.ui.common import domain_names, err

log = logging.getLogger(__name__)

DAY_S = 86400                 # time buckets are labelled (evenly spaced, one per bucket), never a continuous axis
COUNT_FORMAT = ".1~f"         # axis ticks of counts: 0, 0.5, 1 (not 1.000000, not 0 1 1)
RATE_DIGITS = 2               # rates are shown as 0.25, never 0.250000
VERSION_HEADERS = ["version", "answers", "up rate", "down rate", "correction rate", "p50 s", "p90 s", "p99 s"]
CHART_VERSIONS = 3            # the answers chart shows the newest versions apart, the rest as "older"
NO_DOMAINS = "No domains yet: create one in the Adapters tab, or from the Chat tab's model picker (New domain…)."


def _label(t: float, bucket: float) -> str:
    """A time bucket's label: dates for day-sized buckets, else day and time to the minute."""
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d" if bucket >= DAY_S else "%m-%d %H:%M")


def _rate(v) -> float:
    return round(float(v or 0.0), RATE_DIGITS)


def seconds(ms) -> str:
    """A latency for people: seconds, one decimal (0.4 s, 18.7 s)."""
    return "–" if ms is None else f"{ms / 1000:.1f}"


def headline(m: dict) -> str:
    rec, q = m["recommendation"], m["quality"]
    if rec.get("training_job"):
        head = (f"### Retraining now\nJob `{rec['training_job']}` is training {m['domain']}: follow it in the Train "
                "tab. It was needed because:\n" + "\n".join(f"- {r}" for r in rec["reasons"]))
    elif rec["retrain"]:
        head = "### Retrain suggested\n" + "\n".join(f"- {r}" for r in rec["reasons"]) + \
            "\n\nReview the new questions and corrections in the Data tab, then press Retrain in the Train tab."
    elif rec.get("ratings_needed"):
        why = rec["reason"].removeprefix("not enough ratings yet: ")
        head = f"### Not enough ratings yet\n{why[:1].upper() + why[1:]}."
    else:
        head = "### No retrain needed\nRatings and questions are within the thresholds."
    lat = m["latency_ms"]
    bad = "–" if q["bad_rate"] is None else f"{q['bad_rate']:.0%}"
    head += (f"\n\n{m['answers']} answers served · latency p50/p90/p99 {seconds(lat['p50'])} / {seconds(lat['p90'])} / "
             f"{seconds(lat['p99'])} s"
             f" · bad-answer rate of {q['adapter_version']}: {bad} ({q['rated']} rated)")
    cur = m["drift"].get("current")
    if cur:
        head += (f" · drift of the last {cur['questions']} questions: {cur['ood_rate']:.0%} unlike the training data, "
                 f"centroid shift {cur['centroid_shift']:.2f}")
    elif m["drift"].get("note"):
        head += f" · drift: {m['drift']['note']}"
    return head


def monitor_view(workspace, domain):
    """-> headline, versions table, answers chart, rates chart, drift chart, raw metrics."""
    import pandas as pd
    empty = pd.DataFrame({"time": [], "value": [], "series": []})
    if not domain:
        text = NO_DOMAINS if not domain_names(workspace) else "Pick a domain."
        return text, [], empty, empty, empty, {"metrics": "none"}
    try:
        m = workspace.metrics(domain)
    except AssistantError as e:
        return err(e), [], empty, empty, empty, {"metrics": "none"}
    if not m["answers"]:
        return (f"### No answers yet\nChat with {domain} in the Chat tab and rate the answers: this tab then "
                "shows how often they are good, and when to retrain.", [], empty, empty, empty, m)
    versions = [[v["adapter_version"], v["answers"], _rate(v["up_rate"]), _rate(v["down_rate"]),
                 _rate(v["correction_rate"]), seconds(v["latency_ms"]["p50"]), seconds(v["latency_ms"]["p90"]),
                 seconds(v["latency_ms"]["p99"])] for v in m["versions"]]
    bucket = m["bucket_seconds"]
    # few series, so the legend fits: the newest versions apart (the rest as "older"); the rates of the
    # version that serves now only (per version they are in the table)
    newest = [v["adapter_version"] for v in m["versions"]][-CHART_VERSIONS:]
    answers = pd.DataFrame([{"time": _label(r["bucket_start"], bucket), "value": r["answers"],
                             "series": r["adapter_version"] if r["adapter_version"] in newest else "older"}
                            for r in m["timeline"]]) if m["timeline"] else empty
    if len(answers):
        answers = answers.groupby(["time", "series"], as_index=False, sort=False)["value"].sum()
    serving = m["quality"]["adapter_version"]
    rates = pd.DataFrame([{"time": _label(r["bucket_start"], bucket), "value": _rate(r[f"{k}_rate"]), "series": k}
                          for r in m["timeline"] if r["adapter_version"] == serving
                          for k in ("up", "down", "correction")])
    rates = rates if len(rates) else empty
    drift = pd.DataFrame([{"time": _label(r["bucket_start"], bucket), "value": _rate(r[k]), "series": k}
                          for r in m["drift"]["timeline"] for k in ("ood_rate", "centroid_shift")
                          if r[k] is not None]) if m["drift"]["timeline"] else empty
    return headline(m), versions, answers, rates, drift, m


def build(workspace, P):
    """The Monitor tab's widgets and its own events."""
    names = domain_names(workspace)
    with gr.Row():
        domain = gr.Dropdown(names, value=names[0] if names else None, label="Domain", elem_id="monitor-domain",
                             scale=3)
        refresh = gr.Button("Refresh", elem_id="monitor-refresh", scale=0)
    head = gr.Markdown(NO_DOMAINS if not names else "", elem_id="monitor-recommendation")
    table = gr.Dataframe(headers=VERSION_HEADERS, interactive=False, elem_id="monitor-versions")
    with gr.Row():
        answers = gr.BarPlot(x="time", y="value", color="series", title="Answers served", x_title="time",
                             y_title="answers", y_axis_format=COUNT_FORMAT, elem_id="monitor-answers", height=240)
        rates = gr.ScatterPlot(x="time", y="value", color="series", title="Ratings of the version serving now",
                               x_title="time", y_title="share of answers", elem_id="monitor-rates", height=240,
                               y_lim=[0, 1], y_axis_format=".0%")
    drift = gr.ScatterPlot(x="time", y="value", color="series", title="Drift from the training data",
                           x_title="time", y_title="share / shift", elem_id="monitor-drift", height=240,
                           y_axis_format=".2f")
    with gr.Accordion("Raw metrics (GET /api/domains/{name}/metrics)", open=False):
        raw = gr.JSON(elem_id="monitor-json")
    out = [head, table, answers, rates, drift, raw]
    domain.change(P(monitor_view, workspace), [domain], out)
    refresh.click(P(monitor_view, workspace), [domain], out)
    return dict(domain=domain, out=out)
