"""OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}` (docs/API.md).

A response is a chat answer asked another way: the request's input (after the conversation of its
`previous_response_id`) and instructions become chat turns, and the answer goes through the same Serving,
engine, grammar and response log as `/v1/chat/completions`, so it is rated, curated and trained on like any
chat answer, under its `resp_...` id. The answer comes back as output items (a message, function calls),
whole or as the Responses event stream (`response.created` ... `response.completed`). Stored responses
(`store`, on by default as at OpenAI) are kept in the database, readable and continuable by their owner.
"""

from __future__ import annotations

import json
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from assistant.api.executors import on_chat, on_control
from assistant.api.openai import SSE_HEADERS, _chat_logprobs, _collect, _events, _first_events, _message, _start
from assistant.api.openai import _usage as chat_usage
from assistant.api.people import principal
from assistant.api.responses_schema import ResponsesRequest, input_turns
from assistant.errors import AssistantError, NotFound
from assistant.serving import LOG_WAIT_S, Serving

ID_PREFIX = "resp_"


def add_responses_routes(r: APIRouter, serving: Serving) -> None:

    @r.post("/v1/responses")
    async def create(body: ResponsesRequest, request: Request):
        stored = serving.workspace.stored_responses
        history = []
        if body.previous_response_id is not None:
            history = (await on_control(_owned, stored, body.previous_response_id, request,
                                        "previous_response_id"))["conversation"]
        turns = history + input_turns(body.input)
        messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + turns
        calls = await _start(serving, request, body, messages=messages, tools=body.chat_tools(),
                             tool_choice=body.chat_tool_choice(), response_format=body.response_format(),
                             max_tokens=body.max_output_tokens, logprobs=body.logprobs, id_prefix=ID_PREFIX)
        call = calls[0]
        owner = getattr(request.state, "user", None)
        if body.stream:
            firsts = await _first_events(calls)
            return StreamingResponse(_stream(serving, stored, body, call, turns, owner, firsts),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        results = await _collect(calls, request)
        if results is None:
            return Response(status_code=499)
        text, reason, lps = results[0]
        message, reason = _message(call, text, reason)
        answer = _response(body, call, "completed", _items(serving, message, lps), reason)
        if body.store is not False:
            await on_control(stored.put, call.id, owner, turns + [_turn(message)], answer)
        return answer

    @r.get("/v1/responses/{response_id}")
    async def read(response_id: str, request: Request):
        return (await on_control(_owned, serving.workspace.stored_responses, response_id, request, "response_id"))["body"]

    @r.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, request: Request):
        stored = serving.workspace.stored_responses
        await on_control(_owned, stored, response_id, request, "response_id")
        await on_control(stored.delete, response_id)
        return {"id": response_id, "object": "response", "deleted": True}


def _owned(stored, response_id: str, request: Request, param: str) -> dict:
    """The stored response, when the caller made it (or is an admin); else NotFound, as if it did not exist."""
    found = stored.get(response_id)
    who = principal(request)
    if found is not None and who is not None and who.name is not None and who.role != "admin" \
            and found["owner"] != who.name:
        found = None
    if found is None:
        raise NotFound(f"no stored response {response_id[:80]!r}: responses are kept when sent with store "
                       "(the default), and only their owner reads them", param=param)
    return found


def _turn(message: dict) -> dict:
    """The answer as the chat turn a continuation sends back."""
    turn = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        turn["tool_calls"] = message["tool_calls"]
    return turn


def _items(serving: Serving, message: dict, lps, status: str = "completed") -> list[dict]:
    """The output items of an answer: its text as a message, then one function_call item per tool call."""
    items = []
    if message.get("content"):
        part = {"type": "output_text", "text": message["content"], "annotations": [],
                "logprobs": _chat_logprobs(serving, lps) if lps else []}
        items.append({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
                      "content": [part]})
    for tc in message.get("tool_calls") or []:
        items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": tc["id"],
                      "name": tc["function"]["name"], "arguments": tc["function"]["arguments"], "status": status})
    return items


def _usage(call) -> dict:
    """Chat's usage of the answer (api/openai.py counts it once), under the Responses API's names."""
    u = chat_usage([call])
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": u["prompt_tokens_details"],
            "output_tokens": u["completion_tokens"], "output_tokens_details": u["completion_tokens_details"],
            "total_tokens": u["total_tokens"]}


