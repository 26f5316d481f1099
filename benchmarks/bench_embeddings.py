"""Embedding throughput: the numpy MiniLM (assistant/minilm.py, what `Embedder` runs) against
sentence-transformers on torch (what it ran before), on the same 2000 support-style texts, both warm,
each the way `Embedder` runs it on all cores. Rounds alternate the two, so both see the same load.

sentence-transformers comes with the test extras (`pip install -e .[test]`).

`run()` prints a table with the CPU and returns {"minilm_numpy_vs_torch": texts/s numpy / texts/s torch}.
Target: >= 0.8.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from common import on_all_cores, print_table, sized  # sets the thread defaults first

N_TEXTS = sized(2_000, 40)
ROUNDS = sized(3, 1)
TORCH_BATCH = 64     # what `Embedder` used with sentence-transformers


def cpu_description() -> str:
    """The CPU's model name, core count and the flags that matter here."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = [f for f in ("avx512_bf16", "avx512f", "avx2") if f" {f}" in text]
    return f"{name}, {len(os.sched_getaffinity(0))} cores, flags: {' '.join(flags) or 'neither avx512 nor avx2'}"


def run() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_curation import synthetic_items
    from sentence_transformers import SentenceTransformer

    from assistant.embeddings import Embedder, model_path
    texts = synthetic_items(N_TEXTS, seed=5)
    model = Embedder()._load()
    reference = SentenceTransformer(str(model_path()), device="cpu", local_files_only=True)

    def numpy_side(batch=texts):
        fresh = Embedder()                 # nothing cached: every text goes through the model
        fresh._model = model
        return fresh.embed(batch)

    def torch_side(batch=texts):
        return on_all_cores(lambda: reference.encode(batch, batch_size=TORCH_BATCH, normalize_embeddings=True,
                                                     convert_to_numpy=True, show_progress_bar=False))
    numpy_side(texts[:TORCH_BATCH])        # warm: first calls allocate and spin up thread pools
    torch_side(texts[:TORCH_BATCH])
    best = {"numpy": float("inf"), "torch": float("inf")}
    for _ in range(ROUNDS):
        for name, fn in (("numpy", numpy_side), ("torch", torch_side)):
            start = time.perf_counter()
            out = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            if name == "numpy":
                ours = out
            else:
                cosine = float((ours * out).sum(axis=1).min())
    ratio = best["torch"] / best["numpy"]
    print_table(f"MiniLM embeddings, {N_TEXTS} texts, best of {ROUNDS} alternating rounds; CPU {cpu_description()}", [
        ("numpy (texts/s)", f"{N_TEXTS / best['numpy']:.0f}"),
        ("sentence-transformers (texts/s)", f"{N_TEXTS / best['torch']:.0f}"),
        ("minilm_numpy_vs_torch", f"{ratio:.2f}   target >= 0.8"),
        ("lowest cosine numpy vs torch", f"{cosine:.7f}"),
    ])
    sys.stdout.flush()
    return {"minilm_numpy_vs_torch": round(ratio, 3)}


if __name__ == "__main__":
    import json
    print(json.dumps(run()))
