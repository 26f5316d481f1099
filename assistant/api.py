"""HTTP routes: the OpenAI-compatible endpoints and the REST API of API.md. Each route only parses,
checks authorization, calls the Service, and turns domain errors into JSON errors."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import AssistantError
from .registry import check_name, check_version
from .settings import MAX_REQUEST_BYTES, MAX_UPLOAD_BYTES

DISCONNECT_POLL_S = 0.2
LOG_WAIT_S = 10.0


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e: AssistantError) -> JSONResponse:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    if e.status == 404:
        kind = "not_found_error" if e.code != "model_not_found" else "invalid_request_error"
    return JSONResponse(error_body(e.message, kind, e.code, e.param), status_code=e.status)


class Unauthorized(AssistantError):
    status = 401
    code = "invalid_api_key"


def check_auth(request: Request) -> str | None:
    """Authorization for the API: `Bearer <api key>` or HTTP Basic with one of the --auth users.
    Open only when neither --api-key nor --auth is set. Returns the user name (or None)."""
    settings = request.app.state.service.settings
    if not settings.api_key and not settings.auth:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and settings.api_key and hmac.compare_digest(value.strip(), settings.api_key):
        return "api-key"
    if scheme.lower() == "basic" and settings.auth:
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            user = password = ""
        for u, p in settings.auth:
            if hmac.compare_digest(user, u) and hmac.compare_digest(password, p):
                return user
    raise Unauthorized("missing or wrong credentials: send 'Authorization: Bearer <api key>' "
                       "(or HTTP Basic with a --auth user)")


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


class TooLarge(AssistantError):
    status = 413
    code = "request_too_large"


def _opt(body: dict, key: str, types, default=None):
    v = body.get(key, default)
    if v is not None and not isinstance(v, types):
        raise AssistantError(f"{key} has the wrong type", param=key)
    return v


def build_api(service) -> APIRouter:
    r = APIRouter()

    def svc(request: Request):
        return request.app.state.service

    # OpenAI-compatible -------------------------------------------------------------------------
    @r.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": service.models()}

    @r.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        user = check_auth(request)
        body = await read_json(request)
        if _opt(body, "n", int, 1) != 1:
            raise AssistantError("only n=1 is supported", param="n")
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise AssistantError("max_tokens must be an integer", param="max_tokens")
        for key in ("temperature", "top_p"):
            if body.get(key) is not None and (isinstance(body[key], bool) or not isinstance(body[key], (int, float))):
                raise AssistantError(f"{key} must be a number", param=key)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise AssistantError("seed must be an integer", param="seed")
        loop = asyncio.get_running_loop()
        call = await asyncio.to_thread(
            service.start_chat, ignore_eos=body.get("ignore_eos") is True, model=body.get("model"),
            messages=body.get("messages"), max_tokens=max_tokens,
            temperature=body.get("temperature"), top_p=body.get("top_p"), seed=seed, stop=body.get("stop"),
            loop=loop, user=body.get("user") if isinstance(body.get("user"), str) else user)
        asyncio.create_task(_watch_disconnect(call, request))
        if stream:
            return StreamingResponse(_stream(call, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(call, request)

    # Feedback and data -------------------------------------------------------------------------
    @r.post("/api/feedback", status_code=201)
    async def feedback(request: Request):
        user = check_auth(request)
        body = await read_json(request)
        rid = body.get("response_id")
        if not isinstance(rid, str) or not rid:
            raise AssistantError("response_id is required", param="response_id")
        fid = await asyncio.to_thread(service.feedback, rid, body.get("rating"), body.get("correction"),
                                      body.get("reason"), user)
        return JSONResponse({"id": fid}, status_code=201)

    @r.post("/api/domains", status_code=201)
    async def create_domain(request: Request):
        check_auth(request)
        body = await read_json(request)
        d = await asyncio.to_thread(service.create_domain, body.get("name"), body.get("system_prompt", ""),
                                    body.get("description", ""))
        return JSONResponse(d, status_code=201)

    @r.get("/api/domains")
    async def list_domains(request: Request):
        check_auth(request)
        return await asyncio.to_thread(service.list_domains)

    @r.post("/api/domains/{name}/examples", status_code=201)
    async def add_examples(name: str, request: Request):
        user = check_auth(request)
        check_name(name)
        body = await read_json(request)
        res = await asyncio.to_thread(service.add_examples, name, body.get("examples"), user)
        return JSONResponse(res, status_code=201)

    @r.get("/api/domains/{name}/dataset")
    async def dataset(name: str, request: Request):
        check_auth(request)
        check_name(name)
        snap = await asyncio.to_thread(service.curate, name)
        return snap.report

    @r.get("/api/domains/{name}/dataset/export")
    async def export(name: str, request: Request):
        check_auth(request)
        check_name(name)
        snap = await asyncio.to_thread(service.curate, name)
        return Response(Path(snap.path).read_bytes(), media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{name}-{snap.hash[:12]}.jsonl"'})

    # Adapters ----------------------------------------------------------------------------------
    @r.get("/api/domains/{name}/adapters")
    async def adapters(name: str, request: Request):
        check_auth(request)
        check_name(name)
        return await asyncio.to_thread(service.adapters, name)

    @r.post("/api/domains/{name}/adapters/{version}/activate")
    async def activate(name: str, version: str, request: Request):
        check_auth(request)
        check_name(name)
        check_version(version)
        return await asyncio.to_thread(service.activate, name, version)

    @r.post("/api/domains/{name}/adapters", status_code=201)
    async def import_adapter(name: str, request: Request):
        """Upload a zipped PEFT LoRA folder as the body (application/zip); ?activate=true to make it live."""
        check_auth(request)
        check_name(name)
        data = await read_body(request, MAX_UPLOAD_BYTES)
        import tempfile
        with tempfile.NamedTemporaryFile(suffix=".zip", dir=service.settings.state_path) as f:
            f.write(data)
            f.flush()
            version = await asyncio.to_thread(service.import_adapter, name, Path(f.name),
                                              activate=request.query_params.get("activate") == "true")
        return JSONResponse({"domain": name, "version": version}, status_code=201)

    # Training jobs -----------------------------------------------------------------------------
    @r.post("/api/domains/{name}/train", status_code=202)
    async def train(name: str, request: Request):
        check_auth(request)
        check_name(name)
        body = await read_json(request)
        job_id = await asyncio.to_thread(service.start_training, name, body)
        return JSONResponse({"job_id": job_id}, status_code=202)

    @r.get("/api/jobs/{job_id}")
    async def job(job_id: str, request: Request):
        check_auth(request)
        return await asyncio.to_thread(service.job, job_id)

    @r.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str, request: Request):
        check_auth(request)
        return await asyncio.to_thread(service.cancel_job, job_id)

    @r.get("/api/health")
    async def health():
        return {"status": "ok", **service.status()}

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
            elif ev.kind == "error":
                yield f"data: {json.dumps(error_body(ev.error.message, 'server_error', ev.error.code))}\n\n"
                break
            else:
                await asyncio.to_thread(call.logged_event.wait, LOG_WAIT_S)
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


def build_app(service, *, with_ui: bool = True) -> FastAPI:
    """The one FastAPI app: the API routes, and the Gradio UI mounted at /."""
    app = FastAPI(title="domain-assistant", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.state.service = service

    @app.exception_handler(AssistantError)
    async def on_error(request: Request, e: AssistantError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        return JSONResponse(error_body(f"invalid request: {e.errors()[:3]}"), status_code=422)

    app.include_router(build_api(service))
    try:
        from .monitoring import build_metrics_routes
        app.include_router(build_metrics_routes(service))
    except ImportError:
        pass
    if with_ui:
        from .ui import mount_ui
        mount_ui(app, service)
    return app

