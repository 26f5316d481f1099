"""HTTP routes: the OpenAI-compatible endpoints and the REST API (docs/API.md). Each route only parses,
calls the Workspace or the Serving, and turns domain errors into JSON errors. Authorization is not checked here: every
request has passed `auth.AuthMiddleware` before it reaches a route."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import AssistantError, SlotsBusy, TooLarge
from .serving import ADAPTER_SLOT_WAIT_S, LOG_WAIT_S, Serving
from .settings import MAX_REQUEST_BYTES, MAX_UPLOAD_BYTES
from .workspace import Workspace

DISCONNECT_POLL_S = 0.2
SLOT_RETRY_S = 0.05            # how often a request waiting for an adapter slot tries again
RETRY_AFTER_S = 2              # the Retry-After a 503 suggests

log = logging.getLogger(__name__)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e: AssistantError) -> JSONResponse:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    if e.status == 404:
        kind = "not_found_error" if e.code != "model_not_found" else "invalid_request_error"
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
    return JSONResponse(error_body(e.message, kind, e.code, e.param), status_code=e.status, headers=headers)


def current_user(request: Request) -> str | None:
    """The user the auth middleware let in (None when the app is open)."""
    return getattr(request.state, "user", None)


async def read_json(request: Request, limit: int = MAX_REQUEST_BYTES) -> dict:
    body = await read_body(request, limit)
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise AssistantError(f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AssistantError("the body must be a JSON object")
    return data


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


TYPE_NAMES = {bool: "true or false", int: "a whole number", dict: "an object", str: "text", list: "a list"}


def _opt(body: dict, key: str, kind, default=None):
    """body[key] when it is of `kind` (bools are not numbers), else an error naming the field."""
    v = body.get(key, default)
    if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
        raise AssistantError(f"{key} must be {TYPE_NAMES.get(kind, kind.__name__)}", param=key)
    return v


def build_api(workspace: Workspace, serving: Serving) -> APIRouter:
    r = APIRouter()

    # OpenAI-compatible -------------------------------------------------------------------------
    @r.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": serving.models()}

    @r.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        user = current_user(request)
        body = await read_json(request)
        if _opt(body, "n", int, 1) != 1:
            raise AssistantError("n must be 1: one answer per request", param="n")
        stream = _opt(body, "stream", bool, False)
        options = _opt(body, "stream_options", dict, {}) or {}
        include_usage = bool(options.get("include_usage")) if stream else False
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise AssistantError("max_tokens must be a whole number", param="max_tokens")
        for key in ("temperature", "top_p"):
            value = body.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise AssistantError(f"{key} must be a finite number", param=key)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or abs(seed) >= 2 ** 63):
            raise AssistantError("seed must be a whole number (64-bit)", param="seed")
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
            raise AssistantError("stop must be a string or a list of strings", param="stop")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ADAPTER_SLOT_WAIT_S
        while True:   # waiting for an adapter slot happens here, asleep, not in a worker thread
            try:
                call = await asyncio.to_thread(
                    serving.start_chat, ignore_eos=body.get("ignore_eos") is True, model=body.get("model"),
                    messages=body.get("messages"), max_tokens=max_tokens,
                    temperature=body.get("temperature"), top_p=body.get("top_p"), seed=seed, stop=body.get("stop"),
                    loop=loop, user=body.get("user") if isinstance(body.get("user"), str) else user, slot_wait_s=0)
                break
            except SlotsBusy:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(SLOT_RETRY_S)
        asyncio.create_task(_watch_disconnect(call, request))
        if stream:
            return StreamingResponse(_stream(call, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(call, request)

    # Feedback and data -------------------------------------------------------------------------
    @r.post("/api/feedback", status_code=201)
    async def feedback(request: Request):
        body = await read_json(request)
        rid = body.get("response_id")
        if not isinstance(rid, str) or not rid:
            raise AssistantError("response_id is required", param="response_id")
        # like chat's `user`: an app in front of many people names who rated; else the signed-in user
        user = _opt(body, "user", str) or current_user(request)
        fid = await asyncio.to_thread(serving.feedback, rid, body.get("rating"), body.get("correction"),
                                      body.get("reason"), user)
        return JSONResponse({"id": fid}, status_code=201)

    @r.post("/api/feedback/withdraw")
    async def withdraw_feedback(request: Request):
        body = await read_json(request)
        rid = body.get("response_id")
        if not isinstance(rid, str) or not rid:
            raise AssistantError("response_id is required", param="response_id")
        user = _opt(body, "user", str) or current_user(request)
        return {"withdrawn": await asyncio.to_thread(serving.withdraw_feedback, rid, user)}

    @r.post("/api/domains", status_code=201)
    async def create_domain(request: Request):
        body = await read_json(request)
        d = await asyncio.to_thread(workspace.create_domain, body.get("name"), body.get("system_prompt", ""),
                                    body.get("description", ""))
        return JSONResponse(d, status_code=201)

    @r.get("/api/domains")
    async def list_domains(request: Request):
        return await asyncio.to_thread(workspace.list_domains)

    @r.post("/api/domains/{name}/examples", status_code=201)
    async def add_examples(name: str, request: Request):
        user = current_user(request)
        body = await read_json(request)
        res = await asyncio.to_thread(workspace.add_examples, name, body.get("examples"), user)
        return JSONResponse(res, status_code=201)

    @r.get("/api/domains/{name}/dataset")
    async def dataset(name: str, request: Request):
        snap = await asyncio.to_thread(workspace.preview, name)
        return snap.report

    @r.get("/api/domains/{name}/dataset/export")
    async def export(name: str, request: Request):
        data, filename = await asyncio.to_thread(workspace.dataset_file, name)   # a GET writes nothing
        return Response(data, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    # Adapters ----------------------------------------------------------------------------------
    @r.get("/api/domains/{name}/adapters")
    async def adapters(name: str, request: Request):
        return await asyncio.to_thread(workspace.adapters, name)

    @r.post("/api/domains/{name}/adapters/{version}/activate")
    async def activate(name: str, version: str, request: Request):
        body = await read_json(request)
        override = _opt(body, "override", bool, False)
        return await asyncio.to_thread(serving.activate, name, version, user=current_user(request), override=override)

    @r.post("/api/domains/{name}/adapters", status_code=201)
    async def import_adapter(name: str, request: Request):
        """Upload a zipped PEFT LoRA folder as the body (application/zip); ?activate=true to make it live."""
        data = await read_body(request, MAX_UPLOAD_BYTES)
        import tempfile
        with tempfile.NamedTemporaryFile(suffix=".zip", dir=workspace.settings.state_path) as f:
            f.write(data)
            f.flush()
            version = await asyncio.to_thread(serving.import_adapter, name, Path(f.name),
                                              activate=request.query_params.get("activate") == "true")
        return JSONResponse({"domain": name, "version": version}, status_code=201)

    # Training jobs -----------------------------------------------------------------------------
    @r.post("/api/domains/{name}/train", status_code=202)
    async def train(name: str, request: Request):
        body = await read_json(request)
        job_id = await asyncio.to_thread(workspace.start_training, name, body)
        return JSONResponse({"job_id": job_id}, status_code=202)

    @r.get("/api/jobs/{job_id}")
    async def job(job_id: str, request: Request):
        return await asyncio.to_thread(workspace.job, job_id)

    @r.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str, request: Request):
        return await asyncio.to_thread(workspace.cancel_job, job_id)

    @r.get("/api/health")
    async def health(request: Request):
        """Public: a bare "ok" for load balancers; the base model's details for signed-in callers."""
        if request.app.state.credentials.enabled and current_user(request) is None:
            return {"status": "ok"}
        return {"status": "ok", **serving.status()}

    # Monitoring --------------------------------------------------------------------------------
    @r.get("/api/domains/{name}/metrics")
    async def metrics(name: str, request: Request):
        return await asyncio.to_thread(workspace.metrics, name)

    @r.get("/metrics")
    async def prometheus(request: Request):
        text = await asyncio.to_thread(workspace.prometheus_text)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return r


