"""The Adapters tab: a domain's versions as a table (created, data, gate verdict, key metrics, active), the
selected version's card as readable sections (raw JSON behind a toggle), activate / activate anyway /
roll back, create a domain, import an adapter. Activation handlers are shared with the Train tab."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import gradio as gr

from assistant.errors import AssistantError
from assistant.settings import BASE
from assistant.ui import canary, jobview
from assistant.ui.common import domain_names, err, field_error, pick, refresh_models, served_by, user_of, version_choices

log = logging.getLogger(__name__)

TABLE_HEADERS = ["version", "created", "dataset size", "feedback used", "gate verdict", "key metrics", "active"]
KEY_METRICS = ("corrections_match", "eval_loss", "eval_match", "general_similarity")
PROMPT_PREVIEW_CHARS = 160
NO_DOMAINS = ("**No domains yet.** Create one below (or in the Chat tab: model picker → *New domain…*), then add "
              "examples in the Data tab, chat with it and correct its answers, and retrain it in the Train tab.")


def _when(t) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if isinstance(t, (int, float)) else ""


def _num(v):
    return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))


def gate_verdict(card: dict) -> str:
    gate = (card.get("metrics") or {}).get("gate") or {}
    if card.get("imported") and not gate:
        verdict = "imported (no gate)"
    else:
        verdict = "passed" if gate.get("promote") else ("blocked" if gate else "–")
    override = card.get("manual_override")
    if override:
        verdict += f" · activated anyway by {override.get('by') or 'anonymous'}"
    return verdict


def dataset_size(card: dict) -> str:
    train = (card.get("metrics") or {}).get("train") or {}
    n = train.get("n_train")
    return "–" if n is None else str(n)


def key_metrics(card: dict) -> str:
    after = (card.get("metrics") or {}).get("after") or {}
    return ", ".join(f"{k} {_num(after[k])}" for k in KEY_METRICS if after.get(k) is not None) or "–"


def card_markdown(domain: str, version: str | None, card: dict) -> str:
    """A card as sections a person reads; the raw JSON stays behind the toggle."""
    if not version:
        return "Pick a version to see its card."
    if version == BASE:
        return (f"### {domain} on the base weights\n\nNo adapter: the base model answers with the domain's system "
                "prompt alone. Activate this to take every version out of service; the versions stay listed.")
    if not card:
        return f"**{domain}@{version}** has no card: it was added without one."
    m = card.get("metrics") or {}
    origin = " · imported from a PEFT folder" if card.get("imported") else f" · trained by job `{card.get('job_id', '?')}`"
    sections = [f"### {domain}@{version}\n\nCreated {_when(card.get('created_at')) or 'at an unknown time'}{origin}"]
    ts = card.get("training_settings") or {}
    if ts:
        epochs = (m.get("train") or {}).get("epochs", ts.get("epochs") or "auto")
        sections.append(f"**Training**: rank {ts.get('rank')}, learning rate {ts.get('learning_rate')}, {epochs} epochs, "
                        f"max length {ts.get('max_seq_len')} tokens")
    snap = card.get("dataset_snapshot")
    if snap or m.get("train"):
        sections.append(f"**Data**: {dataset_size(card)} training rows from snapshot `{str(snap or '?')[:12]}`, "
                        f"{len(card.get('feedback_ids') or [])} feedback items")
    before, after = m.get("before") or {}, m.get("after") or {}
    keys = [k for k in dict.fromkeys([*before, *after]) if not isinstance(after.get(k, before.get(k)), (dict, list))]
    if keys:
        sections.append("\n".join(["**Evaluation** (before → after)", "", "| metric | before | after |",
                                   "|---|---|---|", *(f"| {k} | {_num(before.get(k))} | {_num(after.get(k))} |"
                                                      for k in keys)]))
    gate = m.get("gate") or {}
    if gate or card.get("manual_override"):
        sections.append("\n".join([f"**Gate**: {gate_verdict(card)}", ""] + [f"- {r}" for r in gate.get("reasons", [])]))
        sections += [x for x in (jobview.retention_markdown(gate), jobview.attempts_markdown(m.get("attempts"))) if x]
    return "\n\n".join(sections)


def adapters_view(workspace, domain, version=None):
    """-> table rows, version picker, card sections, raw card, heading, create form (open when empty)."""
    if not domain:
        empty = not domain_names(workspace)
        return ([], gr.update(choices=[], value=None), "", {"card": "none"},
                NO_DOMAINS if empty else "Pick a domain.", gr.update(open=empty))
    try:
        items = workspace.adapters(domain)
        info = workspace.require_domain(domain)
    except AssistantError as e:
        return [], gr.update(choices=[], value=None), "", {"card": "none"}, err(e), gr.update()
    rows = [[a["version"], _when(a["card"].get("created_at")), dataset_size(a["card"]),
             str(len(a["card"].get("feedback_ids") or [])) if not a["card"].get("imported") else "–",
             gate_verdict(a["card"]), key_metrics(a["card"]), "active" if a["active"] else ""] for a in items]
    versions = [a["version"] for a in items]
    version = pick(version or info.active_version or BASE, [*versions, BASE])
    card = next((a["card"] for a in items if a["version"] == version), {})
    prompt = info.system_prompt[:PROMPT_PREVIEW_CHARS] or "(none)"
    head = (f"**{domain}** · active: **{info.active_version or 'none (base weights)'}** · {len(versions)} version(s)"
            f" · system prompt: {prompt}")
    for v, why in workspace.refused_versions(domain).items():
        head += f"\n\n⚠️ **{v}** cannot serve: {why}"
    if not versions:
        head += ("\n\nNo versions yet: add examples in the Data tab and correct answers in the Chat tab, then "
                 "press Retrain in the Train tab (or import a PEFT adapter below).")
    return (rows, gr.update(choices=version_choices(versions), value=version),
            card_markdown(domain, version, card) + history_markdown(workspace, domain, version),
            card or {"card": "none"}, head, gr.update(open=False))


def show_card(workspace, domain, version):
    if not domain or not version:
        return "", {"card": "none"}
    if version == BASE:
        return card_markdown(domain, version, {}), {"card": "none"}
    try:
        card = workspace.card(domain, version)
    except AssistantError as e:
        return err(e), {"card": "none"}
    return card_markdown(domain, version, card) + history_markdown(workspace, domain, version), card or {"card": "none"}


HISTORY_WORDS = {"UI activate": "activated (UI)", "UI activate_anyway": "activated past the gate (UI)",
                 "POST /api/domains/{name}/adapters/{version}/activate": "activated (API)"}


def history_markdown(workspace, domain: str, version: str | None) -> str:
    """Who did what to this version (the audit log): activations, overrides."""
    if not version or version == BASE:
        return ""
    entries = workspace.version_history(domain, version)
    if not entries:
        return ""
    lines = [f"- {_when(e['at'])} · **{e['who']}** ({e['role']}) · {HISTORY_WORDS.get(e['action'], e['action'])}"
             for e in entries]
    return "\n\n**History**\n\n" + "\n".join(lines)


def activate(serving, domain, version, model, request: gr.Request):
    """-> status, model picker."""
    return _activate(serving, domain, version, model, user_of(request), override=False)


def activate_anyway(serving, domain, version, model, request: gr.Request):
    """Activate a version the gate blocked; the card records who did it."""
    return _activate(serving, domain, version, model, user_of(request), override=True)


def _activate(serving, domain, version, model, user, *, override: bool):
    try:
        if not domain:
            raise field_error("Domain", "pick a domain")
        if not version:
            raise field_error("Version", "pick a version")
        serving.activate(domain, version, user=user, override=override)
        if version == BASE:
            msg = f"{domain} is back on the base weights (its system prompt alone): the next chat with it uses them"
        else:
            msg = (f"{domain}@{version} is now active" + (" (manual override, recorded in its card)" if override
                                                          else "") + f": the next chat with '{domain}' uses it")
    except AssistantError as e:
        msg = err(e)
    return msg, refresh_models(serving.workspace, model)


def rollback(serving, domain, model, request: gr.Request):
    try:
        if not domain:
            raise field_error("Domain", "pick a domain")
        version = serving.rollback(domain, user=user_of(request))["active_version"]
        msg = f"{served_by(domain, version)} is now active (rolled back)"
    except AssistantError as e:
        msg = err(e)
    return msg, refresh_models(serving.workspace, model)


def create_domain(workspace, name, system_prompt, description):
    """-> status, the new domain's name (None on error)."""
    try:
        if not (name or "").strip():
            raise field_error("Name", "required: lower-case letters, digits, - and _ (e.g. support)")
        d = workspace.create_domain(name.strip(), system_prompt or "", description or "")
    except AssistantError as e:
        return err(e), None
    return (f"created domain {d['name']}: chat with it in the Chat tab, add examples in the Data tab",
            d["name"])


