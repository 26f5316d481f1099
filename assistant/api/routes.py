"""HTTP routes: the REST API (docs/API.md), with the OpenAI-compatible routes of api/openai.py, and the edge
every route shares: bodies are pydantic models (api/openai_schema.py), a JSON route takes only JSON (415 else:
a cross-site form cannot post to it), bodies are capped, and every error, a wrong field, an unknown
route or method included, is an OpenAI-shaped JSON body. Each route only parses, calls the Workspace or
the Serving, and turns domain errors into JSON errors. Who is calling was settled by `auth.AuthMiddleware`
before any route runs; what they may do is checked once for every route by the router's dependency
(api_people.authorizer, people/permissions.py's table)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from assistant.api.embeddings import add_embedding_routes
from assistant.api.executors import on_chat, on_control
from assistant.api.openai import add_openai_routes, error_body
from assistant.api.openai_schema import (
    ActivateRequest,
    CanaryRequest,
    DomainRequest,
    ExamplesRequest,
    FeedbackRequest,
    WithdrawRequest,
)
from assistant.api.people import add_people_routes, authorizer, principal
from assistant.api.responses import add_responses_routes
from assistant.errors import AssistantError, MethodNotAllowed, NotFound, PermissionDenied, TooLarge, UnsupportedMediaType
from assistant.serving import Serving
from assistant.settings import MAX_REQUEST_BYTES, MAX_UPLOAD_BYTES
from assistant.workspace import Workspace

RETRY_AFTER_S = 2              # the Retry-After a 503 suggests
UPLOAD_PATH = re.compile(r"^/api/domains/[^/]+/adapters$")   # takes a zip, not JSON
GUARDED = ("/v1/", "/api/")

log = logging.getLogger(__name__)


def error_response(e: AssistantError) -> JSONResponse:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    if e.status == 404:
        kind = "not_found_error" if e.code != "model_not_found" else "invalid_request_error"
    kind = {403: "permission_error", 429: "rate_limit_error"}.get(e.status, kind)   # OpenAI's types for these
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
    if e.status == 429:
        headers = {"Retry-After": str(getattr(e, "retry_after", RETRY_AFTER_S))}
    return JSONResponse(error_body(e.message, kind, e.code, e.param), status_code=e.status, headers=headers)


def current_user(request: Request) -> str | None:
    """The user the auth middleware let in (None when the app is open)."""
    return getattr(request.state, "user", None)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _rater(body, request: Request) -> tuple[str | None, object]:
    """(the `user` a rating is recorded under, who authenticated). An app behind the API key or an editor may
    name its own end users in `user`; a user account rates as itself, never as someone else."""
    who = principal(request)
    if who is not None and who.role == "user":
        if body.user not in (None, who.name):
            raise PermissionDenied(f"user: you are signed in as {who.name!r} and can rate only as yourself: leave "
                                   "`user` out", param="user")
        return who.name, who
    return body.user or current_user(request), who


def build_api(workspace: Workspace, serving: Serving) -> APIRouter:
    r = APIRouter(dependencies=[Depends(authorizer(workspace))])

    # Feedback and data -------------------------------------------------------------------------
    @r.post("/api/feedback", status_code=201)
    async def feedback(body: FeedbackRequest, request: Request):
        # like chat's `user`: an app in front of many people names who rated; else the signed-in user
        user, who = _rater(body, request)
        fid = await on_chat(serving.feedback, body.response_id, body.rating, body.correction,
                                      body.reason, user, current_user(request), who.role if who else None)
        return JSONResponse({"id": fid}, status_code=201)

    @r.post("/api/feedback/withdraw")
    async def withdraw_feedback(body: WithdrawRequest, request: Request):
        user, _ = _rater(body, request)
        return {"withdrawn": await on_chat(serving.withdraw_feedback, body.response_id, user,
                                                     current_user(request))}

    @r.get("/api/feedback")
    async def my_feedback(request: Request, domain: str | None = None):
        """Ratings: a user's own; an editor's or admin's, every one (of their domains)."""
        who = principal(request)
        rows = await on_control(workspace.feedback_list, domain)
        if who is not None and who.role == "user":
            rows = [f for f in rows if f["principal"] == who.name]
        elif who is not None and who.domains:
            rows = [f for f in rows if f["domain"] in who.domains]
        return rows

    @r.post("/api/domains", status_code=201)
    async def create_domain(body: DomainRequest, request: Request):
        d = await on_control(workspace.create_domain, body.name, body.system_prompt or "",
                                    body.description or "", body.trust_users)
        return JSONResponse(d, status_code=201)

    @r.get("/api/domains")
    async def list_domains(request: Request):
        return await on_control(workspace.list_domains)

    @r.post("/api/domains/{name}/examples", status_code=201)
    async def add_examples(name: str, body: ExamplesRequest, request: Request):
        user = current_user(request)
        res = await on_control(workspace.add_examples, name, body.examples, user)
        return JSONResponse(res, status_code=201)

    @r.get("/api/domains/{name}/dataset")
    async def dataset(name: str, request: Request):
        snap = await on_control(workspace.preview, name)
        return snap.report

    @r.get("/api/domains/{name}/dataset/export")
    async def export(name: str, request: Request):
        data, filename = await on_control(workspace.dataset_file, name)   # a GET writes nothing
        return Response(data, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    # Adapters ----------------------------------------------------------------------------------
    @r.get("/api/domains/{name}/adapters")
    async def adapters(name: str, request: Request):
        return await on_control(workspace.adapters, name)

    @r.post("/api/domains/{name}/adapters/{version}/activate")
    async def activate(name: str, version: str, request: Request, body: ActivateRequest | None = None):
        override = body.override if body is not None else False
        return await on_control(serving.activate, name, version, user=current_user(request), override=override)

    @r.post("/api/domains/{name}/adapters/{version}/canary")
    async def canary_start(name: str, version: str, request: Request, body: CanaryRequest | None = None):
        share = body.share if body is not None else None
        return await on_control(serving.start_canary, name, version, share, user=current_user(request))

    @r.get("/api/domains/{name}/canary")
    async def canary(name: str, request: Request):
        return await on_control(workspace.canary, name)

    @r.delete("/api/domains/{name}/canary")
    async def canary_stop(name: str, request: Request):
        return await on_control(serving.stop_canary, name, user=current_user(request))

    @r.post("/api/domains/{name}/adapters", status_code=201)
    async def import_adapter(name: str, request: Request):
        """Upload a zipped PEFT LoRA folder as the body (application/zip); ?activate=true to make it live."""
        data = await read_body(request, MAX_UPLOAD_BYTES)
        import tempfile
        with tempfile.NamedTemporaryFile(suffix=".zip", dir=workspace.settings.state_path) as f:
            f.write(data)
            f.flush()
            version = await on_control(serving.import_adapter, name, Path(f.name),
                                              activate=request.query_params.get("activate") == "true",
                                              user=current_user(request))
        return JSONResponse({"domain": name, "version": version}, status_code=201)

    # Training jobs -----------------------------------------------------------------------------
    @r.post("/api/domains/{name}/train", status_code=202)
    async def train(name: str, request: Request, body: dict[str, Any] | None = None):
        """Training settings (docs/API.md), checked by the Workspace: each wrong one is named."""
        job_id = await on_control(workspace.start_training, name, body or {})
        return JSONResponse({"job_id": job_id}, status_code=202)

    @r.get("/api/jobs/{job_id}")
    async def job(job_id: str, request: Request):
        return await on_control(workspace.job, job_id)

    @r.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str, request: Request):
        return await on_control(workspace.cancel_job, job_id)

    @r.post("/api/jobs/{job_id}/retry", status_code=202)
    async def retry(job_id: str, request: Request):
        """Retry a failed job from evaluation (its trained adapter was kept)."""
        return JSONResponse(await on_control(workspace.retry_job, job_id), status_code=202)

    @r.get("/api/health")
    async def health(request: Request):
        """Public: a bare "ok" for load balancers; the base model's details for signed-in callers; `control`
        true for a caller holding this server's control token (how jobs and the CLI know it is the server
        their server file names)."""
        credentials = request.app.state.credentials
        if credentials.enabled and current_user(request) is None:
            return {"status": "ok"}
        body = {"status": "ok", **serving.status()}
        if credentials.is_control(request.headers):
            body["control"] = True
        return body

    @r.get("/health")
    async def probe(request: Request):
        """Public, for probes (Kubernetes, LiteLLM, load balancers): 200 {"status": "ok"} while the engine can
        answer, 503 {"status": "unavailable"} while it cannot (e.g. its vLLM server restarting)."""
        if serving.status()["engine"]["ready"]:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    # Monitoring --------------------------------------------------------------------------------
    @r.get("/api/domains/{name}/metrics")
    async def metrics(name: str, request: Request):
        return await on_control(workspace.metrics, name)

    add_openai_routes(r, serving)
    add_embedding_routes(r, workspace)
    add_responses_routes(r, serving)
    add_people_routes(r, workspace)

    @r.get("/metrics")
    async def prometheus(request: Request):
        text = await on_control(workspace.prometheus_text)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    @r.api_route("/v1/{rest:path}", methods=methods, include_in_schema=False)
    @r.api_route("/api/{rest:path}", methods=methods, include_in_schema=False)
    async def unknown(rest: str, request: Request):
        """OpenAI's 404 for an unknown route, 405 (with Allow) for a known route and another method."""
        allowed = set()
        for route in _routes(r):
            if getattr(route, "endpoint", None) is not unknown and route.matches(request.scope)[0] == Match.PARTIAL:
                allowed |= getattr(route, "methods", set())
        if allowed:
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}: use "
                                   f"{', '.join(sorted(allowed))}")
        raise NotFound(f"no route {request.method} {request.url.path}: docs/API.md lists them (/api/docs)")

    return r


