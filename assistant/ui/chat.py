"""The Chat tab: pick a model (or create a domain), chat with streaming, and give feedback on one answer
in one gesture: thumbs up/down on the message opens a panel for that answer (reason, free text, what it
should have said); sending it updates the same feedback record."""

from __future__ import annotations

import logging
import threading
import time

import gradio as gr

from assistant.errors import AssistantError
from assistant.settings import BASE, DEFAULT_MAX_NEW_TOKENS, MAX_MESSAGE_CHARS, MAX_NEW_TOKENS_CAP, MAX_UI_PROMPT_TOKENS
from assistant.ui.common import NEW_DOMAIN, err, field_error, model_choices, principal_of, public, role_of, served_by, user_of

log = logging.getLogger(__name__)

STREAM_UPDATE_S = 0.05        # at most this often a streamed answer is pushed to the browser
DEFAULT_TEMPERATURE = 0.7     # the UI samples a little; the API's default is greedy
FEEDBACK_REASONS = ["wrong fact", "incomplete", "off topic", "outdated", "tone or style", "unsafe", "other"]
GOOD_REASONS = ["correct", "clear", "complete", "helpful", "good tone", "other"]   # what a thumbs-up may say
BUTTON_MIN_PX = 64            # the chat's four buttons stay on one row on a phone
FEEDBACK_HINT = "Press thumbs up or down on an answer to give feedback on it (press it again to undo)."
# After a thumb: the panel for that answer is brought into view (on a short screen it opens below the fold).
SCROLL_TO_PANEL = """() => { const p = document.getElementById('feedback-panel');
  if (p && p.offsetParent !== null) p.scrollIntoView({behavior: 'smooth', block: 'center'}); }"""

_calls: dict[str, object] = {}   # session -> the chat call in flight (for Stop)
# A page answers one question at a time, in the order they were sent: a question sent while an answer is
# being written waits here (and is shown as queued), and the event writing that answer takes it next.
_queues: dict[str, list[str]] = {}   # session -> questions queued behind the answer being written
_queue_lock = threading.Lock()
_slots: list = []                    # [Semaphore(max_batch)]: answers written at once, over all pages


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


def prompt_limit(serving) -> int:
    """The most tokens a conversation sent from the chat box may hold; the answer needs room too."""
    return min(MAX_UI_PROMPT_TOKENS, serving.context_tokens - 1)


def _conversation(system, history, message) -> list[dict]:
    system = (system or "").strip()
    return ([{"role": "system", "content": system}] if system else []) + _plain(history) + \
        ([{"role": "user", "content": message}] if message else [])


def demo_note(serving) -> str:
    if serving.workspace.settings.base_model != "embedded":
        return f"Base model: `{public(serving.base.name)}`."
    return ("This server runs the embedded SmolLM2-135M demo model on CPU: judge the feedback → retrain loop, not "
            "its knowledge. For a real base: `assistant serve --base-model PATH`.")


# Tokens --------------------------------------------------------------------------------------------
def token_count(serving, message, history, model, system) -> str:
    """The conversation's size against what the chat box accepts, shown under the input."""
    message = (message or "").strip()
    if not message:
        return ""
    if len(message) > MAX_MESSAGE_CHARS:
        return f"**{len(message):,} characters: over the {MAX_MESSAGE_CHARS:,}-character limit of one message**"
    try:
        n = serving.count_tokens(model if model and model != NEW_DOMAIN else BASE,
                                 _conversation(system, history, message))
    except AssistantError:
        return ""
    limit = prompt_limit(serving)
    text = f"{n:,} / {limit:,} tokens"
    return f"**{text}: too long, shorten the message or press Clear**" if n > limit else text


