"""Curation: a domain's training candidates -> an immutable, hashed dataset snapshot.

Cheap checks first, each counting what it removed: review rejections, feedback from user accounts that
waits for an editor's review (`pending`, unless the domain trusts its users), empty / too short / too long,
garbage, prompt-injection markers, PII (scrubbed and counted, or dropped), exact duplicates (normalized
text hash), near duplicates (MiniLM prompt embeddings + FAISS, cosine >= a threshold; the newest
correction wins, then the best rated), a cap on any one user's share. Two items are near duplicates only
when they carry the same information: the embedding match must be confirmed by `dedup.compare` (same
answer content tokens, questions naming the same entities), so templated facts with different names,
numbers or places are all kept. The same question asked again is `superseded` by its newest correction,
whatever came before it (an older correction, a rated answer, a seed, approved or not). Then a train/eval
split by content hash (only on datasets of MIN_ITEMS_FOR_HOLDOUT+ items; below that everything the user
taught is trained on), with no eval item near-duplicate of a train item. The snapshot is JSON Lines
`{"messages", "split", "source", "key", "feedback_ids"}` (a rated or corrected answer's earlier replies
carry `"weight": 0`: context, not taught; see `mark_context`) at `<state>/snapshots/<domain>/<hash>.jsonl`,
the hash being of that content: the same candidates give the same hash, and curating twice changes nothing.

`Curator.preview(domain)` is the read-only report (it writes nothing: no snapshot, no database row, no
embedding cache row, no index file); `Curator.snapshot(domain)` writes it, for a job or an export.

`Curator.check_new(domain, item)` is the insert-time check of one new item against the domain's
persisted index of kept rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from assistant.data import dedup, pii
from assistant.data.conversations import read_as_confirmed
from assistant.data.quality import has_injection, is_garbage, normalize  # noqa: F401 - part of curation's interface
from assistant.files import atomic_write_bytes

log = logging.getLogger(__name__)

# Report keys, in the order the filters run. `pii_scrubbed` counts rows kept after scrubbing.
FILTERS = ("rejected", "pending", "empty", "too_short", "too_long", "garbage", "injection", "pii", "pii_scrubbed",
           "exact_duplicate", "superseded", "near_duplicate", "user_cap")
MIN_ITEMS_FOR_HOLDOUT = 50       # below this many kept rows everything is train (a holdout of 2 means nothing)
REPORT_TEXT_CHARS = 120          # characters of a question shown per removed item in the report
SNAPSHOT_FIELDS = ("messages", "split", "source", "key", "feedback_ids")
ROW_SOURCE = {"seed": "seed", "up": "thumbs_up", "correction": "correction"}   # candidate source -> row source
SOURCE_RANK = {"correction": 0, "up": 1, "seed": 2}   # near-duplicate winner: corrections first
SNAPSHOT_HASH_CHARS = 16         # hex characters of the content hash that name a snapshot file
SPLIT_HASH_CHARS = 12            # hex characters of a row's hash that place it in [0, 1) for the eval pick
SPLIT_BLOCK_ROWS = 4096          # train rows per similarity product in the split check (bounds its memory)




@dataclass(frozen=True)
class CurationSettings:
    near_dup_threshold: float = field(default=0.65, metadata={
        "help": "cosine of MiniLM embeddings of the conversation text at or above which two candidates may be "
                "near duplicates; they merge only if their answers also carry the same content tokens "
                "(0.65: on tests/dedup_calibration.py precision 1.00, recall 0.93, no fact lost; chosen there "
                "by benchmarks/bench_dedup.py, and checked on tests/dedup_testset.py)"})
    split_threshold: float = field(default=0.65, metadata={
        "help": "an eval row must be below this cosine to every train row"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of rows held out for evaluation"})
    min_prompt_chars: int = field(default=2, metadata={"help": "shorter last user messages are too_short"})
    min_answer_chars: int = field(default=2, metadata={"help": "shorter answers are too_short"})
    max_chars: int = field(default=8000, metadata={"help": "longer conversations are too_long"})
    pii: str = field(default="scrub", metadata={"help": "scrub (replace with [EMAIL]...) or drop rows with PII"})
    max_user_share: float = field(default=0.5, metadata={
        "help": "most of the dataset one user may contribute (applies when 2+ users contributed)"})
    neighbours: int = field(default=10, metadata={"help": "nearest neighbours looked at per candidate"})
    embedding_model: str = field(default="all-MiniLM-L6-v2", metadata={
        "help": "the sentence-transformers model that embeds conversations: all-MiniLM-L6-v2 (packaged, the "
                "default), a local folder, or a model name already in the local Hugging Face cache (e.g. a "
                "multilingual one for non-English domains); the thresholds above were chosen for MiniLM"})

    def __post_init__(self):
        for name in ("near_dup_threshold", "split_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}: use a cosine in (0, 1]")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction}: use a share in [0, 1)")
        if self.pii not in ("scrub", "drop"):
            raise ValueError(f"pii={self.pii!r}: use 'scrub' or 'drop'")
        if not 0 < self.max_user_share <= 1:
            raise ValueError(f"max_user_share={self.max_user_share}: use a share in (0, 1]")
        if self.neighbours < 1:
            raise ValueError("neighbours must be at least 1")
        if not isinstance(self.embedding_model, str) or not self.embedding_model.strip():
            raise ValueError("embedding_model: name a sentence-transformers model or folder")


@dataclass
class Snapshot:
    hash: str
    path: Path | None               # None for a preview (nothing written)
    report: dict
    rows: list[dict]                 # what training sees: {"messages", "split", "source", "key", "feedback_ids"}
    items: list[dict] = field(default_factory=list)   # per candidate: decision, near-duplicate info


# Text helpers ----------------------------------------------------------------------------------------
def dedup_text(messages: list[dict] | str) -> str:
    """What near-duplicate detection embeds: the conversation without its system prompt. Prompt and
    answer together: on paraphrased questions, MiniLM on the question alone separates paraphrases from
    related-but-different questions far worse (median paraphrase cosine 0.57, hard negatives to 0.80)."""
    if isinstance(messages, str):
        return messages.strip()
    return "\n".join(m["content"].strip() for m in messages if m["role"] != "system").strip()


def _row_hash(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def mark_context(messages: list[dict], source: str) -> list[dict]:
    """A row's messages with what it teaches marked: a rated or corrected answer teaches its last reply
    only; the conversation's earlier replies (nobody confirmed them) get `"weight": 0`, context the loss
    skips (lm.taught). Seed examples teach every reply their author wrote."""
    if source == "seed":
        return messages
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return [{**m, "weight": 0} if m["role"] == "assistant" and i != last else
            {k: v for k, v in m.items() if k != "weight"} for i, m in enumerate(messages)]


def _priority(item: dict) -> tuple:
    """Sort key, best first: approved, then corrections (newest first), ups (most, newest), seeds."""
    return (item["review_status"] != "approved", SOURCE_RANK.get(item["source"], 3), -item.get("ups", 0),
            -(item.get("seq") or 0), item["key"])


def _state_dir(settings) -> Path:
    return Path(getattr(settings, "state_path", settings))


# The pipeline ---------------------------------------------------------------------------------------
def _cheap_filters(item: dict, opts: CurationSettings, removed: dict) -> str | None:
    """Run the per-row filters on `item` (scrubbing in place); -> the filter that removed it, or None."""
    messages = item["messages"]
    approved = item["review_status"] == "approved"
    users = [m for m in messages if m["role"] == "user"]
    answer = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
    if item["review_status"] == "rejected":
        return "rejected"
    if item.get("pending") and not approved:   # a user account's feedback, not yet approved by an editor
        return "pending"
    if not answer.strip() or not users or not any(m["content"].strip() for m in users):
        return "empty"
    if not approved and (len(answer.strip()) < opts.min_answer_chars
                         or len(users[-1]["content"].strip()) < opts.min_prompt_chars):
        return "too_short"
    if sum(len(m["content"]) for m in messages) > opts.max_chars:
        return "too_long"
    talk = [m["content"] for m in messages if m["role"] != "system"]
    if not approved and any(is_garbage(t) for t in talk):
        return "garbage"
    if not approved and any(has_injection(t) for t in talk):
        return "injection"
    found = 0
    scrubbed = []
    for m in messages:
        text, n = pii.scrub(m["content"])
        found += n
        scrubbed.append({**m, "content": text})
    if found:
        if opts.pii == "drop":
            return "pii"
        item["messages"] = scrubbed
        item["pii_scrubbed"] = found
        removed["pii_scrubbed"] += 1
    return None


def _greedy_dedup(items: list[dict], vectors: np.ndarray, opts: CurationSettings) -> None:
    """Walk items best-first; an item merges into its most similar kept predecessor whose cosine is >= the
    threshold AND that carries the same information (`dedup.compare`). Different facts never merge.

    `items` are sorted by priority. kNN via `VectorIndex` (exact, or HNSW past its threshold): O(n log n)."""
    from assistant.data.embeddings import VectorIndex
    index = VectorIndex(vectors.shape[1])
    index.add(vectors, [str(i) for i in range(len(items))])
    k = min(opts.neighbours + 1, len(items))
    sims, ids = index.search_ids(vectors, k)
    for i, item in enumerate(items):
        nearest, nearest_sim, dup_of, dup_sim, dup_cmp = None, -1.0, None, -1.0, None
        for j, s in sorted(zip(ids[i], sims[i]), key=lambda p: -p[1]):
            if j < 0 or j == i:
                continue
            if s > nearest_sim:
                nearest, nearest_sim = j, float(s)
            if item["removed"] is None and dup_of is None and j < i and items[j]["removed"] is None \
                    and s >= opts.near_dup_threshold:
                cmp = dedup.compare(item["messages"], items[j]["messages"])
                if cmp.same:
                    dup_of, dup_sim, dup_cmp = j, float(s), cmp
        if nearest is not None:
            item["nearest"], item["nearest_similarity"] = items[nearest]["key"], round(nearest_sim, 4)
        if dup_of is not None:
            item.update(removed="near_duplicate", near_duplicate_of=items[dup_of]["key"],
                        similarity=round(dup_sim, 4), shared_answer_tokens=list(dup_cmp.shared_answer_tokens),
                        why=dup_cmp.why(dup_sim))


def _user_cap(kept: list[dict], opts: CurationSettings) -> None:
    """Drop the lowest-priority rows of any user above `max_user_share` of the kept rows."""
    users = {it["user"] for it in kept if it["user"] is not None}
    if len(users) < 2 or opts.max_user_share >= 1:
        return
    alive = list(kept)
    while True:
        counts: dict[str, int] = {}
        for it in alive:
            if it["user"] is not None:
                counts[it["user"]] = counts.get(it["user"], 0) + 1
        over = [u for u, n in counts.items() if n > opts.max_user_share * len(alive)]
        if not over:
            return
        user = max(over, key=lambda u: (counts[u], u))
        worst = max((it for it in alive if it["user"] == user), key=_priority)
        worst["removed"] = "user_cap"
        alive.remove(worst)


def _split(kept: list[dict], vectors: np.ndarray, opts: CurationSettings) -> None:
    """Hash-based eval pick among non-corrections, then move to train any eval row too close to a train row."""
    for it in kept:
        it["split"] = "train"
    if len(kept) < MIN_ITEMS_FOR_HOLDOUT or opts.eval_fraction <= 0:
        return
    scores = [int(it["row_hash"][:SPLIT_HASH_CHARS], 16) / 16 ** SPLIT_HASH_CHARS for it in kept]
    # Corrections always train: a user who corrected an answer expects that answer to be learned
    # (the gate checks every one of them); held-out rows come from seeds and thumbs-up answers.
    eligible = [i for i, it in enumerate(kept) if it.get("source") != "correction"]
    if not eligible:
        return
    eval_idx = {i for i in eligible if scores[i] < opts.eval_fraction}
    if not eval_idx:
        eval_idx = {min(eligible, key=lambda i: scores[i])}
    while True:
        ev = sorted(eval_idx)
        tr = [i for i in range(len(kept)) if i not in eval_idx]
        if not ev or not tr:
            break
        best = np.zeros(len(ev), np.float32) - 1
        for start in range(0, len(tr), SPLIT_BLOCK_ROWS):
            block = vectors[tr[start:start + SPLIT_BLOCK_ROWS]]
            best = np.maximum(best, (vectors[ev] @ block.T).max(axis=1))
        leaking = {e for e, s in zip(ev, best) if s >= opts.split_threshold}
        if not leaking:
            break
        eval_idx -= leaking
    for i in eval_idx:
        kept[i]["split"] = "eval"
    trained = {it.get("conversation") for it in kept if it["split"] == "train"}
    for it in kept:     # a conversation's turns stay together: one of them trains, all of them do
        if it.get("conversation") in trained:
            it["split"] = "train"


def run(store, domain: str, embedder, opts: CurationSettings, *, read_only: bool = False,
        trust_users: bool = False) -> tuple[list[dict], list[dict], dict, np.ndarray]:
    """Candidates -> (items with decisions, kept items in snapshot order, report, kept prompt vectors).
    `read_only`: embeddings missing from the cache are computed in memory and not stored. `trust_users`:
    user accounts' feedback is not held for review."""
    items = []
    for cand in store.candidates(domain):
        items.append({**cand, "pending": bool(cand.get("pending")) and not trust_users,
                      "messages": mark_context([dict(m) for m in cand["messages"]], cand["source"]),
                      "removed": None,
                      "near_duplicate_of": None, "similarity": None, "nearest": None,
                      "nearest_similarity": None, "split": None, "shared_answer_tokens": None, "why": None})
    removed = {name: 0 for name in FILTERS}
    for it in items:
        it["removed"] = _cheap_filters(it, opts, removed)

    survivors = sorted((it for it in items if it["removed"] is None), key=_priority)
    seen: dict[str, dict] = {}
    for it in survivors:
        norm = "\x1e".join(f"{m['role']}\x1f{normalize(m['content'])}" for m in it["messages"] if m["role"] != "system")
        first = seen.setdefault(hashlib.sha256(norm.encode()).hexdigest(), it)
        if first is not it:
            it["removed"], it["near_duplicate_of"], it["similarity"] = "exact_duplicate", first["key"], 1.0
            it["why"] = "the same question and answer (case, spacing and punctuation aside)"
    survivors = [it for it in survivors if it["removed"] is None]
    dedup.supersede(survivors)

    vectors = np.zeros((0, embedder.dim), np.float32)
    if survivors:
        cache = dedup.ReadOnlyCache(store) if read_only else store
        vectors = embedder.embed([dedup_text(it["messages"]) for it in survivors], cache=cache)
        _greedy_dedup(survivors, vectors, opts)
    _user_cap([it for it in survivors if it["removed"] is None], opts)
    keep_mask = [it["removed"] is None for it in survivors]
    kept_vectors = vectors[np.array(keep_mask, bool)] if survivors else vectors
    kept = [it for it in survivors if it["removed"] is None]
    read_as_confirmed(kept)     # earlier turns of a conversation read as what the person confirmed
    for it in kept:
        it["row_hash"] = _row_hash(it["messages"])
    _split(kept, kept_vectors, opts)

    for it in items:
        if it["removed"] == "user_cap":
            it["why"] = f"one user's share of the dataset is capped at {opts.max_user_share:.0%}"
        if it["removed"] and it["removed"] in removed:
            removed[it["removed"]] += 1
    by_key = {it["key"]: it for it in items}
    order = sorted(range(len(kept)), key=lambda i: (kept[i]["split"] != "train", kept[i]["row_hash"]))
    kept = [kept[i] for i in order]
    kept_vectors = kept_vectors[order] if len(order) else kept_vectors
    report = {"snapshot": None, "candidates": len(items), "removed": removed, "kept": len(kept),
              "train": sum(it["split"] == "train" for it in kept), "eval": sum(it["split"] == "eval" for it in kept),
              "sources": {ROW_SOURCE[src]: sum(it["source"] == src for it in kept) for src in ROW_SOURCE},
              "holdout_min_items": MIN_ITEMS_FOR_HOLDOUT,
              "removed_items": [dedup.removed_entry(it, by_key, REPORT_TEXT_CHARS)
                                for it in sorted(items, key=lambda it: it["key"]) if it["removed"]]}
    return items, kept, report, kept_vectors