def _chunk(call, delta: dict, finish_reason=None, usage=None) -> str:
    body = {"id": call.id, "object": "chat.completion.chunk", "created": call.created, "model": call.target.model,
            "system_fingerprint": call.target.version or "base",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _token_chunks(call):
    """text -> the SSE line of a token, equal to `_chunk(call, {"content": text})`: the fields that never
    change within a response are serialized once, not once per token."""
    head = _chunk(call, {"content": ""})
    before, after = head.split('"delta": {"content": ""}', 1)
    before += '"delta": {"content": '
    after = "}" + after
    return lambda text: before + json.dumps(text, ensure_ascii=False) + after


def _usage(call) -> dict:
    n = len(call.handle.req.generated)
    return {"prompt_tokens": call.prompt_tokens, "completion_tokens": n, "total_tokens": call.prompt_tokens + n}


async def _watch_disconnect(call, request: Request):
    """Cancel generation when the client goes away, even while the response is blocked in send(). The
    engine then ends the request with finish_reason "cancelled". (Checked here, a few times a second, not
    once per token in the stream: that would take the GIL from the decode loop.)"""
    while not call.handle.done.is_set():
        await asyncio.sleep(DISCONNECT_POLL_S)
        if await request.is_disconnected():
            call.handle.cancel()
            return


async def _stream(call, include_usage: bool):
    try:
        yield _chunk(call, {"role": "assistant", "content": ""})
        token = _token_chunks(call)
        async for ev in call.handle.aiter():
            if ev.kind == "token":
                yield token(ev.text)
                continue
            await asyncio.to_thread(call.logged_event.wait, LOG_WAIT_S)   # ended, so logged: feedback may follow
            if ev.kind == "error":
                yield f"data: {json.dumps(error_body(ev.error.message, 'server_error', ev.error.code))}\n\n"
                break
            else:
                yield _chunk(call, {}, finish_reason=ev.finish_reason)
                if include_usage:
                    body = {"id": call.id, "object": "chat.completion.chunk", "created": call.created,
                            "model": call.target.model, "choices": [], "usage": _usage(call)}
                    yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        call.handle.cancel()  # a client that went away stops generation at the next step


async def _complete(call, request: Request):
    parts = []

    async def collect():
        async for ev in call.handle.aiter():
            if ev.kind == "token":
                parts.append(ev.text)
            elif ev.kind == "error":
                await asyncio.to_thread(call.logged_event.wait, LOG_WAIT_S)   # an error is logged before it is told
                raise ev.error
            else:
                return ev.finish_reason

    try:
        reason = await collect()
        if reason == "cancelled" and await request.is_disconnected():  # the client went away
            return Response(status_code=499)
    finally:
        call.handle.cancel()
    await asyncio.to_thread(call.logged_event.wait, LOG_WAIT_S)  # feedback may follow at once
    return {"id": call.id, "object": "chat.completion", "created": call.created, "model": call.target.model,
            "system_fingerprint": call.target.version or "base", "adapter_version": call.target.version,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": reason, "logprobs": None}],
            "usage": _usage(call)}


def install_error_handlers(app: FastAPI) -> None:
    """Errors become JSON messages at the edge: a domain error says what to do; anything else is logged with
    its traceback and the client sees no exception text and no server path."""

    @app.exception_handler(AssistantError)
    async def on_error(request: Request, e: AssistantError):
        if e.status >= 500:
            log.error("%s %s -> %d %s: %s", request.method, request.url.path, e.status, e.code, e.message)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        where = ", ".join(".".join(str(x) for x in err.get("loc", ())) for err in e.errors()[:3])
        return JSONResponse(error_body(f"invalid request at {where}: check the field's type and value"),
                            status_code=422)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body("the server failed on this request (the error is in the server log): retry, "
                                       "and tell the operator if it persists", "server_error", "internal_error"),
                            status_code=500)
