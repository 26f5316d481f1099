"""The OpenAI-compatible routes: models, chat completions and legacy completions (docs/API.md). Bodies are
the pydantic models of api/openai_schema.py; each route calls the Serving and shapes its answers as OpenAI
does: n choices, logprobs, tool calls, streamed (server-sent events) or not."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from assistant.api.executors import on_chat
from assistant.api.openai_schema import ChatRequest, CompletionRequest
from assistant.engine.toolcalls import parse_auto, parse_constrained
from assistant.errors import ModelNotFound, SlotsBusy
from assistant.serving import ADAPTER_SLOT_WAIT_S, LOG_WAIT_S, Serving

DISCONNECT_POLL_S = 0.2
SLOT_RETRY_S = 0.05            # how often a request waiting for an adapter slot tries again
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def add_openai_routes(r: APIRouter, serving: Serving) -> None:

    @r.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": serving.models()}

    @r.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        found = [m for m in await on_chat(serving.models) if m["id"] == model_id]
        if not found:
            raise ModelNotFound(f"the model {model_id!r} does not exist: GET /v1/models lists them")
        return found[0]

    @r.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        limit, _ = body.token_limit
        tools = [t.model_dump() for t in body.tools] if body.tools else None
        choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
        fmt = body.response_format.model_dump(by_alias=True) if body.response_format is not None else None
        calls = await _start(serving, request, body, messages=[m.plain() for m in body.messages], tools=tools,
                             tool_choice=choice, response_format=fmt, max_tokens=limit,
                             logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        shape = {"one_call": body.legacy_functions or body.parallel_tool_calls is False,
                 "legacy": body.legacy_functions}
        if body.stream:
            firsts = await _first_events(calls)
            return StreamingResponse(_stream_chat(serving, calls, body.usage_options, firsts, shape),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        results = await _collect(calls, request)
        if results is None:
            return Response(status_code=499)
        choices = []
        for i, (call, (text, reason, lps)) in enumerate(zip(calls, results)):
            message, reason = _message(call, text, reason, **shape)
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": {"content": _chat_logprobs(serving, lps)} if body.logprobs else None})
        head = calls[0]
        return {"id": head.id, "object": "chat.completion", "created": head.created, "model": head.target.model,
                "system_fingerprint": head.target.version or "base", "adapter_version": head.target.version,
                "choices": choices, "usage": _usage(calls)}

    @r.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        calls = []
        for p in body.prompts:
            calls += await _start(serving, request, body, prompt=p, max_tokens=body.max_tokens,
                                  logprobs=body.logprobs)
        echo = {c.id: (c.messages[0]["content"] if body.echo else "") for c in calls}   # the prompt's text
        if body.stream:
            firsts = await _first_events(calls)
            return StreamingResponse(_stream_text(serving, calls, echo, body.logprobs is not None, body.usage_options,
                                                  firsts),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        results = await _collect(calls, request)
        if results is None:
            return Response(status_code=499)
        choices = [{"index": i, "text": echo[c.id] + text, "finish_reason": reason,
                    "logprobs": _text_logprobs(serving, lps, len(echo[c.id])) if body.logprobs is not None else None}
                   for i, (c, (text, reason, lps)) in enumerate(zip(calls, results))]
        head = calls[0]
        return {"id": head.id, "object": "text_completion", "created": head.created, "model": head.target.model,
                "system_fingerprint": head.target.version or "base", "choices": choices, "usage": _usage(calls)}


async def _start(serving: Serving, request: Request, body, **kw) -> list:
    """The request's answers, queued; waiting for an adapter slot happens here, asleep, not in a thread."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ADAPTER_SLOT_WAIT_S
    user = getattr(body, "end_user", body.user) or getattr(request.state, "user", None)
    request.state.model = body.model      # for the access log (api/access.py), as are the tokens below
    while True:
        try:
            calls = await on_chat(serving.start_choices, body.model, loop=loop, user=user, slot_wait_s=0,
                                            principal=getattr(request.state, "user", None),   # who authenticated
                                            **{**body.sampling(), **kw})
            break
        except SlotsBusy:
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(SLOT_RETRY_S)
    state = request.state
    state.answers = [*getattr(state, "answers", ()), *calls]       # a legacy completion starts one per prompt
    state.tokens = lambda: _usage(state.answers)["total_tokens"]    # read when the line is written: a stream's end
    asyncio.create_task(_watch_disconnect(calls, request))
    return calls


async def _watch_disconnect(calls, request: Request):
    """Cancel generation when the client goes away, even while the response is blocked in send(). The
    engine then ends the requests with finish_reason "cancelled". (Checked here, a few times a second, not
    once per token in the stream: that would take the GIL from the decode loop.)"""
    while not all(c.handle.done.is_set() for c in calls):
        await asyncio.sleep(DISCONNECT_POLL_S)
        if await request.is_disconnected():
            for c in calls:
                c.handle.cancel()
            return


