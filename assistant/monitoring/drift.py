"""Drift: how far the questions a domain gets have moved from the questions it was trained on.

The reference is the training snapshot's questions (the snapshot the active adapter's card names, else the
domain's latest curated snapshot, else its data as curation would take it now), embedded with MiniLM and
kept per state folder and domain until the snapshot changes. Two numbers per set of recent questions: the
centroid shift (1 - cosine between the two mean vectors) and the out-of-distribution rate (the share of
questions whose nearest training question, by FAISS inner product, is below `settings.ood_similarity`).
Everything here embeds text: the Prometheus scrape never calls it (monitoring.Exporter caches its results).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np

from assistant.data import curation
from assistant.data.curation import read_snapshot
from assistant.data.dedup import ReadOnlyCache
from assistant.data.embeddings import VectorIndex


def question(messages: list[dict]) -> str:
    """The last user message of a conversation: what drift compares."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1].strip() if users else ""


# The reference: the training questions -------------------------------------------------------------
_ref_cache: dict[tuple[str, str], tuple[str, np.ndarray, VectorIndex]] = {}   # (state, domain) -> hash, centroid, index
_ref_lock = threading.Lock()


def _snapshot_for(workspace, domain: str) -> tuple[str | None, list[dict] | None]:
    """(hash, rows) of the snapshot the active adapter was trained on (from its card), else of the latest
    written one, else of the domain's data as curation would take it now (computed, nothing written)."""
    folder = workspace.settings.state_path / "snapshots" / domain
    active = workspace.registry.active_version(domain)
    if active:
        h = workspace.registry.read_card(domain, active).get("dataset_snapshot")   # written by jobs.run_job
        if isinstance(h, str) and (folder / f"{h}.jsonl").is_file():
            return h, read_snapshot(folder / f"{h}.jsonl")
    latest = workspace.store.latest_snapshot(domain)
    if latest and Path(latest["path"]).is_file():
        return latest["hash"], read_snapshot(latest["path"])
    preview = curation.preview(workspace.store, domain, workspace.settings)   # reads only: nothing is written
    return (preview.hash, preview.rows) if preview.rows else (None, None)


def _read_only_cache(workspace):
    """Embeddings already cached are reused; new ones are not stored: reading metrics writes nothing."""
    return ReadOnlyCache(workspace.store)


def _embedder(workspace):
    """The embedding model curation uses (`--curation.embedding-model`)."""
    return curation.default_embedder(workspace.curator().options.embedding_model)


def _reference(workspace, domain: str):
    """(snapshot hash, centroid, FAISS index of the training questions) or (None, None, None)."""
    h, rows = _snapshot_for(workspace, domain)
    if h is None:
        return None, None, None
    with _ref_lock:
        cached = _ref_cache.get((str(workspace.settings.state_path), domain))
        if cached and cached[0] == h:
            return h, cached[1], cached[2]
    questions = [q for q in (question(r["messages"]) for r in rows) if q]
    if not questions:
        return None, None, None
    vecs = _embedder(workspace).embed(questions, cache=_read_only_cache(workspace))
    index = VectorIndex(vecs.shape[1])
    index.add(vecs)
    centroid = vecs.mean(axis=0)
    with _ref_lock:
        _ref_cache[(str(workspace.settings.state_path), domain)] = (h, centroid, index)
    return h, centroid, index


def drift_of(vectors: np.ndarray, centroid: np.ndarray, index, settings) -> dict:
    """Centroid shift and out-of-distribution rate of a set of question vectors against the reference."""
    if len(vectors) == 0:
        return {"questions": 0, "centroid_shift": None, "ood_rate": None}
    mean = vectors.mean(axis=0)
    denom = float(np.linalg.norm(mean) * np.linalg.norm(centroid)) or 1.0
    shift = 1.0 - float(mean @ centroid) / denom
    sims, _ = index.search(vectors, 1)
    ood = float(np.mean(sims[:, 0] < settings.ood_similarity))
    return {"questions": int(len(vectors)), "centroid_shift": round(shift, 4), "ood_rate": round(ood, 4)}


def domain_drift(workspace, domain: str, responses: list[dict], bucket: float, settings) -> dict:
    """Drift of the questions of `responses` (in time order) against the domain's reference: over the latest
    `settings.window_questions` (`current`) and per time bucket of `bucket` seconds (`timeline`)."""
    snapshot, centroid, index = _reference(workspace, domain)
    out = {"snapshot": snapshot, "reference_questions": len(index) if index is not None else 0,
           "window_questions": settings.window_questions, "current": None, "timeline": []}
    if snapshot is None:
        out["note"] = "no curated training data yet: add examples or feedback, then curate"
        return out
    asked = [(r["created_at"], question(r["messages"])) for r in responses]
    asked = [(t, q) for t, q in asked if q]
    if not asked:
        return out
    vecs = _embedder(workspace).embed([q for _, q in asked], cache=_read_only_cache(workspace))
    out["current"] = drift_of(vecs[-settings.window_questions:], centroid, index, settings)
    buckets: dict[float, list[int]] = {}
    for i, (t, _) in enumerate(asked):
        buckets.setdefault(math.floor(t / bucket) * bucket, []).append(i)
    out["timeline"] = [{"bucket_start": b, **drift_of(vecs[idx], centroid, index, settings)}
                       for b, idx in sorted(buckets.items())]
    return out
