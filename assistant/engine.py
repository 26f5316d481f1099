"""The generation engine: continuous batching across adapters, streaming, cancellation. Knows nothing of
HTTP or Gradio, and little of text: requests carry prompt token ids, the core loop produces token ids and
ends a request on an id (end of sequence, max_new_tokens); each request's ids become text in its
`TextStream` (textstream.py: incremental detokenization at a constant cost per token, and stop strings).

One thread owns the model. Each loop iteration admits waiting requests (prefill, one at a time),
then runs ONE decode step for every active row together, each row with its own adapter slot
(see lora.py), position and sampling settings. Rows that finish leave at once and new ones join,
so a long answer never blocks a short one.

Llama-family bases (llama, mistral, qwen2, qwen3) run on our own forward (runner.py), with a
per-row KV cache and per-row adapters. Other architectures fall back to the model's own forward,
one request at a time, without adapters.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from .engine_protocol import EngineProtocol, EngineStatus
from .errors import AssistantError, Busy, ContextTooLong, GenerationFailed
from .runner import FAST_ARCHS, LlamaRunner
from .settings import MAX_BATCH, MAX_QUEUE, MAX_RESIDENT_ADAPTERS
from .textstream import TextStream, chat_prompt_ids
from .threads import claim_cores

MAX_CONTEXT_TOKENS = 8192      # cap on prompt + answer, whatever the model claims

log = logging.getLogger(__name__)


@dataclass
class Event:
    kind: str            # "token" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    error: AssistantError | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: str | None = None          # key of a resident adapter, None for the base
    ignore_eos: bool = False            # benchmarks: always generate max_new_tokens
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
        if rest:
            self.put(Event("token", rest))
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
    is cut to that room), and a request for an adapter comes with its slot pinned."""
    n = len(req.prompt_ids)
    if n >= max_context:
        raise ContextTooLong(f"the conversation is {n} tokens and this model reads at most {max_context} "
                             f"(question and answer together): shorten it or start a new conversation")
    req.max_new_tokens = max(1, min(req.max_new_tokens, max_context - n))
    if req.adapter is not None and not req.slot:
        raise AssistantError(f"adapter {req.adapter} has no pinned slot: pin or load it first")


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

def eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(i) for i in v)
    # End-of-turn markers of common chat templates, when the tokenizer has them as special tokens.
    vocab, special = tokenizer.get_vocab(), set(tokenizer.all_special_tokens or [])
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"):
        if tok in vocab and (tok in special or tok == "<|im_end|>"):
            ids.add(vocab[tok])
    return ids


