"""Our own forward for Llama-family decoders (llama, mistral, qwen2, qwen3): prefill and batched decode
with a per-row KV cache and a per-row LoRA adapter (engine/lora.py).

Two decode paths, with the same numerics (math in float32, values rounded to the model's dtype where
the model stores them):
- on CPU, for bfloat16 or float32 weights, a whole step is ONE call into the C library
  (kernels.c `decode_step`): every layer, the final norm and the LM head, on one OpenMP team. Op by
  op, a step of the embedded model is ~35 torch calls per layer, and their dispatch cost a third of
  the step (18.5 ms, of which 12 read the weights);
- elsewhere (GPUs, quantized weights, no C compiler, ASSISTANT_KERNELS=0), torch ops: fused qkv and
  gate/up projections, weights prepacked for oneDNN on CPU, SDPA attention. On CUDA those ops run as
  static-shape steps replayed from CUDA graphs (engine/graph_step.py).
Prefill (a prompt's many rows at once) always takes the torch path, where the matmuls dominate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from assistant.engine import graph_step
from assistant.engine.kernels import KERNEL_DTYPES, rms_kernel, step_kernel
from assistant.engine.lora import Group, LoraBank

INITIAL_CACHE_TOKENS = 256     # KV cache length allocated at first; doubles on demand
FAST_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------

class FusedLinear:
    """Several linear modules applied to one input, outputs concatenated. Plain float weights are
    concatenated (and prepacked for oneDNN on CPU), and the modules' own weights become views of the
    concatenation, so the weights are not held twice (16 GB for an 8B model in bf16); quantized modules
    are called one by one."""

    def __init__(self, modules: list, device: str):
        self.modules = modules
        plain = all(type(m) is torch.nn.Linear for m in modules)
        self.mode = "modules"
        if plain:
            self.weight = torch.cat([m.weight.detach() for m in modules]).contiguous() if len(modules) > 1 \
                else modules[0].weight.detach()
            off = 0
            for m in modules if len(modules) > 1 else ():   # the model's modules read the fused copy: one copy
                m.weight.data = self.weight[off:off + m.out_features]
                off += m.out_features
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
    call (assistant/engine/kernels.py) instead of seven ops."""
    if (x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and w.dtype == x.dtype and x.dim() == 2
            and x.is_contiguous() and (c_rms := rms_kernel()) is not None):
        out = torch.empty_like(x)
        c_rms(x.shape[0], x.shape[1], x.data_ptr(), w.data_ptr(), out.data_ptr(), x.dtype == torch.bfloat16, eps)
        return out
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * w


