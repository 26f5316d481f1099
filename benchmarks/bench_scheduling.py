"""Adapter scheduling under oversubscription: the same requests over 4 domains served with 2 adapter slots
(requests wait for a slot and adapters are swapped in) against 4 slots (every adapter stays resident).
Prints `oversubscribed_vs_fit`: tokens/s on 2 slots / tokens/s on 4 (target >= 0.7, with 0 errors)."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import make_adapter  # noqa: E402 - after the sys.path line and the thread policy

from common import print_table, sized  # noqa: E402

DOMAINS = 4
PER_DOMAIN = sized(8, 2)
N_TOKENS = sized(16, 4)
PAIRS = sized(3, 1)
QUESTIONS = ["What is a LoRA adapter?", "Summarise the refund policy.", "Name three rivers.", "Explain tides briefly."]


def cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}; flags: {' '.join(have) or 'none of avx2/avx512f/avx512_bf16/amx_bf16'}"


def serve_all(engine, folders: dict, prompts: list) -> tuple[float, int]:
    """Submit every request at once; (generated tokens per second, errors)."""
    from assistant.engine.engine import Request
    t = time.perf_counter()
    hs = [engine.submit(Request(prompt_ids=ids, max_new_tokens=N_TOKENS, ignore_eos=True, adapter=key,
                                adapter_folder=lambda key=key: folders[key])) for key, ids in prompts]
    errors = 0
    for h in hs:
        try:
            h.result()
        except Exception:  # noqa: BLE001 - counted, and reported
            errors += 1
    return sum(len(h.req.generated) for h in hs) / (time.perf_counter() - t), errors


def run(base_model: str = "embedded") -> dict:
    from assistant.engine.engine import Engine
    from assistant.engine.model import load_base
    from assistant.settings import Settings

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), base_model=base_model).ensure_dirs()
        base = load_base(settings, verbose=False)
        folders = {f"d{i}": make_adapter(str(base.path), Path(home) / f"d{i}", seed=i, rank=8) for i in range(DOMAINS)}
        fit = Engine(base, max_resident_adapters=DOMAINS)
        over = Engine(base, max_resident_adapters=DOMAINS // 2)
        prompts = [(f"d{i % DOMAINS}", fit.encode_chat([{"role": "user", "content": QUESTIONS[(i // DOMAINS) % 4]}]))
                   for i in range(DOMAINS * PER_DOMAIN)]
        serve_all(fit, folders, prompts[:DOMAINS])      # warm up both
        serve_all(over, folders, prompts[:DOMAINS])
        rounds, errors = [], 0
        for i in range(PAIRS):   # in turn first, so that a drift of the machine's speed favours neither
            order = (fit, over) if i % 2 == 0 else (over, fit)
            got = {id(e): serve_all(e, folders, prompts) for e in order}
            errors += got[id(fit)][1] + got[id(over)][1]
            rounds.append((got[id(fit)][0], got[id(over)][0]))
        fit.close()
        over.close()
    ratio = statistics.median(o / f for f, o in rounds)
    ratios = {"oversubscribed_vs_fit": round(ratio, 3), "oversubscribed_errors": errors}
    print_table(f"{DOMAINS} domains x {PER_DOMAIN} requests x {N_TOKENS} tokens; CPU: {cpu()}", [
        ("4 slots (fit), tok/s per round", ", ".join(f"{f:.1f}" for f, _ in rounds)),
        ("2 slots (oversubscribed), tok/s per round", ", ".join(f"{o:.1f}" for _, o in rounds)),
        ("errors (both sides, all rounds)", str(errors)),
        *[(k, str(v)) for k, v in ratios.items()],
    ])
    return ratios


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "embedded")))
