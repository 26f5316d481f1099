"""A training job record as the Train tab shows it: the stages curate → train → evaluate → publish →
activate with a bar each, the gate's verdict in words, a log without server paths.

Job records that carry `stages` (and `metrics.gate.checks`) are rendered as they are; older records,
with only `progress`, `log` and `metrics.gate.reasons`, get their stages derived from those."""

from __future__ import annotations

import html
import logging
import re

from assistant.data.stages import STAGE_STATUSES, STAGES, TERMINAL
from assistant.gate.verdict import MEANING_PASSED
from assistant.ui.common import public, served_by

log = logging.getLogger(__name__)

STATUS_COLORS = {"done": "#2a2", "running": "#36c", "failed": "#d33", "skipped": "#bbb", "pending": "#ddd"}
# Records written before jobs reported stages: training was the first 80% of `progress`, and the log
# named the staging folder on a line of its own.
LEGACY_TRAIN_SHARE = 0.8
LEGACY_STAGING_TAG = "staging "
RAW_EXCEPTION = re.compile(r"^[A-Z]\w*(Error|Exception|Interrupt)\b")


def derived_stages(job: dict) -> list[dict]:
    """Stages for a record written before jobs reported them, from its progress, log and outcome."""
    text, status = job.get("log") or "", job["status"]
    trained = "trained:" in text or float(job.get("progress") or 0) >= LEGACY_TRAIN_SHARE
    evaluated = "evaluated:" in text or bool((job.get("metrics") or {}).get("gate"))
    published = bool(job.get("adapter_version"))
    done = [True, trained, evaluated, published, bool(job.get("promoted"))]
    out, current_found = [], False
    for name, finished in zip(STAGES, done):
        st = {"name": name, "status": "done" if finished else "pending", "done": None, "total": None,
              "progress": 1.0 if finished else 0.0, "elapsed_s": None, "eta_s": None}
        if not finished and not current_found:
            current_found = True
            if status in ("queued", "running"):
                st["status"] = "running"
            elif status == "succeeded":
                st["status"] = "skipped"            # published, not activated: the gate blocked it
            else:
                st["status"] = "failed"
        elif not finished and status in TERMINAL:
            st["status"] = "skipped" if status == "succeeded" else "pending"
        if name == "train" and job.get("total_steps"):
            st["done"], st["total"] = job.get("step") or 0, job["total_steps"]
            st["progress"] = 1.0 if finished else (st["done"] / st["total"])
        out.append(st)
    return out


def stages_of(job: dict | None) -> list[dict]:
    if not job:
        return []
    stages = job.get("stages")
    if isinstance(stages, list) and stages and all(isinstance(s, dict) and "name" in s for s in stages):
        return stages
    return derived_stages(job)


def _seconds(s) -> str:
    if not isinstance(s, (int, float)):
        return ""
    s = int(round(s))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def stages_html(job: dict | None) -> str:
    if not job:
        return ('<div id="train-stages" data-stage="">No training run yet: press Retrain to run curate → train → '
                'evaluate → publish → activate.</div>')
    stages = stages_of(job)
    current = job.get("stage") or next((s["name"] for s in stages if s.get("status") == "running"), "")
    items = []
    for s in stages:
        st = s.get("status") if s.get("status") in STAGE_STATUSES else "pending"
        p = max(0.0, min(1.0, float(s.get("progress") or (1.0 if st == "done" else 0.0))))
        count = f" · {s['done']}/{s['total']}" if s.get("total") else ""
        detail = f" · {html.escape(str(s['detail']))}" if st == "running" and s.get("detail") else ""
        why = (f'<div class="stage-why" style="flex:1 1 100%;font-size:85%;color:#555">{html.escape(str(s["why"]))}'
               '</div>') if s.get("why") else ""
        timing = "".join(x for x in (f" · {_seconds(s.get('elapsed_s'))}" if s.get("elapsed_s") else "",
                                     f" · about {_seconds(s.get('eta_s'))} left" if st == "running" and s.get("eta_s")
                                     else ""))
        # the bar keeps a usable width on a phone: the text wraps under it instead of squeezing it
        items.append(
            f'<li data-name="{html.escape(str(s["name"]))}" data-status="{st}" data-progress="{p:.3f}" '
            f'style="margin:6px 0;list-style:none">'
            f'<div style="display:flex;flex-wrap:wrap;gap:2px 8px;align-items:center">'
            f'<span style="flex:0 0 72px">{html.escape(str(s["name"]))}</span>'
            f'<div class="stage-bar" style="flex:1 1 160px;min-width:160px;background:#eee;border-radius:5px;'
            f'height:12px;overflow:hidden"><div style="background:{STATUS_COLORS[st]};width:{p * 100:.1f}%;'
            f'height:100%"></div></div>'
            f'<span class="stage-text" style="flex:1 1 220px;font-size:90%">{st}{count}{detail}{timing}</span>'
            f'{why}</div></li>')
    return (f'<ol id="train-stages" data-stage="{html.escape(str(current))}" style="padding:0;margin:0">'
            + "".join(items) + "</ol>")


