"""A differential stress run of the engine (used by tests/test_engine_stress.py): a seeded random mix of
requests, each also served alone; the mix must give every request what it gives alone.

The mix: prompt lengths from a few tokens to near the context, max_tokens 1..512, stop strings, greedy and
seeded sampled requests, temperatures and top_p at their extremes, more adapters than slots, cancellations and
client disconnects mid-stream, staggered arrivals, and invalid requests (over the context) that must be
refused at once. Works on engines with and without a waiting room for adapters (old code is checked too)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

from assistant.engine.engine import Request
from assistant.errors import ContextTooLong

TEMPERATURES = (0.0, 0.0, 1e-40, 5e-324, 1e-5, 0.7, 1.0, 2.0)
TOP_PS = (1.0, 1.0, 0.9, 0.5, 1e-30)
STOPS = ((), (), (), ("e",), ("the", "."), ("\n",))


@dataclass
class Spec:
    n: int
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    adapter: str | None
    action: str                    # "read" | "cancel" | "disconnect"
    after: int                     # events read before a cancel / disconnect
    delay: float                   # arrival, seconds after the start
    valid: bool = True
    result: dict = field(default_factory=dict)


def make_specs(rng: random.Random, n: int, vocab: int, context: int, adapters: list[str], *, long_share=0.3,
               max_tokens_cap: int = 512) -> list[Spec]:
    specs = []
    for i in range(n):
        if rng.random() < long_share:
            length = rng.randint(context // 2, context - 2)
        else:
            length = rng.randint(1, 48)
        valid = rng.random() > 0.05
        if not valid:
            length = context + rng.randint(0, 20)
        prompt = [rng.randrange(3, vocab) for _ in range(length)]
        sampled = rng.random() < 0.5
        specs.append(Spec(
            n=i, prompt=prompt, max_tokens=rng.choice((1, 2, rng.randint(1, 64), rng.randint(1, max_tokens_cap))),
            temperature=rng.choice(TEMPERATURES[2:]) if sampled else 0.0,
            top_p=rng.choice(TOP_PS), seed=rng.randrange(2 ** 31) if sampled else None,
            stop=rng.choice(STOPS), adapter=rng.choice([None, *adapters]),
            action=rng.choices(("read", "cancel", "disconnect"), (8, 1, 1))[0], after=rng.randint(0, 6),
            delay=rng.random() * 0.3, valid=valid))
    return specs


def request_of(engine, spec: Spec, folders: dict) -> Request:
    req = Request(prompt_ids=list(spec.prompt), max_new_tokens=spec.max_tokens, temperature=spec.temperature,
                  top_p=spec.top_p, seed=spec.seed, stop=spec.stop, adapter=spec.adapter)
    if spec.adapter is not None:
        if getattr(engine, "schedules_adapters", False):
            req.adapter_folder = lambda a=spec.adapter: folders[a]
        else:   # an engine without a waiting room: the request comes pinned
            req.slot = engine.load_adapter(spec.adapter, folders[spec.adapter], pin=True)
    return req


def solo(engine, spec: Spec, folders: dict) -> dict:
    """The request served alone, read to the end."""
    try:
        h = engine.submit(request_of(engine, spec, folders))
    except ContextTooLong:
        return {"refused": True}
    try:
        text, reason = h.result()
    except Exception as e:  # noqa: BLE001 - recorded: the check says it must not happen
        return {"error": repr(e)}
    return {"ids": list(h.req.generated), "text": text, "reason": reason}


def mixed(engine, specs: list[Spec], folders: dict, timeout: float = 600) -> None:
    """Serve all specs together, arriving at their delays; each spec's `result` is filled in."""
    finished = {}
    lock = threading.Lock()

    def counter(spec):
        def on_finish():
            with lock:
                finished[spec.n] = finished.get(spec.n, 0) + 1
        return on_finish

    def client(spec):
        time.sleep(spec.delay)
        loop = asyncio.new_event_loop() if spec.action == "disconnect" else None
        try:
            h = engine.submit(request_of(engine, spec, folders), loop=loop, on_finish=counter(spec))
        except ContextTooLong:
            spec.result = {"refused": True}
            return
        except Exception as e:  # noqa: BLE001
            spec.result = {"error": repr(e)}
            return
        if loop is not None:   # the client's connection closes after a moment: its loop is gone
            time.sleep(0.002 * spec.after)
            loop.close()
            h.done.wait(timeout)
            spec.result = {"ids": list(h.req.generated), "reason": h.req.finish_reason, "h": h}
            return
        parts, error = [], None
        for i, ev in enumerate(h):
            if ev.kind == "token":
                parts.append(ev.text)
                if spec.action == "cancel" and i + 1 >= spec.after:
                    h.cancel()
            elif ev.kind == "error":
                error = repr(ev.error)
        spec.result = {"ids": list(h.req.generated), "text": "".join(parts), "reason": h.req.finish_reason,
                       "error": error, "h": h}

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    for s in specs:
        s.result["finished"] = finished.get(s.n, 0)


def problems(specs: list[Spec], alone: dict[int, dict]) -> list[str]:
    """What differs from the solo runs, as readable lines (empty: all good)."""
    out = []
    for s in specs:
        got, want = s.result, alone[s.n]
        tag = f"#{s.n} (prompt {len(s.prompt)}, max {s.max_tokens}, T={s.temperature}, top_p={s.top_p}, " \
              f"adapter {s.adapter}, {s.action})"
        if not s.valid:
            if not got.get("refused"):
                out.append(f"{tag}: an invalid request was not refused: {got}")
            continue
        if "error" in want:
            out.append(f"{tag}: failed alone: {want['error']}")
            continue
        if got.get("error") or got.get("refused") or "ids" not in got:
            out.append(f"{tag}: failed in the mix: {got.get('error') or got}")
            continue
        if got["finished"] != 1:
            out.append(f"{tag}: finished {got['finished']} times")
        if s.action == "read":
            if (got["ids"], got["text"], got["reason"]) != (want["ids"], want["text"], want["reason"]):
                out.append(f"{tag}: answered differently in the mix: {got['reason']} {got['ids'][:12]}... "
                           f"vs alone {want['reason']} {want['ids'][:12]}...")
        elif got["ids"] != want["ids"][:len(got["ids"])] or got["reason"] not in ("cancelled", want["reason"]):
            out.append(f"{tag}: a cancelled answer is not a prefix of its solo answer ({got['reason']})")
    return out


def idle_problems(engine, timeout: float = 10) -> list[str]:
    deadline = time.time() + timeout
    room = getattr(engine, "room", ())
    while (engine.active or not engine.pending.empty() or len(room)) and time.time() < deadline:
        time.sleep(0.02)
    out = []
    if engine.active or not engine.pending.empty() or len(room):
        out.append(f"not idle: {len(engine.active)} rows, {engine.pending.qsize()} queued, {len(room)} waiting")
    if engine.runner and any(engine.runner.bank.in_use.values()):
        out.append(f"pinned slots left: {engine.runner.bank.in_use}")
    if getattr(room, "draining", None):
        out.append(f"drains left: {room.draining}")
    return out
