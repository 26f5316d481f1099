"""MiniLM embeddings and the FAISS index, on the real model; the numpy model against sentence-transformers."""

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
    assert embedding_dim() == embedder._load().hidden   # the pooling config names the model's size
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


def _varied_texts() -> list[str]:
    """About 50 texts: empty, short, long past the 256-token limit, unicode, code, numbers, odd spacing."""
    texts = ["", " ", "a", "OK", "Hi!", "How do I reset my password?", "what's the capital of australia",
             "Café naïve résumé coöperate façade", "Größenänderung der Straße in München", "日本語のテキストです。",
             "这是一个中文句子，用于测试。", "Привет, как дела?", "مرحبا بالعالم", "emoji 😀🎉👍 and more 🚀",
             "def f(x):\n    return x ** 2  # square", "SELECT * FROM users WHERE id = 42;", "1234567890 3.14159 -2e10",
             "   leading and trailing spaces   ", "tabs\tand\nnew\nlines", "!!!???...,,,;;;", "URL https://example.com/a?b=c#d",
             "THE SAME WORDS IN CAPITALS", "the same words in capitals", "a b c d e f g h i j k l m n o p",
             "supercalifragilisticexpialidocious antidisestablishmentarianism", "[CLS] [SEP] [PAD] [MASK] [UNK]"]
    texts += ["The refund arrives within 5 business days. " * n for n in (1, 3, 10, 30, 60)]       # up to ~600 tokens
    texts += ["word " * n for n in (100, 254, 255, 256, 300, 1000)]                                  # around the limit
    texts += ["日本語 " * 200, "é" * 600, "🙂" * 300]
    texts += [f"Order #{i}: {i * 7} items shipped to room {i % 13}; status {'late' if i % 2 else 'on time'}." for i in range(10)]
    return texts


def test_numpy_model_matches_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    from assistant.embeddings import model_path
    texts = _varied_texts()
    ours = embedder._load().encode(texts, batch_size=8, threads=2)
    reference = st.SentenceTransformer(str(model_path()), device="cpu", local_files_only=True).encode(
        texts, batch_size=8, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    assert len(texts) >= 50 and ours.shape == reference.shape == (len(texts), embedding_dim()) and ours.dtype == np.float32
    cosine = np.sum(ours * reference, axis=1)
    assert cosine.min() >= 0.99999, [(t[:30], c) for t, c in zip(texts, cosine) if c < 0.99999]
    assert np.abs(ours - reference).max() <= 1e-4


def test_embedding_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys; from assistant.embeddings import Embedder; "
            "v = Embedder().embed(['one text', 'and another'] + [f'text {i}' for i in range(10)]); "
            "assert v.shape == (12, 384); print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


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