class KVCache:
    """Keys and values of every layer for up to `rows` sequences: per layer, K and V tensors
    [rows, kv_heads, cap, head_dim]. The engine keeps its active requests in rows 0..B-1 (a request that
    leaves is replaced by the last row: `move_row`). `cap` starts at INITIAL_CACHE_TOKENS and doubles when
    a sequence needs more (`ensure`); growing reallocates, and `version` counts reallocations, so users
    of the tensors' addresses (the C step, CUDA graphs) know when to read them again.

    Every method runs in inference mode, whatever mode its caller is in: tensors made in inference mode
    cannot be written outside it (the engine moves rows between decode steps, outside the model's forward,
    and growth happens inside it), so the cache's tensors are always inference tensors, written only there."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, dtype, device: str,
                 cap: int = INITIAL_CACHE_TOKENS):
        self.layers, self.rows, self.kv_heads, self.head_dim = layers, rows, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.cap = 0
        self.version = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._alloc(cap)

    @torch.inference_mode()
    def _alloc(self, cap: int):
        shape = (self.rows, self.kv_heads, cap, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        for old, new in ((self.k, new_k), (self.v, new_v)):
            for o, n in zip(old, new):
                n[:, :, :self.cap] = o
        self.k, self.v, self.cap = new_k, new_v, cap
        self.version += 1

    @torch.inference_mode()
    def ensure(self, tokens: int):
        """Room for `tokens` positions per row (doubling `cap`; what the rows hold is kept)."""
        if tokens > self.cap:
            cap = self.cap
            while cap < tokens:
                cap *= 2
            self._alloc(cap)

    @torch.inference_mode()
    def move_row(self, src: int, dst: int, length: int):
        """Row `src`'s first `length` positions into row `dst`, in every layer."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `li`'s whole K and V [rows, kv_heads, cap, head_dim] (views of the cache: writes land in it)."""
        return self.k[li], self.v[li]

    @torch.inference_mode()
    def fill(self, li: int, row: int, k: torch.Tensor, v: torch.Tensor):
        """Layer `li`, row `row`: positions 0..L-1 from k and v [kv_heads, L, head_dim] (a prompt's)."""
        L = k.shape[1]
        self.k[li][row, :, :L].copy_(k)
        self.v[li][row, :, :L].copy_(v)


def _rotate(x, cos, sin_signed):
    """Rotary embedding of x [N, heads, D]: x*cos + rotate_half(x)*sin, where rotate_half(x) = (-x2, x1)
    is the halves swapped (a flip) times (-1, +1), folded into `sin_signed`. Three ops for q and k together."""
    N, heads, D = x.shape
    return torch.addcmul(x * cos, x.view(N, heads, 2, D // 2).flip(2).view(N, heads, D), sin_signed)


class LlamaRunner:
    """Our own forward for Llama-family decoders, with per-row LoRA and a per-row KV cache."""

    GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj"), "self_attn"), ("o", ("o_proj",), "self_attn"),
              ("gate_up", ("gate_proj", "up_proj"), "mlp"), ("down", ("down_proj",), "mlp"))
    GROUP_NAMES = tuple(name for name, _, _ in GROUPS)   # also the order of the LoRA bank's groups

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
        self.step = KernelStep.build(self)   # None: decode runs op by op in torch
        # On CUDA: static-shape steps replayed from CUDA graphs (engine/graph_step.py; ASSISTANT_CUDA_GRAPHS=0: off).
        self.graph_step = graph_step.StaticStep(self) if self.step is None and graph_step.enabled(device) else None
        # Attention runs in float32 on CPU: there, torch's bf16 attention kernels are several times slower
        # (0.18 vs 0.04 ms per layer for one row, 1.2 vs 0.17 ms for eight). The KV cache is float32 too,
        # except under the C step with a bfloat16 model: then it holds the bfloat16 k and v as they are
        # (no rounding), and a long context reads half the bytes per token.
        self.attn_dtype = torch.float32 if device == "cpu" else self.dtype
        self.kv_dtype = self.dtype if self.step is not None and self.dtype == torch.bfloat16 else self.attn_dtype
        self.cache = KVCache(len(self.layers), max_batch, self.KH, self.D, self.kv_dtype, device)

    def module_shapes(self) -> dict:
        return {n: (m.in_features, m.out_features) for n, m in self.model.named_modules()
                if hasattr(m, "in_features") and hasattr(m, "out_features") and n.startswith("model.layers.")}

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
        self.cache.ensure(L + 1)
        t = torch.tensor(ids, device=self.device)
        pos = torch.arange(L, device=self.device)

        def attend(li, q, k, v):   # the whole prompt is here: attention reads k and v, not the cache
            kt, vt = k.transpose(0, 1), v.transpose(0, 1)
            self.cache.fill(li, row, kt, vt)
            ad = self.attn_dtype
            o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0).to(ad), kt.unsqueeze(0).to(ad),
                                               vt.unsqueeze(0).to(ad), is_causal=True,
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
        self.cache.ensure(Tc)
        if self.step is not None:
            return self.step(tokens, positions, slots)
        if self.graph_step is not None:
            return self.graph_step(tokens, positions, slots)
        t = torch.tensor(tokens, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        slot_t = torch.tensor(slots, device=self.device)
        uniform = slots[0] if all(s == slots[0] for s in slots) else None
        ar = torch.arange(B, device=self.device)
        # One row attends to all of its Tc positions: no mask needed. Rows of different lengths mask the tail.
        keep = (None if B == 1 else
                (torch.arange(Tc, device=self.device)[None, :] <= pos[:, None]).view(B, 1, 1, Tc))

        def attend(li, q, k, v):
            K, V = self.cache.layer(li)
            K[ar, :, pos] = k.to(K.dtype)
            V[ar, :, pos] = v.to(V.dtype)
            ad = self.attn_dtype
            o = F.scaled_dot_product_attention(q.unsqueeze(2).to(ad), K[:B, :, :Tc].to(ad), V[:B, :, :Tc].to(ad),
                                               attn_mask=keep, enable_gqa=self.KH != self.H, scale=self.scale)
            return o.reshape(B, self.H * self.D).to(q.dtype)

        x = self._layers(self.embed(t), pos, slot_t, uniform, attend)
        return self.logits(x)


class KernelStep:
    """A whole decode step of a LlamaRunner as one call into kernels.c `decode_step` (CPU, float weights).

    The C side reads the runner's own tensors through a table of addresses (weights, norms, LoRA bank,
    KV cache), rebuilt whenever the cache is reallocated or the bank's rank grows."""

    # The order of kernels.c's P_* and T_* enums.
    PARAMS = ("hidden", "heads", "kv_heads", "head_dim", "inter", "layers", "vocab", "cap", "rank", "max_rows",
              "bf16", "lora_bf16", "kv_bf16")
    TABLE = ("norm1", "norm2", "q_norm", "k_norm", "w_qkv", "w_o", "w_gate_up", "w_down", "b_qkv", "b_o",
             "b_gate_up", "b_down", "lora_a_qkv", "lora_a_o", "lora_a_gate_up", "lora_a_down", "lora_b_qkv",
             "lora_b_o", "lora_b_gate_up", "lora_b_down", "k_cache", "v_cache")

    @classmethod
    def build(cls, runner) -> "KernelStep | None":
        """The step for this runner, or None when the C path does not apply (then torch ops serve)."""
        if runner.device != "cpu" or runner.dtype not in KERNEL_DTYPES or runner.H % runner.KH or runner.D % 2:
            return None
        lib = step_kernel()
        if lib is None or lib.decode_table_count() != len(cls.TABLE) or lib.decode_params_count() != len(cls.PARAMS):
            return None
        dt = runner.dtype
        linears = [ly[g] for ly in runner.layers for g in LlamaRunner.GROUP_NAMES] + [runner.lm_head]
        if any(f.mode == "modules" or f.weight.dtype != dt or (f.bias is not None and f.bias.dtype != dt)
               for f in linears):
            return None
        norms = [w for ly in runner.layers for w in (ly["n1"], ly["n2"])] + [runner.norm, runner.embed.weight]
        for ly in runner.layers:
            for key in ("qn", "kn"):
                if ly[key] is not None:
                    eps = getattr(ly[key], "variance_epsilon", getattr(ly[key], "eps", None))
                    if eps != runner.eps:
                        return None
                    norms.append(ly[key].weight)
        if any(w.dtype != dt for w in norms) or runner.bank.dtype not in KERNEL_DTYPES:
            return None
        return cls(runner, lib)

    def __init__(self, runner, lib):
        self.runner, self.lib = runner, lib
        self.key = None
        self.vocab = runner.lm_head.weight.shape[0]

    def _refresh(self):
        """(Re)build the parameter block, the address table and the scratch space after a reallocation."""
        r, bank, cache = self.runner, self.runner.bank, self.runner.cache
        key = (cache.version, bank.rank, id(bank.A))
        if key == self.key:
            return
        values = {"hidden": r.embed.weight.shape[1], "heads": r.H, "kv_heads": r.KH, "head_dim": r.D,
                  "inter": r.intermediate, "layers": len(r.layers), "vocab": self.vocab, "cap": cache.cap,
                  "rank": bank.rank, "max_rows": r.max_batch, "bf16": int(r.dtype == torch.bfloat16),
                  "lora_bf16": int(bank.dtype == torch.bfloat16), "kv_bf16": int(cache.dtype == torch.bfloat16)}
        self.params = torch.tensor([values[k] for k in self.PARAMS], dtype=torch.int64)

        def ptr(t):
            return 0 if t is None else t.data_ptr()
        rows = []
        for li, ly in enumerate(r.layers):
            groups = [ly[g] for g in r.GROUP_NAMES]
            rows.append([ptr(ly["n1"]), ptr(ly["n2"]),
                         ptr(ly["qn"].weight if ly["qn"] is not None else None),
                         ptr(ly["kn"].weight if ly["kn"] is not None else None),
                         *[ptr(f.weight) for f in groups], *[ptr(f.bias) for f in groups],
                         *[ptr(a) for a in bank.A[li]], *[ptr(b) for b in bank.Bt[li]],
                         *map(ptr, cache.layer(li))])
        self.table = torch.tensor(rows, dtype=torch.int64).reshape(-1)
        self.scratch = torch.empty(self.lib.decode_scratch_floats(self.params.data_ptr()), dtype=torch.float32)
        self.key = key

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        r = self.runner
        self._refresh()
        B = len(tokens)
        x = r.embed(torch.tensor(tokens)).contiguous()
        pos = torch.tensor(positions)
        cos, sin = r.rotary(x, pos.unsqueeze(0))
        cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        slot_t = torch.tensor(slots, dtype=torch.int64)
        logits = torch.empty(B, self.vocab, dtype=torch.float32)
        rc = self.lib.decode_step(self.params.data_ptr(), r.eps, r.scale, self.table.data_ptr(), r.norm.data_ptr(),
                                  r.lm_head.weight.data_ptr(), B, x.data_ptr(), pos.data_ptr(), slot_t.data_ptr(),
                                  int(any(slots)), cos.data_ptr(), sin.data_ptr(), self.scratch.data_ptr(),
                                  logits.data_ptr())
        if rc:
            raise RuntimeError(f"decode_step failed ({rc}): {B} rows, cache of {r.cache.cap}")
        return logits
