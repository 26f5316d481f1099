"""The Gradio UI: Chat, Adapters, Data, Train and Monitor tabs. The only module that imports gradio.

Handlers are module-level functions that translate widgets to `Service` calls and results back to
widgets; `build_ui` only lays out and wires them (`functools.partial` binds the service). Domain errors
become a visible message in the tab's status line. Elements a browser test drives carry `elem_id`s.
"""

import functools
import html
import inspect
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path

import gradio as gr

from .errors import AssistantError
from .settings import BASE, DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_CAP

STREAM_UPDATE_S = 0.05        # at most this often a streamed answer is pushed to the browser
JOB_POLL_S = 2.0              # the Train tab's polling period while a job runs
QUEUE_POLL_S = 0.01           # how often Gradio's idle event queue looks for work (its default on Linux: 0.001)
PROGRESS_POLL_S = 0.05        # and for progress updates (its default: 0.01)
QUEUE_TEXT_CHARS = 160        # prompt/answer preview length in the review queue
FEEDBACK_REASONS = ["wrong fact", "incomplete", "off topic", "outdated", "tone or style", "unsafe", "other"]
TERMINAL = ("succeeded", "failed", "cancelled")
# Events that rewrite the domain dropdowns run one at a time, in the order they were sent: a tab's refresh
# that started before "Create domain" can then never land after it and blank the new domain.
DOMAINS = {"concurrency_id": "domain-dropdowns", "concurrency_limit": 1}
QUEUE_HEADERS = ["#", "source", "rating", "status", "prompt", "answer", "duplicate", "key"]

_calls: dict[str, object] = {}   # session -> the chat call in flight (for Stop)