def _check_input(serving, message, msgs, model, temperature, max_tokens) -> tuple[float, int]:
    if not model or model == NEW_DOMAIN:
        raise field_error("Model or domain", "pick a model, or 'base (no adapter)'")
    try:
        temperature = float(temperature)
        max_tokens = int(max_tokens)
    except (TypeError, ValueError):
        raise field_error("Settings", "temperature and max tokens must be numbers") from None
    if not 0 <= temperature <= 2:
        raise field_error("Temperature", "must be between 0 and 2")
    if not 1 <= max_tokens <= MAX_NEW_TOKENS_CAP:
        raise field_error("Max tokens", f"must be between 1 and {MAX_NEW_TOKENS_CAP}")
    if len(message) > MAX_MESSAGE_CHARS:
        raise field_error("Message", f"{len(message):,} characters; one message holds at most "
                                     f"{MAX_MESSAGE_CHARS:,}: shorten it")
    n, limit = serving.count_tokens(model, msgs), prompt_limit(serving)
    if n > limit:
        raise field_error("Message", f"the conversation would be {n:,} tokens; this chat accepts at most "
                                     f"{limit:,}: shorten the message or press Clear to start over")
    return temperature, max_tokens


# Chat ----------------------------------------------------------------------------------------------
def _session(request) -> str:
    return getattr(request, "session_hash", None) or "-"


def queued_text(questions: list[str]) -> str:
    shown = "; ".join(f"“{q if len(q) <= 80 else q[:79] + '…'}”" for q in questions)
    return (f"Queued ({len(questions)}): {shown}. It is sent as soon as the current answer is finished "
            "(Stop puts it back in the box).")


def respond(serving, message, history, meta, model, system, temperature, max_tokens, request: gr.Request):
    """-> (input box, chatbot, meta, status, feedback status), streamed. While this page's previous
    question is still being answered the new one is queued (and shown); that answer's event then answers
    it, on the conversation as it stands, so nothing typed is lost and the order is kept."""
    message = (message or "").strip()
    if not message:
        yield message, gr.skip(), gr.skip(), gr.update(), gr.update()
        return
    session = _session(request)
    with _queue_lock:
        queue = _queues.get(session)
        if queue is not None:
            queue.append(message)
            shown = list(queue)
        else:
            _queues[session] = []
    if queue is not None:
        yield "", gr.skip(), gr.skip(), queued_text(shown), gr.update()
        return
    history, meta = _plain(history), dict(meta or {})
    # the box is cleared once, now; later updates leave it alone, so the next question can be typed while
    # this answer streams
    yield "", gr.skip(), gr.skip(), gr.update(), gr.update()
    released = False
    try:
        while True:
            ok = yield from _answer(serving, message, history, meta, model, system, temperature, max_tokens,
                                    request, session)
            with _queue_lock:
                queue = _queues.get(session) or []
                if not ok or not queue:
                    back = "\n".join(queue) if not ok else None
                    _queues.pop(session, None)
                    released = True
                    break
                message = queue.pop(0)
        if back:          # the answer failed: the questions still queued go back in the box, not lost
            yield back, history, meta, gr.update(), gr.update()
    finally:
        if not released:
            with _queue_lock:
                _queues.pop(session, None)


def _answer(serving, message, history, meta, model, system, temperature, max_tokens, request, session):
    """Answer one question, appending it and the answer to `history` (and the answer's ids to `meta`);
    yields the outputs of `respond`. -> whether it was answered."""
    msgs = _conversation(system, history, message)
    try:
        temperature, max_tokens = _check_input(serving, message, msgs, model, temperature, max_tokens)
        serving.workspace.quotas.check(principal_of(request))    # a user's quotas count the UI's chat too
    except AssistantError as e:
        yield message, history, meta, err(e), ""      # refused before generation: the text stays in the box
        return False
    if not _slots:
        _slots.append(threading.BoundedSemaphore(max(1, serving.workspace.settings.max_batch)))
    history.append({"role": "user", "content": message})
    waiting = not _slots[0].acquire(blocking=False)
    if waiting:
        yield gr.skip(), history, meta, "waiting for a free answer slot (other people are chatting)…", ""
        _slots[0].acquire()
    try:
        return (yield from _stream(serving, message, history, meta, model, msgs, temperature, max_tokens, request,
                                   session))
    except AssistantError as e:
        history.pop()
        yield message, history, meta, err(e), ""
        return False
    finally:
        _slots[0].release()


