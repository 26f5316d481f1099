"""Turns of one conversation in the dataset.

Every rated or corrected answer is logged with the conversation before it, as it was shown: the base's
earlier answers, wrong ones included. Two steps make a conversation cost and teach what it should:

- `read_as_confirmed` (curation): in the context of a later turn, an earlier answer a person corrected
  (or liked) reads as what they confirmed; an unconfirmed earlier answer stays as it was shown. Context
  stays context (`"weight": 0`); the rows of one conversation get one `conversation` id, so the split
  keeps them together.
- `merge_turns` (training): a row whose messages begin another row's is taught inside that row, so a
  conversation of n confirmed turns is one sequence with loss on each of them, not n rows that repeat
  the conversation before each turn (about n²/2 turns of compute).
"""

from __future__ import annotations

import hashlib
import json

from assistant.engine.lm import taught


def _key(messages: list[dict]) -> str:
    """Identity of a conversation prefix: roles and contents (weights and marks aside)."""
    plain = [[m["role"], m["content"]] for m in messages]
    return hashlib.sha256(json.dumps(plain, ensure_ascii=False).encode()).hexdigest()


def read_as_confirmed(items: list[dict]) -> None:
    """In place, on curated items ({"key", "messages", "shown"?}, their last message the taught reply): an
    earlier assistant turn of an item's context that another item confirmed (matched by the conversation
    before it and the answer shown) is replaced by what that item teaches, still as context. Items linked
    this way share `item["conversation"]` (the key of the conversation's earliest confirmed turn; an item
    alone, its own key)."""
    shown_at: dict[str, dict] = {}
    for it in items:
        msgs = it["messages"]
        if msgs and msgs[-1]["role"] == "assistant":
            shown = it.get("shown", msgs[-1]["content"])
            shown_at[_key(msgs[:-1] + [{"role": "assistant", "content": shown}])] = it
    parent = {it["key"]: it["key"] for it in items}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    original = {it["key"]: [dict(m) for m in it["messages"]] for it in items}
    for it in items:
        msgs = original[it["key"]]
        for p in range(len(msgs) - 1):
            if msgs[p]["role"] != "assistant" or msgs[p].get("weight", 1) != 0:   # context turns only
                continue
            earlier = shown_at.get(_key(msgs[:p + 1]))
            if earlier is None or earlier is it:
                continue
            it["messages"][p] = {**it["messages"][p], "content": earlier["messages"][-1]["content"]}
            a, b = root(it["key"]), root(earlier["key"])
            if a != b:
                first, later = sorted((a, b), key=lambda k: (len(original[k]), k))
                parent[later] = first
    for it in items:
        it["conversation"] = root(it["key"])


def merge_turns(rows: list[dict]) -> list[dict]:
    """Training rows with every row that begins a longer one taught inside it: the longer row's turn at
    that place carries loss (its `"weight": 0` dropped). Rows keep their order; a merged row's place is
    the longest row's. `rows` are of one split (training merges its train rows)."""
    prefixes: dict[str, int] = {}            # prefix key -> the longest row that holds it
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["messages"]))
    keep = [True] * len(rows)
    out = [dict(r, messages=[dict(m) for m in r["messages"]]) for r in rows]
    for i in order:
        msgs = out[i]["messages"]
        if not msgs or not taught(msgs[-1]):
            continue
        holder = prefixes.get(_key(msgs))
        if holder is not None:
            target = out[holder]["messages"]
            for p, m in enumerate(msgs):     # everything this row teaches, taught in the longer row
                if taught(m):
                    target[p] = {k: v for k, v in target[p].items() if k != "weight"}
            keep[i] = False
            continue
        for p, m in enumerate(msgs):
            if m["role"] == "assistant":
                prefixes.setdefault(_key(msgs[:p + 1]), i)
    return [r for r, k in zip(out, keep) if k]


def taught_turns(row: dict) -> int:
    """How many replies of a row carry loss."""
    return sum(taught(m) for m in row["messages"])
