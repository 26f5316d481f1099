"""What adapters cost on one resident base: selecting one, loading one from disk, decoding
with one, and serving concurrent requests that mix them."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LONG_PROMPT, best_of, print_table, sized  # noqa: E402 - after the sys.path line and the thread policy

N_TOKENS = sized(64, 8)
N_ADAPTERS = 4
SELECTS = sized(2000, 20)
PAIRS = sized(3, 1)         # measurements of each side, interleaved


def make_adapter(model_path: str, out: Path, seed: int, rank: int = 16) -> Path:
    """A LoRA adapter of random (non-zero) weights in PEFT's format, on all projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft = get_peft_model(model, cfg)
    for n, p in peft.named_parameters():
        if "lora_" in n:
            p.data.mul_(0.05)
    peft.save_pretrained(str(out), safe_serialization=True)
    return out


def base_load_time(settings) -> float:
    """From the cached safetensors folder to the first generated token."""
    from assistant.engine.engine import Engine, Request
    from assistant.engine.model import load_base
    t = time.perf_counter()
    base = load_base(settings, verbose=False)
    engine = Engine(base)
    h = engine.submit(Request(prompt_ids=engine.encode_chat(LONG_PROMPT), max_new_tokens=1))
    h.result()
    dt = time.perf_counter() - t
    engine.close()
    return dt


def concurrent(engine, ids, adapters: list[str | None], n=N_TOKENS) -> float:
    """Aggregate tokens/s of len(adapters) requests submitted together."""
    from assistant.engine.engine import Request
    t = time.perf_counter()
    hs = [engine.submit(Request(prompt_ids=ids, max_new_tokens=n, ignore_eos=True, adapter=a,
                                slot=engine.pin_adapter(a) if a else 0)) for a in adapters]
    for h in hs:
        h.result()
    return sum(len(h.req.generated) for h in hs) / (time.perf_counter() - t)


def serial(engine, ids, adapters, n=N_TOKENS) -> float:
    from assistant.engine.engine import Request
    t = time.perf_counter()
    total = 0
    for a in adapters:
        h = engine.submit(Request(prompt_ids=ids, max_new_tokens=n, ignore_eos=True, adapter=a,
                                slot=engine.pin_adapter(a) if a else 0))
        h.result()
        total += len(h.req.generated)
    return total / (time.perf_counter() - t)


def decode_rate(engine, ids, adapter, n=N_TOKENS, repeat=3) -> float:
    from assistant.engine.engine import Request
    best = 0.0
    for _ in range(repeat):
        h = engine.submit(Request(prompt_ids=ids, max_new_tokens=n, ignore_eos=True, adapter=adapter,
                                slot=engine.pin_adapter(adapter) if adapter else 0))
        h.result()
        best = max(best, (len(h.req.generated) - 1) / (h.req.t_done - h.req.t_first))
    return best


def run(base_model: str = "embedded") -> dict:
    from assistant.server import build
    from assistant.settings import Settings

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), base_model=base_model).ensure_dirs()
        base_s = min(base_load_time(settings) for _ in range(sized(2, 1)))
        svc = build(settings, recover_jobs=False)[1]
        src = Path(home) / "src"
        names = [f"d{i}" for i in range(N_ADAPTERS)]
        for i, name in enumerate(names):
            svc.workspace.create_domain(name)
            svc.import_adapter(name, make_adapter(svc.base.path, src / name, seed=i), activate=True)
        ids = svc.engine.encode_chat(LONG_PROMPT)

        # (a) selecting another resident adapter: what a request does to pick its adapter
        for name in names:
            svc.resolve(name)
        k = SELECTS
        t = time.perf_counter()
        for i in range(k):
            svc.resolve(names[i % N_ADAPTERS])
        select_s = (time.perf_counter() - t) / k

        # (b) loading a new version from disk (validation included)
        def load():
            svc.engine.unload_adapter("d0@v1")
            svc.ensure_loaded("d0", "v1")
        load_s = best_of(load, sized(5, 1))

        # Decode speed on this shared machine drifts by a third within a minute, so each ratio below is the
        # median of ratios of measurements taken back to back, not a ratio of two bests taken apart.
        # (c) decode with an adapter against none
        pairs = []
        for i in range(PAIRS + sized(2, 1)):     # in turn first, so that a drift does not favour one side
            first, second = (None, "d0@v1") if i % 2 == 0 else ("d0@v1", None)
            a = decode_rate(svc.engine, ids, first, repeat=1)
            b = decode_rate(svc.engine, ids, second, repeat=1)
            pairs.append((a, b) if first is None else (b, a))
        base_rate, lora_rate = max(b for b, _ in pairs), max(a for _, a in pairs)
        adapter_ratio = statistics.median(a / b for b, a in pairs)

        # (d) 8 concurrent requests over 4 adapters against 8 on one; and against serving them one by one
        mixed_keys = [f"{names[i % N_ADAPTERS]}@v1" for i in range(8)]
        single_keys = ["d0@v1"] * 8
        concurrent(svc.engine, ids, mixed_keys, n=4)
        rounds = []
        for _ in range(PAIRS):
            rounds.append((concurrent(svc.engine, ids, mixed_keys), concurrent(svc.engine, ids, single_keys),
                           serial(svc.engine, ids, mixed_keys)))
        svc.close()
    mixed, single, one_by_one = (max(r[i] for r in rounds) for i in range(3))

    ratios = {
        "adapter_select_vs_base_load": round(select_s / base_s, 7),
        "adapter_load_vs_base_load": round(load_s / base_s, 4),
        "adapter_decode_vs_base": round(adapter_ratio, 3),
        "mixed_vs_single_adapter": round(statistics.median(m / s for m, s, _ in rounds), 3),
        "concurrent_vs_serial": round(statistics.median(m / o for m, _, o in rounds), 3),
    }
    print_table("adapters (rank 16 on all projections)", [
        ("base load (folder -> first token)", f"{base_s:.2f} s"),
        ("select a resident adapter", f"{select_s * 1e6:.0f} us"),
        ("load an adapter from disk", f"{load_s * 1000:.0f} ms"),
        ("decode base / with adapter (best)", f"{base_rate:.1f} / {lora_rate:.1f} tok/s"),
        ("decode with / without adapter (pairs)", ", ".join(f"{a / b:.2f}" for b, a in pairs)),
        ("8 concurrent: 4 adapters / 1 adapter (best)", f"{mixed:.1f} / {single:.1f} tok/s"),
        ("8 mixed one at a time (best)", f"{one_by_one:.1f} tok/s"),
        ("concurrent / one at a time (rounds)", ", ".join(f"{m / o:.2f}" for m, _, o in rounds)),
        *[(k, str(v)) for k, v in ratios.items()],
    ])
    return ratios


if __name__ == "__main__":
    print(json.dumps(run()))