def import_adapter(serving, domain, upload, make_active, model):
    try:
        if not domain:
            raise field_error("Domain", "pick a domain first")
        if not upload:
            raise field_error("Adapter zip", "choose a .zip of a PEFT LoRA folder "
                                             "(adapter_config.json + adapter_model.safetensors)")
        version = serving.import_adapter(domain, Path(upload), activate=bool(make_active))
        msg = f"imported and validated as {domain}@{version}" + (" (active)" if make_active else "")
    except AssistantError as e:
        msg = err(e)
    return msg, refresh_models(serving.workspace, model)


def build(workspace, serving, P, model):
    """The Adapters tab's widgets and its own events."""
    names = domain_names(workspace)
    domain = gr.Dropdown(names, value=names[0] if names else None, label="Domain", elem_id="adapters-domain")
    head = gr.Markdown(NO_DOMAINS if not names else "", elem_id="adapters-head")
    with gr.Accordion("Create a domain", open=not names, elem_id="create-domain") as create_box:
        c_name = gr.Textbox(label="Name (a-z, 0-9, - and _)", elem_id="new-domain-name")
        c_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="new-domain-prompt")
        c_desc = gr.Textbox(label="Description", elem_id="new-domain-description")
        c_btn = gr.Button("Create domain", variant="primary", elem_id="create-domain-btn")
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, elem_id="adapters-table", wrap=True)
    with gr.Row():
        version = gr.Dropdown([], label="Version", elem_id="adapters-version")
        act = gr.Button("Activate (promote / roll back)", variant="primary", elem_id="adapters-activate")
        anyway = gr.Button("Activate anyway (overrides the gate)", elem_id="adapters-activate-anyway")
        back = gr.Button("Roll back to previous", elem_id="adapters-rollback")
    status = gr.Markdown("", elem_id="adapters-status")
    canary_view, canary_out = canary.build(workspace, serving, P, domain, version, status)
    card_md = gr.Markdown("", elem_id="adapter-card")
    with gr.Accordion("Raw card (JSON)", open=False, elem_id="adapter-card-raw-box"):
        card_raw = gr.JSON(label="card.json", elem_id="adapter-card-raw")
    with gr.Accordion("Import an adapter (.zip of a PEFT LoRA folder)", open=False, elem_id="import-adapter"):
        i_file = gr.File(label="Adapter zip", file_types=[".zip"], type="filepath", elem_id="import-file")
        i_active = gr.Checkbox(label="Activate after import", elem_id="import-activate")
        i_btn = gr.Button("Validate and import", elem_id="import-btn")

    out = [table, version, card_md, card_raw, head, create_box]
    domain.change(P(adapters_view, workspace), [domain], out)
    version.input(P(show_card, workspace), [domain, version], [card_md, card_raw])
    for btn, fn in ((act, activate), (anyway, activate_anyway)):
        btn.click(P(fn, serving), [domain, version, model], [status, model]).then(
            P(adapters_view, workspace), [domain, version], out)
    back.click(P(rollback, serving), [domain, model], [status, model]).then(
        P(adapters_view, workspace), [domain], out)
    i_btn.click(P(import_adapter, serving), [domain, i_file, i_active, model], [status, model]).then(
        P(adapters_view, workspace), [domain], out)
    for btn in (act, anyway, back):   # activating ends a running canary
        btn.click(canary_view, [domain], canary_out)
    return dict(domain=domain, out=out, status=status, c_name=c_name, c_prompt=c_prompt, c_desc=c_desc, c_btn=c_btn,
                canary_view=canary_view, canary_out=canary_out)
