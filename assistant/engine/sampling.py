"""Numerically safe choice of the next token from a row's logits.

Every value the API accepts must give an answer: a temperature of 1e-40 once divided the logits into inf,
softmax into NaN, and `torch.multinomial` raised for the whole batch. Here:
- logits are float32 and NaN never survives (NaN counts as "never this token");
- a temperature below TEMPERATURE_FLOOR (or not finite) decodes greedily, as 0 does;
- the logits are shifted by their maximum before the temperature divides them, so the best token's weight
  is exactly 1 and nothing overflows;
- `top_p` is raised to TOP_P_FLOOR at least, and the most likely token is always kept;
- `min_p` and `top_k` (vLLM's order: after the temperature, min_p, then top_k, then top_p on what is left,
  renormalized) never drop the most likely token either; `top_k` 1 is greedy, whatever the temperature;
- the weights are checked before `multinomial`: if they still are not finite and positive, the row decodes
  greedily. A row with no usable logit at all raises `SamplingError` (that request alone fails).
"""

from __future__ import annotations

import torch

from assistant.errors import SamplingError

__all__ = ["SamplingError", "TEMPERATURE_FLOOR", "TOP_P_FLOOR", "greedy", "is_greedy", "row_is_greedy", "sample"]

TEMPERATURE_FLOOR = 1e-5   # below this, sampling is greedy (the distribution is a point mass anyway)
TOP_P_FLOOR = 1e-6         # smaller top_p values are raised to this (keeps only the most likely token)


def clean(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with NaN as -inf and +inf as the largest finite value."""
    x = logits.float()
    if not torch.isfinite(x).all():
        x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    return x


def is_greedy(temperature: float) -> bool:
    """True when this temperature decodes greedily: below the floor, 0, or not a finite number."""
    return not (TEMPERATURE_FLOOR <= temperature < float("inf"))


def row_is_greedy(req) -> bool:
    """True when a request's row decodes greedily: its temperature does, or top_k keeps one token."""
    return is_greedy(req.temperature) or req.top_k == 1


def greedy(logits: torch.Tensor) -> list[int]:
    """The most likely token of each row of logits [B, V]."""
    x = clean(logits)
    if (x.amax(-1) == float("-inf")).any():
        raise SamplingError("the model produced no finite logit for this request")
    return x.argmax(-1).tolist()


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
           top_k: int = 0, min_p: float = 0.0) -> int:
    """The next token of one row (logits [V])."""
    x = clean(logits.reshape(-1))
    top = x.max()
    if top == float("-inf"):
        raise SamplingError("the model produced no finite logit for this request")
    if is_greedy(temperature) or top_k == 1:
        return int(x.argmax())
    probs, ids = keep_likely(torch.softmax((x - top) / float(temperature), dim=-1), top_k, min_p)
    top_p = max(float(top_p), TOP_P_FLOOR) if top_p == top_p else 1.0
    if top_p < 1.0:
        sp, si = probs.sort(descending=True)
        cut = sp.cumsum(-1) - sp > top_p          # the first token is never cut: its prefix sum is 0
        probs = torch.zeros_like(probs).scatter_(-1, si, sp.masked_fill(cut, 0.0))
    total = probs.sum()
    if not torch.isfinite(probs).all() or not total > 0:
        return int(x.argmax())
    i = int(torch.multinomial(probs.cpu()[None], 1, generator=generator)[0, 0])
    return i if ids is None else int(ids[i])


def keep_likely(probs: torch.Tensor, top_k: int, min_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probabilities, their token ids; None: all of `probs` [V], in order): less the tokens min_p drops
    (less likely than min_p times the best one), then only the `top_k` most likely (0: off), renormalized
    (top_p reads what is left). The best token always stays: its probability is positive and at least
    min_p times itself. `probs` as it is when neither is set."""
    filtered, ids = False, None
    if min_p == min_p and min_p > 0:
        probs = probs.masked_fill(probs < min(float(min_p), 1.0) * probs.max(), 0.0)
        filtered = True
    if 0 < top_k < probs.numel():
        probs, ids = probs.topk(int(top_k))     # the k candidates alone: sampling among k, not the vocabulary
        filtered = True
    return (probs / probs.sum() if filtered else probs), ids
