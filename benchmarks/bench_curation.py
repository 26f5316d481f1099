"""Curation benchmark: embed + near-duplicate throughput at 1k and 10k items (is anything quadratic?),
recall@10 of the approximate FAISS index against exact search at 100k vectors, and the insert-time
near-duplicate check per item.

`run()` prints a table and returns {"dedup_cost_10k_vs_1k", "ann_recall", "insert_check_ms", ...}.
Targets: dedup_cost_10k_vs_1k <= 1.5, ann_recall >= 0.95, insert_check_ms <= 50.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sized  # noqa: E402  (also sets the thread defaults and offline mode)

SMALL, LARGE = sized((1_000, 10_000), (20, 200))
ANN_VECTORS, ANN_QUERIES, ANN_K = sized((100_000, 1_000, 10), (3_000, 50, 10))
ANN_CLUSTERS = sized(2_000, 100)
ANN_APPROX_THRESHOLD = sized(None, 1_000)    # smoke: the approximate index on fewer vectors
INSERT_CHECKS = sized(50, 5)

_SUBJECTS = ["my invoice", "the mobile app", "my subscription", "the export button", "two-factor login",
             "the shipping label", "my order", "the dashboard", "a refund", "the API key", "the team workspace",
             "my password", "the promo code", "the dark theme", "a damaged parcel", "the weekly report",
             "my profile photo", "the Slack integration", "the free trial", "my payment card"]
_PROBLEMS = ["does not load", "shows an error", "was charged twice", "cannot be found", "stopped working",
             "is missing", "keeps logging me out", "is too slow", "has the wrong date", "will not update"]
_ASKS = ["How do I fix it", "What should I do", "Can you help", "Is this a known issue", "Who can I contact",
         "How long will it take", "Can I get a refund", "Is there a workaround"]
_STEPS = ["open Settings", "clear the cache", "sign out and back in", "update the app", "check your email",
          "contact billing", "wait 24 hours", "retry the payment", "reset the password", "reinstall the app"]
_WHEN = ["since yesterday", "after the update", "on Android", "on my laptop", "every morning", "for a week",
         "when I travel", "in Firefox", "on the web", "at checkout"]


def synthetic_items(n: int, seed: int) -> list[str]:
    """Support-style question + answer texts; distinct per seed (an id-like detail is mixed in)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = (f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_PROBLEMS)} {rng.choice(_WHEN)} "
             f"(case {seed}-{i}). {rng.choice(_ASKS)}?")
        a = (f"Sorry about that. Please {rng.choice(_STEPS)}, then {rng.choice(_STEPS)}. If {rng.choice(_SUBJECTS)} "
             f"still {rng.choice(_PROBLEMS)}, reply here and we will {rng.choice(['escalate it', 'call you', 'refund you'])}.")
        out.append(q + "\n" + a)
    return out


def as_messages(text: str) -> list[dict]:
    """A synthetic item (question, newline, answer) as the conversation curation compares."""
    question, answer = text.split("\n", 1)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _dedup(embedder, texts: list[str]) -> tuple[float, int]:
    from assistant.data.curation import CurationSettings, _greedy_dedup
    start = time.perf_counter()
    vectors = embedder.embed(texts)
    items = [{"key": f"k{i}", "removed": None, "messages": as_messages(t)} for i, t in enumerate(texts)]
    _greedy_dedup(items, vectors, CurationSettings())
    return time.perf_counter() - start, sum(it["removed"] is not None for it in items)


def _ann_recall() -> tuple[float, float]:
    import faiss

    from assistant.data.embeddings import VectorIndex, embedding_dim
    dim = embedding_dim()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((ANN_CLUSTERS, dim)).astype(np.float32)

    def sample(n):   # clustered "random-ish" unit vectors: same-cluster cosine ~0.5, like topical text
        v = centers[rng.integers(0, ANN_CLUSTERS, n)] + rng.standard_normal((n, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    base, queries = sample(ANN_VECTORS), sample(ANN_QUERIES)
    start = time.perf_counter()
    index = VectorIndex(approx_threshold=ANN_APPROX_THRESHOLD) if ANN_APPROX_THRESHOLD else VectorIndex()
    index.add(base)
    build_s = time.perf_counter() - start
    assert index.approximate, "past APPROX_THRESHOLD the index must be approximate"
    _, approx = index.search_ids(queries, ANN_K)
    exact_index = faiss.IndexFlatIP(dim)
    exact_index.add(base)
    _, exact = exact_index.search(queries, ANN_K)
    recall = float(np.mean([len(set(a) & set(e)) / ANN_K for a, e in zip(approx, exact)]))
    return recall, build_s


def _insert_check_ms(embedder, texts: list[str]) -> float:
    from assistant.data.curation import Curator
    from assistant.data.embeddings import VectorIndex
    with tempfile.TemporaryDirectory() as tmp:
        curator = Curator(store=None, settings=Path(tmp), embedder=embedder)
        index = VectorIndex()
        index.add(embedder.embed(texts), [f"example:{i}" for i in range(len(texts))])
        index.save(curator.index_path("bench"))
        fresh = synthetic_items(INSERT_CHECKS + 1, seed=99)
        curator.check_new("bench", fresh[0])                      # loads the index
        start = time.perf_counter()
        for text in fresh[1:]:
            curator.check_new("bench", text)
        return (time.perf_counter() - start) / INSERT_CHECKS * 1000


def run() -> dict:
    from assistant.data.embeddings import Embedder
    embedder = Embedder()
    embedder.embed(synthetic_items(64, seed=7))                    # load the model outside the timings
    small, large = synthetic_items(SMALL, seed=1), synthetic_items(LARGE, seed=2)
    t_small, removed_small = _dedup(embedder, small)
    t_large, removed_large = _dedup(embedder, large)
    cost_ratio = (t_large / LARGE) / (t_small / SMALL)
    recall, build_s = _ann_recall()
    check_ms = _insert_check_ms(embedder, large)
    rows = [
        ("embed+dedup 1k (items/s)", f"{SMALL / t_small:.0f}", f"{removed_small} near-duplicates"),
        ("embed+dedup 10k (items/s)", f"{LARGE / t_large:.0f}", f"{removed_large} near-duplicates"),
        ("dedup_cost_10k_vs_1k", f"{cost_ratio:.2f}", "target <= 1.5"),
        (f"ann_recall (recall@{ANN_K}, {ANN_VECTORS})", f"{recall:.3f}", f"target >= 0.95; HNSW build {build_s:.0f} s"),
        ("insert_check_ms", f"{check_ms:.1f}", "target <= 50"),
    ]
    print(f"{'curation':32} {'value':>10}  note")
    for name, value, note in rows:
        print(f"{name:32} {value:>10}  {note}")
    sys.stdout.flush()
    return {"dedup_cost_10k_vs_1k": round(cost_ratio, 3), "ann_recall": round(recall, 4),
            "insert_check_ms": round(check_ms, 2), "embed_dedup_items_per_s_1k": round(SMALL / t_small, 1),
            "embed_dedup_items_per_s_10k": round(LARGE / t_large, 1)}


if __name__ == "__main__":
    import json
    print(json.dumps(run()))
