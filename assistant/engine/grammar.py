"""Grammar-constrained decoding with xgrammar (the library vLLM and SGLang use): a JSON schema, or any
JSON object, compiled once per tokenizer and schema, and a `Constraint` per request that masks, at every
step of that request's row in the batch, the tokens the grammar does not allow. When the grammar is
complete only an end-of-sequence token is allowed, so the answer ends there.

Two bounds keep a small model from running to max_tokens inside a value it may make as long as it likes:
whitespace between JSON tokens is not allowed (`any_whitespace=False`; it emits newlines and spaces
forever otherwise), and an integer the schema leaves unbounded is bounded to JSON's safe integers,
±(2^53 - 1), the range every JSON parser reads exactly (it wrote "1111..." for 80 tokens otherwise)."""

from __future__ import annotations

import json
import logging
import threading
from functools import lru_cache

import torch

from assistant.errors import AssistantError

COMPILED_CACHE = 64            # compiled grammars kept per tokenizer (schemas repeat across requests)
SAFE_INTEGER = 2 ** 53 - 1     # the bound an unbounded "integer" gets

log = logging.getLogger(__name__)


class Grammars:
    """The compiler of one tokenizer (its vocabulary seen as bytes) and a cache of compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        import xgrammar as xgr
        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._compile = lru_cache(COMPILED_CACHE)(self._compile_uncached)

    def _compile_uncached(self, kind: str, schema: str):
        if kind == "json_object":
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        return self.compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)

    def constraint(self, kind: str, schema: dict | None = None, *, param: str = "response_format") -> Constraint:
        """A fresh matcher for one request: `kind` "json_object" (any object) or "json_schema" (`schema`)."""
        text = json.dumps(bounded(schema or {}))   # property order is the order the answer writes them
        try:
            with self._lock:
                compiled = self._compile(kind, text)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError with the schema's fault
            reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise AssistantError(f"the JSON schema cannot be used to constrain the answer: {reason}",
                                 param=param) from None
        return Constraint(self.xgr, compiled, self.vocab_size)


def bounded(schema):
    """The schema with every unbounded integer bounded to ±SAFE_INTEGER (a copy; the rest unchanged)."""
    if isinstance(schema, list):
        return [bounded(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    types = out.get("type")
    if types == "integer" or (isinstance(types, list) and "integer" in types):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -SAFE_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = SAFE_INTEGER
    return out


class Constraint:
    """One request's grammar state: `mask(logits_row)` before its token is picked, `accept(id)` after."""

    def __init__(self, xgr, compiled, vocab_size: int):
        self.xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, row: torch.Tensor) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        view = row.view(1, -1)
        self.xgr.apply_token_bitmask_inplace(view, self.bitmask, vocab_size=view.shape[1])

    def accept(self, tok: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(tok):
            log.warning("the grammar refused token %d, which it had allowed", tok)
