"""The engine's waiting room: requests queued for a row of the batch and, when they ask for an adapter, for
an adapter slot (engine/lora.py). More domains than slots is ordinary load, not an error: a request whose adapter is
not resident waits here, and gets a slot as soon as one frees.

Rules, applied at every engine step, oldest request first:
- a request whose adapter is resident pins its slot and goes (unless that slot is being drained, below);
- a request whose adapter is not resident loads it into a free slot, else into an idle one (no request pins
  it) whose adapter nobody here waits for, else into any idle one;
- when every slot is pinned, the oldest such request *drains* one slot (at most half the slots drain at
  once): the one whose adapter the fewest waiting requests want (least recently used among equals). No new
  request is admitted to a draining slot; when its rows finish, the waiting adapter takes it. So a busy
  domain cannot starve a quiet one: each adapter waiting for a slot gets one within the time its victim's
  answers take to finish;
- a request that waited MAX_QUEUE_WAIT_S for an adapter slot is refused with `Busy` (503 server_busy,
  Retry-After). Waiting for a row of the batch has no deadline: rows are served in order, and the queue's
  length (the engine's `max_queue`) bounds that wait; a job's evaluation queues all its questions at once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from assistant.errors import AssistantError, Busy, GenerationFailed, SlotsBusy

log = logging.getLogger(__name__)

MAX_QUEUE_WAIT_S = 120.0   # the longest a request waits for an adapter slot before 503 server_busy


class WaitingRoom:
    """Handles waiting for the engine, oldest first. Used by the engine thread only."""

    def __init__(self, bank, max_wait_s: float = MAX_QUEUE_WAIT_S):
        self.bank = bank                       # the LoraBank, or None when the engine has no adapters
        self.max_wait_s = max_wait_s
        self.items: list = []                  # Handles, in arrival order
        self.draining: dict[int, tuple[str, str]] = {}   # slot -> (its adapter, the adapter waiting for it)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, h) -> None:
        self.items.append(h)

    def pop_ready(self, now: float | None = None):
        """The oldest request that can go now, as (handle, error): error None means "prefill it" (its adapter
        slot, if any, is pinned); an error ends it (cancelled requests come back with the string "cancelled").
        None when nobody can go."""
        now = time.perf_counter() if now is None else now
        self._tidy()
        waiting = Counter(h.req.adapter for h in self.items if h.req.adapter is not None and not h.req.slot)
        if waiting and not self.bank.has_room():   # every slot pinned: the oldest absent adapters drain one each
            for key in dict.fromkeys(h.req.adapter for h in self.items if h.req.adapter is not None and not h.req.slot):
                if len(self.draining) >= max(1, self.bank.max_slots // 2):   # the others keep serving
                    break
                if self.bank.slot_of_quiet(key) is None and key not in self._wanted():
                    self._drain_for(key, waiting)
        for h in self.items:
            req = h.req
            if h.cancelled.is_set():
                return self._take(h, "cancelled")
            if req.adapter is not None and not req.slot and now - req.t_submit > self.max_wait_s:
                return self._take(h, Busy(f"the server is busy: this request waited {self.max_wait_s:.0f} s for "
                                          "the model (every adapter slot was serving other domains): retry in a "
                                          "few seconds"))
            if req.adapter is None or req.slot:
                return self._take(h, None)
            try:
                if self._acquire(req, waiting):
                    return self._take(h, None)
            except AssistantError as e:   # its adapter cannot load: this request alone fails
                return self._take(h, e)
            except Exception:  # noqa: BLE001 - an unreadable folder, a bug: still this request alone
                log.exception("loading adapter %s for request %s failed", req.adapter, req.id)
                return self._take(h, GenerationFailed(f"the adapter {req.adapter} could not be loaded (the error is "
                                                      "in the server log): tell the operator"))
        return None

    def _take(self, h, error):
        self.items.remove(h)
        return h, error

    def _acquire(self, req, waiting: Counter) -> bool:
        """Pin (or load and pin) the request's adapter; False when it has to wait."""
        bank, key = self.bank, req.adapter
        resident = bank.slot_of(key)
        if resident is not None:
            if resident in self.draining:
                return False
            req.slot = bank.pin(key) or 0
            if req.slot:
                return True
        if bank.has_room():
            try:
                req.slot = bank.load(key, req.adapter_folder(), pin=True, keep=frozenset(waiting))
            except SlotsBusy:
                return False
            for slot, (_, wanted) in list(self.draining.items()):
                if wanted == key:
                    del self.draining[slot]
            return True
        return False

    def _wanted(self) -> set[str]:
        return {wanted for _, wanted in self.draining.values()}

    def _drain_for(self, key: str, waiting: Counter) -> None:
        with self.bank.lock:
            order = list(self.bank.slots.items())      # least recently used first
        candidates = [(waiting.get(k, 0), i, s, k) for i, (k, s) in enumerate(order) if s not in self.draining]
        if candidates:
            _, _, slot, victim = min(candidates)
            self.draining[slot] = (victim, key)

    def _tidy(self) -> None:
        """Forget drains whose slot changed hands or whose waiting adapter nobody waits for any more."""
        if not self.draining:
            return
        wanted = {h.req.adapter for h in self.items if not h.cancelled.is_set()}
        for slot, (victim, key) in list(self.draining.items()):
            if self.bank.slots.get(victim) != slot or key not in wanted:
                del self.draining[slot]