def _text(content) -> str:
    """A chatbot message's content (str, or Gradio 6's list of parts) -> plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def _plain(history) -> list[dict]:
    return [{"role": m["role"], "content": _text(m["content"])} for m in (history or [])
            if m.get("role") in ("user", "assistant")]


def _err(e: Exception) -> str:
    return f"Error: {getattr(e, 'message', None) or e}"


_credentials = None   # set by build_ui: the server's credentials, to name the signed-in user


def _user(request: gr.Request | None) -> str | None:
    """The signed-in user (the auth middleware has checked the request before it got here)."""
    from .auth import user_from_headers
    return user_from_headers(_credentials, getattr(request, "headers", None)) if request is not None else None


# Choices ---------------------------------------------------------------------------------------------
def model_choices(service) -> list[tuple[str, str]]:
    out = [("base (no adapter)", BASE)]
    for d in service.list_domains():
        active = d["active_version"]
        out.append((f"{d['name']} (active: {active or 'base weights'})", d["name"]))
        for v in reversed(d["versions"]):
            out.append((f"{d['name']}@{v}" + ("  (active)" if v == active else ""), f"{d['name']}@{v}"))
    return out


def domain_names(service) -> list[str]:
    return [d["name"] for d in service.list_domains()]


def _pick(value, choices):
    values = [c[1] if isinstance(c, tuple) else c for c in choices]
    return value if value in values else (values[0] if values else None)


def refresh_models(service, current):
    choices = model_choices(service)
    return gr.update(choices=choices, value=_pick(current, choices))


def refresh_domain(service, current):
    names = domain_names(service)
    return gr.update(choices=names, value=_pick(current, names))


# Chat ------------------------------------------------------------------------------------------------
def respond(service, message, history, meta, model, system, temperature, max_tokens, request: gr.Request):
    message = (message or "").strip()
    history, meta = _plain(history), dict(meta or {})
    if not message:
        yield message, history, meta, gr.update()
        return
    history.append({"role": "user", "content": message})
    msgs = ([{"role": "system", "content": system.strip()}] if (system or "").strip() else []) + _plain(history)
    try:
        call = service.start_chat(model or BASE, msgs, max_tokens=int(max_tokens), temperature=float(temperature),
                                  user=_user(request))
    except AssistantError as e:
        history.append({"role": "assistant", "content": _err(e)})
        yield "", history, meta, _err(e)
        return
    session = getattr(request, "session_hash", None) or "-"
    _calls[session] = call
    history.append({"role": "assistant", "content": ""})
    yield "", history, meta, f"answering with {call.target.model} ({call.target.version or 'base weights'})…"
    last = 0.0
    try:
        for ev in call.handle:
            if ev.kind == "token":
                history[-1]["content"] += ev.text
                if time.perf_counter() - last >= STREAM_UPDATE_S:
                    last = time.perf_counter()
                    yield "", history, meta, gr.update()
            elif ev.kind == "error":
                history[-1]["content"] += f"\n\n{_err(ev.error)}"
                break
    finally:
        call.handle.cancel()
        service.finish_chat(call)   # waits until the response-log thread has logged it
        _calls.pop(session, None)
    version = call.target.version or BASE
    meta[str(len(history) - 1)] = {"response_id": call.id, "model": call.target.model,
                                   "domain": call.target.domain or BASE, "version": version}
    reason = call.handle.req.finish_reason
    yield "", history, meta, (f"answered by {_served_by(call.target.domain or BASE, version)} · response `{call.id}`"
                              + (" · stopped" if reason == "cancelled" else ""))


def retry(service, history, meta, model, system, temperature, max_tokens, request: gr.Request):
    history, meta = _plain(history), dict(meta or {})
    while history and history[-1]["role"] == "assistant":
        meta.pop(str(len(history) - 1), None)
        history.pop()
    if not history:
        yield "", history, meta, "nothing to retry"
        return
    message = history.pop()["content"]
    yield from respond(service, message, history, meta, model, system, temperature, max_tokens, request)


def stop(request: gr.Request):
    call = _calls.get(getattr(request, "session_hash", None) or "-")
    if call is not None:
        call.handle.cancel()


def clear():
    return [], {}, None, "", "Press thumbs up or down on an answer to give feedback on it."


def _served_by(domain: str, version: str | None) -> str:
    return f"{domain}@{version}" if version and version != BASE else f"{domain} (base weights)"


def _target_text(t: dict) -> str:
    return f"answer #{t['index']} · {_served_by(t['domain'], t['version'])} · response `{t['response_id']}`"


def on_like(service, meta, evt: gr.LikeData, request: gr.Request):
    index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    info = (meta or {}).get(str(index))
    if not info:
        return None, "This message has no response id (it was not generated by this server).", gr.update()
    target = {**info, "index": index}
    if evt.liked not in (True, False):
        return target, f"Selected {_target_text(target)}", gr.update()
    rating = "up" if evt.liked else "down"
    try:
        fid = service.feedback(info["response_id"], rating, user=_user(request))
    except AssistantError as e:
        return target, _err(e), gr.update()
    icon = "Thumbs up" if rating == "up" else "Thumbs down"
    hint = "" if rating == "up" else " Say below what it should have said: the correction becomes training data."
    return target, f"{icon} recorded (feedback #{fid}) for {_target_text(target)}.{hint}", gr.update(value=rating)


def send_feedback(service, target, rating, reason, reason_text, correction, request: gr.Request):
    if not target:
        return "Error: press thumbs up or down on an answer first: the feedback is attached to that exact answer.", correction
    reasons = [r for r in (reason, (reason_text or "").strip()) if r]
    try:
        fid = service.feedback(target["response_id"], rating or "down", (correction or "").strip() or None,
                               "; ".join(reasons) or None, user=_user(request))
    except AssistantError as e:
        return _err(e), correction
    what = "correction" if (correction or "").strip() else "feedback"
    return (f"Saved {what} #{fid} for {_target_text(target)}. It joins the {target['domain']} "
            "dataset (Data tab) for the next training run."), ""


# Adapters --------------------------------------------------------------------------------------------
def adapters_view(service, domain, version=None):
    if not domain:
        return [], gr.update(choices=[], value=None), {}, ""
    try:
        items = service.adapters(domain)
        info = service.require_domain(domain)
    except AssistantError as e:
        return [], gr.update(choices=[], value=None), {}, _err(e)
    rows = []
    for a in items:
        card, m = a["card"], a["card"].get("metrics") or {}
        created = card.get("created_at")
        rows.append([a["version"], "active" if a["active"] else "",
                     datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M") if created else "",
                     str(card.get("dataset_snapshot") or card.get("snapshot") or "")[:12],
                     "imported" if card.get("imported") else "trained",
                     json.dumps({k: v for k, v in m.items() if not isinstance(v, (dict, list))})[:200]])
    versions = [a["version"] for a in items]
    version = _pick(version or info.active_version, versions)
    card = next((a["card"] for a in items if a["version"] == version), {})
    head = (f"**{domain}** · active: **{info.active_version or 'none (base weights)'}** · "
            f"{len(versions)} version(s) · system prompt: {info.system_prompt[:120] or '(none)'}")
    return rows, gr.update(choices=versions, value=version), card, head


def show_card(service, domain, version):
    if not domain or not version:
        return {}
    try:
        return service.registry.read_card(domain, version)
    except AssistantError as e:
        return {"error": e.message}


def activate(service, domain, version, model):
    if not domain or not version:
        return "Error: pick a domain and a version", refresh_models(service, model)
    try:
        service.activate(domain, version)
        msg = f"{domain}@{version} is now active: the next chat with '{domain}' uses it"
    except AssistantError as e:
        msg = _err(e)
    return msg, refresh_models(service, model)


def rollback(service, domain, model):
    if not domain:
        return "Error: pick a domain", refresh_models(service, model)
    d = service.require_domain(domain)
    older = [v for v in d.versions if d.active_version and int(v[1:]) < int(d.active_version[1:])]
    if not older:
        return f"Error: {domain} has no version older than {d.active_version or 'none'} to roll back to", \
            refresh_models(service, model)
    return activate(service, domain, older[-1], model)


def create_domain(service, name, system_prompt, description):
    try:
        d = service.create_domain((name or "").strip(), system_prompt or "", description or "")
        msg = f"created domain **{d['name']}**: chat with it in the Chat tab, train it in the Train tab"
        current = d["name"]
    except AssistantError as e:
        msg, current = _err(e), None
    names = domain_names(service)
    dd = gr.update(choices=names, value=_pick(current, names))
    return msg, dd, dd, dd, dd, refresh_models(service, None)


def import_adapter(service, domain, upload, make_active, model):
    if not domain:
        return "Error: pick a domain first", refresh_models(service, model)
    if not upload:
        return "Error: choose a .zip of a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)", \
            refresh_models(service, model)
    try:
        version = service.import_adapter(domain, Path(upload), activate=bool(make_active))
        msg = f"imported and validated as {domain}@{version}" + (" (active)" if make_active else "")
    except AssistantError as e:
        msg = _err(e)
    return msg, refresh_models(service, model)


# Data ------------------------------------------------------------------------------------------------
def _short(s: str) -> str:
    s = " ".join((s or "").split())
    return s if len(s) <= QUEUE_TEXT_CHARS else s[:QUEUE_TEXT_CHARS - 1] + "…"


def _last(messages, role) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == role), "")


@functools.cache
def _export_dir() -> Path:
    """One folder per process for snapshot downloads, outside the state dir (Gradio never serves that)."""
    return Path(tempfile.mkdtemp(prefix="assistant-export-"))


def data_view(service, domain):
    """-> queue rows, queue items (state), report rows, summary, snapshot file."""
    if not domain:
        return [], [], [], "create a domain first", None
    try:
        snap = service.preview(domain)
    except AssistantError as e:
        return [], [], [], _err(e), None
    items = sorted(snap.items, key=lambda it: -(it.get("created_at") or 0))
    number = {it["key"]: i + 1 for i, it in enumerate(items)}
    rows = []
    for i, it in enumerate(items):
        status = it.get("review_status") or ("kept" if not it.get("removed") else f"removed: {it['removed']}")
        if it.get("review_status") and it.get("removed") and it["removed"] != "rejected":
            status += f" (removed: {it['removed']})"
        dup = ""
        if it.get("near_duplicate_of"):
            dup = f"near-duplicate of #{number.get(it['near_duplicate_of'], '?')} ({it.get('similarity') or 0:.2f})"
        elif it.get("nearest") and it.get("nearest_similarity") is not None:
            dup = f"nearest #{number.get(it['nearest'], '?')} ({it['nearest_similarity']:.2f})"
        rating = it.get("rating") or ""
        rows.append([i + 1, it["source"], rating, status + (" · edited" if it.get("edited") else ""),
                     _short(_last(it["messages"], "user")), _short(_last(it["messages"], "assistant")), dup, it["key"]])
    r = snap.report
    report = [[name, n] for name, n in r["removed"].items()]
    summary = (f"snapshot `{r['snapshot']}`: {r['candidates']} candidates → **{r['kept']} kept** "
               f"({r['train']} train / {r['eval']} eval)")
    out = _export_dir() / f"{domain}-{snap.hash[:12]}.jsonl"
    if not out.exists():   # written outside the state dir: Gradio never serves the state dir
        out.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in snap.rows),
                       encoding="utf-8")
    slim = [{"key": it["key"], "messages": it["messages"]} for it in items]
    return rows, slim, report, summary, str(out)


def select_item(items, evt: gr.SelectData):
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    if not items or row is None or row >= len(items):
        return None, "", "", ""
    it = items[row]
    return it["key"], _last(it["messages"], "user"), _last(it["messages"], "assistant"), f"selected #{row + 1} ({it['key']})"


def review(service, domain, key, items, status, prompt=None, answer=None):
    if not key:
        return "Error: select a row of the review queue first"
    messages = None
    if status == "edit":
        it = next((i for i in items or [] if i["key"] == key), None)
        if it is None:
            return "Error: that row is gone: refresh the queue"
        messages = [dict(m) for m in it["messages"]]
        for role, text in (("user", prompt), ("assistant", answer)):
            idx = max(i for i, m in enumerate(messages) if m["role"] == role)
            messages[idx]["content"] = text or ""
        status = "approved"
    try:
        service.review(domain, key, status, messages)
    except AssistantError as e:
        return _err(e)
    return f"{key}: {status}" + (" with your edit" if messages else "") + " · refresh to see the report"


def import_seed(service, domain, upload, request: gr.Request):
    if not domain or not upload:
        return "Error: pick a domain and a JSONL file of {\"messages\": [...]} lines"
    examples, bad = [], []
    for n, line in enumerate(Path(upload).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                examples.append(json.loads(line))
            except ValueError as e:
                bad.append(f"line {n}: not JSON ({e})")
    try:
        res = service.add_examples(domain, examples, user=_user(request))
    except AssistantError as e:
        return _err(e)
    bad += [f"example {r['index'] + 1}: {r['reason']}" for r in res["rejected"]]
    return f"imported {res['added']} examples" + (f"; rejected {len(bad)}: " + "; ".join(bad[:5]) if bad else "")


# Train -----------------------------------------------------------------------------------------------
def _progress_html(job: dict | None) -> str:
    if not job:
        return '<div id="train-progress-bar" data-status="none" data-progress="0">no training job yet</div>'
    p = max(0.0, min(1.0, float(job.get("progress") or 0)))
    if job["status"] == "succeeded":
        p = 1.0
    color = {"failed": "#d33", "cancelled": "#999", "succeeded": "#2a2"}.get(job["status"], "#36c")
    loss = f" · loss {job['loss']:.3f}" if job.get("loss") is not None else ""
    stage = next((st for st in job.get("stages") or [] if st["name"] == job.get("stage")), None)
    where = (f" · {stage['name']} {stage['done']}/{stage['total'] or '?'}"
             + (f", about {stage['eta_s']:.0f} s left" if stage.get("eta_s") else "")) if stage else ""
    text = (f"{job['status']}{where} · step {job.get('step') or 0}/{job.get('total_steps') or '?'}{loss} · "
            f"{p:.0%}")
    return (f'<div id="train-progress-bar" data-status="{job["status"]}" data-progress="{p:.3f}" '
            f'data-version="{html.escape(job.get("adapter_version") or "")}">'
            f'<div style="background:#eee;border-radius:6px;height:18px;overflow:hidden">'
            f'<div style="background:{color};width:{p * 100:.1f}%;height:100%"></div></div>'
            f'<div style="margin-top:4px">{html.escape(text)}</div></div>')


def _job_outputs(service, job: dict | None, model):
    import pandas as pd
    losses = pd.DataFrame((job or {}).get("losses") or [], columns=["step", "loss"]).astype(
        {"step": "int64", "loss": "float64"})   # typed, or an empty first frame makes the axes nominal
    log = (job or {}).get("log") or ""
    if job and job.get("error"):
        log += f"\nERROR: {job['error']}"
    metrics = (job or {}).get("metrics") or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    def num(v):
        return round(v, 3) if isinstance(v, float) else v
    table = [[k, num(before.get(k)), num(after.get(k))] for k in dict.fromkeys([*before, *after])
             if not isinstance(before.get(k, after.get(k)), (dict, list))]
    summary = ""
    if job and job["status"] in TERMINAL:
        v = job.get("adapter_version")
        summary = (f"**{job['status']}**" + (f": published {job['domain']}@{v}" if v else "")
                   + (" and activated (passed the gate)" if job.get("promoted") else
                      (" (not activated: activate it below if you want it)" if v else "")))
        gate = metrics.get("gate") or {}
        summary += f"\n\n{gate['summary']}" if gate.get("summary") else ""
        summary += "".join(f"\n- {r}" for r in gate.get("reasons", []))
    running = bool(job) and job["status"] not in TERMINAL
    return (_progress_html(job), losses, log, table, summary, gr.Timer(active=running),
            refresh_models(service, model))


def train_view(service, domain, model):
    """Dataset size, latest job (also after a reload or a restart) and versions of a domain."""
    if not domain:
        return ("create a domain first", None, gr.update(choices=[], value=None),
                *_job_outputs(service, None, model))
    from .training import MIN_EXAMPLES
    try:
        report = service.preview(domain).report
        d = service.require_domain(domain)
        jobs = service.jobs(domain)
    except AssistantError as e:
        return (_err(e), None, gr.update(), *_job_outputs(service, None, model))
    size = (f"**{report['kept']}** curated examples ({report['train']} train / {report['eval']} eval) from "
            f"{report['candidates']} candidates · training needs at least {MIN_EXAMPLES} · active version: "
            f"**{d.active_version or 'none'}**")
    job = service.job(jobs[0]["job_id"]) if jobs else None
    versions = gr.update(choices=d.versions, value=d.active_version or (d.versions[-1] if d.versions else None))
    return (size, job["job_id"] if job else None, versions, *_job_outputs(service, job, model))


def retrain(service, domain, settings_text, model):
    try:
        overrides = json.loads(settings_text) if (settings_text or "").strip() else {}
        if not isinstance(overrides, dict):
            raise ValueError("training settings must be a JSON object, e.g. {\"epochs\": 3}")
        job_id = service.start_training(domain, overrides)
    except (AssistantError, ValueError) as e:
        return (_err(e), None, *_job_outputs(service, None, model))
    return (f"training job `{job_id}` started: keep chatting, the bar below follows it", job_id,
            *_job_outputs(service, service.job(job_id), model))


def poll_job(service, job_id, model, seen):
    """One timer tick: re-render only when the job moved (the browser redraws the plot otherwise)."""
    try:
        job = service.job(job_id) if job_id else None
    except AssistantError:
        job = None
    stamp = None if job is None else [job["status"], job.get("step"), round(float(job.get("progress") or 0), 3)]
    if stamp is not None and stamp == seen:
        return (*(gr.skip() for _ in range(7)), seen)
    return (*_job_outputs(service, job, model), stamp)


def cancel(service, job_id, model):
    if not job_id:
        return "Error: no job to cancel", *_job_outputs(service, None, model)
    try:
        job = service.cancel_job(job_id)
    except AssistantError as e:
        return _err(e), *_job_outputs(service, None, model)
    return f"job `{job_id}`: {job['status']}", *_job_outputs(service, job, model)


# Monitor ---------------------------------------------------------------------------------------------
def monitor_view(service, domain):
    import pandas as pd
    empty = pd.DataFrame({"time": [], "value": [], "series": []})
    if not domain:
        return "create a domain first", [], empty, empty, empty, {}
    try:
        m = service.metrics(domain)
    except AssistantError as e:
        return _err(e), [], empty, empty, empty, {}
    rec = m["recommendation"]
    head = ("### Retrain recommended\n" + "\n".join(f"- {r}" for r in rec["reasons"]) if rec["retrain"]
            else "### No retrain needed\nRatings and questions are within the thresholds.")
    cur = m["drift"].get("current")
    head += (f"\n\n{m['answers']} answers served · latency p50/p90/p99: {m['latency_ms']['p50']} / "
             f"{m['latency_ms']['p90']} / {m['latency_ms']['p99']} ms · bad-answer rate of "
             f"{m['quality']['adapter_version']}: {m['quality']['bad_rate'] if m['quality']['bad_rate'] is not None else '–'}"
             f" ({m['quality']['rated']} rated)")
    if cur:
        head += (f" · drift of the last {cur['questions']} questions: OOD rate {cur['ood_rate']:.0%}, "
                 f"centroid shift {cur['centroid_shift']:.2f}")
    versions = [[v["adapter_version"], v["answers"], v["up_rate"], v["down_rate"], v["correction_rate"],
                 v["latency_ms"]["p50"], v["latency_ms"]["p90"], v["latency_ms"]["p99"]] for v in m["versions"]]

    def when(t):
        return datetime.fromtimestamp(t)
    answers = pd.DataFrame([{"time": when(r["bucket_start"]), "value": r["answers"], "series": r["adapter_version"]}
                            for r in m["timeline"]]) if m["timeline"] else empty
    rates = pd.DataFrame([{"time": when(r["bucket_start"]), "value": r[f"{k}_rate"] or 0.0,
                           "series": f"{r['adapter_version']} {k}"}
                          for r in m["timeline"] for k in ("up", "down", "correction")]) if m["timeline"] else empty
    drift = pd.DataFrame([{"time": when(r["bucket_start"]), "value": r[k], "series": k}
                          for r in m["drift"]["timeline"] for k in ("ood_rate", "centroid_shift")
                          if r[k] is not None]) if m["drift"]["timeline"] else empty
    return head, versions, answers, rates, drift, m


# Layout ----------------------------------------------------------------------------------------------
def _bind(fn, *bound):
    """`fn` with its first arguments bound. Unlike functools.partial, the result keeps the remaining
    signature and type hints, which Gradio reads to pass gr.Request / gr.LikeData / gr.SelectData."""
    if inspect.isgeneratorfunction(fn):
        def wrapper(*args, **kwargs):
            yield from fn(*bound, *args, **kwargs)
    else:
        def wrapper(*args, **kwargs):
            return fn(*bound, *args, **kwargs)
    functools.update_wrapper(wrapper, fn)
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[len(bound):]
    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k in {p.name for p in params}}
    return wrapper


def build_ui(service, credentials=None) -> gr.Blocks:
    global _credentials
    _credentials = credentials
    P = _bind
    with gr.Blocks(title="domain-assistant") as demo:
        gr.Markdown("# domain-assistant\nOne base model, many domain assistants that get better from your feedback.")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_tab:
                meta = gr.State({})          # message index -> {response_id, model, domain, version}
                target = gr.State(None)      # the answer the feedback form is about
                with gr.Row():
                    model = gr.Dropdown(model_choices(service), value=BASE, label="Model or domain",
                                        elem_id="model-select", scale=3)
                    refresh_m = gr.Button("↻", elem_id="refresh-models", scale=0, min_width=40)
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420)
                msg = gr.Textbox(placeholder="Ask something…", show_label=False, elem_id="chat-input", lines=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send-btn")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                    retry_btn = gr.Button("Retry", elem_id="retry-btn")
                    clear_btn = gr.Button("Clear", elem_id="clear-btn")
                chat_status = gr.Markdown("", elem_id="chat-status")
                with gr.Accordion("Settings", open=False, elem_id="chat-settings"):
                    system = gr.Textbox(label="System prompt (overrides the domain's)", lines=2, elem_id="system-prompt")
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)",
                                            elem_id="temperature")
                    max_tokens = gr.Slider(1, MAX_NEW_TOKENS_CAP, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                           label="Max tokens", elem_id="max-tokens")
                with gr.Group(elem_id="feedback-panel"):
                    fb_target = gr.Markdown("Press thumbs up or down on an answer to give feedback on it.", elem_id="fb-target")
                    with gr.Row():
                        fb_rating = gr.Radio([("good", "up"), ("bad", "down")], value="down", label="Rating",
                                             elem_id="fb-rating")
                        fb_reason = gr.Dropdown(FEEDBACK_REASONS, value=None, label="Reason", elem_id="fb-reason")
                        fb_reason_text = gr.Textbox(label="Other reason", elem_id="fb-reason-text")
                    fb_correction = gr.Textbox(label="What should it have said?", lines=2, elem_id="fb-correction")
                    fb_send = gr.Button("Send feedback", elem_id="fb-submit")
                    fb_status = gr.Markdown("", elem_id="fb-status")

            with gr.Tab("Adapters", id="adapters", elem_id="tab-adapters") as adapters_tab:
                a_domain = gr.Dropdown(domain_names(service), label="Domain", elem_id="adapters-domain")
                a_head = gr.Markdown("", elem_id="adapters-head")
                a_table = gr.Dataframe(headers=["version", "active", "created", "snapshot", "origin", "metrics"],
                                       interactive=False, elem_id="adapters-table", wrap=True)
                with gr.Row():
                    a_version = gr.Dropdown([], label="Version", elem_id="adapters-version")
                    a_activate = gr.Button("Activate (promote / roll back)", variant="primary",
                                           elem_id="adapters-activate")
                a_card = gr.JSON(label="Card", elem_id="adapter-card")
                a_status = gr.Markdown("", elem_id="adapters-status")
                with gr.Accordion("Create a domain", open=False, elem_id="create-domain"):
                    c_name = gr.Textbox(label="Name (a-z, 0-9, - and _)", elem_id="new-domain-name")
                    c_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="new-domain-prompt")
                    c_desc = gr.Textbox(label="Description", elem_id="new-domain-description")
                    c_btn = gr.Button("Create domain", elem_id="create-domain-btn")
                with gr.Accordion("Import an adapter (.zip of a PEFT LoRA folder)", open=False, elem_id="import-adapter"):
                    i_file = gr.File(label="Adapter zip", file_types=[".zip"], type="filepath", elem_id="import-file")
                    i_active = gr.Checkbox(label="Activate after import", elem_id="import-activate")
                    i_btn = gr.Button("Validate and import", elem_id="import-btn")

            with gr.Tab("Data", id="data", elem_id="tab-data") as data_tab:
                items = gr.State([])
                selected = gr.State(None)
                with gr.Row():
                    d_domain = gr.Dropdown(domain_names(service), label="Domain", elem_id="data-domain", scale=3)
                    d_refresh = gr.Button("Refresh", elem_id="data-refresh", scale=0)
                d_summary = gr.Markdown("", elem_id="data-summary")
                d_queue = gr.Dataframe(headers=QUEUE_HEADERS, interactive=False, wrap=True, elem_id="review-queue",
                                       max_height=360)
                d_sel = gr.Markdown("click a row to review it", elem_id="review-selected")
                d_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="review-prompt")
                d_answer = gr.Textbox(label="Answer", lines=3, elem_id="review-answer")
                with gr.Row():
                    d_approve = gr.Button("Approve", elem_id="review-approve")
                    d_reject = gr.Button("Reject", variant="stop", elem_id="review-reject")
                    d_edit = gr.Button("Save edit", elem_id="review-edit")
                d_status = gr.Markdown("", elem_id="data-status")
                with gr.Row():
                    d_report = gr.Dataframe(headers=["filter", "removed"], interactive=False, elem_id="curation-report",
                                            label="Curation report")
                    with gr.Column():
                        d_download = gr.DownloadButton("Download snapshot (JSONL)", elem_id="download-snapshot")
                        s_file = gr.File(label="Seed examples (.jsonl)", file_types=[".jsonl", ".json"],
                                         type="filepath", elem_id="seed-file")
                        s_btn = gr.Button("Import seed examples", elem_id="import-seed-btn")

            with gr.Tab("Train", id="train", elem_id="tab-train") as train_tab:
                job_id = gr.State(None)
                job_seen = gr.State(None)    # what the last timer tick rendered
                timer = gr.Timer(JOB_POLL_S, active=False)
                t_domain = gr.Dropdown(domain_names(service), label="Domain", elem_id="train-domain")
                t_size = gr.Markdown("", elem_id="train-dataset")
                with gr.Accordion("Training settings (JSON, optional)", open=False):
                    t_settings = gr.Textbox("{}", label="Overrides of the recipe's defaults, e.g. {\"epochs\": 3}",
                                            elem_id="train-settings")
                with gr.Row():
                    t_go = gr.Button("Retrain", variant="primary", elem_id="retrain-btn")
                    t_cancel = gr.Button("Cancel job", variant="stop", elem_id="cancel-job-btn")
                t_status = gr.Markdown("", elem_id="train-status")
                t_progress = gr.HTML(_progress_html(None), elem_id="train-progress")
                t_summary = gr.Markdown("", elem_id="train-summary")
                with gr.Row():
                    t_loss = gr.LinePlot(x="step", y="loss", title="Training loss", elem_id="loss-plot", height=260)
                    t_metrics = gr.Dataframe(headers=["metric", "before", "after"], label="Before / after",
                                             interactive=False, elem_id="job-metrics")
                t_log = gr.Textbox(label="Job log", lines=8, max_lines=16, elem_id="job-log", interactive=False)
                with gr.Row():
                    t_version = gr.Dropdown([], label="Version", elem_id="train-version")
                    t_activate = gr.Button("Activate", elem_id="train-activate-btn")
                    t_rollback = gr.Button("Roll back to previous", elem_id="rollback-btn")
                t_vstatus = gr.Markdown("", elem_id="train-version-status")

            with gr.Tab("Monitor", id="monitor", elem_id="tab-monitor") as monitor_tab:
                with gr.Row():
                    m_domain = gr.Dropdown(domain_names(service), label="Domain", elem_id="monitor-domain", scale=3)
                    m_refresh = gr.Button("Refresh", elem_id="monitor-refresh", scale=0)
                m_head = gr.Markdown("", elem_id="monitor-recommendation")
                m_versions = gr.Dataframe(headers=["version", "answers", "up rate", "down rate", "correction rate",
                                                   "p50 ms", "p90 ms", "p99 ms"], interactive=False,
                                          elem_id="monitor-versions")
                with gr.Row():
                    m_answers = gr.LinePlot(x="time", y="value", color="series", title="Answers served",
                                            elem_id="monitor-answers", height=240)
                    m_rates = gr.LinePlot(x="time", y="value", color="series", title="Up / down / correction rate",
                                          elem_id="monitor-rates", height=240, y_lim=[0, 1])
                m_drift = gr.LinePlot(x="time", y="value", color="series", title="Drift from the training data",
                                      elem_id="monitor-drift", height=240)
                with gr.Accordion("Raw metrics (GET /api/domains/{name}/metrics)", open=False):
                    m_json = gr.JSON(elem_id="monitor-json")

        # Wiring: Chat ---------------------------------------------------------------------------------
        chat_in = [msg, chatbot, meta, model, system, temperature, max_tokens]
        chat_out = [msg, chatbot, meta, chat_status]
        limit = service.settings.max_batch
        send.click(P(respond, service), chat_in, chat_out, concurrency_limit=limit)
        msg.submit(P(respond, service), chat_in, chat_out, concurrency_limit=limit)
        retry_in = [chatbot, meta, model, system, temperature, max_tokens]
        retry_btn.click(P(retry, service), retry_in, chat_out, concurrency_limit=limit)
        chatbot.retry(P(retry, service), retry_in, chat_out, concurrency_limit=limit)
        stop_btn.click(stop, None, None, concurrency_limit=None)
        clear_btn.click(clear, None, [chatbot, meta, target, chat_status, fb_target])
        chatbot.clear(clear, None, [chatbot, meta, target, chat_status, fb_target])
        chatbot.like(P(on_like, service), [meta], [target, fb_target, fb_rating], concurrency_limit=None)
        fb_send.click(P(send_feedback, service), [target, fb_rating, fb_reason, fb_reason_text, fb_correction],
                      [fb_status, fb_correction], concurrency_limit=None)
        refresh_m.click(P(refresh_models, service), [model], [model])
        chat_tab.select(P(refresh_models, service), [model], [model])

        # Adapters
        a_out = [a_table, a_version, a_card, a_head]
        adapters_tab.select(P(refresh_domain, service), [a_domain], [a_domain], **DOMAINS).then(
            P(adapters_view, service), [a_domain], a_out)
        a_domain.change(P(adapters_view, service), [a_domain], a_out)
        a_version.input(P(show_card, service), [a_domain, a_version], [a_card])
        a_activate.click(P(activate, service), [a_domain, a_version, model], [a_status, model]).then(
            P(adapters_view, service), [a_domain, a_version], a_out)
        c_btn.click(P(create_domain, service), [c_name, c_prompt, c_desc],
                    [a_status, a_domain, d_domain, t_domain, m_domain, model], **DOMAINS)
        i_btn.click(P(import_adapter, service), [a_domain, i_file, i_active, model], [a_status, model]).then(
            P(adapters_view, service), [a_domain], a_out)

        # Data
        d_out = [d_queue, items, d_report, d_summary, d_download]
        data_tab.select(P(refresh_domain, service), [d_domain], [d_domain], **DOMAINS).then(
            P(data_view, service), [d_domain], d_out)
        d_domain.change(P(data_view, service), [d_domain], d_out)
        d_refresh.click(P(data_view, service), [d_domain], d_out)
        d_queue.select(select_item, [items], [selected, d_prompt, d_answer, d_sel])
        for btn, status in ((d_approve, "approved"), (d_reject, "rejected"), (d_edit, "edit")):
            btn.click(P(_review_button, service, status),
                      [d_domain, selected, items, d_prompt, d_answer], [d_status]).then(
                P(data_view, service), [d_domain], d_out)
        s_btn.click(P(import_seed, service), [d_domain, s_file], [d_status]).then(
            P(data_view, service), [d_domain], d_out)

        # Train
        job_out = [t_progress, t_loss, t_log, t_metrics, t_summary, timer, model]
        train_tab.select(P(refresh_domain, service), [t_domain], [t_domain], **DOMAINS).then(
            P(train_view, service), [t_domain, model], [t_size, job_id, t_version, *job_out])
        t_domain.change(P(train_view, service), [t_domain, model], [t_size, job_id, t_version, *job_out])
        t_go.click(P(retrain, service), [t_domain, t_settings, model], [t_status, job_id, *job_out])
        t_cancel.click(P(cancel, service), [job_id, model], [t_status, *job_out])
        timer.tick(P(poll_job, service), [job_id, model, job_seen], [*job_out, job_seen], concurrency_limit=None)
        t_summary.change(P(_versions, service), [t_domain, t_version], [t_version])
        t_activate.click(P(activate, service), [t_domain, t_version, model], [t_vstatus, model]).then(
            P(_versions, service), [t_domain, t_version], [t_version])
        t_rollback.click(P(rollback, service), [t_domain, model], [t_vstatus, model]).then(
            P(_versions, service), [t_domain], [t_version])

        # Monitor
        m_out = [m_head, m_versions, m_answers, m_rates, m_drift, m_json]
        monitor_tab.select(P(refresh_domain, service), [m_domain], [m_domain], **DOMAINS).then(
            P(monitor_view, service), [m_domain], m_out)
        m_domain.change(P(monitor_view, service), [m_domain], m_out)
        m_refresh.click(P(monitor_view, service), [m_domain], m_out)
    _calm_queue(demo)
    return demo


def _review_button(service, status, domain, key, items, prompt, answer):
    return review(service, domain, key, items, status, prompt, answer)


def _versions(service, domain, current=None):
    if not domain:
        return gr.update(choices=[], value=None)
    try:
        d = service.require_domain(domain)
    except AssistantError:
        return gr.update(choices=[], value=None)
    return gr.update(choices=d.versions, value=d.active_version or _pick(current, d.versions))


def _calm_queue(demo: gr.Blocks) -> None:
    """Gradio's event queue polls the event loop while idle, 1000 times a second. On a small CPU machine every
    wake-up takes a core from the decode threads for a moment, and it cost a tenth of the streamed API's
    speed. A UI event now waits at most 10 ms to start, and progress bars update 20 times a second."""
    q = getattr(demo, "_queue", None)
    if q is not None and hasattr(q, "sleep_when_free"):
        q.sleep_when_free = max(q.sleep_when_free, QUEUE_POLL_S)
        q.progress_update_sleep_when_free = max(getattr(q, "progress_update_sleep_when_free", 0), PROGRESS_POLL_S)