def _routes(router):
    """Every route of a router, through the routers it includes."""
    for route in router.routes:
        inner = getattr(route, "original_router", None)
        yield from (_routes(inner) if inner is not None else (route,))


def _path_sent(body, loc, missing: bool) -> str:
    """The field a validation error is about, as sent (messages[0].content), without pydantic's union tags."""
    out, data = "", body
    for i, key in enumerate(loc):
        if isinstance(data, dict) and key in data:
            out, data = (f"{out}.{key}" if out else str(key)), data[key]
        elif isinstance(data, list) and isinstance(key, int) and key < len(data):
            out, data = f"{out}[{key}]", data[key]
        else:
            if missing and i == len(loc) - 1:
                out = f"{out}.{key}" if out else str(key)
            break
    return out


def validation_error(e: RequestValidationError) -> AssistantError:
    """A pydantic error as one message naming the field that was sent."""
    err = e.errors()[0]
    loc = tuple(err.get("loc", ()))
    if loc[:1] == ("body",):
        loc = loc[1:]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return AssistantError(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return AssistantError("the body must be a JSON object")
    body = getattr(e, "body", None)
    where = _path_sent(body, loc, kind == "missing") or ".".join(map(str, loc)) or "body"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        msg = "this field is not supported here (docs/API.md lists the supported ones)"
    return AssistantError(f"{where}: {msg}", param=where)


class BodyGuard:
    """POST/PUT/PATCH under /v1/ and /api/: JSON only (415 otherwise: a page on another site can post a
    form as text/plain, never as application/json without the browser asking first), and at most
    MAX_REQUEST_BYTES (413). The adapter upload takes its zip as the body and caps it itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH")
                or not scope.get("path", "").startswith(GUARDED) or UPLOAD_PATH.match(scope.get("path", ""))):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        problem = None
        if media and media != "application/json" and not media.endswith("+json"):
            problem = UnsupportedMediaType(f"the body must be JSON, sent as Content-Type: application/json "
                                           f"(not {media[:60]})")
        declared = headers.get("content-length", "")
        if problem is None and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
            problem = TooLarge(f"the request body is {int(declared)} bytes; the limit is {MAX_REQUEST_BYTES}")
        chunks, size, more = [], 0, problem is None
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_REQUEST_BYTES:
                problem = TooLarge(f"the request body is over the limit of {MAX_REQUEST_BYTES} bytes")
                break
        if problem is not None:
            body = json.dumps(error_body(problem.message, "invalid_request_error", problem.code)).encode()
            await send({"type": "http.response.start", "status": problem.status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        whole, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)


def install_error_handlers(app: FastAPI) -> None:
    """Errors become JSON messages at the edge: a domain error says what to do; anything else is logged with
    its traceback and the client sees no exception text and no server path."""

    @app.exception_handler(AssistantError)
    async def on_error(request: Request, e: AssistantError):
        if e.status >= 500:
            log.error("%s %s -> %d %s: %s", request.method, request.url.path, e.status, e.code, e.message)
        return error_response(e)

    app.add_middleware(BodyGuard)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        body = getattr(e, "body", None)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            request.state.model = body["model"]   # the access log names it (api/access.py)
        return error_response(validation_error(e))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, e: HTTPException):   # Starlette's own 404/405 (e.g. /api/docs/x)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind, None), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body("the server failed on this request (the error is in the server log): retry, "
                                       "and tell the operator if it persists", "server_error", "internal_error"),
                            status_code=500)