def _stream(serving, message, history, meta, model, msgs, temperature, max_tokens, request, session):
    call = serving.start_chat(model, msgs, max_tokens=max_tokens, temperature=temperature, user=user_of(request))
    _calls[session] = call
    with _queue_lock:
        more = len(_queues.get(session) or [])
    then = f" · {more} more queued" if more else ""
    yield gr.skip(), history, meta, f"answering with {served_by(call.target.domain or BASE, call.target.version)}…{then}", ""
    last, started = 0.0, False
    try:
        for ev in call.handle:
            if ev.kind == "token":
                if not started:   # the answer's bubble (and its feedback buttons) appear with its first token
                    history.append({"role": "assistant", "content": ""})
                    started = True
                history[-1]["content"] += ev.text
                if time.perf_counter() - last >= STREAM_UPDATE_S:
                    last = time.perf_counter()
                    yield gr.skip(), history, meta, gr.update(), gr.update()
            elif ev.kind == "error":
                yield gr.skip(), history, meta, err(ev.error), gr.update()
                return False
    finally:
        call.handle.cancel()
        serving.finish_chat(call)   # waits for the response-log thread: feedback needs the row
        _calls.pop(session, None)
    if not started:
        history.append({"role": "assistant", "content": "(no answer)"})
    version = call.target.version or BASE
    meta[str(len(history) - 1)] = {"response_id": call.id, "model": call.target.model,
                                   "domain": call.target.domain or BASE, "version": version}
    stopped = " · stopped" if call.handle.req.finish_reason == "cancelled" else ""
    yield gr.skip(), history, meta, f"answered by {served_by(call.target.domain or BASE, version)}{stopped}", gr.update()
    return True


def retry(serving, history, meta, model, system, temperature, max_tokens, request: gr.Request):
    history, meta = _plain(history), dict(meta or {})
    while history and history[-1]["role"] == "assistant":
        meta.pop(str(len(history) - 1), None)
        history.pop()
    if not history:
        yield "", history, meta, "nothing to retry", ""
        return
    message = history.pop()["content"]
    yield from respond(serving, message, history, meta, model, system, temperature, max_tokens, request)


def stop(request: gr.Request):
    """Stop the answer being written; questions queued behind it go back into the input box. -> input box."""
    session = _session(request)
    with _queue_lock:
        queue = _queues.get(session) or []
        back = "\n".join(queue)
        queue.clear()
    call = _calls.get(session)
    if call is not None:
        call.handle.cancel()
    return back if back else gr.skip()


def clear():
    """-> chatbot, meta, feedback target, status, panel, feedback status."""
    return [], {}, None, "", gr.update(visible=False), ""


# Feedback ------------------------------------------------------------------------------------------
def answer_number(history, index: int) -> int:
    """The answer's number as the user sees it: 1 for the first answer, 2 for the second..."""
    return sum(1 for m in (history or [])[:index + 1] if m.get("role") == "assistant")


def _target_text(t: dict) -> str:
    return f"answer #{t['number']} ({served_by(t['domain'], t['version'])})"


def _where_it_goes(t: dict) -> str:
    if t["domain"] == BASE:
        return ("It is kept for review with the base model's answers; to train on corrections like it, create a "
                "domain (model picker → New domain…) and chat with that domain.")
    return f"It joins the {t['domain']} dataset (Data tab) for the next training run."


def _panel_fields(rating: str | None):
    """The panel's reason and correction fields for a rating: a thumbs-up asks what was good (optional),
    a thumbs-down what was wrong and what it should have said. -> reason, other reason, correction."""
    if rating == "up":
        return (gr.update(choices=GOOD_REASONS, value=None, label="What was good? (optional)"),
                gr.update(value="", label="In your words (optional)"), gr.update(value="", visible=False))
    return (gr.update(choices=FEEDBACK_REASONS, value=None, label="What was wrong?"),
            gr.update(value="", label="In your words (optional)"),
            gr.update(value="", visible=True, label="What should it have said? (the correction)"))


