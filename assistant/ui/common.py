"""What every tab shares: binding handlers to the workspace, the error edge, model and domain choices.

No handler lets an exception reach the page: `bind` turns an `AssistantError` its handler did not catch
into a Gradio message (the error's own words), and any other exception into one generic line, logged
with its traceback on the server. Messages shown to users never carry server file paths.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re

import gradio as gr

from assistant.errors import AssistantError
from assistant.settings import BASE

log = logging.getLogger(__name__)

NEW_DOMAIN = "__new_domain__"     # the model picker's "New domain…" entry
# Events that rewrite the domain dropdowns run one at a time, in the order they were sent: a tab's refresh
# that started before "Create domain" can then never land after it and blank the new domain.
DOMAINS = {"concurrency_id": "domain-dropdowns", "concurrency_limit": 1}
UNEXPECTED = "Something went wrong on the server (details are in its log). Try again; if it persists, reload."
_PATH = re.compile(r"(?<![\w.])(?:/[\w.@+-]+){2,}/?")


def public(text: str) -> str:
    """A text for the page: server file paths replaced by a placeholder."""
    return _PATH.sub("(server path)", text or "")


def err(e: Exception) -> str:
    """An error as a status line: the domain error's message, or the generic line for anything else."""
    if isinstance(e, AssistantError):
        return "Error: " + public(e.message)
    log.error("unexpected error in the UI", exc_info=e)
    return "Error: " + UNEXPECTED


def field_error(field: str, problem: str) -> AssistantError:
    """An error naming the UI field the user can fix."""
    return AssistantError(f"{field}: {problem}", param=field)


CREDENTIALS: list = [None]   # the server's credentials (set by mount_ui), to name the signed-in user


def user_of(request: gr.Request | None) -> str | None:
    """The signed-in user. The auth middleware has checked the request before any handler runs."""
    from assistant.api.auth import user_from_headers
    return user_from_headers(CREDENTIALS[0], getattr(request, "headers", None)) if request is not None else None


def principal_of(request: gr.Request | None):
    """Who is calling and their role (users.Principal; users.OPEN when the app is open)."""
    from assistant.api.auth import principal_from_headers
    return principal_from_headers(CREDENTIALS[0], getattr(request, "headers", None) if request is not None else None)


def role_of(request: gr.Request | None) -> str:
    return principal_of(request).role


# What a handler needs: chat handlers (and the pickers chat opens with) serve anyone signed in; every other
# tab's handlers need an editor (people/permissions.py's table, for the UI). Checked in `bind` on every event, so a
# hidden tab's events called directly (gradio_client) are refused too.
USER_HANDLERS = {"refresh_models", "clear_status", "role_view"}
# UI actions that change something: recorded in the audit log (who, the action, the values it was given)
# -> where its domain and its target (a version) are among the values it is given (None: not there)
AUDITED = {"activate": (0, 1), "activate_anyway": (0, 1), "rollback": (0, None), "import_adapter": (0, None),
           "create_from_adapters": (0, None), "create_from_chat": (0, None), "review": (1, None),
           "import_seed": (0, None), "retrain": (None, None), "cancel": (None, None), "retry": (None, None),
           "activate_published": (0, None), "approve_pending": (0, None), "send_out": (0, 1),
           "promote_canary": (0, None), "stop_canary": (0, None)}
AUDIT_VALUE_CHARS = 80


def needed_role(fn) -> str:
    return "user" if fn.__module__.endswith(".chat") or fn.__name__ in USER_HANDLERS else "editor"


def bind(fn, *bound):
    """`fn` with its first arguments bound, the role check and the error edge. Unlike functools.partial, the
    result keeps the remaining signature and type hints, which Gradio reads to pass gr.Request / gr.LikeData
    (a gr.Request parameter is added last for the role check)."""
    role = needed_role(fn)

    def edge(e: Exception):
        if isinstance(e, AssistantError):
            raise gr.Error(public(e.message)) from None
        log.error("unexpected error in %s", fn.__name__, exc_info=e)
        raise gr.Error(UNEXPECTED) from None

    audited = role == "editor" and fn.__name__ in AUDITED

    def allowed(args, kwargs):
        request = kwargs.pop("role_request_", None)
        if request is None and args and isinstance(args[-1], gr.Request):
            request, args = args[-1], args[:-1]
        who = principal_of(request)
        if not who.has(role):
            raise gr.Error(f"the {role} role is needed for this; you are signed in as a {who.role}: ask an admin")
        if audited:
            _audit(who, fn.__name__, args)
        return args

    if inspect.isgeneratorfunction(fn):
        def wrapper(*args, **kwargs):
            args = allowed(args, kwargs)
            try:
                yield from fn(*bound, *args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001 - the edge: nothing raw reaches the page
                edge(e)
    else:
        def wrapper(*args, **kwargs):
            args = allowed(args, kwargs)
            try:
                return fn(*bound, *args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001 - the edge: nothing raw reaches the page
                edge(e)
    functools.update_wrapper(wrapper, fn)
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[len(bound):]
    extra = inspect.Parameter("role_request_", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                              annotation=gr.Request)
    wrapper.__signature__ = sig.replace(parameters=params + [extra])
    wrapper.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k in {p.name for p in params}},
                               "role_request_": gr.Request}
    return wrapper


def _audit(who, action: str, args) -> None:
    """Record a UI action in the audit log (users.Directory), with the short values it was given."""
    directory = getattr(CREDENTIALS[0], "directory", None)
    if directory is None:
        return
    values = [a[:AUDIT_VALUE_CHARS] for a in args if isinstance(a, str) and a]
    where = [args[i] if i is not None and i < len(args) and isinstance(args[i], str) else None
             for i in AUDITED[action]]
    try:
        directory.audit(who, f"UI {action}", *where, values=values)
    except Exception:  # noqa: BLE001 - the action goes on; the failure is in the server log
        log.exception("could not write the audit log for the UI action %s", action)


# Choices ---------------------------------------------------------------------------------------------
def model_choices(workspace) -> list[tuple[str, str]]:
    out = [("base (no adapter)", BASE)]
    for d in workspace.list_domains():
        active = d["active_version"]
        out.append((f"{d['name']} (active: {active or 'base weights'})", d["name"]))
        for v in reversed(d["versions"]):
            out.append((f"{d['name']}@{v}" + ("  (active)" if v == active else ""), f"{d['name']}@{v}"))
    return out + [("New domain…", NEW_DOMAIN)]


def domain_names(workspace) -> list[str]:
    return [d["name"] for d in workspace.list_domains()]


def pick(value, choices):
    values = [c[1] if isinstance(c, tuple) else c for c in choices]
    values = [v for v in values if v != NEW_DOMAIN]
    return value if value in values else (values[0] if values else None)


def version_choices(names: list[str]) -> list[tuple[str, str]]:
    """A domain's versions, newest first, and the base weights it can always go back to."""
    return [(v, v) for v in reversed(names)] + [("base weights (system prompt only)", BASE)]


def refresh_models(workspace, current):
    choices = model_choices(workspace)
    return gr.update(choices=choices, value=pick(current, choices))


def refresh_domain(workspace, current):
    names = domain_names(workspace)
    return gr.update(choices=names, value=pick(current, names))


def served_by(domain: str, version: str | None) -> str:
    return f"{domain}@{version}" if version and version != BASE else f"{domain} (base weights)"
