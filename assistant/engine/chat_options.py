"""What a chat request asks beyond its messages, turned into engine requests: sampling settings checked
and defaulted (vLLM's top_k, min_p, repetition_penalty and min_tokens too), `n` rows with their seeds,
logprobs, penalties and logit_bias, and the structured output that `response_format` or a forced tool call
asks for (a JSON grammar the engine enforces per row)."""

from __future__ import annotations

from assistant.engine.toolcalls import call_schema
from assistant.errors import AssistantError
from assistant.settings import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_CAP

MAX_STOP_STRINGS = 4
SEED_SPACE = 2 ** 64            # seeds wrap into torch's unsigned 64-bit range
TOP_K_OFF = (0, -1)             # vLLM's words for "no top_k"


def check_sampling(max_tokens, temperature, top_p, stop) -> tuple[int, float, float, tuple[str, ...]]:
    """The request's sampling fields, checked and defaulted."""
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_NEW_TOKENS
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_NEW_TOKENS_CAP:
        raise AssistantError(f"max_tokens must be between 1 and {MAX_NEW_TOKENS_CAP}", param="max_tokens")
    temperature = 0.0 if temperature is None else float(temperature)
    if not 0 <= temperature <= 2:
        raise AssistantError("temperature must be between 0 and 2", param="temperature")
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0 < top_p <= 1:
        raise AssistantError("top_p must be in (0, 1]", param="top_p")
    if isinstance(stop, str):
        stop = [stop]
    stop = tuple(s for s in (stop or []) if isinstance(s, str) and s)
    if len(stop) > MAX_STOP_STRINGS:
        raise AssistantError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    return max_tokens, temperature, top_p, stop


def check_extensions(max_tokens: int, top_k=None, min_p=None, repetition_penalty=None,
                     min_tokens=None) -> dict:
    """vLLM's sampling extensions, checked and defaulted: the Request fields they set."""
    top_k = 0 if top_k is None or top_k in TOP_K_OFF else top_k
    if not isinstance(top_k, int) or top_k < 0:
        raise AssistantError("top_k must be a positive integer, or 0 or -1 for off", param="top_k")
    min_p = 0.0 if min_p is None else float(min_p)
    if not 0 <= min_p <= 1:
        raise AssistantError("min_p must be between 0 and 1", param="min_p")
    repetition_penalty = 1.0 if repetition_penalty is None else float(repetition_penalty)
    if not 0 < repetition_penalty < float("inf"):
        raise AssistantError("repetition_penalty must be above 0 (1 is off)", param="repetition_penalty")
    min_tokens = 0 if min_tokens is None else min_tokens
    if not isinstance(min_tokens, int) or not 0 <= min_tokens <= max_tokens:
        raise AssistantError(f"min_tokens must be between 0 and the answer's token limit ({max_tokens} here)",
                             param="min_tokens")
    return {"top_k": top_k, "min_p": min_p, "repetition_penalty": repetition_penalty, "min_tokens": min_tokens}


def structured_spec(tools, tool_choice, response_format) -> tuple[tuple | None, str | None]:
    """(the grammar spec of the answer, how it carries tool calls: None, "auto" or "call")."""
    if tools and tool_choice not in (None, "none", "auto"):
        name = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
        return ("json_schema", call_schema(tools, name)), "call"
    mode = "auto" if tools and tool_choice != "none" else None
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return ("json_object", None), mode
    if kind == "json_schema":
        return ("json_schema", response_format["json_schema"].get("schema") or {"type": "object"}), mode
    if kind != "text":
        raise AssistantError(f"response_format type {kind!r} is not one of text, json_object, json_schema",
                             param="response_format")
    return None, mode


def build_requests(ids: list[int], n: int, tools, tool_choice, response_format, *, adapter: str | None,
                   max_tokens=None, temperature=None, top_p=None, seed=None, stop=None, logprobs: int | None = None,
                   frequency_penalty: float = 0.0, presence_penalty: float = 0.0, logit_bias=None,
                   ignore_eos: bool = False, **extensions) -> tuple[list, str | None]:
    """The engine requests of one chat request's `n` answers (row i samples with seed + i), and the tool mode.
    `extensions`: top_k, min_p, repetition_penalty, min_tokens (`check_extensions`)."""
    from assistant.engine.engine import Request
    max_tokens, temperature, top_p, stop = check_sampling(max_tokens, temperature, top_p, stop)
    extensions = check_extensions(max_tokens, **extensions)
    spec, mode = structured_spec(tools, tool_choice, response_format)
    reqs = [Request(prompt_ids=list(ids), max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    seed=None if seed is None else (seed + i) % SEED_SPACE, stop=stop, adapter=adapter,
                    ignore_eos=bool(ignore_eos), logprobs=logprobs, frequency_penalty=frequency_penalty or 0.0,
                    presence_penalty=presence_penalty or 0.0, logit_bias=dict(logit_bias or {}), structured=spec,
                    **extensions)
            for i in range(n)]
    return reqs, mode
