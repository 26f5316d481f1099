"""The Data tab: a domain's training candidates as a review queue (approve, reject, edit), the curation
report per filter, seed-example import and the snapshot's export. Reading the tab never writes: the view
comes from `Workspace.preview`, the file from `Workspace.export_dataset` when asked for."""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

import gradio as gr

from assistant.errors import AssistantError
from assistant.settings import MAX_REQUEST_BYTES
from assistant.ui.common import domain_names, err, field_error, user_of

log = logging.getLogger(__name__)

QUEUE_TEXT_CHARS = 160        # prompt/answer preview length in the review queue
QUEUE_HEADERS = ["#", "source", "rating", "status", "context", "prompt", "answer", "duplicate", "key"]
CONTEXT_TEXT_CHARS = 400      # characters of each turn shown in a selected row's conversation
NO_DOMAINS = "No domains yet: create one in the Adapters tab, or from the Chat tab's model picker (New domain…)."
REVIEW_STATUSES = ("approved", "rejected")


def _short(s: str) -> str:
    s = " ".join((s or "").split())
    return s if len(s) <= QUEUE_TEXT_CHARS else s[:QUEUE_TEXT_CHARS - 1] + "…"


def _last(messages, role) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == role), "")


@functools.cache
def _export_dir() -> Path:
    """One folder per process for snapshot downloads, outside the state dir (Gradio never serves that)."""
    return Path(tempfile.mkdtemp(prefix="assistant-export-"))


def _context(messages) -> str:
    """The queue's context column: how many earlier exchanges the row carries (context only, not taught)."""
    earlier = sum(m["role"] == "user" for m in messages) - 1
    return "" if earlier <= 0 else f"{earlier} earlier turn{'s' * (earlier > 1)}"


def conversation_view(messages) -> str:
    """A row's whole conversation, each turn marked: what the row teaches, and what is context only."""
    from assistant.engine.lm import taught
    lines = []
    for m in messages:
        mark = "**taught**" if taught(m) else "context"
        text = " ".join(m["content"].split())
        if len(text) > CONTEXT_TEXT_CHARS:
            text = text[:CONTEXT_TEXT_CHARS - 1] + "…"
        lines.append(f"- {m['role']} · {mark}: {text}")
    return "Conversation of the selected row (the loss covers only the taught turns):\n\n" + "\n".join(lines)


def _row(i: int, it: dict, number: dict) -> list:
    status = it.get("review_status") or ("kept" if not it.get("removed") else f"removed: {it['removed']}")
    if it.get("review_status") and it.get("removed") and it["removed"] != "rejected":
        status += f" (removed: {it['removed']})"
    dup = ""
    if it.get("removed") == "superseded":
        dup = f"replaced by #{number.get(it['near_duplicate_of'], '?')}, a newer correction of the same question"
    elif it.get("near_duplicate_of"):
        dup = f"near-duplicate of #{number.get(it['near_duplicate_of'], '?')} ({it.get('similarity') or 0:.2f})"
    elif it.get("nearest") and it.get("nearest_similarity") is not None:
        dup = f"nearest #{number.get(it['nearest'], '?')} ({it['nearest_similarity']:.2f})"
    return [i + 1, it["source"], it.get("rating") or "", status + (" · edited" if it.get("edited") else ""),
            _context(it["messages"]), _short(_last(it["messages"], "user")), _short(_last(it["messages"], "assistant")),
            dup, it["key"]]


def review_counts(items: list[dict]) -> dict:
    """Pending (a user account's feedback not yet approved), approved and rejected candidates."""
    return {"pending": sum(1 for it in items if it.get("removed") == "pending"),
            "approved": sum(1 for it in items if it.get("review_status") == "approved"),
            "rejected": sum(1 for it in items if it.get("review_status") == "rejected")}


def data_view(workspace, domain):
    """-> queue rows, queue items (state), report rows, summary."""
    if not domain:
        return [], [], [], NO_DOMAINS if not domain_names(workspace) else "Pick a domain."
    try:
        snap = workspace.preview(domain)
    except AssistantError as e:
        return [], [], [], err(e)
    items = sorted(snap.items, key=lambda it: -(it.get("seq") or 0))
    number = {it["key"]: i + 1 for i, it in enumerate(items)}
    rows = [_row(i, it, number) for i, it in enumerate(items)]
    r = snap.report
    report = [[name, n] for name, n in r["removed"].items()]
    if not items:
        summary = (f"**No training data for {domain} yet.** Import seed examples (.jsonl) below, or chat with "
                   f"{domain} in the Chat tab and rate or correct its answers: they show up here.")
    else:
        summary = (f"{r['candidates']} candidates → **{r['kept']} kept** ({r['train']} train / {r['eval']} eval) · "
                   f"snapshot `{r['snapshot'][:12]}` · click a row to review it")
        counts = review_counts(items)
        summary += (f"\n\nReview: **{counts['pending']} pending** (feedback from user accounts: it trains once "
                    f"approved) · {counts['approved']} approved · {counts['rejected']} rejected")
    slim = [{"key": it["key"], "messages": it["messages"]} for it in items]
    return rows, slim, report, summary


