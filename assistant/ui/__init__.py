"""The Gradio UI: Chat, Adapters, Data, Train and Monitor tabs, one module each. The only package that
imports gradio. A person with the `user` role sees the Chat tab only, and every other tab's events refuse
them (common.bind).

Each tab module has module-level handlers that translate widgets to `Workspace` and `Serving` calls and results back to
widgets, and a `build` that lays out and wires its own events; `build_ui` composes the tabs and wires what
crosses them (a new domain appears in every picker). Opening a tab only reads. Elements a browser test
drives carry `elem_id`s.

May import: the foundation, engine (lm), data (stages), gate (verdict's names), monitoring (canary), jobs
(process), training (TrainSettings), api (auth); the Workspace and the Serving come in as arguments.
"""

from __future__ import annotations

import logging

import gradio as gr

from assistant.ui import adapters, chat, data, monitor, train
from assistant.ui.common import DOMAINS, bind, domain_names, pick, principal_of, refresh_domain, refresh_models

log = logging.getLogger(__name__)

QUEUE_POLL_S = 0.01           # how often Gradio's idle event queue looks for work (its default on Linux: 0.001)
PROGRESS_POLL_S = 0.05        # and for progress updates (its default: 0.01)

__all__ = ["build_ui", "mount_ui", "share_tunnel"]


def _created(workspace, name, model, *, select: bool):
    """After a domain was created: every domain picker lists it and shows it; the model picker too when
    the form was the Chat tab's."""
    names = domain_names(workspace)
    dd = gr.update(choices=names, value=pick(name, names)) if name else gr.update(choices=names)
    models = refresh_models(workspace, name if (select and name) else model)
    return dd, dd, dd, dd, models


def create_from_adapters(workspace, name, system_prompt, description, model):
    msg, new = adapters.create_domain(workspace, name, system_prompt, description)
    return (msg, *_created(workspace, new, model, select=False))


def create_from_chat(workspace, name, system_prompt, description, model):
    msg, new = adapters.create_domain(workspace, name, system_prompt, description)
    return (msg, *_created(workspace, new, model, select=True), gr.update(visible=new is None))


def role_view(request: gr.Request):
    """What the signed-in person's role shows: a user sees Chat only (their own answers and ratings)."""
    editor = principal_of(request).has("editor")
    # "hidden", not False: Gradio 6 leaves a tab's button shown for visible=False
    return tuple(gr.Tab(visible=True if editor else "hidden") for _ in range(4))


def clear_status() -> str:
    """An action's message belongs to the moment it was done: a tab opened later starts without it."""
    return ""


def build_ui(workspace, serving) -> gr.Blocks:
    P = bind
    with gr.Blocks(title="domain-assistant") as demo:
        gr.Markdown("# domain-assistant\nOne base model, many domain assistants that get better from your feedback.")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_tab:
                c = chat.build(serving, P)
            model = c["model"]
            with gr.Tab("Adapters", id="adapters", elem_id="tab-adapters") as adapters_tab:
                a = adapters.build(workspace, serving, P, model)
            with gr.Tab("Data", id="data", elem_id="tab-data") as data_tab:
                d = data.build(workspace, P)
            with gr.Tab("Train", id="train", elem_id="tab-train") as train_tab:
                t = train.build(workspace, serving, P, model)
            with gr.Tab("Monitor", id="monitor", elem_id="tab-monitor") as monitor_tab:
                m = monitor.build(workspace, P)

        demo.load(P(role_view), None, [adapters_tab, data_tab, train_tab, monitor_tab])
        # Opening a tab refreshes its domain picker, then shows the domain (reads only).
        chat_tab.select(P(refresh_models, workspace), [model], [model])
        adapters_tab.select(P(refresh_domain, workspace), [a["domain"]], [a["domain"]], **DOMAINS).then(
            P(adapters.adapters_view, workspace), [a["domain"]], a["out"]).then(P(clear_status), None, [a["status"]]).then(
            a["canary_view"], [a["domain"]], a["canary_out"])
        data_tab.select(P(refresh_domain, workspace), [d["domain"]], [d["domain"]], **DOMAINS).then(
            P(data.data_view, workspace), [d["domain"]], d["out"])
        train_tab.select(P(refresh_domain, workspace), [t["domain"]], [t["domain"]], **DOMAINS).then(
            P(train.train_view, workspace), [t["domain"], model], t["view_out"])
        monitor_tab.select(P(refresh_domain, workspace), [m["domain"]], [m["domain"]], **DOMAINS).then(
            P(monitor.monitor_view, workspace), [m["domain"]], m["out"])

        # A new domain, from the Adapters tab or the Chat tab's model picker, shows up everywhere.
        pickers = [a["domain"], d["domain"], t["domain"], m["domain"], model]
        a["c_btn"].click(P(create_from_adapters, workspace), [a["c_name"], a["c_prompt"], a["c_desc"], model],
                         [a["status"], *pickers], **DOMAINS)
        c["n_create"].click(P(create_from_chat, workspace), [c["n_name"], c["n_prompt"], c["n_desc"], model],
                            [c["n_status"], *pickers, c["new_form"]], **DOMAINS)
    _calm_queue(demo)
    return demo


def mount_ui(app, workspace, serving, credentials=None) -> None:
    """Mount the UI at / of the FastAPI app. Sign-in is the app's own auth middleware, in front of every
    route (assistant/api/auth.py), not Gradio's; the state, adapter and cache folders are blocked from Gradio's
    file routes, and Gradio never shows exception text."""
    from assistant.ui.common import CREDENTIALS
    from assistant.ui.style import CSS
    CREDENTIALS[0] = credentials
    s = workspace.settings
    gr.mount_gradio_app(app, build_ui(workspace, serving), path="/",
                        blocked_paths=[str(s.state_path), str(s.adapters_path), str(s.cache_dir)],
                        show_error=False, ssr_mode=False, css=CSS)


def share_tunnel(host: str, port: int) -> str:
    """A public link to the local server through Gradio's share servers -> its URL."""
    import secrets

    from gradio import networking
    return networking.setup_tunnel(host, port, secrets.token_urlsafe(32), None, None)


def _calm_queue(demo: gr.Blocks) -> None:
    """Gradio's event queue polls the event loop while idle, 1000 times a second. On a small CPU machine every
    wake-up takes a core from the decode threads for a moment, and it cost a tenth of the streamed API's
    speed. A UI event now waits at most 10 ms to start, and progress bars update 20 times a second."""
    q = getattr(demo, "_queue", None)
    if q is not None and hasattr(q, "sleep_when_free"):
        q.sleep_when_free = max(q.sleep_when_free, QUEUE_POLL_S)
        q.progress_update_sleep_when_free = max(getattr(q, "progress_update_sleep_when_free", 0), PROGRESS_POLL_S)