def snapshot_rows(kept: list[dict]) -> list[dict]:
    """What training sees, one row per kept item: messages, split, source, key and feedback ids."""
    return [{"messages": it["messages"], "split": it["split"], "source": ROW_SOURCE.get(it["source"], it["source"]),
             "key": it["key"], "feedback_ids": list(it.get("feedback_ids") or [])} for it in kept]


def snapshot_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def read_snapshot(path: str | os.PathLike) -> list[dict]:
    """The rows of a snapshot file (JSON Lines of SNAPSHOT_FIELDS), in file order: the one reader of them."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_snapshot(folder: Path, rows: list[dict]) -> tuple[str, Path]:
    data = snapshot_bytes(rows)
    digest = hashlib.sha256(data).hexdigest()[:SNAPSHOT_HASH_CHARS]
    path = folder / f"{digest}.jsonl"
    if not path.exists():                    # immutable: never rewritten once published
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return digest, path


_embedders: dict[str, object] = {}
_default_lock = threading.Lock()


def default_embedder(model: str | None = None):
    """One shared `Embedder` per model and process (loaded on first use); `model`: a name or folder
    (`CurationSettings.embedding_model`, the packaged MiniLM when None)."""
    from assistant.data.embeddings import MODEL_ID, Embedder, model_id
    key = model_id(model or MODEL_ID)
    with _default_lock:
        if key not in _embedders:
            _embedders[key] = Embedder(model or MODEL_ID)
        return _embedders[key]


class Curator:
    """Curation for one state dir: `curate(domain)`, `review_queue(domain)`, `check_new(domain, text)`."""

    def __init__(self, store, settings, embedder=None, options: CurationSettings | None = None,
                 trusts_users=None):
        """`trusts_users(domain)`: whether a domain trains on its users' feedback without review (else a
        user account's rating or correction is `pending` until an editor approves it)."""
        self.store = store
        self.trusts_users = trusts_users or (lambda domain: False)
        self.state_dir = _state_dir(settings)
        self.embedder = embedder
        if options is None and hasattr(settings, "curation"):
            from assistant.settings import group_settings
            options = group_settings(settings, "curation")
        self.options = options or CurationSettings()
        self._indexes: dict[str, tuple[float, object]] = {}
        self._lock = threading.RLock()

    def _embedder(self):
        if self.embedder is None:
            self.embedder = default_embedder(self.options.embedding_model)
        return self.embedder

    def index_path(self, domain: str) -> Path:
        return self.state_dir / "index" / domain

    def preview(self, domain: str) -> Snapshot:
        """The curation report and rows as `snapshot` would make them, writing nothing at all (no file,
        no database row, no embedding cache row, no index). `path` is None; `hash` is what the snapshot
        file would be named."""
        items, kept, report, _ = run(self.store, domain, self._embedder(), self.options, read_only=True,
                                      trust_users=self.trusts_users(domain))
        rows = snapshot_rows(kept)
        digest = hashlib.sha256(snapshot_bytes(rows)).hexdigest()[:SNAPSHOT_HASH_CHARS]
        report["snapshot"] = digest
        return Snapshot(digest, None, report, rows, items)

    def snapshot(self, domain: str) -> Snapshot:
        """Curate and write: the immutable snapshot file, its database row, the insert-time index. For a
        job taking the data or a user exporting it; display uses `preview`."""
        items, kept, report, vectors = run(self.store, domain, self._embedder(), self.options,
                                           trust_users=self.trusts_users(domain))
        rows = snapshot_rows(kept)
        digest, path = _write_snapshot(self.state_dir / "snapshots" / domain, rows)
        report["snapshot"] = digest
        self.store.save_snapshot(domain, digest, report, str(path))
        self._save_index(domain, [it["key"] for it in kept], vectors)
        return Snapshot(digest, path, report, rows, items)

    curate = snapshot     # the former name

    def review_queue(self, domain: str) -> list[dict]:
        """Every candidate with its decision: key, source, messages, rating, user, review_status, removed
        (filter name or None), near_duplicate_of + similarity + why, nearest + nearest_similarity, split.
        Read-only."""
        items, _, _, _ = run(self.store, domain, self._embedder(), self.options, read_only=True,
                                      trust_users=self.trusts_users(domain))
        return sorted(items, key=lambda it: -(it.get("seq") or 0))

    # Insert-time check ---------------------------------------------------------------------------
    def _save_index(self, domain: str, keys: list[str], vectors: np.ndarray) -> None:
        from assistant.data.embeddings import VectorIndex
        path = self.index_path(domain)
        model = self._embedder().model_id
        current = self._load_index(domain, rebuild=False)
        if current is not None and current.keys == keys and current.model == model:
            return                                  # unchanged: leave the files alone
        index = VectorIndex(vectors.shape[1], model=model)   # (0, dim) when nothing was kept
        if len(keys):
            index.add(vectors, keys)
        with self._lock:
            index.save(path)
            self._indexes[domain] = (self._mtime(path), index)

    @staticmethod
    def _mtime(path: Path) -> float:
        try:
            return path.with_name(path.name + ".keys.json").stat().st_mtime_ns
        except FileNotFoundError:
            return -1

    def _load_index(self, domain: str, *, rebuild: bool = True):
        """The domain's saved index; one made by another embedding model than the current one is rebuilt
        from the domain's data first (`rebuild`), or not returned."""
        from assistant.data.embeddings import VectorIndex
        path = self.index_path(domain)
        mtime = self._mtime(path)
        with self._lock:
            cached = self._indexes.get(domain)
            if cached and cached[0] == mtime:
                index = cached[1]
            else:
                index = VectorIndex.load(path)
                if index is not None:
                    self._indexes[domain] = (mtime, index)
            if index is None or index.model == self._embedder().model_id:
                return index
            if not rebuild:
                return None
            log.info("the %s index was built with %s; the embedding model is now %s: rebuilding it", domain,
                     index.model, self._embedder().model_id)
            _, kept, _, vectors = run(self.store, domain, self._embedder(), self.options,
                                      trust_users=self.trusts_users(domain))
            self._save_index(domain, [it["key"] for it in kept], vectors)
            return self._indexes[domain][1]

    def check_new(self, domain: str, item: str | list[dict]) -> tuple[str | None, float]:
        """Nearest kept row of the domain to a new item (its messages, or their `dedup_text`)
        -> (that row's key or None, cosine similarity); compare with `options.near_dup_threshold`."""
        index = self._load_index(domain)
        if index is None or len(index) == 0:
            return None, 0.0
        vec = self._embedder().embed([dedup_text(item)])
        with self._lock:
            sims, keys = index.search(vec, 1)
        return keys[0][0], float(sims[0][0])

    def add_to_index(self, domain: str, key: str, item: str | list[dict]) -> None:
        """Add one accepted item so later arrivals are checked against it too (persisted). Two processes
        adding at once may lose one addition; the next `curate` rebuilds the index from the dataset."""
        from assistant.data.embeddings import VectorIndex
        vector = self._embedder().embed([dedup_text(item)])
        path = self.index_path(domain)
        with self._lock:
            index = self._load_index(domain) or VectorIndex(vector.shape[1], model=self._embedder().model_id)
            index.add(vector, [key])
            index.save(path)
            self._indexes[domain] = (self._mtime(path), index)


def curate(store, domain: str, settings, embedder=None, options: CurationSettings | None = None) -> Snapshot:
    """Curate `domain` now: write (or reuse) its snapshot and record it as the latest. `settings` is the
    app `Settings` (or a state dir path)."""
    return Curator(store, settings, embedder, options).snapshot(domain)


def preview(store, domain: str, settings, embedder=None, options: CurationSettings | None = None) -> Snapshot:
    """The curation report of `domain` without writing anything (see `Curator.preview`)."""
    return Curator(store, settings, embedder, options).preview(domain)
