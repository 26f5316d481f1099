"""The generation engine: continuous batching across adapters, streaming, cancellation. Knows nothing of
HTTP or Gradio, and little of text: requests carry prompt token ids, the core loop produces token ids and
ends a request on an id (end of sequence, max_new_tokens); each request's ids become text in its
`TextStream` (engine/textstream.py: incremental detokenization at a constant cost per token, and stop strings).

One thread owns the model. Each loop iteration admits waiting requests (prefill, one at a time),
then runs ONE decode step for every active row together, each row with its own adapter slot
(see engine/lora.py), position and sampling settings. Rows that finish leave at once and new ones join,
so a long answer never blocks a short one.

Llama-family bases (llama, mistral, qwen2, qwen3) run on our own forward (engine/runner.py), with a
per-row KV cache and per-row adapters. Other architectures fall back to the model's own forward,
one request at a time, without adapters.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

import torch

from assistant.engine import choices, sampling
from assistant.engine import logits as controls
from assistant.engine.grammar import Grammars
from assistant.engine.protocol import EngineProtocol, EngineStatus
from assistant.engine.request import Event, Handle, Request, check_admission  # noqa: F401 - the engine's public names
from assistant.engine.runner import FAST_ARCHS, LlamaRunner
from assistant.engine.textstream import TextStream, chat_prompt_ids
from assistant.engine.threads import claim_cores
from assistant.engine.waiting import MAX_QUEUE_WAIT_S, WaitingRoom
from assistant.errors import AssistantError, Busy, GenerationFailed
from assistant.settings import MAX_BATCH, MAX_QUEUE, MAX_RESIDENT_ADAPTERS

MAX_CONTEXT_TOKENS = 8192      # cap on prompt + answer, whatever the model claims
ROOM_POLL_S = 0.02             # while requests wait for a slot pinned elsewhere: how often the engine looks again

log = logging.getLogger(__name__)


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
    schedules_adapters = True   # requests may come with `adapter_folder` and wait here for a slot

    def __init__(self, base, *, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
                 max_resident_adapters: int = MAX_RESIDENT_ADAPTERS, max_queue_s: float = MAX_QUEUE_WAIT_S):
        self.base = base
        self.model, self.tokenizer = base.model, base.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = min(base.max_context, MAX_CONTEXT_TOKENS)
        arch = getattr(self.model.config, "model_type", "")
        self.runner = LlamaRunner(self.model, max_resident_adapters, max_batch, base.device) if arch in FAST_ARCHS else None
        self.eos = eos_ids(self.tokenizer, self.model)
        self.pending: queue.Queue = queue.Queue()   # submitted, not yet in the waiting room
        self.room = WaitingRoom(self.runner.bank if self.runner else None, max_queue_s)
        self._grammars = None
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
            self.wake.set()   # a request may be waiting for this slot

    def wait_for_free_slot(self, timeout: float) -> None:
        if self.runner:
            self.runner.bank.wait_for_release(timeout)

    def unload_adapter(self, key: str) -> None:
        if self.runner:
            self.runner.bank.evict(key)

    # Prompts -----------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, tools)

    def encode_text(self, text: str) -> list[int]:
        """A legacy completion's prompt: the text's ids, after the tokenizer's BOS when it adds one."""
        return list(self.tokenizer(text)["input_ids"])

    def structure(self, req: Request) -> None:
        """`req.structured` as the grammar constraint that masks its row (engine/grammar.py)."""
        if req.structured is not None:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size, self.eos)
            req.constraint = self._grammars.constraint(*req.structured)

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

    def _submit(self, req: Request, loop, on_finish, followers=()) -> Handle:
        check_admission(req, self.max_context)
        self.structure(req)
        if req.adapter is not None and self.runner is None:
            raise AssistantError(f"adapters need a Llama-family base ({', '.join(FAST_ARCHS)}); "
                                 f"this base is {self.model.config.model_type}")
        if self.pending.qsize() + len(self.room) >= self.max_queue:
            raise Busy(f"the server is busy ({self.max_queue} requests waiting): retry in a few seconds")
        h = self._handle(req, loop, on_finish)
        h.followers = list(followers)
        self.pending.put(h)
        self.wake.set()
        return h

    def _handle(self, req: Request, loop, on_finish) -> Handle:
        req.t_submit = time.perf_counter()
        req.generator = torch.Generator().manual_seed(req.seed if req.seed is not None
                                                      else int.from_bytes(uuid.uuid4().bytes[:6], "little"))
        req.stream = TextStream(self.tokenizer, req.stop, min_ids=req.min_tokens)
        h = Handle(req, loop)
        h.on_finish = on_finish
        return h

    def submit_group(self, reqs: list[Request], loop=None, on_finish=None) -> list[Handle]:
        """Answers to one prompt (OpenAI's `n`), from one prefill: engine/choices.py."""
        return choices.submit_group(self, reqs, loop, on_finish,
                                    lambda r: (check_admission(r, self.max_context), self.structure(r)))

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
        claim_cores()   # the one thread pool in this process that decodes (see assistant/engine/threads.py)
        while not self.stopping:
            if not self.active and self.pending.empty():
                self.wake.wait(0.5 if not len(self.room) else ROOM_POLL_S)   # waiting for a slot: look again soon
                self.wake.clear()
                if not len(self.room):
                    continue
            try:
                with self.lock:
                    self._admit()
                    if self.active:
                        self._step()
            except Exception:  # noqa: BLE001 - the step failed: fail its rows once, keep serving
                log.exception("decode step failed for %d request(s)", len(self.active))
                err = GenerationFailed("generation failed on the server (the error is in the server log): "
                                       "retry, and tell the operator if it persists")
                for req, h in self.active:
                    self._finish(req, h, None, error=err)
                self.active.clear()

    def _admit(self):
        limit = self.max_batch if self.runner else 1
        while True:
            try:
                self.room.add(self.pending.get_nowait())
            except queue.Empty:
                break
        while len(self.active) < limit:
            item = self.room.pop_ready()
            if item is None:
                return
            h, problem = item
            req = h.req
            if problem == "cancelled":
                self._finish(req, h, "cancelled")
                for f in getattr(h, "followers", ()):
                    self.pending.put(f)   # each follower is a request of its own from here
                continue
            if problem is not None:
                log.warning("request %s refused: %s", req.id, problem.message)
                for f in [h, *getattr(h, "followers", ())]:
                    self._finish(f.req, f, None, error=problem)
                continue
            row = len(self.active)
            try:
                if self.runner:
                    logits = self.runner.prefill(row, req.prompt_ids, req.slot)
                else:
                    logits = self._hf_prefill(req)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                for f in [h, *getattr(h, "followers", ())]:
                    self._fail(f.req, f, e, "while reading the prompt")
                continue
            live = [h, *(choices.admit_followers(self, h, row, limit) if self.runner else ())]
            if not self.runner:
                for f in getattr(h, "followers", ()):
                    self.pending.put(f)   # the fallback decodes one row at a time
            pairs = [(f.req, f) for f in live]
            self.active.extend(pairs)
            for (r, f), tok in zip(pairs, self._sample_rows(pairs, logits[None].expand(len(pairs), -1))):
                if tok is not None:
                    self._accept_guarded(r, f, tok)
            for i in reversed(range(row, row + len(live))):
                if self.active[i][0].finish_reason:
                    self._remove(i)

    def _step(self):
        reqs = [r for r, _ in self.active]
        if self.runner:
            tokens = [r.generated[-1] for r in reqs]
            positions = [len(r.prompt_ids) + len(r.generated) - 1 for r in reqs]
            logits = self.runner.decode(tokens, positions, [r.slot for r in reqs])
        else:
            logits = self._hf_decode(reqs[0])
        self.steps += 1
        nxt = self._sample_rows(self.active, logits)
        done = []
        for i, ((req, h), tok) in enumerate(zip(self.active, nxt)):
            if tok is None:   # its sampling failed: that request alone ends (already finished)
                done.append(i)
                continue
            self._accept_guarded(req, h, tok)
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

    # Sampling (engine/sampling.py: numerically safe; engine/logits.py: each row's controls and logprobs) ---------
    def _sample_rows(self, pairs, logits) -> list[int | None]:
        """Each row's next token; None for a row whose own sampling failed (that request is finished)."""
        reqs = [r for r, _ in pairs]
        logits = controls.apply(reqs, logits, self.eos)
        if all(sampling.row_is_greedy(r) for r in reqs):
            try:
                return sampling.greedy(logits)
            except sampling.SamplingError:
                pass   # some row has no usable logits: find it below, one row at a time
        out = []
        for i, (req, h) in enumerate(pairs):
            try:
                out.append(self._sample(req, logits[i]))
            except Exception as e:  # noqa: BLE001 - this request's failure ends it alone
                self._fail(req, h, e, "while choosing the next token")
                out.append(None)
        return out

    def _sample(self, req: Request, logits) -> int:
        if sampling.row_is_greedy(req):
            return sampling.greedy(logits.reshape(1, -1))[0]
        return sampling.sample(logits, req.temperature, req.top_p, req.generator, req.top_k, req.min_p)

    def _fail(self, req: Request, h: Handle, e: BaseException, where: str) -> None:
        """One request's own failure: logged once, with its reason, and it alone ends with "error"."""
        log.error("request %s failed %s (%d prompt tokens, %d generated): %s: %s", req.id, where,
                  len(req.prompt_ids), len(req.generated), type(e).__name__, e,
                  exc_info=not isinstance(e, sampling.SamplingError))
        self._finish(req, h, None, error=GenerationFailed(
            f"generation failed on the server {where} (the error is in the server log): retry, and tell the "
            "operator if it persists"))

    def _accept_guarded(self, req: Request, h: Handle, tok: int) -> None:
        try:
            self._accept(req, h, tok)
        except Exception as e:  # noqa: BLE001 - its stop strings or text: this request alone ends
            self._fail(req, h, e, "while reading the answer")

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
        if req.constraint is not None:
            req.constraint.accept(tok)
        if req.logprobs is not None:
            controls.record(req, tok)
        text = req.stream.push(tok)
        if text:
            lps = None
            if req.logprobs is not None:
                lps, req.lp_sent = req.token_logprobs[req.lp_sent:], len(req.token_logprobs)
            h.put(Event("token", text, logprobs=lps, generated=len(req.generated)))
        if req.stream.stopped:
            return self._finish(req, h, "stop")
        if len(req.generated) >= req.max_new_tokens:
            return self._finish(req, h, "length")

    def _finish(self, req: Request, h: Handle, reason: str | None, error: AssistantError | None = None):
        """End a request: exactly once, whatever fails afterwards (a second call changes nothing)."""
        if req.finished:
            return
        req.finished = True
        req.finish_reason = reason or "error"
        req.t_done = time.perf_counter()
        if self.runner and req.slot:
            self.runner.bank.release(req.slot)
            req.slot = 0
        rest = ""
        try:
            rest = req.stream.finish() if req.stream is not None else ""
            req.text = req.stream.text if req.stream is not None else ""
        except Exception:  # noqa: BLE001 - the request still ends (and is logged) with what it has
            log.exception("the text of request %s could not be completed", req.id)
            if error is None:
                req.finish_reason = "error"
                error = GenerationFailed("generation failed on the server while reading the answer (the error is "
                                         "in the server log): retry, and tell the operator if it persists")
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
