"""How an engine request reads in vLLM's words (structured outputs, logprobs, penalties, logit_bias), how
vLLM's logprobs come back as the engine's, and how vLLM says an adapter is loaded already."""

from __future__ import annotations

from assistant.engine.request import Request
from assistant.vllm.client import VllmError


def vllm_options(req: Request, vocab: int | None = None) -> dict:
    """What a request asks beyond sampling, in vLLM's words: structured outputs (the same JSON constraint
    the local engine enforces with xgrammar; vLLM uses xgrammar too), logprobs, penalties, logit_bias, and
    vLLM's own sampling extensions (top_k, min_p, repetition_penalty, min_tokens), each only when set (a
    top_k of the whole `vocab` or more is off, and is not sent)."""
    from assistant.engine.grammar import bounded
    out: dict = {}
    if req.structured is not None:
        kind, schema = req.structured
        # the same grammar as engine/grammar.py: no free whitespace, unbounded integers bounded
        out["structured_outputs"] = {**({"json_object": True} if kind == "json_object" else {"json": bounded(schema)}),
                                     "disable_any_whitespace": True}
    if req.logprobs is not None:
        out.update(logprobs=req.logprobs, return_tokens_as_token_ids=True)
    if req.frequency_penalty:
        out["frequency_penalty"] = req.frequency_penalty
    if req.presence_penalty:
        out["presence_penalty"] = req.presence_penalty
    if req.logit_bias:
        out["logit_bias"] = {str(k): v for k, v in req.logit_bias.items()}
    if 0 < req.top_k < (vocab or float("inf")):
        out["top_k"] = req.top_k
    if req.min_p > 0:
        out["min_p"] = req.min_p
    if req.repetition_penalty != 1.0:
        out["repetition_penalty"] = req.repetition_penalty
    if req.min_tokens > 0:
        out["min_tokens"] = req.min_tokens
    return out


def _token_id(name: str) -> int:
    return int(name.rpartition(":")[2])   # "token_id:123" (return_tokens_as_token_ids)


def vllm_logprobs(lp: dict | None, k: int) -> list:
    """A completions chunk's logprobs as the engine's TokenLogprobs (the `k` most likely rivals each)."""
    from assistant.engine.logits import TokenLogprob
    if not lp:
        return []
    tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens") or [])
    return [TokenLogprob(_token_id(t), float(v), sorted(((_token_id(k), float(x)) for k, x in (top or {}).items()),
                                                        key=lambda p: -p[1])[:k])
            for t, v, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], tops)]


def already_loaded(e: VllmError) -> bool:
    """vLLM's answer to loading a name it already has (400, "... has already been loaded")."""
    return e.http_status == 400 and "already" in (e.vllm_message or "").lower()