async def _first_events(calls) -> list:
    """Each answer's first event, before a stream's status is sent: a request refused while it waited for
    the model (503 server_busy past the queue time) answers with that status, not a 200 and an error chunk."""
    firsts = [await c.handle.aq.get() for c in calls]
    for c, ev in zip(calls, firsts):
        if ev.kind == "error":
            for other in calls:
                other.handle.cancel()
            await on_chat(c.logged_event.wait, LOG_WAIT_S)
            raise ev.error
    return firsts


async def _events(calls, firsts=None):
    """(choice index, event) of every answer, as they come (after `firsts`, already taken, when given)."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, call):
        if firsts is not None:
            await q.put((i, firsts[i]))
            if firsts[i].kind != "token":
                return
        async for ev in call.handle.aiter():
            await q.put((i, ev))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(calls)]
    try:
        left = len(calls)
        while left:
            i, ev = await q.get()
            if ev.kind != "token":
                left -= 1
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()


async def _collect(calls, request: Request):
    """[(text, finish_reason, token logprobs)] per answer; None when the client went away."""
    parts = [[] for _ in calls]
    lps = [[] for _ in calls]
    reasons = [None] * len(calls)
    try:
        async for i, ev in _events(calls):
            if ev.kind == "token":
                parts[i].append(ev.text)
                lps[i] += ev.logprobs or []
            elif ev.kind == "error":
                await on_chat(calls[i].logged_event.wait, LOG_WAIT_S)   # logged before it is told
                raise ev.error
            else:
                reasons[i] = ev.finish_reason
        if "cancelled" in reasons and await request.is_disconnected():
            return None
    finally:
        for c in calls:
            c.handle.cancel()
    for c in calls:
        await on_chat(c.logged_event.wait, LOG_WAIT_S)  # feedback may follow at once
    return [("".join(p), r, lp) for p, r, lp in zip(parts, reasons, lps)]


def _message(call, text: str, reason: str, *, one_call: bool = False, legacy: bool = False) -> tuple[dict, str]:
    """The assistant message of an answer, with tool calls parsed out of it when tools were offered.
    `one_call`: the first call only (`parallel_tool_calls: false`); `legacy`: the request offered
    `functions`, so its call is `function_call` and the finish_reason "function_call", as OpenAI answers."""
    calls = []
    content = text
    if call.tools == "call":
        calls, content = parse_constrained(text), None
        content = None if calls else text
    elif call.tools == "auto":
        content, calls = parse_auto(text, set(call.tool_names))
    message = {"role": "assistant", "content": content}
    if calls and legacy:
        message["function_call"] = calls[0]["function"]
        reason = "function_call" if reason == "stop" else reason
    elif calls:
        message["tool_calls"] = calls[:1] if one_call else calls
        reason = "tool_calls" if reason == "stop" else reason
    return message, reason


NO_DETAILS = {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
              "rejected_prediction_tokens": 0}   # the model cannot reason, hear, or take a predicted output


def _usage(calls, generated: list[int] | None = None) -> dict:
    """The request's usage; `generated`: each answer's ids so far (while streaming), else all of them."""
    n = sum(len(c.handle.req.generated) for c in calls) if generated is None else sum(generated)
    prompt = sum(c.prompt_tokens for c in calls if c.index == 0)   # a prompt is read once for its n answers
    cached = sum(c.handle.req.cached_tokens for c in calls if c.index == 0)
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": dict(NO_DETAILS)}


def _chat_logprobs(serving: Serving, lps) -> list[dict]:
    texts = serving.token_texts({i for t in lps for i in [t.id, *(j for j, _ in t.top)]})

    def entry(i, lp):
        s = texts[i]
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return [{**entry(t.id, t.logprob), "top_logprobs": [entry(j, v) for j, v in t.top]} for t in lps]


def _text_logprobs(serving: Serving, lps, offset: int) -> dict:
    texts = serving.token_texts({i for t in lps for i in [t.id, *(j for j, _ in t.top)]})
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in lps:
        out["tokens"].append(texts[t.id])
        out["token_logprobs"].append(t.logprob)
        # the chosen token and the `logprobs` most likely ones (up to logprobs + 1, as OpenAI and vLLM send)
        out["top_logprobs"].append({texts[t.id]: t.logprob, **{texts[j]: v for j, v in t.top}})
        out["text_offset"].append(offset)
        offset += len(texts[t.id])
    return out


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _chunk(call, delta: dict, index: int = 0, finish_reason=None, logprobs=None) -> dict:
    return {"id": call.id, "object": "chat.completion.chunk", "created": call.created, "model": call.target.model,
            "system_fingerprint": call.target.version or "base",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]}


def _token_chunks(call, index: int = 0):
    """text -> the SSE line of a token, equal to `_sse(_chunk(call, {"content": text}, index))`: the fields that
    never change within a response are serialized once, not once per token."""
    head = _sse(_chunk(call, {"content": ""}, index))
    before, after = head.split('"delta": {"content": ""}', 1)
    before += '"delta": {"content": '
    after = "}" + after
    return lambda text: before + json.dumps(text, ensure_ascii=False) + after


async def _stream_chat(serving: Serving, calls, usage_options: tuple[bool, bool], firsts, shape: dict):
    """Chat chunks: a role chunk per choice, content deltas as they come (an answer that may carry tool calls
    is held until it ends, then sent as one tool_calls delta, as parsing needs the whole answer; one
    function_call delta for a legacy `functions` request), a finish chunk per choice, the usage chunk when
    asked, and [DONE]. `usage_options`: (include_usage, continuous_usage_stats: every chunk carries the
    usage so far)."""
    head = calls[0]
    held = [[] for _ in calls]
    include_usage, continuous = usage_options
    so_far = [0] * len(calls)
    token = [_token_chunks(head, i) for i in range(len(calls))]

    def sse(delta: dict, i: int, **kw) -> str:
        body = _chunk(head, delta, i, **kw)
        if continuous:
            body["usage"] = _usage(calls, so_far)
        return _sse(body)
    try:
        for i, _ in enumerate(calls):
            yield sse({"role": "assistant", "content": ""}, i)
        async for i, ev in _events(calls, firsts):
            call = calls[i]
            if ev.kind == "token":
                so_far[i] = max(so_far[i], ev.generated)
                if not call.tools and not ev.logprobs and not continuous:
                    yield token[i](ev.text)
                    continue
                lp = {"content": _chat_logprobs(serving, ev.logprobs)} if ev.logprobs else None
                if call.tools:
                    held[i].append(ev.text)
                if not call.tools or lp:
                    yield sse({} if call.tools else {"content": ev.text}, i, logprobs=lp)
                continue
            await on_chat(call.logged_event.wait, LOG_WAIT_S)   # ended, so logged: feedback may follow
            if ev.kind == "error":
                yield _sse(error_body(ev.error.message, "server_error", ev.error.code))
                break
            so_far[i] = len(call.handle.req.generated)
            reason = ev.finish_reason
            if call.tools:
                message, reason = _message(call, "".join(held[i]), reason, **shape)
                if message.get("function_call"):
                    yield sse({"function_call": message["function_call"]}, i)
                elif message.get("tool_calls"):
                    yield sse({"tool_calls": [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]}, i)
                elif message["content"]:
                    yield sse({"content": message["content"]}, i)
            yield sse({}, i, finish_reason=reason)
        else:
            if include_usage:
                yield _usage_chunk(head, "chat.completion.chunk", calls)
        yield "data: [DONE]\n\n"
    finally:
        for c in calls:
            c.handle.cancel()  # a client that went away stops generation at the next step


def _usage_chunk(head, kind: str, calls) -> str:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the request's usage."""
    return _sse({"id": head.id, "object": kind, "created": head.created, "model": head.target.model,
                 "choices": [], "usage": _usage(calls)})


