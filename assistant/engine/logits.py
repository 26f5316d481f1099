"""Per-row logits controls of the engine, applied to a decode step's logits before sampling: logit_bias,
frequency and presence penalties, and a grammar constraint (engine/grammar.py) that masks every token the
grammar does not allow. Also each row's logprobs, read from the model's own distribution (the raw logits,
before any control or temperature: what OpenAI and vLLM report), so a greedy answer's logprobs sum to the
model's score of that answer. Rows without controls cost nothing here."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    """One generated token: its id, its logprob, and the `top` most likely ids with theirs."""
    id: int
    logprob: float
    top: list[tuple[int, float]]


def needs_controls(req) -> bool:
    return bool(req.logit_bias or req.frequency_penalty or req.presence_penalty or req.constraint is not None)


def apply(reqs, logits: torch.Tensor) -> torch.Tensor:
    """`logits` [B, V] of rows `reqs`, with each row's controls applied (a float copy when any row has some),
    and each row's log-distribution kept on the request when it asked for logprobs (`req.pending_lp`)."""
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
        if (r.frequency_penalty or r.presence_penalty) and r.generated:
            ids, counts = torch.tensor(r.generated, dtype=torch.long).unique(return_counts=True)
            row[ids] -= r.frequency_penalty * counts.to(row.dtype) + r.presence_penalty
        if r.constraint is not None:
            r.constraint.mask(row)
    return logits


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
