"""Many LoRA adapters resident on one base, selected per row of a batch.

PEFT's `set_adapter` is global model state and walks every module (tens of ms); here each adapter
is a *slot* in stacked tensors, so choosing an adapter for a request is an integer, and a batch may
mix adapters freely. Slot 0 is all zeros: the base model.

Per projection group (qkv, o, gate_up, down) and layer we keep
    A[slot]:  [R_total, in]   (the A matrices of the group's modules, stacked)
    Bt[slot]: [R_total, out]  (block-diagonal B^T, with PEFT's scale alpha/r folded in)
so a group's delta is two small matmuls (two bmm's when rows use different slots). On CPU the C decode
step reads these tensors directly (engine/runner.py `KernelStep`), and a few rows at a time elsewhere (short
prompts, the torch decode path) go through one C call per group (kernels.c `lora_delta`).
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from assistant.engine.kernels import KERNEL_DTYPES, lora_kernel
from assistant.errors import InvalidAdapter, SlotsBusy

KERNEL_MAX_ROWS = 64   # up to this many rows use the C call; a long prompt's rows go to the BLAS matmuls


@dataclass(frozen=True)
class Group:
    """A fused projection: `parts` are (module suffix, out_features) in output order."""
    name: str
    in_features: int
    parts: tuple[tuple[str, int], ...]

    @property
    def out_features(self) -> int:
        return sum(o for _, o in self.parts)


class LoraBank:
    def __init__(self, n_layers: int, groups: list[Group], layer_prefix: str, *, max_slots: int,
                 dtype, device, rank: int = 16):
        # LoRA math runs in float32 on CPU: tiny bf16 GEMMs there take milliseconds, fp32 microseconds.
        # The weights are kept in float32 too, except with the C kernel on a bfloat16 base: then they are
        # stored like the base (half the bytes to read per token) and widened to float32 as they are read.
        cpu = str(device).startswith("cpu")
        self.kernel = lora_kernel() if cpu else None
        self.compute_dtype = torch.float32 if cpu else dtype
        if cpu and not (self.kernel is not None and dtype == torch.bfloat16):
            dtype = torch.float32
        self.n_layers = n_layers
        self.groups = groups
        self.layer_prefix = layer_prefix  # e.g. "model.layers"
        self.max_slots = max_slots
        self.dtype, self.device = dtype, device
        self.rank = rank                     # per-module rank capacity (grows on demand)
        self.lock = threading.RLock()
        self.released = threading.Condition(self.lock)     # notified whenever a slot's last pin goes
        self.slots: OrderedDict[str, int] = OrderedDict()  # key -> slot, in LRU order
        self.in_use: dict[int, int] = {}                  # slot -> requests pinning it (never evicted)
        self._parts = [(ctypes.c_int64 * len(g.parts))(*(o for _, o in g.parts)) for g in groups]
        self._alloc()

    # Storage -----------------------------------------------------------------------------------
    def _alloc(self, keep: dict | None = None):
        S = self.max_slots + 1
        self.A = [[torch.zeros(S, self.rank * len(g.parts), g.in_features, dtype=self.dtype, device=self.device)
                    for g in self.groups] for _ in range(self.n_layers)]
        self.Bt = [[torch.zeros(S, self.rank * len(g.parts), g.out_features, dtype=self.dtype, device=self.device)
                    for g in self.groups] for _ in range(self.n_layers)]
        # Per-slot views, made once: indexing a tensor per call costs a dispatch, a list lookup does not.
        self.A_of = [[list(a.unbind(0)) for a in layer] for layer in self.A]
        self.B_of = [[list(b.unbind(0)) for b in layer] for layer in self.Bt]
        # The C kernel's per-group arguments that only change when the storage does.
        self._kargs = [(g.in_features, self.rank, len(g.parts), ctypes.addressof(self._parts[gi]), g.out_features)
                       for gi, g in enumerate(self.groups)]
        # Scratch space for one row (input, t, output), used by the one thread that decodes.
        floats = max(g.in_features + self.rank * len(g.parts) + g.out_features for g in self.groups)
        self._scratch_t = torch.empty(floats, dtype=torch.float32)
        self._scratch = self._scratch_t.data_ptr()
        self._kptrs = [[(a.data_ptr(), b.data_ptr(), a.dtype == torch.bfloat16) for a, b in zip(la, lb)]
                       for la, lb in zip(self.A, self.Bt)]

    def _grow_rank(self, r: int):
        old_A, old_B, old_r = self.A, self.Bt, self.rank
        self.rank = r
        self._alloc()
        for li in range(self.n_layers):
            for gi, g in enumerate(self.groups):
                for pi in range(len(g.parts)):
                    self.A[li][gi][:, pi * r:pi * r + old_r] = old_A[li][gi][:, pi * old_r:(pi + 1) * old_r]
                    self.Bt[li][gi][:, pi * r:pi * r + old_r, :] = old_B[li][gi][:, pi * old_r:(pi + 1) * old_r, :]

    def _index(self):
        idx = {}
        for gi, g in enumerate(self.groups):
            off = 0
            for pi, (suffix, out) in enumerate(g.parts):
                idx[suffix] = (gi, pi, off, out)
                off += out
        return idx

    # Loading -----------------------------------------------------------------------------------
    def slot_of(self, key: str) -> int | None:
        with self.lock:
            s = self.slots.get(key)
            if s is not None:
                self.slots.move_to_end(key)
            return s

    def slot_of_quiet(self, key: str) -> int | None:
        """The slot holding `key`, without counting as a use (LRU order unchanged)."""
        with self.lock:
            return self.slots.get(key)

    def pin(self, key: str) -> int | None:
        """The slot holding `key`, pinned for one request (lookup and pin are one step under the lock, so
        no load can evict it in between), or None when `key` is not resident. Unpin with `release`."""
        with self.lock:
            s = self.slots.get(key)
            if s is not None:
                self.slots.move_to_end(key)
                self.in_use[s] = self.in_use.get(s, 0) + 1
            return s

    def load(self, key: str, folder: Path, *, pin: bool = False, keep: frozenset = frozenset()) -> int:
        """Read a validated PEFT folder into a free (or least recently used, idle) slot, evicting the keys in
        `keep` (adapters requests are waiting for) only when no other idle slot is left. With `pin`, the slot
        comes back pinned for the caller's request. Raises SlotsBusy when every slot is pinned."""
        from safetensors.torch import load_file
        folder = Path(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        r = int(config["r"])
        alpha = float(config.get("lora_alpha", r))
        scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
        try:
            tensors = load_file(str(folder / "adapter_model.safetensors"), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise InvalidAdapter(f"cannot read {folder.name}/adapter_model.safetensors ({e}): export it again") from None
        parsed = {}
        index = self._index()
        prefix = self.layer_prefix + "."
        for k, t in tensors.items():
            name = k.removeprefix("base_model.model.")
            mod, _, rest = name.partition(".lora_")
            ab = rest[:1]
            if not mod.startswith(prefix):
                raise InvalidAdapter(f"tensor {k} is outside the decoder layers: not supported")
            layer_s, _, suffix = mod[len(prefix):].partition(".")
            suffix = suffix.split(".")[-1]
            if suffix not in index:
                raise InvalidAdapter(f"tensor {k} targets {suffix!r}, not a projection this engine adapts")
            parsed[(int(layer_s), suffix, ab)] = t
        with self.lock:
            if pin and (slot := self.pin(key)) is not None:   # another request loaded it meanwhile
                return slot
            slot = self._free_slot(keep)   # first: a full bank must not reallocate its storage for nothing
            if r > self.rank:
                self._grow_rank(r)
            R = self.rank
            for li in range(self.n_layers):
                for gi in range(len(self.groups)):
                    self.A[li][gi][slot].zero_()
                    self.Bt[li][gi][slot].zero_()
            for (li, suffix, ab), t in parsed.items():
                if ab != "A":
                    continue
                gi, pi, off, out = index[suffix]
                B = parsed[(li, suffix, "B")]
                self.A[li][gi][slot, pi * R:pi * R + r] = t.to(self.dtype)
                self.Bt[li][gi][slot, pi * R:pi * R + r, off:off + out] = (B.t() * scale).to(self.dtype)
            self.slots[key] = slot
            self.slots.move_to_end(key)
            if pin:
                self.in_use[slot] = self.in_use.get(slot, 0) + 1
            return slot

    def _free_slot(self, keep: frozenset = frozenset()) -> int:
        used = set(self.slots.values())
        for s in range(1, self.max_slots + 1):
            if s not in used:
                return s
        for spare in (False, True):   # idle slots nobody waits for first, then idle ones; least recently used first
            for key, s in self.slots.items():
                if not self.in_use.get(s) and (spare or key not in keep):
                    del self.slots[key]
                    return s
        raise SlotsBusy(f"all {self.max_slots} adapter slots are serving other domains' requests: retry in a "
                        "few seconds (or start the server with a larger --max-resident-adapters)")

    def has_room(self) -> bool:
        """True when a load would find a slot now (a free one, or one no request pins)."""
        with self.lock:
            return len(self.slots) < self.max_slots or any(not self.in_use.get(s) for s in self.slots.values())

    def pins(self, slot: int) -> int:
        with self.lock:
            return self.in_use.get(slot, 0)

    def evict(self, key: str) -> None:
        with self.lock:
            self.slots.pop(key, None)

    def release(self, slot: int) -> None:
        if slot:
            with self.lock:
                self.in_use[slot] -= 1
                if not self.in_use[slot]:
                    self.released.notify_all()

    def wait_for_release(self, timeout: float) -> None:
        """Block until some slot's last pin goes (or `timeout` seconds pass)."""
        with self.lock:
            self.released.wait(timeout)

    # Compute -----------------------------------------------------------------------------------
    def delta(self, layer: int, group: int, h: torch.Tensor, rows: torch.Tensor, uniform: int | None,
              out: torch.Tensor) -> None:
        """out += LoRA delta for rows of h ([N, in]); rows [N] gives each row's slot."""
        if uniform == 0:
            return
        N = h.shape[0]
        if (self.kernel is not None and N <= KERNEL_MAX_ROWS and h.dtype in KERNEL_DTYPES
                and out.dtype in KERNEL_DTYPES and h.stride(-1) == 1 and out.stride(-1) == 1):
            shape, weights = self._kargs[group], self._kptrs[layer][group]
            if self.kernel(N, *shape, h.data_ptr(), h.stride(0), h.dtype == torch.bfloat16, out.data_ptr(),
                           out.stride(0), out.dtype == torch.bfloat16, *weights, rows.data_ptr(), self._scratch):
                raise RuntimeError("LoRA kernel failed")
            return
        cd = self.compute_dtype
        h = h.to(cd)
        if uniform is not None:   # one adapter for all rows: two matmuls
            out.add_(torch.mm(torch.mm(h, self.A_of[layer][group][uniform].to(cd).t()),
                              self.B_of[layer][group][uniform].to(cd)))
            return
        A, Bt = self.A[layer][group], self.Bt[layer][group]
        t = torch.bmm(h.unsqueeze(1), A.index_select(0, rows).to(cd).transpose(1, 2))
        out.add_(torch.bmm(t, Bt.index_select(0, rows).to(cd)).squeeze(1))
