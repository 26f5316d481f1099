"""The access log: one line per HTTP request, written when its response has ended (a stream's when the
stream ends), by `AccessLog`, pure ASGI middleware outside every other layer, so that what the auth check
and the body guard refuse is logged too. Logger `assistant.access`; `--access-log text` (the default: lines
of `key=value` through the app's log format), `json` (one JSON object a line) or `off`.

A line's fields: `time` (JSON; a text line has the log format's), `request_id` (the caller's `X-Request-ID`
when it is a plain token, else a new one; sent back as `X-Request-ID`), `principal` (who authenticated;
none when nobody did, or the app is open), `method`, `path`, `route` (the matched route's template,
`/api/domains/{name}/metrics`), `model` (when the body named one: routes note it in `request.state.model`),
`status`, `tokens` (the usage total when the route noted it in `request.state.tokens`: a number, or a
function read when the line is written, after a stream), `latency_ms`, and for an error answer its `param`
and `error`, read from the error body the caller was sent (the server's own JSON, cut to
`MAX_ERROR_CHARS`). Never a request body, a query string, a header or a credential.

The API's routes (`/v1/`, `/api/`, `/health`, `/metrics`, the sign-in pages) log at INFO; the UI's own
(Gradio's pages, assets and queue polling) at DEBUG, seen with `--log-level debug` only.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone

ACCESS_LOGGER = "assistant.access"
API_PREFIXES = ("/v1/", "/api/")
API_PATHS = ("/health", "/metrics", "/login", "/logout")
MAX_ERROR_BODY_BYTES = 8192    # of an error answer, read for its param and message
MAX_ERROR_CHARS = 300          # of the message, in the line
MAX_FIELD_CHARS = 200          # a path or a model name
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
PLAIN = re.compile(r"^[A-Za-z0-9._:/@{}+-]+$")   # text-line values written as they are; others are quoted

log = logging.getLogger(ACCESS_LOGGER)


def _request_id(scope) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == b"x-request-id":
            given = value.decode("latin-1")
            return given if REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
    return uuid.uuid4().hex[:16]


def _error(body: bytes) -> tuple[str | None, str | None]:
    """(param, message) of an OpenAI-shaped error body; (None, None) for anything else."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(err, dict):
        return None, None
    param, message = err.get("param"), err.get("message")
    return (param if isinstance(param, str) else None,
            message[:MAX_ERROR_CHARS] if isinstance(message, str) else None)


def _tokens(value) -> int | None:
    if callable(value):
        try:
            value = value()
        except Exception:  # noqa: BLE001 - a count that cannot be read is left out, never fails the line
            logging.getLogger(__name__).warning("could not count a request's tokens for the access log", exc_info=True)
            return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _cut(value):
    return value[:MAX_FIELD_CHARS] if isinstance(value, str) else value


def fields(scope, status: int | None, error_body: bytes, started: float, seconds: float) -> dict:
    """The line's fields (see the module docstring)."""
    state = scope.get("state") or {}
    route = getattr(scope.get("route"), "path", None)
    out = {"time": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="milliseconds"),
           "request_id": state.get("request_id"), "principal": _cut(state.get("user")),
           "method": scope.get("method"), "path": _cut(scope.get("path", "")), "route": route,
           "model": _cut(state.get("model") if isinstance(state.get("model"), str) else None),
           "status": status, "tokens": _tokens(state.get("tokens")), "latency_ms": round(seconds * 1000, 1)}
    if status is not None and status >= 400:
        out["param"], out["error"] = _error(error_body)
    return out


def text_line(f: dict) -> str:
    """`key=value` pairs (without `time`: the log format has it); a value with spaces, quotes or control
    characters is written as a JSON string, so one request is always one line."""
    def value(v):
        if v is None:
            return "-"
        v = str(v)
        return v if PLAIN.match(v) else json.dumps(v, ensure_ascii=False)
    return " ".join(f"{k}={value(v)}" for k, v in f.items() if k != "time")


def json_line(f: dict) -> str:
    return json.dumps(f, ensure_ascii=False)


class AccessLog:
    """Writes each HTTP request's line (see the module docstring); `json_lines`: JSON objects, else text."""

    def __init__(self, app, *, json_lines: bool = False):
        self.app = app
        self.format = json_line if json_lines else text_line

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, t0 = time.time(), time.perf_counter()
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        status, error, is_json = None, bytearray(), False

        async def send_logged(message):
            nonlocal status, is_json
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                is_json = status >= 400 and any(k.lower() == b"content-type" and b"json" in v for k, v in headers)
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and is_json and len(error) < MAX_ERROR_BODY_BYTES:
                error.extend(message.get("body", b"")[:MAX_ERROR_BODY_BYTES - len(error)])
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except Exception:
            status = status or 500     # the server error middleware answers it
            raise
        finally:
            path = scope.get("path", "")
            level = logging.INFO if path.startswith(API_PREFIXES) or path in API_PATHS else logging.DEBUG
            if log.isEnabledFor(level):
                log.log(level, "%s", self.format(fields(scope, status, bytes(error), started, time.perf_counter() - t0)))
