"""The Adapters tab's canary panel: send a version out to a share of the domain's conversations, watch how
its users rate it against the live version (rates with their likely range, and how sure the rule is), and
promote, roll back or change the share now. The rule decides by itself after every rating
(monitoring/canary.py); this shows why."""

from __future__ import annotations

import gradio as gr

from assistant.errors import AssistantError
from assistant.monitoring.canary import timeline
from assistant.ui.common import err, field_error, user_of

NO_CANARY = ("No canary out. Pick a version above and send it out: it answers a share of this domain's "
             "conversations beside the live version, and its users' ratings promote or roll it back.")
ARM_WORDS = {"canary": "canary", "current": "live now"}


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def canary_view(workspace, domain):
    """-> summary, the arms' bad-answer rates over the ratings, how sure the rule is over the ratings, and
    the share slider (set to the running canary's share)."""
    import pandas as pd
    rates = pd.DataFrame({"ratings": [], "bad answers": [], "arm": []})
    sure = pd.DataFrame({"ratings": [], "probability": [], "line": []})
    if not domain:
        return "", rates, sure, gr.update()
    try:
        rollout = workspace.canary(domain)
    except AssistantError as e:
        return err(e), rates, sure, gr.update()
    if rollout is None:
        return NO_CANARY, rates, sure, gr.update()
    v = rollout["verdict"]
    lines = [f"**Canary {domain}@{rollout['version']}** against **{rollout['baseline'] or 'the base weights'}** · "
             f"{rollout['share']:.0%} of conversations · **{rollout['status']}** after {_duration(rollout['hours'])}",
             "", "| arm | version | rated | rated down (likely) |", "|---|---|---|---|"]
    for name, arm in rollout["arms"].items():
        low, high = arm["interval"]
        lines.append(f"| {ARM_WORDS[name]} | {arm['version'] or 'base'} | {arm['rated']} | "
                     f"{_pct(arm['bad_rate'])} ({low:.0%}–{high:.0%}) |")
    lines += ["", f"**Verdict: {v['verdict']}**: {v['why']}" + (f". Next: {v['next']}" if v.get("next") else "")]
    points = timeline(workspace.rollouts, workspace.rollouts.get(rollout["id"]))
    rates = pd.DataFrame([{"ratings": p["ratings"], "bad answers": p[arm], "arm": ARM_WORDS[arm]}
                          for p in points for arm in ("canary", "current") if p[arm] is not None]
                         or {"ratings": [], "bad answers": [], "arm": []})
    settings = workspace.canary_settings()
    bounds = [(settings.confidence, "roll back"), (1 - settings.confidence, "promote")]
    sure = pd.DataFrame([{"ratings": p["ratings"], "probability": p["p_worse"], "line": "canary worse"}
                         for p in points] + [{"ratings": p["ratings"], "probability": b, "line": word}
                                              for p in points[:1] + points[-1:] for b, word in bounds]
                        or {"ratings": [], "probability": [], "line": []})
    return "\n".join(lines), rates, sure, gr.update(value=rollout["share"]) if rollout["status"] == "running" else gr.update()


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def send_out(serving, domain, version, share, request: gr.Request):
    """Send the picked version out as a canary, or give the running canary a new share."""
    try:
        if not domain:
            raise field_error("Domain", "pick a domain")
        if not version or version == "base":
            raise field_error("Version", "pick a version to send out as a canary")
        r = serving.start_canary(domain, version, float(share), user=user_of(request))
        return f"{domain}@{version} answers {r['share']:.0%} of {domain}'s conversations; its users' ratings decide"
    except AssistantError as e:
        return err(e)


def promote_canary(serving, domain, request: gr.Request):
    """Make the running canary live for everyone now."""
    try:
        running = serving.workspace.canary(domain) if domain else None
        if not running or running["status"] != "running":
            raise field_error("Canary", "none is out for this domain")
        blocked = serving.workspace.registry.gate_verdict(domain, running["version"]).get("promote") is False
        serving.activate(domain, running["version"], user=user_of(request), override=blocked)
        return f"{domain}@{running['version']} is live for everyone (promoted by hand)"
    except AssistantError as e:
        return err(e)


def stop_canary(serving, domain, request: gr.Request):
    """Roll the running canary back now: everyone gets the live version."""
    try:
        if not domain:
            raise field_error("Domain", "pick a domain")
        r = serving.stop_canary(domain, user=user_of(request))
        return f"{domain}@{r['version']} stopped serving: everyone gets {r['baseline'] or 'the base weights'}"
    except AssistantError as e:
        return err(e)


def build(workspace, serving, P, domain, version, status):
    """The panel's widgets and events; -> (the view function's outputs, its inputs)."""
    with gr.Accordion("Canary: let the users decide", open=True, elem_id="canary-box"):
        summary = gr.Markdown(NO_CANARY, elem_id="canary-summary")
        with gr.Row():
            share = gr.Slider(0.05, 0.95, value=workspace.canary_settings().share, step=0.05,
                              label="Share of conversations", elem_id="canary-share")
            send = gr.Button("Send out as canary / change share", elem_id="canary-send")
            promote = gr.Button("Promote canary now", elem_id="canary-promote")
            stop = gr.Button("Roll back canary now", elem_id="canary-stop")
        with gr.Row():
            rates = gr.ScatterPlot(x="ratings", y="bad answers", color="arm", title="Bad answers per arm",
                                   x_title="ratings so far", y_title="share rated down", height=220,
                                   elem_id="canary-rates")
            sure = gr.LinePlot(x="ratings", y="probability", color="line", title="How sure the rule is",
                               x_title="ratings so far", y_title="P(canary is worse)", height=220,
                               elem_id="canary-sure")
    out = [summary, rates, sure, share]
    view = P(canary_view, workspace)
    send.click(P(send_out, serving), [domain, version, share], [status]).then(view, [domain], out)
    promote.click(P(promote_canary, serving), [domain], [status]).then(view, [domain], out)
    stop.click(P(stop_canary, serving), [domain], [status]).then(view, [domain], out)
    domain.change(view, [domain], out)
    return view, out