def state_text(job: dict | None, active_version: str | None, domain: str | None) -> str:
    """One line that follows the job from its start to its end, with the domain's active version now."""
    active = served_by(domain, active_version) if domain else ""
    now = f"Active now: **{active}**." if domain else ""
    if not job:
        return now
    jid, status = f"job `{job['job_id']}`", job["status"]
    if status == "queued":
        return f"{jid} is queued. {now}"
    if status == "running":
        stage = job.get("stage") or ""
        running = next((s for s in stages_of(job) if s.get("status") == "running"), {})
        sub = f" ({running['detail']})" if running.get("detail") else ""
        return f"{jid} is running: {stage}{sub}. Keep chatting meanwhile; the stages below follow it. {now}"
    if status == "succeeded":
        v = job.get("adapter_version")
        if job.get("promoted"):
            return f"{jid} finished: {job['domain']}@{v} passed the gate and is active. {now}"
        return f"{jid} finished: {job['domain']}@{v} is published but not active (the gate blocked it). {now}"
    if status == "cancelled":
        return f"{jid} was cancelled: nothing was published. {now}"
    return f"{jid} failed: {public_error(job.get('error') or '')} {now}"


def progress_html(job: dict | None) -> str:
    """The overall bar; its data attributes are what scripts and tests read."""
    if not job:
        return '<div id="train-progress-bar" data-status="none" data-progress="0"></div>'
    p = 1.0 if job["status"] == "succeeded" else max(0.0, min(1.0, float(job.get("progress") or 0)))
    loss = f" · loss {job['loss']:.3f}" if job.get("loss") is not None else ""
    text = f"{job['status']} · step {job.get('step') or 0}/{job.get('total_steps') or '?'}{loss} · {p:.0%} overall"
    return (f'<div id="train-progress-bar" data-status="{job["status"]}" data-progress="{p:.3f}" '
            f'data-version="{html.escape(job.get("adapter_version") or "")}">{html.escape(text)}</div>')


def public_log(job: dict | None) -> str:
    """The job's log for the page: no staging folders or other server paths, no raw exception text."""
    if not job:
        return ""
    lines = [public(line) for line in (job.get("log") or "").splitlines() if not line.startswith(LEGACY_STAGING_TAG)]
    if job.get("error"):
        lines.append("ERROR: " + public_error(job["error"]))
    return "\n".join(lines)


def public_error(error: str) -> str:
    if RAW_EXCEPTION.match(error or ""):
        log.info("job error hidden from the page: %s", error)
        return "the training process failed unexpectedly (details are in the server log): try again"
    return public(error)


def gate_markdown(job: dict | None) -> str:
    """The run's outcome and the gate's verdict in words (checks when the record has them)."""
    if not job or job["status"] not in TERMINAL:
        return ""
    if job["status"] != "succeeded":
        why = public_error(job.get("error") or "") if job["status"] == "failed" else "cancelled"
        return f"**{job['status']}**: {why}"
    v, domain = job.get("adapter_version"), job["domain"]
    gate = (job.get("metrics") or {}).get("gate") or {}
    if job.get("promoted"):
        out = [f"**Gate passed: {domain}@{v} is published and active.**"]
    else:
        out = [f"**Gate blocked {domain}@{v}**: it is published but not active. Activate anyway if you judge it "
               "better; the override is recorded in its card."]
    if gate.get("summary"):
        out.append(public(str(gate["summary"])))
    checks = gate.get("checks")
    if isinstance(checks, list) and checks:
        out += ["| check | result | value | bound | meaning |", "|---|---|---|---|---|"]
        for c in checks:
            if c.get("decides") is False:      # a figure shown beside the checks that decide
                result = "shown (within bound)" if c.get("passed") else "shown (outside bound; does not decide)"
            else:
                result = "passed" if c.get("passed") else "failed" + (f": {c['advice']}" if c.get("advice") else "")
            # what the outcome means: a passed check says what passing means (older records carry the
            # failure text on every check)
            meaning = c.get("meaning", "") if c.get("decides") is not None else (
                MEANING_PASSED.get(c.get("name"), "") if c.get("passed") else c.get("meaning", ""))
            out.append(f"| {c.get('name', '')} | {result} | {_fmt(c.get('value'))} | {_fmt(c.get('bound'))} | "
                       f"{meaning} |")
    else:
        out += [f"- {r}" for r in gate.get("reasons", [])]
    out += ["", retention_markdown(gate), "", attempts_markdown((job.get("metrics") or {}).get("attempts"))]
    return "\n".join(out[:1] + [""] + out[1:]).rstrip()


