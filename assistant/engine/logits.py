"""Per-row logits controls of the engine, applied to a decode step's logits before sampling: logit_bias,
frequency and presence penalties, the repetition penalty (HF's and vLLM's rule: a logit of an id the prompt
or the answer holds is divided by the penalty when positive, multiplied when negative), a grammar constraint
(engine/grammar.py) that masks every token the grammar does not allow, and `min_tokens` (the end-of-sequence
ids masked until the answer has that many; a grammar that allows nothing but the end still ends it).
Also each row's logprobs, read from the model's own distribution (the raw logits, before any control or
temperature: what OpenAI and vLLM report), so a greedy answer's logprobs sum to the model's score of that
answer. Rows without controls cost nothing here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

REPETITION_PENALTY_FLOOR = 1e-6   # smaller penalties act as this one (in float32 they would be 0)


@dataclass
class TokenLogprob:
    """One generated token: its id, its logprob, and the `top` most likely ids with theirs."""
    id: int
    logprob: float
    top: list[tuple[int, float]]


def needs_controls(req) -> bool:
    return bool(req.logit_bias or req.frequency_penalty or req.presence_penalty or req.constraint is not None
                or req.repetition_penalty != 1.0 or too_short(req))


def too_short(req) -> bool:
    """True while the end of sequence may not end this answer yet (`min_tokens`)."""
    return req.min_tokens > len(req.generated) and not req.ignore_eos


def apply(reqs, logits: torch.Tensor, eos=()) -> torch.Tensor:
    """`logits` [B, V] of rows `reqs`, with each row's controls applied (a float copy when any row has some),
    and each row's log-distribution kept on the request when it asked for logprobs (`req.pending_lp`).
    `eos`: the end-of-sequence ids (what `min_tokens` masks)."""
    want_lp = [i for i, r in enumerate(reqs) if r.logprobs is not None]
    controlled = [i for i, r in enumerate(reqs) if needs_controls(r)]
    if not want_lp and not controlled:
        return logits
    logits = logits.float().clone() if controlled else logits
    if want_lp:
        lp = torch.log_softmax(logits[want_lp].float(), dim=-1)
        for j, i in enumerate(want_lp):
            reqs[i].pending_lp = lp[j]
    for i in controlled:
        r, row = reqs[i], logits[i]
        if r.logit_bias:
            ids = torch.tensor([t for t in r.logit_bias if t < row.shape[0]], dtype=torch.long)
            if len(ids):
                row[ids] += torch.tensor([r.logit_bias[int(t)] for t in ids], dtype=row.dtype)
        if r.repetition_penalty != 1.0:   # after logit_bias, before the other penalties: vLLM's and HF's order
            penalize_repetition(row, r.prompt_ids + r.generated, r.repetition_penalty)
        if (r.frequency_penalty or r.presence_penalty) and r.generated:
            ids, counts = torch.tensor(r.generated, dtype=torch.long).unique(return_counts=True)
            row[ids] -= r.frequency_penalty * counts.to(row.dtype) + r.presence_penalty
        if r.constraint is not None:
            r.constraint.mask(row)
        if eos and too_short(r):
            forbid_end(row, eos)
    return logits


def penalize_repetition(row: torch.Tensor, seen: list[int], penalty: float) -> None:
    """HF's and vLLM's repetition penalty on `row` [V], in place: each id in `seen`, once."""
    ids = torch.tensor(seen, dtype=torch.long, device=row.device).unique()
    ids = ids[ids < row.shape[0]]
    p = max(float(penalty), REPETITION_PENALTY_FLOOR)
    x = row[ids]
    row[ids] = torch.where(x > 0, x / p, x * p)


def forbid_end(row: torch.Tensor, eos) -> None:
    """The end-of-sequence ids of `row` [V] masked, unless nothing else is left (a grammar that allows only
    the end: the answer is whole)."""
    ids = torch.tensor([t for t in eos if t < row.shape[0]], dtype=torch.long, device=row.device)
    kept = row[ids].clone()
    row[ids] = float("-inf")
    if not bool((row > float("-inf")).any()):
        row[ids] = kept


def record(req, tok: int) -> None:
    """After `tok` was picked for `req`: its logprob and the top alternatives, when asked for."""
    lp = getattr(req, "pending_lp", None)
    if req.logprobs is None or lp is None:
        return
    top = []
    if req.logprobs > 0:
        values, ids = lp.topk(req.logprobs)
        top = list(zip(ids.tolist(), values.tolist()))
    req.token_logprobs.append(TokenLogprob(tok, float(lp[tok]), top))
    req.pending_lp = None