def _response(body: ResponsesRequest, call, status: str, output: list[dict], reason: str | None = None,
              error: dict | None = None) -> dict:
    """The Response object: the request's settings as they were applied, the output, the usage."""
    incomplete = status == "completed" and reason == "length"
    if incomplete:
        status = "incomplete"
        for item in output:
            item["status"] = "incomplete"
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else None
    return {
        "id": call.id, "object": "response", "created_at": call.created, "status": status,
        "background": False, "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls, "model": call.target.model, "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
        "service_tier": "default", "store": body.store is not False,
        "temperature": body.temperature if body.temperature is not None else 0.0,
        "text": {"format": fmt or {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": [{"type": "function", "name": t["function"]["name"],
                   "description": t["function"].get("description"), "parameters": t["function"]["parameters"],
                   "strict": False} for t in body.chat_tools() or []],
        "top_logprobs": body.top_logprobs or 0, "top_p": body.top_p if body.top_p is not None else 1.0,
        "truncation": body.truncation or "disabled", "user": body.user, "metadata": body.metadata or {},
        "usage": _usage(call) if status != "in_progress" else None,
        "adapter_version": call.target.version,
    }


class _Events:
    """Server-sent events of the Responses stream, numbered in order."""

    def __init__(self):
        self.n = 0

    def __call__(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.n, **fields}
        self.n += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(serving: Serving, stored, body: ResponsesRequest, call, turns: list[dict], owner, firsts):
    """The Responses event stream: created, in_progress; the message item's text deltas as they come (an
    answer that may call tools is held until it ends, as chat's stream does, then sent as its items); each
    item's done events; completed (or incomplete, or failed)."""
    ev = _Events()
    yield ev("response.created", response=_response(body, call, "in_progress", []))
    yield ev("response.in_progress", response=_response(body, call, "in_progress", []))
    msg_id = f"msg_{uuid.uuid4().hex}"
    started = False
    held, lps = [], []
    try:
        async for _, e in _events([call], firsts):
            if e.kind == "token":
                lps += e.logprobs or []
                if call.tools:
                    held.append(e.text)
                    continue
                if not started:
                    started = True
                    yield ev("response.output_item.added", output_index=0,
                             item={"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant",
                                   "content": []})
                    yield ev("response.content_part.added", item_id=msg_id, output_index=0, content_index=0,
                             part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                held.append(e.text)
                yield ev("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                         delta=e.text, logprobs=_chat_logprobs(serving, e.logprobs) if e.logprobs else [])
                continue
            await on_chat(call.logged_event.wait, LOG_WAIT_S)   # ended, so logged: feedback may follow
            if e.kind == "error":
                error = {"code": e.error.code or "server_error", "message": e.error.message}
                yield ev("response.failed", response=_response(body, call, "failed", [], error=error))
                return
            message, reason = _message(call, "".join(held), e.finish_reason)
            items = _items(serving, message, lps)
            if started and not (items and items[0]["type"] == "message"):   # streamed text that decoded to nothing
                items.insert(0, {"type": "message", "id": msg_id, "status": "completed", "role": "assistant",
                                 "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]})
            if items and items[0]["type"] == "message":
                items[0]["id"] = msg_id
            answer = _response(body, call, "completed", items, reason)
            for event in _item_events(ev, answer["output"], started):
                yield event
            if body.store is not False:
                await on_control(stored.put, call.id, owner, turns + [_turn(message)], answer)
            yield ev(f"response.{answer['status']}", response=answer)
    except AssistantError as err:
        yield ev("response.failed", response=_response(body, call, "failed", [],
                                                       error={"code": err.code or "server_error",
                                                              "message": err.message}))
    finally:
        call.handle.cancel()   # a client that went away stops generation at the next step


def _item_events(ev: _Events, output: list[dict], text_started: bool):
    """The events that close (or, for held answers, add and close) each output item."""
    for i, item in enumerate(output):
        if item["type"] == "message":
            part = item["content"][0]
            if not text_started:
                yield ev("response.output_item.added", output_index=i,
                         item={**item, "status": "in_progress", "content": []})
                yield ev("response.content_part.added", item_id=item["id"], output_index=i, content_index=0,
                         part={**part, "text": "", "logprobs": []})
                yield ev("response.output_text.delta", item_id=item["id"], output_index=i, content_index=0,
                         delta=part["text"], logprobs=part["logprobs"])
            yield ev("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                     text=part["text"], logprobs=part["logprobs"])
            yield ev("response.content_part.done", item_id=item["id"], output_index=i, content_index=0, part=part)
        else:
            yield ev("response.output_item.added", output_index=i,
                     item={**item, "arguments": "", "status": "in_progress"})
            yield ev("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                     delta=item["arguments"])
            yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                     name=item["name"], arguments=item["arguments"])
        yield ev("response.output_item.done", output_index=i, item=item)