class Engine(EngineProtocol):
    """The in-process engine (see the module's docstring)."""

    def __init__(self, base, *, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
                 max_resident_adapters: int = MAX_RESIDENT_ADAPTERS):
        self.base = base
        self.model, self.tokenizer = base.model, base.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = min(base.max_context, MAX_CONTEXT_TOKENS)
        arch = getattr(self.model.config, "model_type", "")
        self.runner = LlamaRunner(self.model, max_resident_adapters, max_batch, base.device) if arch in FAST_ARCHS else None
        self.eos = eos_ids(self.tokenizer, self.model)
        self.pending: queue.Queue = queue.Queue()
        self.active: list[tuple[Request, Handle]] = []
        self.wake = threading.Event()
        self.stopping = False
        self.lock = threading.Lock()
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    # Adapters ----------------------------------------------------------------------------------
    def module_shapes(self) -> dict:
        if self.runner is not None:
            return self.runner.module_shapes()
        return {n: (m.in_features, m.out_features) for n, m in self.model.named_modules()
                if isinstance(m, torch.nn.Linear)}

    def pin_adapter(self, key: str) -> int | None:
        """The resident slot of `key` pinned for one request (unpinned when that request ends), or None."""
        return self.runner.bank.pin(key) if self.runner else None

    def load_adapter(self, key: str, folder, *, pin: bool = False) -> int:
        """Load a validated adapter folder into a slot; with `pin`, the slot comes back pinned."""
        if self.runner is None:
            raise AssistantError(f"adapters need a Llama-family base ({', '.join(FAST_ARCHS)}); "
                                 f"this base is {self.model.config.model_type}")
        with self.lock:  # never while a step is running
            return self.runner.bank.load(key, folder, pin=pin)

    def unpin(self, slot: int) -> None:
        if self.runner and slot:
            self.runner.bank.release(slot)

    def wait_for_free_slot(self, timeout: float) -> None:
        if self.runner:
            self.runner.bank.wait_for_release(timeout)

    def unload_adapter(self, key: str) -> None:
        if self.runner:
            self.runner.bank.evict(key)

    # Prompts -----------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # Submission --------------------------------------------------------------------------------
    def submit(self, req: Request, loop=None, on_finish=None) -> Handle:
        """Queue a request. A request with an adapter comes with `req.slot` already pinned (`pin_adapter` or
        `load_adapter(pin=True)`); the engine unpins it when the request ends, or here if it is refused."""
        try:
            return self._submit(req, loop, on_finish)
        except BaseException:
            self.unpin(req.slot)
            req.slot = 0
            raise

    def _submit(self, req: Request, loop, on_finish) -> Handle:
        check_admission(req, self.max_context)
        if self.pending.qsize() >= self.max_queue:
            raise Busy(f"the server is busy ({self.max_queue} requests waiting): retry in a few seconds")
        req.t_submit = time.perf_counter()
        req.generator = torch.Generator().manual_seed(req.seed if req.seed is not None
                                                      else int.from_bytes(uuid.uuid4().bytes[:6], "little"))
        req.stream = TextStream(self.tokenizer, req.stop)
        h = Handle(req, loop)
        h.on_finish = on_finish
        self.pending.put(h)
        self.wake.set()
        return h

    def generate(self, messages: list[dict] | None = None, *, prompt_ids: list[int] | None = None,
                 adapter: str | None = None, **kw) -> str:
        """Blocking generation; `adapter` names a resident adapter (pinned for this request)."""
        ids = prompt_ids if prompt_ids is not None else self.encode_chat(messages)
        slot = 0
        if adapter is not None:
            slot = self.pin_adapter(adapter)
            if slot is None:
                raise AssistantError(f"adapter {adapter} is not loaded: load it first")
        return self.submit(Request(prompt_ids=ids, adapter=adapter, slot=slot, **kw)).result()[0]

    def status(self) -> EngineStatus:
        adapters = []
        if self.runner:
            with self.runner.bank.lock:   # the bank's own lock: never waits for a decode step
                adapters = sorted(self.runner.bank.slots)
        return {"kind": "local", "ready": self.thread.is_alive() and not self.stopping,
                "queued": self.pending.qsize(), "inflight": len(self.active), "adapters": adapters, "servers": []}

    def close(self):
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    # The loop ----------------------------------------------------------------------------------
    def _loop(self):
        claim_cores()   # the one thread pool in this process that decodes (see assistant/threads.py)
        while not self.stopping:
            if not self.active and self.pending.empty():
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                with self.lock:
                    self._admit()
                    if self.active:
                        self._step()
            except Exception:  # noqa: BLE001 - fail the requests, keep serving
                log.exception("decode step failed for %d request(s)", len(self.active))
                err = GenerationFailed("generation failed on the server (the error is in the server log): "
                                       "retry, and tell the operator if it persists")
                for req, h in self.active:
                    self._finish(req, h, None, error=err)
                self.active.clear()

    def _admit(self):
        limit = self.max_batch if self.runner else 1
        while len(self.active) < limit:
            try:
                h = self.pending.get_nowait()
            except queue.Empty:
                return
            req = h.req
            if h.cancelled.is_set():
                self._finish(req, h, "cancelled")
                continue
            row = len(self.active)
            try:
                if self.runner:
                    logits = self.runner.prefill(row, req.prompt_ids, req.slot)
                else:
                    logits = self._hf_prefill(req)
            except Exception:  # noqa: BLE001 - this request fails, the others go on
                log.exception("prefill failed for request %s (%d prompt tokens)", req.id, len(req.prompt_ids))
                err = GenerationFailed("generation failed on the server while reading the prompt (the error is "
                                       "in the server log): retry, and tell the operator if it persists")
                self._finish(req, h, None, error=err)
                continue
            self.active.append((req, h))
            self._accept(req, h, self._sample(req, logits[None])[0])
            if req.finish_reason:
                self._remove(row)

    def _step(self):
        reqs = [r for r, _ in self.active]
        if self.runner:
            tokens = [r.generated[-1] for r in reqs]
            positions = [len(r.prompt_ids) + len(r.generated) - 1 for r in reqs]
            logits = self.runner.decode(tokens, positions, [r.slot for r in reqs])
        else:
            logits = self._hf_decode(reqs[0])
        self.steps += 1
        nxt = self._sample_rows(reqs, logits)
        done = []
        for i, ((req, h), tok) in enumerate(zip(self.active, nxt)):
            self._accept(req, h, tok)
            if req.finish_reason:
                done.append(i)
        for i in reversed(done):
            self._remove(i)

    def _remove(self, i: int):
        last = len(self.active) - 1
        if self.runner and i != last:
            req = self.active[last][0]
            self.runner.cache.move_row(last, i, len(req.prompt_ids) + len(req.generated))
        self.active[i] = self.active[last]
        self.active.pop()

    # Sampling ----------------------------------------------------------------------------------
    def _sample_rows(self, reqs, logits) -> list[int]:
        if all(r.temperature <= 0 for r in reqs):
            return logits.argmax(-1).tolist()
        return [self._sample(r, logits[i:i + 1])[0] for i, r in enumerate(reqs)]

    def _sample(self, req: Request, logits) -> list[int]:
        if req.temperature <= 0:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits.float() / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sp, si = probs.sort(dim=-1, descending=True)
            cut = sp.cumsum(-1) - sp > req.top_p
            sp = sp.masked_fill(cut, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, si, sp)
        return torch.multinomial(probs.cpu(), 1, generator=req.generator)[:, 0].tolist()

    def _accept(self, req: Request, h: Handle, tok: int):
        """The next id of a request: it ends the request (cancelled, end of sequence, a stop string in its
        text, max_new_tokens) or streams the text it completes."""
        if req.t_first is None:
            req.t_first = time.perf_counter()
        if h.cancelled.is_set():
            return self._finish(req, h, "cancelled")
        if tok in self.eos and not req.ignore_eos:
            return self._finish(req, h, "stop")
        req.generated.append(tok)
        text = req.stream.push(tok)
        if text:
            h.put(Event("token", text))
        if req.stream.stopped:
            return self._finish(req, h, "stop")
        if len(req.generated) >= req.max_new_tokens:
            return self._finish(req, h, "length")

    def _finish(self, req: Request, h: Handle, reason: str | None, error: AssistantError | None = None):
        req.finish_reason = reason or "error"
        req.t_done = time.perf_counter()
        if self.runner and req.slot:
            self.runner.bank.release(req.slot)
            req.slot = 0
        rest = req.stream.finish() if req.stream is not None else ""
        req.text = req.stream.text if req.stream is not None else ""
        h.finish(error, rest=rest)

    # Fallback for other architectures: the model's own forward, one request at a time ----------
    @torch.inference_mode()
    def _hf_prefill(self, req: Request):
        from transformers import DynamicCache
        req._cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([req.prompt_ids], device=self.base.device)
        out = self.model(ids, past_key_values=req._cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def _hf_decode(self, req: Request):
        ids = torch.tensor([[req.generated[-1]]], device=self.base.device)
        out = self.model(ids, past_key_values=req._cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()