def on_like(serving, meta, history, evt: gr.LikeData, request: gr.Request):
    """Thumbs on an answer: record the rating at once, and open the panel for that answer; the same thumb
    pressed again undoes the rating (and removes its dataset row).
    -> target, panel, panel heading, reason, other reason, correction, feedback status."""
    index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    info = (meta or {}).get(str(index))
    closed = (None, gr.update(visible=False), "", None, "", "")
    if not info:
        return *closed, "This answer is still being written: give feedback once it is finished."
    number = answer_number(_plain(history), index)
    if evt.liked not in (True, False):      # the thumb was pressed again: the rating is undone
        try:
            undone = serving.withdraw_feedback(info["response_id"], user=user_of(request))
        except AssistantError as e:
            return *closed, err(e)
        what = {**info, "number": number}
        return *closed, (f"Rating of {_target_text(what)} undone: it counts nowhere and is out of the dataset."
                         if undone else f"{_target_text(what)} has no rating of yours to undo.")
    rating = "up" if evt.liked else "down"
    target = {**info, "index": index, "number": number, "rating": rating}
    try:
        fid = serving.feedback(info["response_id"], rating, user=user_of(request), role=role_of(request))
    except AssistantError as e:
        return *closed, err(e)
    target["feedback_id"] = fid
    ask = ("What was good about it? (optional: the thumbs-up already counts)" if rating == "up" else
           "What was wrong, and what should it have said? The correction becomes training data.")
    head = f"**Thumbs {rating} recorded** for {_target_text(target)}. {ask}"
    return target, gr.update(visible=True), head, *_panel_fields(rating), ""


def send_feedback(serving, target, reason, reason_text, correction, request: gr.Request):
    """Add the reason and correction to the answer's feedback record (the same record, updated; what it
    said before is kept as its history). -> target, panel, panel heading, reason, other reason,
    correction, feedback status."""
    if not target:
        return (None, gr.update(visible=False), "", None, "", "",
                "Press thumbs up or down on an answer first: feedback is attached to that exact answer.")
    reasons_allowed = GOOD_REASONS if target["rating"] == "up" else FEEDBACK_REASONS
    if reason is not None and reason not in reasons_allowed:
        return (target, gr.update(), "Error: Reason: pick one of " + ", ".join(reasons_allowed),
                gr.update(), gr.update(), gr.update(), "")
    reasons = "; ".join(r for r in (reason, (reason_text or "").strip()) if r) or None
    correction = (correction or "").strip() or None if target["rating"] == "down" else None
    try:
        fid = serving.feedback(target["response_id"], target["rating"], correction, reasons, user=user_of(request),
                               role=role_of(request))
    except AssistantError as e:
        return target, gr.update(), err(e), gr.update(), gr.update(), gr.update(), ""
    what = "correction" if correction else "feedback"
    done = f"Saved {what} #{fid} for {_target_text(target)}."
    if correction or target["rating"] == "up":
        done += " " + _where_it_goes(target)
    return None, gr.update(visible=False), "", None, "", "", done


def on_model(value):
    """The picker's "New domain…" entry opens the form; the picker goes back to the base model."""
    if value == NEW_DOMAIN:
        return gr.update(value=BASE), gr.update(visible=True), ""
    return gr.update(), gr.update(visible=False), ""


def hide_form():
    return gr.update(visible=False)


def close_panel():
    return None, gr.update(visible=False), "", None, "", ""