def _cell(text, n: int = 90) -> str:
    """A table cell: one line, at most `n` characters, no pipes, no server paths."""
    text = " ".join(public(str(text or "")).split()).replace("|", "/")
    return html.escape(text if len(text) <= n else text[:n - 1] + "…", quote=False)


def retention_markdown(gate: dict | None) -> str:
    """The retention check as a short table: general answers kept and lost, the lost ones with the live
    version's (or base's) answer beside the new one; then answers that leaked taught words."""
    ret = (gate or {}).get("retention")
    if not isinstance(ret, dict) or ret.get("n_reference_right") is None:
        return ""
    ref = "live version" if ret.get("reference") == "live" else "base"
    basis, kept = ret.get("n_reference_right") or 0, ret.get("n_kept") or 0
    out = [f"**General questions**: of {ret.get('n_probes')} asked, the {ref} knows {basis} (right with the system "
           f"prompt and without it); the new version kept **{kept}** and lost **{basis - kept}**."]
    lost = ret.get("lost") or []
    if lost:
        out += ["", f"| lost question | {ref} answered | new version answers |", "|---|---|---|"]
        out += [f"| {_cell(x.get('question'), 60)} | {_cell(x.get('reference'))} | {_cell(x.get('candidate'))} |"
                for x in lost]
        more = basis - kept - len(lost)
        if more > 0:
            out.append(f"\n…and {more} more.")
    leaked = ret.get("leaked") or []
    if leaked:
        out += ["", f"**Taught words in general answers**: {ret.get('n_leaked')} of {ret.get('n_probes')}.", "",
                "| question | new version answers | taught words |", "|---|---|---|"]
        out += [f"| {_cell(x.get('question'), 60)} | {_cell(x.get('answer'))} | {_cell(', '.join(x.get('words') or []))} |"
                for x in leaked]
    return "\n".join(out)


def attempts_markdown(attempts) -> str:
    """One line per training attempt of the job, when it tried more than once: why, and what the gate said."""
    if not isinstance(attempts, list) or len(attempts) < 2:
        return ""
    out = ["**Attempts**", "", "| attempt | why | recipe | general answers kept | verdict |", "|---|---|---|---|---|"]
    for a in attempts:
        r = a.get("recipe") or {}
        kept = (f"{a.get('n_kept')} of {a.get('n_reference_right')}" if a.get("n_reference_right") is not None else "")
        outcome = "passed" if a.get("promote") else "blocked: " + ", ".join(a.get("failed") or [])
        out.append(f"| {a.get('attempt')} | {_cell(a.get('why'), 200)} | learning rate {_fmt(r.get('learning_rate'))}, "
                   f"{r.get('epochs')} epochs, replay {r.get('replay')} | {kept} | {_cell(outcome)} |")
    return "\n".join(out)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))


def metrics_table(job: dict | None) -> list[list]:
    metrics = (job or {}).get("metrics") or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    return [[k, _fmt(before.get(k)), _fmt(after.get(k))] for k in dict.fromkeys([*before, *after])
            if not isinstance(before.get(k, after.get(k)), (dict, list))]


def stamp(job: dict | None):
    """What changes when the job moves: the Train tab re-renders only then."""
    if job is None:
        return None
    running = [[s.get("detail"), s.get("elapsed_s"), s.get("eta_s")] for s in stages_of(job)
               if s.get("status") == "running"]
    return [job["status"], job.get("step"), round(float(job.get("progress") or 0), 3), job.get("stage"),
            len(job.get("log") or ""), running]
