"""Decode steps of a LlamaRunner with static shapes, replayed from CUDA graphs on a GPU.

Op by op, a decode step on a GPU is ~30 small kernels per layer, each launched from Python: an 8B model
in bf16 was measured at 45 tok/s that way on an H200, a sixth of what its memory bandwidth allows. Here a
step has static shapes, so it can be captured once as a CUDA graph and replayed with one launch:

- rows are padded up to a bucket (1, 2, 4, 8, 16, ...); padded rows read token 0 at position 0, write
  only cache rows that no request holds (the engine keeps its rows 0..B-1), and their logits are dropped;
- attention reads the first `context` positions of the (static) KV cache, a power of two of at least
  MIN_CONTEXT, with a mask per row, instead of exactly as many positions as the longest row;
- LoRA runs in one of three forms: none (every row on the base), one slot for all rows (that slot's
  weights, two matmuls) or a slot per row (gathered, two batched matmuls).

One graph per (form, slot, rows, context), captured on first use into one memory pool; all are dropped
when the KV cache or the LoRA bank is reallocated. The same step runs eagerly (`graphs=False`) on any
device, which is how the CPU tests check it against the runner's own decode. Used only on CUDA, and
`ASSISTANT_CUDA_GRAPHS=0` turns it off; if capturing fails, decode goes back to eager torch ops.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MIN_CONTEXT = 256          # smallest attention window of a graph; windows double from there
SWITCH = "ASSISTANT_CUDA_GRAPHS"


def enabled(device: str) -> bool:
    """CUDA graphs for decode: on CUDA unless ASSISTANT_CUDA_GRAPHS=0; never on CPU."""
    return str(device).startswith("cuda") and os.environ.get(SWITCH, "1") != "0"


def _bucket(n: int, smallest: int = 1) -> int:
    b = smallest
    while b < n:
        b *= 2
    return b


class StaticStep:
    """A decode step of `runner` over padded rows and a bucketed context, eager or from CUDA graphs."""

    def __init__(self, runner, *, graphs: bool = True):
        self.runner = runner
        self.graphs = graphs
        dev = runner.device
        self.io = torch.zeros(3, runner.max_batch, dtype=torch.long, device=dev)   # tokens, positions, slots
        self.rows_ar = torch.arange(runner.max_batch, device=dev)
        self.ctx_ar = None
        self.captured: dict[tuple, tuple] = {}
        self.key = None
        self.pool = None
        self.failed = False

    # What a step computes ---------------------------------------------------------------------
    def _forward(self, rows: int, context: int, form: str, slot: int) -> torch.Tensor:
        r = self.runner
        t, pos, slots = self.io[0, :rows], self.io[1, :rows], self.io[2, :rows]
        ar = self.rows_ar[:rows]
        keep = (self.ctx_ar[:context][None, :] <= pos[:, None]).view(rows, 1, 1, context)

        def attend(li, q, k, v):
            K, V = r.cache.layer(li)
            K[ar, :, pos] = k.to(K.dtype)
            V[ar, :, pos] = v.to(V.dtype)
            ad = r.attn_dtype
            o = F.scaled_dot_product_attention(q.unsqueeze(2).to(ad), K[:rows, :, :context].to(ad),
                                               V[:rows, :, :context].to(ad), attn_mask=keep,
                                               enable_gqa=r.KH != r.H, scale=r.scale)
            return o.reshape(rows, r.H * r.D).to(q.dtype)

        uniform = {"base": 0, "one": slot, "mixed": None}[form]
        x = r._layers(r.embed(t), pos, slots, uniform, attend)
        return r.logits(x)

    # Calling it ------------------------------------------------------------------------------
    def _fresh(self):
        """Graphs hold the addresses of the cache and the LoRA bank: drop them when either moves."""
        r = self.runner
        key = (r.cache.version, r.bank.rank, id(r.bank.A))
        if key != self.key:
            self.captured.clear()
            self.key = key
            self.ctx_ar = torch.arange(r.cache.cap, device=r.device)

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        with torch.inference_mode():   # the KV cache holds inference tensors (runner.KVCache): written only there
            return self._step(tokens, positions, slots)

    def _step(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        r = self.runner
        self._fresh()
        B = len(tokens)
        rows = min(_bucket(B), r.max_batch)
        context = min(_bucket(max(positions) + 1, MIN_CONTEXT), r.cache.cap)
        pad = rows - B
        self.io[:, :rows].copy_(torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots + [0] * pad]))
        if all(s == 0 for s in slots):
            form, slot = "base", 0
        elif all(s == slots[0] for s in slots):   # padded rows get the adapter too; their output is dropped
            form, slot = "one", slots[0]
        else:
            form, slot = "mixed", 0
        if not self.graphs or self.failed:
            return self._forward(rows, context, form, slot)[:B]
        key = (form, slot, rows, context)
        entry = self.captured.get(key)
        if entry is None:
            entry = self._capture(key)
            if entry is None:
                return self._forward(rows, context, form, slot)[:B]
        graph, out = entry
        graph.replay()
        return out[:B]

    def _capture(self, key):
        form, slot, rows, context = key
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):   # warm-up: library handles, workspaces, lazy initialisation
                self._forward(rows, context, form, slot)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads of the server (the embedder, adapter uploads) may use CUDA meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._forward(rows, context, form, slot)
            self.pool = graph.pool()
        except RuntimeError as e:   # an op that cannot be captured: decode eagerly from now on
            log.warning("CUDA graph capture failed (%s): decoding with eager torch ops", e)
            self.failed = True
            return None
        self.captured[key] = (graph, out)
        log.info("captured a decode graph: %s rows, %s positions, LoRA %s", rows, context, form)
        return graph, out