async def _stream_text(serving: Serving, calls, echo: dict, with_logprobs: bool, usage_options: tuple[bool, bool],
                       firsts):
    head = calls[0]
    include_usage, continuous = usage_options
    so_far = [0] * len(calls)

    def chunk(i, text, reason=None, lps=None, offset=0):
        lp = _text_logprobs(serving, lps or [], offset) if with_logprobs else None
        body = {"id": head.id, "object": "text_completion", "created": head.created, "model": head.target.model,
                "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": lp}]}
        if continuous:
            body["usage"] = _usage(calls, so_far)
        return _sse(body)
    offsets = [len(echo[c.id]) for c in calls]
    try:
        for i, c in enumerate(calls):
            if echo[c.id]:
                yield chunk(i, echo[c.id])
        async for i, ev in _events(calls, firsts):
            if ev.kind == "token":
                so_far[i] = max(so_far[i], ev.generated)
                yield chunk(i, ev.text, lps=ev.logprobs, offset=offsets[i])
                offsets[i] += len(ev.text)
                continue
            await on_chat(calls[i].logged_event.wait, LOG_WAIT_S)
            if ev.kind == "error":
                yield _sse(error_body(ev.error.message, "server_error", ev.error.code))
                break
            so_far[i] = len(calls[i].handle.req.generated)
            yield chunk(i, "", ev.finish_reason)
        else:
            if include_usage:
                yield _usage_chunk(head, "text_completion", calls)
        yield "data: [DONE]\n\n"
    finally:
        for c in calls:
            c.handle.cancel()