def export(workspace, domain):
    """-> the snapshot file to download, status."""
    try:
        if not domain:
            raise field_error("Domain", "pick a domain")
        path = workspace.export_dataset(domain, _export_dir())
    except AssistantError as e:
        return gr.update(value=None, visible=False), err(e)
    return gr.update(value=str(path), visible=True), f"exported {Path(path).name}: download it below"


def select_item(items, evt: gr.SelectData):
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    if not items or row is None or row >= len(items):
        return None, "", "", "click a row to review it", ""
    it = items[row]
    return (it["key"], _last(it["messages"], "user"), _last(it["messages"], "assistant"), f"selected #{row + 1}",
            conversation_view(it["messages"]))


def review(workspace, action, domain, key, prompt, answer):
    """Approve, reject or edit (which approves) the selected candidate -> status."""
    try:
        if not domain:
            raise field_error("Domain", "pick a domain")
        if not key:
            raise field_error("Review queue", "click a row first")
        if action == "edit":
            workspace.edit_item(domain, key, prompt, answer)
            return f"{key}: approved with your edit"
        if action not in REVIEW_STATUSES:
            raise field_error("Review", f"use one of {', '.join(REVIEW_STATUSES)}")
        workspace.review(domain, key, action)
    except AssistantError as e:
        return err(e)
    return f"{key}: {action}"


def approve_pending(workspace, domain):
    """Approve every pending item (user accounts' feedback) of the domain at once -> status."""
    try:
        if not domain:
            raise field_error("Domain", "pick a domain")
        keys = [it["key"] for it in workspace.review_queue(domain) if it.get("removed") == "pending"]
        if not keys:
            return "nothing is pending review"
        n = workspace.review_many(domain, keys, "approved")
    except AssistantError as e:
        return err(e)
    return f"approved {n} pending item{'s' if n != 1 else ''}: they train from the next job on"


def import_seed(workspace, domain, upload, request: gr.Request):
    try:
        if not domain:
            raise field_error("Domain", "pick a domain")
        if not upload:
            raise field_error("Seed examples", 'choose a .jsonl file, one {"messages": [...]} object per line')
        if Path(upload).stat().st_size > MAX_REQUEST_BYTES:
            raise field_error("Seed examples", f"the file is over {MAX_REQUEST_BYTES >> 20} MiB: split it")
        text = Path(upload).read_text(encoding="utf-8", errors="replace")
        return workspace.import_seed_jsonl(domain, text, user=user_of(request))["message"]
    except AssistantError as e:
        return err(e)


def build(workspace, P):
    """The Data tab's widgets and its own events."""
    items = gr.State([])
    selected = gr.State(None)
    names = domain_names(workspace)
    with gr.Row():
        domain = gr.Dropdown(names, value=names[0] if names else None, label="Domain", elem_id="data-domain", scale=3)
        refresh = gr.Button("Refresh", elem_id="data-refresh", scale=0)
    summary = gr.Markdown(NO_DOMAINS if not names else "", elem_id="data-summary")
    queue = gr.Dataframe(headers=QUEUE_HEADERS, interactive=False, wrap=True, elem_id="review-queue", max_height=360)
    sel = gr.Markdown("click a row to review it", elem_id="review-selected")
    convo = gr.Markdown("", elem_id="review-conversation")
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="review-prompt")
    answer = gr.Textbox(label="Answer", lines=3, elem_id="review-answer")
    with gr.Row():
        approve = gr.Button("Approve", elem_id="review-approve")
        reject = gr.Button("Reject", variant="stop", elem_id="review-reject")
        edit = gr.Button("Save edit", elem_id="review-edit")
        approve_all = gr.Button("Approve all pending", elem_id="review-approve-pending")
    status = gr.Markdown("", elem_id="data-status")
    with gr.Row():
        report = gr.Dataframe(headers=["filter", "removed"], interactive=False, elem_id="curation-report",
                              label="Curation report")
        with gr.Column():
            seed_file = gr.File(label="Seed examples (.jsonl)", file_types=[".jsonl", ".json"], type="filepath",
                                elem_id="seed-file")
            seed_btn = gr.Button("Import seed examples", elem_id="import-seed-btn")
            export_btn = gr.Button("Export snapshot (JSONL)", elem_id="export-snapshot")
            export_file = gr.File(label="Snapshot", visible=False, interactive=False, elem_id="snapshot-file")

    out = [queue, items, report, summary]
    domain.change(P(data_view, workspace), [domain], out)
    refresh.click(P(data_view, workspace), [domain], out)
    queue.select(P(select_item), [items], [selected, prompt, answer, sel, convo])
    for btn, action in ((approve, "approved"), (reject, "rejected"), (edit, "edit")):
        btn.click(P(review, workspace, action), [domain, selected, prompt, answer], [status]).then(
            P(data_view, workspace), [domain], out)
    approve_all.click(P(approve_pending, workspace), [domain], [status]).then(P(data_view, workspace), [domain], out)
    seed_btn.click(P(import_seed, workspace), [domain, seed_file], [status]).then(P(data_view, workspace), [domain], out)
    export_btn.click(P(export, workspace), [domain], [export_file, status])
    return dict(domain=domain, out=out)
