"""Grammar-constrained decoding (xgrammar, per row in the engine's batch) against free decoding: tokens/s
of the same prompts, generating the same number of tokens, with a JSON-schema constraint and without.
The schema asks for a long array, so the constrained answers run to max_new_tokens as the free ones do
(`ignore_eos`). Prints `constrained_vs_free_decode` (one row) and `constrained_vs_free_decode_batch4`
(four rows decoded together), with the CPU and its flags."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, sized  # noqa: E402  (before torch)

N_TOKENS = sized(64, 8)
ROUNDS = sized(2, 1)
PROMPTS = ["List forty animals as JSON.", "List forty colors as JSON.", "List forty cities as JSON.",
           "List forty fruits as JSON."]
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 24},
                                                     "minItems": 60, "maxItems": 60}},
          "required": ["items"], "additionalProperties": False}


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text) or "none of avx2/avx512"


def decode_rate(engine, prompts, structured) -> float:
    """Tokens/s of the prompts decoded together (best of ROUNDS), each to N_TOKENS tokens."""
    from assistant.engine.chat_options import build_requests
    best = 0.0
    for _ in range(ROUNDS):
        reqs = []
        for p in prompts:
            ids = engine.encode_chat([{"role": "user", "content": p}])
            fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}} if structured else None
            reqs += build_requests(ids, 1, None, None, fmt, adapter=None, max_tokens=N_TOKENS,
                                   ignore_eos=not structured)[0]
        handles = [engine.submit(r) for r in reqs]
        for h in handles:
            h.result()
        tokens = sum(len(r.generated) - 1 for r in reqs)
        first = max(r.t_first for r in reqs)
        last = max(r.t_done for r in reqs)
        assert all(len(r.generated) == N_TOKENS for r in reqs), [len(r.generated) for r in reqs]
        best = max(best, tokens / (last - first))
    return best


def run(base_model: str = "embedded") -> dict:
    from assistant.engine.engine import Engine
    from assistant.engine.model import load_base
    from assistant.settings import Settings
    engine = Engine(load_base(Settings(base_model=base_model), verbose=False), max_batch=8)
    try:
        decode_rate(engine, PROMPTS[:1], True)   # warm-up: compiles the grammar once, as a server would
        one = {s: decode_rate(engine, PROMPTS[:1], s) for s in (False, True)}
        four = {s: decode_rate(engine, PROMPTS, s) for s in (False, True)}
    finally:
        engine.close()
    ratios = {"constrained_vs_free_decode": one[True] / one[False],
              "constrained_vs_free_decode_batch4": four[True] / four[False]}
    print_table(f"JSON-schema constrained vs free decode, {N_TOKENS} tokens per row ({cpu_name()}, CPU flags: "
                f"{cpu_flags()})", [
                    ("one row, free", f"{one[False]:.1f} tok/s"), ("one row, constrained", f"{one[True]:.1f} tok/s"),
                    ("four rows, free", f"{four[False]:.1f} tok/s"),
                    ("four rows, constrained", f"{four[True]:.1f} tok/s"),
                    *((k, f"{v:.2f}") for k, v in ratios.items())])
    return ratios


if __name__ == "__main__":
    run()
