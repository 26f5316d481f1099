"""What an engine serves and what its caller holds: the `Request` (prompt ids, sampling, adapter, the
runtime state the engine thread owns), the `Handle` its events arrive on, and the admission check every
engine applies before it takes a request."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from assistant.engine.textstream import TextStream
from assistant.errors import AssistantError, ContextTooLong

log = logging.getLogger(__name__)


@dataclass
class Event:
    kind: str            # "token" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    error: AssistantError | None = None
    logprobs: list | None = None         # the TokenLogprobs of the ids this text completes (when asked)
    generated: int = 0                   # the answer's ids so far, this text's included (usage while streaming)


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: str | None = None          # key of an adapter, None for the base
    # Where the adapter's validated folder is, when the engine has to load it (the engine then pins its slot
    # at admission, waiting for one if need be: engine/waiting.py); None: `slot` comes pinned with the request.
    adapter_folder: Callable[[], Path] | None = None
    ignore_eos: bool = False            # benchmarks: always generate max_new_tokens
    logprobs: int | None = None         # None: none; k: each token's logprob and its k most likely rivals
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_k: int = 0                      # 0: off; k: sampling keeps the k most likely tokens (1: greedy)
    min_p: float = 0.0                  # sampling keeps tokens at least min_p times as likely as the best
    repetition_penalty: float = 1.0     # 1: off; the HF/vLLM rule on every id of the prompt and the answer
    min_tokens: int = 0                 # neither end of sequence nor a stop string ends the answer before this
    structured: tuple | None = None     # ("json_object", None) | ("json_schema", schema): see `structure`
    constraint: object | None = None    # a grammar.Constraint: masks the tokens its grammar does not allow
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Runtime state, owned by the engine thread.
    slot: int = 0
    generated: list[int] = field(default_factory=list)
    text: str = ""                      # the answer's text, set when the request ends
    finish_reason: str | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    generator: torch.Generator | None = None
    stream: TextStream | None = None
    token_logprobs: list = field(default_factory=list)
    pending_lp: torch.Tensor | None = None
    lp_sent: int = 0                    # token_logprobs already sent with a text event
    finished: bool = False              # set once, by the engine's `_finish`
    cached_tokens: int = 0              # prompt ids the engine did not read again (vLLM's prefix cache, if it says)


class Handle:
    """What a caller holds: events arrive on a thread-safe queue (or an asyncio queue when `loop` is set)."""

    def __init__(self, req: Request, loop=None):
        self.req = req
        self.loop = loop
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.aq = None
        if loop is not None:
            import asyncio
            self.aq = asyncio.Queue()
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.on_finish = None  # called from the engine thread when the request ends (logging)

    def put(self, ev: Event) -> None:
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self.aq.put_nowait, ev)
            except RuntimeError:  # the loop is closed: the client is gone
                self.cancelled.set()
        else:
            self.q.put(ev)
        if ev.kind != "token":
            self.done.set()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self):
        while True:
            ev = self.q.get()
            yield ev
            if ev.kind != "token":
                return

    async def aiter(self):
        while True:
            ev = await self.aq.get()
            yield ev
            if ev.kind != "token":
                return

    def finish(self, error: AssistantError | None = None, *, rest: str = "") -> None:
        """The request ended (its finish_reason, t_done and text are set): the caller's `on_finish` runs
        (the response log), then the last event goes out: `rest` of the text and "done", or "error"."""
        if self.on_finish is not None:
            try:
                self.on_finish()
            except Exception:  # noqa: BLE001 - a failing callback must never stop generation for others
                log.exception("the finish callback of request %s failed: its response may not be logged", self.req.id)
        if error is not None:
            self.put(Event("error", error=error, finish_reason="error"))
            return
        more = self.req.token_logprobs[self.req.lp_sent:] if self.req.logprobs is not None else None
        if rest or more:
            self.put(Event("token", rest, logprobs=more, generated=len(self.req.generated)))
        self.put(Event("done", finish_reason=self.req.finish_reason))

    def result(self) -> tuple[str, str]:
        text = []
        for ev in self:
            if ev.kind == "token":
                text.append(ev.text)
            elif ev.kind == "error":
                raise ev.error
            else:
                return "".join(text), ev.finish_reason
        return "".join(text), "stop"


def check_admission(req: Request, max_context: int) -> None:
    """What every engine checks before it takes a request: the prompt leaves room for an answer (the answer
    is cut to that room), and a request for an adapter comes with its slot pinned or its folder to load."""
    n = len(req.prompt_ids)
    if n >= max_context:
        raise ContextTooLong(f"the conversation is {n} tokens and this model reads at most {max_context} "
                             f"(question and answer together): shorten it or start a new conversation")
    req.max_new_tokens = max(1, min(req.max_new_tokens, max_context - n))
    if req.adapter is not None and not req.slot and req.adapter_folder is None:
        raise AssistantError(f"adapter {req.adapter} has no pinned slot: pin or load it first")