# Layout --------------------------------------------------------------------------------------------
def build(serving, P):
    """The Chat tab's widgets and its own events; returns the widgets other tabs wire to."""
    meta = gr.State({})          # message index -> {response_id, model, domain, version}
    target = gr.State(None)      # the answer the feedback panel is about
    gr.Markdown(demo_note(serving), elem_id="demo-note")
    model = gr.Dropdown(model_choices(serving.workspace), value=BASE, label="Model or domain", elem_id="model-select",
                        allow_custom_value=True)   # API callers may name a domain created after the page loaded
    with gr.Column(visible=False, variant="panel", elem_id="chat-new-domain") as new_form:
        gr.Markdown("**New domain**: a name, and the system prompt its answers start from.")
        n_name = gr.Textbox(label="Name (a-z, 0-9, - and _)", elem_id="chat-domain-name")
        n_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="chat-domain-prompt")
        n_desc = gr.Textbox(label="Description (optional)", elem_id="chat-domain-description")
        with gr.Row():
            n_create = gr.Button("Create domain", variant="primary", elem_id="chat-create-domain")
            n_cancel = gr.Button("Cancel", elem_id="chat-cancel-domain")
        n_status = gr.Markdown("", elem_id="chat-domain-status")
    chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420,
                         placeholder="Ask a question below. Then rate the answer with the thumbs under it.")
    msg = gr.Textbox(placeholder="Ask something…", show_label=False, elem_id="chat-input", lines=1)
    tokens = gr.Markdown("", elem_id="chat-tokens")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="send-btn", min_width=BUTTON_MIN_PX)
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", min_width=BUTTON_MIN_PX)
        retry_btn = gr.Button("Retry", elem_id="retry-btn", min_width=BUTTON_MIN_PX)
        clear_btn = gr.Button("Clear", elem_id="clear-btn", min_width=BUTTON_MIN_PX)
    status = gr.Markdown("", elem_id="chat-status")
    with gr.Column(visible=False, variant="panel", elem_id="feedback-panel") as panel:
        fb_head = gr.Markdown("", elem_id="fb-target")
        with gr.Row():
            fb_reason = gr.Dropdown(FEEDBACK_REASONS, value=None, label="Reason", elem_id="fb-reason")
            fb_reason_text = gr.Textbox(label="In your words (optional)", elem_id="fb-reason-text")
        fb_correction = gr.Textbox(label="What should it have said?", lines=2, elem_id="fb-correction")
        with gr.Row():
            fb_send = gr.Button("Send feedback", variant="primary", elem_id="fb-submit")
            fb_close = gr.Button("Close", elem_id="fb-close")
    fb_status = gr.Markdown(FEEDBACK_HINT, elem_id="fb-status")
    with gr.Accordion("Settings", open=False, elem_id="chat-settings"):
        system = gr.Textbox(label="System prompt (overrides the domain's)", lines=2, elem_id="system-prompt")
        temperature = gr.Slider(0, 2, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature (0 = greedy)",
                                elem_id="temperature")
        max_tokens = gr.Slider(1, MAX_NEW_TOKENS_CAP, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max tokens",
                               elem_id="max-tokens")

    chat_in = [msg, chatbot, meta, model, system, temperature, max_tokens]
    chat_out = [msg, chatbot, meta, status, fb_status]
    # Every press is an event (a second question while one is answered is queued, not ignored); answers
    # written at once are bounded by the engine's batch inside `respond`, not by Gradio's queue, whose
    # waiting events would carry a conversation that is out of date by the time they run.
    chat_events = dict(concurrency_limit=None, trigger_mode="multiple")
    send.click(P(respond, serving), chat_in, chat_out, **chat_events)
    msg.submit(P(respond, serving), chat_in, chat_out, **chat_events)
    retry_in = [chatbot, meta, model, system, temperature, max_tokens]
    retry_btn.click(P(retry, serving), retry_in, chat_out, **chat_events)
    chatbot.retry(P(retry, serving), retry_in, chat_out, **chat_events)
    stop_btn.click(P(stop), None, [msg], concurrency_limit=None)
    clear_out = [chatbot, meta, target, status, panel, fb_status]
    clear_btn.click(P(clear), None, clear_out)
    chatbot.clear(P(clear), None, clear_out)
    msg.change(P(token_count, serving), [msg, chatbot, model, system], [tokens], trigger_mode="always_last",
               concurrency_limit=None, show_progress="hidden")
    panel_out = [target, panel, fb_head, fb_reason, fb_reason_text, fb_correction, fb_status]
    chatbot.like(P(on_like, serving), [meta, chatbot], panel_out, concurrency_limit=None).then(
        None, None, None, js=SCROLL_TO_PANEL)
    fb_send.click(P(send_feedback, serving), [target, fb_reason, fb_reason_text, fb_correction], panel_out,
                  concurrency_limit=None)
    fb_close.click(P(close_panel), None, panel_out[:-1])
    model.input(P(on_model), [model], [model, new_form, n_status], concurrency_limit=None)
    n_cancel.click(P(hide_form), None, [new_form])
    return dict(model=model, new_form=new_form, n_name=n_name, n_prompt=n_prompt, n_desc=n_desc,
                n_create=n_create, n_status=n_status)
