"""MiniLM embeddings and the FAISS index, on the real model."""

import numpy as np
import pytest

from assistant.embeddings import Embedder, VectorIndex, embedding_dim
from assistant.store import Store


@pytest.fixture(scope="module")
def embedder():
    from assistant.curation import default_embedder
    return default_embedder()


def test_normalized_and_semantic(embedder):
    v = embedder.embed(["How do I reset my password?", "I forgot my password, how can I change it?",
                        "What is the capital of Australia?"])
    assert v.shape == (3, embedding_dim()) and v.dtype == np.float32
    assert embedding_dim() == embedder._load().get_sentence_embedding_dimension()   # the config names the model's size
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > 0.6 > v[0] @ v[2]


def test_known_texts_are_not_re_embedded(tmp_path, embedder):
    texts = [f"cache check sentence number {i}" for i in range(5)]
    before = embedder.computed
    first = embedder.embed(texts + texts[:2])
    assert embedder.computed - before == 5                  # duplicates embedded once
    again = embedder.embed(texts)
    assert embedder.computed - before == 5 and np.array_equal(first[:5], again)
    store = Store(tmp_path / "s.db")
    fresh = Embedder(cache=store)
    fresh._model = embedder._load()                          # same weights, no second load
    fresh.embed(["persisted one", "persisted two"])
    other = Embedder(cache=store)                            # a new process would start like this
    out = other.embed(["persisted one", "persisted two"])
    assert other.computed == 0 and other._model is None and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-4)


def _unit(n, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, embedding_dim())).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_index_switches_to_approximate_past_threshold_and_persists(tmp_path):
    vecs = _unit(3000)
    index = VectorIndex(approx_threshold=1000)
    index.add(vecs[:800], [f"k{i}" for i in range(800)])
    assert not index.approximate
    index.add(vecs[800:], [f"k{i}" for i in range(800, 3000)])
    assert index.approximate and len(index) == 3000
    sims, keys = index.search(vecs[:50], 5)
    assert [k[0] for k in keys] == [f"k{i}" for i in range(50)] and np.allclose(sims[:, 0], 1, atol=1e-4)
    index.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    assert loaded.approximate and loaded.keys == index.keys
    assert loaded.search(vecs[:5], 1)[1] == [[f"k{i}"] for i in range(5)]
    assert VectorIndex.load(tmp_path / "missing") is None
    empty = VectorIndex()
    sims, keys = empty.search(vecs[:2], 3)
    assert keys == [[None] * 3] * 2
