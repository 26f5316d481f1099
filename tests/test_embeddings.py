"""Embeddings (sentence-transformers on the packaged all-MiniLM-L6-v2, or another model by folder) and the
FAISS index, on the real models; an index made by another model is rebuilt."""

import numpy as np
import pytest

from assistant.data.embeddings import Embedder, VectorIndex, embedding_dim
from assistant.data.store import Store


@pytest.fixture(scope="module")
def embedder():
    from assistant.data.curation import default_embedder
    return default_embedder()


def test_normalized_and_semantic(embedder):
    v = embedder.embed(["How do I reset my password?", "I forgot my password, how can I change it?",
                        "What is the capital of Australia?"])
    assert v.shape == (3, embedding_dim()) and v.dtype == np.float32
    assert embedding_dim() == embedder._load().get_embedding_dimension()   # read from the pooling config
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


def test_batches_on_all_cores_equal_one_text_at_a_time(embedder):
    """Any text (empty, past the token limit, any script) gets a unit vector, the same in a batch on all
    cores as alone on the calling thread."""
    texts = _varied_texts()
    batch = Embedder(embedder.model)
    batch._model = embedder._load()
    together = batch.embed(texts)
    alone = np.concatenate([batch._encode([t]) for t in texts])
    assert len(texts) >= 50 and together.shape == (len(texts), embedding_dim()) and together.dtype == np.float32
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-4)
    assert np.sum(together * alone, axis=1).min() >= 0.9999


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory):
    """Another sentence-transformers model in a local folder: MiniLM's encoder with CLS pooling."""
    from sentence_transformers import SentenceTransformer, models

    from assistant.data.embeddings import model_path
    encoder = models.Transformer(str(model_path()))
    pooling = models.Pooling(encoder.get_embedding_dimension(), pooling_mode="cls")
    folder = tmp_path_factory.mktemp("cls-model")
    SentenceTransformer(modules=[encoder, pooling, models.Normalize()], device="cpu").save(str(folder))
    return folder


def test_the_embedding_model_is_chosen_by_folder_and_the_index_is_rebuilt_for_it(tmp_path, cls_model):
    from assistant.data.curation import CurationSettings, Curator, dedup_text
    from assistant.data.embeddings import content_hash
    store = Store(tmp_path / "s.db")
    store.add_examples("d", [{"messages": [{"role": "user", "content": f"Where is branch {c}?"},
                                           {"role": "assistant", "content": f"Branch {c} is on {s} Street."}]}
                             for c, s in (("A", "Oak"), ("B", "Elm"), ("C", "Pine"))])
    minilm = Curator(store, tmp_path)
    minilm.snapshot("d")
    index = minilm._load_index("d")
    assert index.model == "all-MiniLM-L6-v2" and len(index) == 3
    question = [{"role": "user", "content": "Where is branch A?"}, {"role": "assistant", "content": "On Oak Street."}]
    key, sim = minilm.check_new("d", question)

    other = Curator(store, tmp_path, options=CurationSettings(embedding_model=str(cls_model)))
    assert other._embedder().model_id == str(cls_model.resolve())
    key2, sim2 = other.check_new("d", question)          # the MiniLM index is rebuilt with the CLS model first
    rebuilt = other._load_index("d")
    assert rebuilt.model == str(cls_model.resolve()) and sorted(rebuilt.keys) == sorted(index.keys)
    assert key2 == key and abs(sim2 - sim) > 1e-3          # another model, other vectors
    saved = VectorIndex.load(minilm.index_path("d"))
    assert saved.model == str(cls_model.resolve())          # the files on disk say which model made them
    # both models' vectors of a row live side by side in the embedding cache, each under its model's name
    h = content_hash(dedup_text(store.candidates("d")[0]["messages"]))
    mine, theirs = store.get_embeddings("all-MiniLM-L6-v2", [h]), store.get_embeddings(str(cls_model.resolve()), [h])
    assert h in mine and h in theirs and mine[h] != theirs[h]


def test_a_model_that_cannot_be_loaded_names_the_setting():
    from assistant.errors import AssistantError
    with pytest.raises(AssistantError) as e:
        Embedder("no-such-org/no-such-model").embed(["text"])
    assert e.value.param == "curation.embedding_model" and "no-such-org/no-such-model" in e.value.message


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
