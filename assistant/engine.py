"""The generation engine: chat template, continuous batching across adapters, streaming, stop strings,
cancellation. Knows nothing of HTTP or Gradio.

One thread owns the model. Each loop iteration admits waiting requests (prefill, one at a time),
then runs ONE decode step for every active row together, each row with its own adapter slot
(see lora.py), position and sampling settings. Rows that finish leave at once and new ones join,
so a long answer never blocks a short one.

Llama-family bases (llama, mistral, qwen2, qwen3) run on this engine's own decode path: fused
qkv and gate/up projections, weights prepacked for oneDNN on CPU, a per-row KV cache. Other
architectures fall back to the model's own forward, one request at a time, without adapters.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import AssistantError, Busy, ContextTooLong
from .kernels import KERNEL_DTYPES, rms_kernel
from .lora import Group, LoraBank
from .settings import MAX_BATCH, MAX_QUEUE, MAX_RESIDENT_ADAPTERS
from .threads import claim_cores

MAX_CONTEXT_TOKENS = 8192      # cap on prompt + answer, whatever the model claims
INITIAL_CACHE_TOKENS = 256     # KV cache length allocated at first; doubles on demand
FAST_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


class AdapterEvicted(AssistantError):
    status = 503
    code = "adapter_not_loaded"


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
    emitted: int = 0
    text: str = ""
    finish_reason: str | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    generator: torch.Generator | None = None


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


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------

class FusedLinear:
    """Several linear modules applied to one input, outputs concatenated. Plain float weights are
    concatenated (and prepacked for oneDNN on CPU); quantized modules are called one by one."""

    def __init__(self, modules: list, device: str):
        self.modules = modules
        plain = all(type(m) is torch.nn.Linear for m in modules)
        self.mode = "modules"
        if plain:
            self.weight = torch.cat([m.weight.detach() for m in modules]).contiguous()
            biases = [m.bias for m in modules]
            self.bias = (torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, dtype=self.weight.dtype,
                                                                                 device=self.weight.device)
                                    for m, b in zip(modules, biases)])
                         if any(b is not None for b in biases) else None)
            self.mode = "linear"
            if device == "cpu" and torch.backends.mkldnn.is_available():
                try:
                    packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 1)
                    x = torch.randn(3, self.weight.shape[1], dtype=self.weight.dtype)
                    got = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
                    want = F.linear(x, self.weight, self.bias)
                    if torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
                        self.packed, self.mode = packed, "mkldnn"
                except (RuntimeError, AttributeError):
                    pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "mkldnn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.mode == "linear":
            return F.linear(x, self.weight, self.bias)
        return torch.cat([m(x) for m in self.modules], dim=-1)


def _rms(x, w, eps):
    """Llama's RMSNorm: normalised in float32, rounded to the input's dtype, then scaled. On CPU one C
    call (assistant/kernels.py) instead of seven ops."""
    if (x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and w.dtype == x.dtype and x.dim() == 2
            and x.is_contiguous() and (c_rms := rms_kernel()) is not None):
        out = torch.empty_like(x)
        c_rms(x.shape[0], x.shape[1], x.data_ptr(), w.data_ptr(), out.data_ptr(), x.dtype == torch.bfloat16, eps)
        return out
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * w


def _rotate(x, cos, sin_signed):
    """Rotary embedding of x [N, heads, D]: x*cos + rotate_half(x)*sin, where rotate_half(x) = (-x2, x1)
    is the halves swapped (a flip) times (-1, +1), folded into `sin_signed`. Three ops for q and k together."""
    N, heads, D = x.shape
    return torch.addcmul(x * cos, x.view(N, heads, 2, D // 2).flip(2).view(N, heads, D), sin_signed)


class LlamaRunner:
    """Our own forward for Llama-family decoders, with per-row LoRA and a per-row KV cache."""

    GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj"), "self_attn"), ("o", ("o_proj",), "self_attn"),
              ("gate_up", ("gate_proj", "up_proj"), "mlp"), ("down", ("down_proj",), "mlp"))

    def __init__(self, model, max_slots: int, max_batch: int, device: str):
        self.model = model
        cfg = model.config
        inner = model.model
        self.H = cfg.num_attention_heads
        self.KH = getattr(cfg, "num_key_value_heads", None) or self.H
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.eps = cfg.rms_norm_eps
        self.scale = self.D ** -0.5
        self.device = device
        self.embed = inner.embed_tokens
        self.dtype = self.embed.weight.dtype if self.embed.weight.dtype.is_floating_point else torch.bfloat16
        self.norm = inner.norm.weight
        self.rotary = inner.rotary_emb
        self.lm_head = FusedLinear([model.lm_head], device)
        self.layers = []
        groups = []
        for li, layer in enumerate(inner.layers):
            entry = {"n1": layer.input_layernorm.weight, "n2": layer.post_attention_layernorm.weight,
                     "qn": getattr(layer.self_attn, "q_norm", None), "kn": getattr(layer.self_attn, "k_norm", None)}
            for gname, parts, owner in self.GROUPS:
                mods = [getattr(getattr(layer, owner), p) for p in parts]
                entry[gname] = FusedLinear(mods, device)
                if li == 0:
                    groups.append(Group(gname, mods[0].in_features, tuple((p, m.out_features) for p, m in zip(parts, mods))))
            self.layers.append(entry)
        self.intermediate = groups[2].parts[0][1]
        self.bank = LoraBank(len(self.layers), groups, "model.layers", max_slots=max_slots,
                             dtype=self.dtype, device=device)
        self.max_batch = max_batch
        # The KV cache and attention run in float32 on CPU: there, bf16 attention kernels are several
        # times slower than float32 ones (0.18 vs 0.04 ms per layer for one row, 1.2 vs 0.17 ms for eight).
        self.kv_dtype = torch.float32 if device == "cpu" else self.dtype
        self.cap = 0
        self.k = self.v = None
        self._alloc(INITIAL_CACHE_TOKENS)

    def module_shapes(self) -> dict:
        return {n: (m.in_features, m.out_features) for n, m in self.model.named_modules()
                if hasattr(m, "in_features") and hasattr(m, "out_features") and n.startswith("model.layers.")}

    def _alloc(self, cap: int):
        shape = (self.max_batch, self.KH, cap, self.D)
        new_k = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.layers]
        new_v = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.layers]
        if self.k is not None:
            for i in range(len(self.layers)):
                new_k[i][:, :, :self.cap] = self.k[i]
                new_v[i][:, :, :self.cap] = self.v[i]
        self.k, self.v, self.cap = new_k, new_v, cap

    def ensure_capacity(self, tokens: int):
        if tokens > self.cap:
            cap = self.cap
            while cap < tokens:
                cap *= 2
            self._alloc(cap)

    def move_row(self, src: int, dst: int, length: int):
        for i in range(len(self.layers)):
            self.k[i][dst, :, :length] = self.k[i][src, :, :length]
            self.v[i][dst, :, :length] = self.v[i][src, :, :length]

    def _layers(self, x, pos, slots, uniform, attend):
        """x [N, hidden] for N tokens at positions pos [N]; attend(layer, q, k, v) -> [N, H*D]."""
        N = x.shape[0]
        H, KH, D, I = self.H, self.KH, self.D, self.intermediate
        cos, sin = self.rotary(x, pos.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [N, 1, D]
        sin = torch.cat((-sin[..., :D // 2], sin[..., D // 2:]), dim=-1)
        bank = self.bank
        for li, ly in enumerate(self.layers):
            h = _rms(x, ly["n1"], self.eps)
            qkv = ly["qkv"](h)
            bank.delta(li, 0, h, slots, uniform, qkv)
            v = qkv[:, (H + KH) * D:].view(N, KH, D)
            if ly["qn"] is not None:
                q = ly["qn"](qkv[:, :H * D].view(N, H, D))
                k = ly["kn"](qkv[:, H * D:(H + KH) * D].view(N, KH, D))
                qk = _rotate(torch.cat((q, k), dim=1), cos, sin)
            else:
                qk = _rotate(qkv[:, :(H + KH) * D].view(N, H + KH, D), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            a = attend(li, q, k, v)
            o = ly["o"](a)
            bank.delta(li, 1, a, slots, uniform, o)
            x = x + o
            h = _rms(x, ly["n2"], self.eps)
            gu = ly["gate_up"](h)
            bank.delta(li, 2, h, slots, uniform, gu)
            m = F.silu(gu[:, :I]) * gu[:, I:]
            d = ly["down"](m)
            bank.delta(li, 3, m, slots, uniform, d)
            x = x + d
        return x

    def logits(self, x):
        return self.lm_head(_rms(x, self.norm, self.eps)).float()

    @torch.inference_mode()
    def prefill(self, row: int, ids: list[int], slot: int) -> torch.Tensor:
        L = len(ids)
        self.ensure_capacity(L + 1)
        t = torch.tensor(ids, device=self.device)
        pos = torch.arange(L, device=self.device)

        def attend(li, q, k, v):
            K, V = self.k[li][row, :, :L], self.v[li][row, :, :L]
            K.copy_(k.transpose(0, 1))
            V.copy_(v.transpose(0, 1))
            o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0).to(K.dtype), K.unsqueeze(0),
                                               V.unsqueeze(0), is_causal=True,
                                               enable_gqa=self.KH != self.H, scale=self.scale)
            return o[0].transpose(0, 1).reshape(L, self.H * self.D).to(q.dtype)

        slots = torch.full((L,), slot, device=self.device)
        x = self._layers(self.embed(t), pos, slots, slot, attend)
        return self.logits(x[-1:])[0]

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """One step for rows 0..B-1 of the cache. Returns logits [B, vocab]."""
        B = len(tokens)
        Tc = max(positions) + 1
        self.ensure_capacity(Tc)
        t = torch.tensor(tokens, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        slot_t = torch.tensor(slots, device=self.device)
        uniform = slots[0] if all(s == slots[0] for s in slots) else None
        ar = torch.arange(B, device=self.device)
        # One row attends to all of its Tc positions: no mask needed. Rows of different lengths mask the tail.
        keep = (None if B == 1 else
                (torch.arange(Tc, device=self.device)[None, :] <= pos[:, None]).view(B, 1, 1, Tc))

        def attend(li, q, k, v):
            K, V = self.k[li], self.v[li]
            K[ar, :, pos] = k.to(K.dtype)
            V[ar, :, pos] = v.to(V.dtype)
            o = F.scaled_dot_product_attention(q.unsqueeze(2).to(K.dtype), K[:B, :, :Tc], V[:B, :, :Tc],
                                               attn_mask=keep, enable_gqa=self.KH != self.H, scale=self.scale)
            return o.reshape(B, self.H * self.D).to(q.dtype)

        x = self._layers(self.embed(t), pos, slot_t, uniform, attend)
        return self.logits(x)


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


class Engine:
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

    def adapter_slot(self, key: str) -> int | None:
        return self.runner.bank.slot_of(key) if self.runner else None

    def load_adapter(self, key: str, folder) -> int:
        if self.runner is None:
            raise AssistantError(f"adapters need a Llama-family base ({', '.join(FAST_ARCHS)}); "
                                 f"this base is {self.model.config.model_type}")
        with self.lock:  # never while a step is running
            return self.runner.bank.load(key, folder)

    def evict_adapter(self, key: str) -> None:
        if self.runner:
            self.runner.bank.evict(key)

    # Prompts -----------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)
        return list(out["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # Submission --------------------------------------------------------------------------------
    def submit(self, req: Request, loop=None, on_finish=None) -> Handle:
        n = len(req.prompt_ids)
        if n >= self.max_context:
            raise ContextTooLong(f"the conversation is {n} tokens and this model reads at most {self.max_context} "
                                 f"(question and answer together): shorten it or start a new conversation")
        req.max_new_tokens = max(1, min(req.max_new_tokens, self.max_context - n))
        if self.pending.qsize() >= self.max_queue:
            raise Busy(f"the server is busy ({self.max_queue} requests waiting): retry in a few seconds")
        if req.adapter is not None:
            slot = self.adapter_slot(req.adapter)
            if slot is None:
                raise AdapterEvicted(f"adapter {req.adapter} is not loaded: load it first")
            req.slot = slot
            self.runner.bank.acquire(slot)
        req.t_submit = time.perf_counter()
        req.generator = torch.Generator().manual_seed(req.seed if req.seed is not None
                                                      else int.from_bytes(uuid.uuid4().bytes[:6], "little"))
        h = Handle(req, loop)
        h.on_finish = on_finish
        self.pending.put(h)
        self.wake.set()
        return h

    def generate(self, messages: list[dict] | None = None, *, prompt_ids: list[int] | None = None, **kw) -> str:
        ids = prompt_ids if prompt_ids is not None else self.encode_chat(messages)
        return self.submit(Request(prompt_ids=ids, **kw)).result()[0]

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
            except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                err = AssistantError(f"generation failed: {type(e).__name__}: {e}")
                err.status = 500
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
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                err = AssistantError(f"generation failed while reading the prompt: {type(e).__name__}: {e}")
                err.status = 500
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
            self.runner.move_row(last, i, len(req.prompt_ids) + len(req.generated))
        self.active[i] = self.active[last]
        self.active.pop()

    # Sampling and text -------------------------------------------------------------------------
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
        if req.t_first is None:
            req.t_first = time.perf_counter()
        if h.cancelled.is_set():
            return self._finish(req, h, "cancelled")
        if tok in self.eos and not req.ignore_eos:
            return self._finish(req, h, "stop")
        req.generated.append(tok)
        text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
        if req.stop:
            start = max(0, req.emitted - max(len(s) for s in req.stop))
            cut = min((i for i in (text.find(s, start) for s in req.stop) if i >= 0), default=-1)
            if cut >= 0:
                req.text = text[:cut]
                return self._finish(req, h, "stop")
        req.text = text
        if len(req.generated) >= req.max_new_tokens:
            return self._finish(req, h, "length")
        self._emit(req, h, final=False)

    def _emit(self, req: Request, h: Handle, final: bool):
        text = req.text
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):   # half of a multi-byte character
                return
            for s in req.stop:            # hold back what may be the start of a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        if safe > req.emitted:
            h.put(Event("token", text[req.emitted:safe]))
            req.emitted = safe

    def _finish(self, req: Request, h: Handle, reason: str | None, error: AssistantError | None = None):
        req.finish_reason = reason or "error"
        req.t_done = time.perf_counter()
        if self.runner and req.slot:
            self.runner.bank.release(req.slot)
            req.slot = 0
        req.text = req.text.rstrip("\ufffd")
        if h.on_finish is not None:
            try:
                h.on_finish()
            except Exception:  # noqa: BLE001 - logging must never break generation
                pass
        if error is not None:
            h.put(Event("error", error=error, finish_reason="error"))
            return
        self._emit(req, h, final=True)
        h.put(Event("done", finish_reason=req.finish_reason))

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
