"""OpenAI's `n` in the engine: several answers to one prompt, from one prefill. The first request is queued as
any other; the others follow it (`Handle.followers`). When it is admitted its prompt is read once, into one
row of the KV cache, which is copied to a row per follower that fits; each row samples with its own
generator (seeded seed, seed+1, ... by engine/chat_options.py), so the answers equal the same requests served
alone. A follower that finds no free row goes back to the queue and reads the prompt itself."""

from __future__ import annotations


def submit_group(engine, reqs: list, loop, on_finish, check) -> list:
    """Answers to one prompt (OpenAI's `n`): the first request is queued, the others follow it. When it is
    admitted its prompt is read once, into one row of the KV cache, copied to a row per follower that fits
    (a follower that does not fit waits and reads the prompt itself); each row samples with its own
    generator. Followers carry the leader's prompt_ids, adapter and settings."""
    done = list(on_finish or [None] * len(reqs))
    try:
        for r in reqs[1:]:
            check(r)   # what the engine checks of every request it takes
        followers = [engine._handle(r, loop, d) for r, d in zip(reqs[1:], done[1:])]
        return [engine._submit(reqs[0], loop, done[0], followers), *followers]
    except BaseException:
        for r in reqs:
            engine.unpin(r.slot)
            r.slot = 0
        raise


def admit_followers(engine, h, row: int, limit: int) -> list:
    """The followers of a just-prefilled request that get rows now, their KV rows copied from `row`; the
    others go back to the queue (they then read the prompt themselves)."""
    now = []
    for f in getattr(h, "followers", ()):
        if f.cancelled.is_set():
            engine._finish(f.req, f, "cancelled")
            continue
        if f.req.adapter is not None and not f.req.slot and len(engine.active) + 1 + len(now) < limit:
            f.req.slot = engine.runner.bank.pin(f.req.adapter) or 0   # resident: the leader holds it
        if len(engine.active) + 1 + len(now) < limit and (f.req.adapter is None or f.req.slot):
            engine.runner.cache.move_row(row, row + 1 + len(now), len(h.req.prompt_ids))
            now.append(f)
        else:
            engine.pending.put(f)
    return now
