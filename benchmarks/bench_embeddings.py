"""Embedding throughput of what `Embedder` runs: sentence-transformers on torch, on the packaged
all-MiniLM-L6-v2, over support-style texts, warm, on all cores; and sentence-transformers' ONNX backend
against it on the same texts when onnxruntime and optimum are installed (they are not dependencies: the
table says when it was not measured). Rounds alternate the backends, so both see the same load.

`run()` prints a table with the CPU and returns {"embed_texts_per_s", and "embed_onnx_vs_torch" when
measured}.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

from common import print_table, sized  # sets the thread defaults first

N_TEXTS = sized(2_000, 40)
ROUNDS = sized(3, 1)


def cpu_description() -> str:
    """The CPU's model name, core count and the flags that matter here."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {f}" in text]
    return f"{name}, {len(os.sched_getaffinity(0))} cores, flags: {' '.join(flags) or 'neither avx512 nor avx2'}"


def _onnx_embedder():
    """An Embedder on sentence-transformers' ONNX backend, or None when its packages are missing."""
    if not all(importlib.util.find_spec(m) for m in ("onnxruntime", "optimum")):
        return None
    from sentence_transformers import SentenceTransformer

    from assistant.data.embeddings import Embedder, model_path
    embedder = Embedder()
    embedder._model = SentenceTransformer(str(model_path()), device="cpu", backend="onnx", local_files_only=True)
    return embedder


def run() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_curation import synthetic_items

    from assistant.data.embeddings import Embedder
    texts = synthetic_items(N_TEXTS, seed=5)
    sides = {"torch": Embedder()._load()}
    onnx = _onnx_embedder()
    if onnx is not None:
        sides["onnx"] = onnx._model

    def embed(model, batch=texts):
        fresh = Embedder()                 # nothing cached: every text goes through the model
        fresh._model = model
        return fresh.embed(batch)
    for model in sides.values():
        embed(model, texts[:64])           # warm: first calls allocate and spin up thread pools
    best = {name: float("inf") for name in sides}
    out = {}
    for _ in range(ROUNDS):
        for name, model in sides.items():
            start = time.perf_counter()
            out[name] = embed(model)
            best[name] = min(best[name], time.perf_counter() - start)
    rows = [(f"{name} (texts/s)", f"{N_TEXTS / best[name]:.0f}") for name in sides]
    ratios = {"embed_texts_per_s": round(N_TEXTS / best["torch"], 1)}
    if onnx is not None:
        ratios["embed_onnx_vs_torch"] = round(best["torch"] / best["onnx"], 3)
        rows.append(("embed_onnx_vs_torch", f"{ratios['embed_onnx_vs_torch']:.2f}"))
        rows.append(("lowest cosine onnx vs torch", f"{float((out['onnx'] * out['torch']).sum(axis=1).min()):.6f}"))
    else:
        rows.append(("onnx backend", "not measured: onnxruntime and optimum are not installed"))
    print_table(f"all-MiniLM-L6-v2 embeddings (sentence-transformers), {N_TEXTS} texts, best of {ROUNDS} rounds; "
                f"CPU {cpu_description()}", rows)
    sys.stdout.flush()
    return ratios


if __name__ == "__main__":
    import json
    print(json.dumps(run()))
