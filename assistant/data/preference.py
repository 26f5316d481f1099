"""Preference data: a domain's ratings -> DPO pairs and KTO rows, and which training methods they support.

Built from the curated snapshot (so the SFT side's PII scrubbing, dedup and user cap hold) plus the ratings
curation does not turn into SFT rows:
  - a DPO pair per kept correction: the correction is *chosen*, the answer it corrected is *rejected*;
  - a DPO pair per question with a liked and a disliked answer: the liked one is *chosen*;
  - KTO rows for unpaired ratings: a kept thumbs-up answer is *desirable*, an answer rated down (more downs
    than ups) without a correction is *undesirable*.
The rows the snapshot does not already curate (rejected answers, thumbs-down answers) go through the same
per-row filters (empty, garbage, injection, PII scrubbed or dropped), one undesirable row per prompt (the
newest rating wins; a prompt whose disliked answer a pair already holds gets none; a prompt may have a
liked and a disliked answer, the most telling pair for KTO) and
the same cap on one user's share. A hash split holds out a share of the thumbs-rated answers (only with
enough of each kind; corrections always train) for the gate's preference-margin check; the rows it holds
out are trained on by no method.

`supported` says which methods the data supports (SFT always, DPO from MIN_PAIRS pairs, KTO from
MIN_PER_KIND ratings of each kind) and `choose` turns a request ("auto", "sft+kto", ...) into the methods a
job runs, or a DatasetTooSmall that says what is missing. "auto" runs SFT, and adds DPO or KTO once the gate
can judge them (AUTO_ORDER says when and why).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from assistant.errors import DatasetTooSmall

METHODS = ("sft", "dpo", "kto")     # in the order a job runs them
# "auto" adds one preference method to SFT, and only once the gate can judge it: with HOLDOUT_MIN_PER_KIND liked
# and disliked answers, a share is held out for its preference margin. DPO when corrections make enough pairs (the
# one method that learns a correction over the answer it corrected), else KTO, else DPO from pairs of a liked and
# a disliked answer to one question. Measured on the preference benchmark (144 thumbs on the embedded model,
# answers rated by length, the app's default settings, seeds 0 to 2): both stayed within the gate's forgetting
# bound on every seed (general loss ratio 1.2 to 1.9, bound 2.0) and taught the liked style at least as well as
# SFT alone on average; on bare thumbs KTO more (+0.58, +0.08, 0.00; mean +0.22) than DPO (+0.33, +0.08, -0.08).
AUTO_ORDER = {"corrections": ("dpo", "kto"), "thumbs": ("kto", "dpo")}
MIN_PAIRS = 4                       # pairs (corrections, or a liked and a disliked answer to one question) for DPO
MIN_PER_KIND = 4                    # thumbs-up and thumbs-down answers, each, before KTO runs
MAX_CLASS_WEIGHT = 4.0              # KTO's weight of the rarer kind is the count ratio, at most this
HOLDOUT_FRACTION = 0.2              # of the rated answers, held out for the gate's preference margin...
HOLDOUT_MIN_PER_KIND = 10           # ...only when there are at least this many liked and disliked answers
HOLDOUT_HASH_CHARS = 12


@dataclass
class PreferenceData:
    pairs: list[dict] = field(default_factory=list)     # {"prompt": [msgs], "chosen", "rejected", "key", "split"}
    kto: list[dict] = field(default_factory=list)       # {"prompt": [msgs], "completion", "label", "key", "split"}
    counts: dict = field(default_factory=dict)

    def train_pairs(self) -> list[dict]:
        return [p for p in self.pairs if p["split"] == "train"]

    def train_kto(self) -> list[dict]:
        return [r for r in self.kto if r["split"] == "train"]

    def heldout(self) -> list[dict]:
        """Held-out rated answers as (prompt, liked, disliked) rows: {"prompt", "completion", "label"}."""
        out = [r for r in self.kto if r["split"] == "eval"]
        for p in self.pairs:
            if p["split"] == "eval":
                out += [{"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                        {"prompt": p["prompt"], "completion": p["rejected"], "label": False}]
        return out

    def heldout_keys(self) -> set[str]:
        """Snapshot rows held out for the margin: no method trains on them."""
        return {r["key"] for r in self.pairs + self.kto if r["split"] == "eval" and r.get("key")}

    def to_jsonl(self) -> bytes:
        rows = [{"kind": "pair", **p} for p in self.pairs] + [{"kind": "kto", **r} for r in self.kto]
        return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()

    @classmethod
    def from_jsonl(cls, path: str | Path, counts: dict | None = None) -> "PreferenceData":
        data = cls(counts=dict(counts or {}))
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                (data.pairs if row.pop("kind") == "pair" else data.kto).append(row)
        return data


def _cut(record: dict) -> bool:
    """The rated answer was cut by its token limit (finish_reason "length"): the model never chose to end it
    there, so its end-of-turn is not part of what is liked or disliked (preference_train drops it)."""
    return record.get("finish_reason") == "length"


def _prompt_text(prompt: list[dict]) -> str:
    from assistant.data.curation import normalize
    return "\x1e".join(f"{m['role']}\x1f{normalize(m['content'])}" for m in prompt if m["role"] != "system")


def _hash(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:HOLDOUT_HASH_CHARS], 16) / 16 ** HOLDOUT_HASH_CHARS


def _clean(messages: list[dict], opts) -> list[dict] | None:
    """`messages` through curation's per-row filters (scrubbed), or None when a filter removes them."""
    from assistant.data.curation import FILTERS, _cheap_filters
    item = {"messages": [dict(m) for m in messages], "review_status": None}
    return None if _cheap_filters(item, opts, {f: 0 for f in FILTERS}) else item["messages"]


def _cap_users(items: list[dict], share: float) -> list[dict]:
    """Drop the oldest rows of any user above `share` of the rows (when 2+ users contributed)."""
    alive = sorted(items, key=lambda it: -it["seq"])
    while len({it["user"] for it in alive if it["user"] is not None}) >= 2 and share < 1:
        counts: dict = {}
        for it in alive:
            if it["user"] is not None:
                counts[it["user"]] = counts.get(it["user"], 0) + 1
        over = [u for u, n in counts.items() if n > share * len(alive)]
        if not over:
            break
        user = max(over, key=lambda u: (counts[u], str(u)))
        alive.remove(next(it for it in reversed(alive) if it["user"] == user))
    return alive


def build(rows: list[dict], feedback: list[dict], opts, system_prompt: str | None = None) -> PreferenceData:
    """Preference rows from a snapshot's `rows` and the domain's `feedback` records (store.list_feedback).
    `opts`: the CurationSettings the snapshot was made with."""
    from assistant.engine.lm import plain, with_system_prompt
    by_id = {f["id"]: f for f in feedback}
    by_response: dict[str, list[dict]] = {}
    for f in feedback:
        by_response.setdefault(f["response_id"], []).append(f)
    data = PreferenceData()
    paired: set[str] = set()     # prompts whose disliked answer a pair already holds
    removed = {"filtered": 0, "duplicate_prompt": 0, "user_cap": 0, "same_answer": 0}
    for row in rows:
        msgs = plain(row["messages"])        # trl's templates take role and content (no context weights)
        prompt, answer = msgs[:-1], msgs[-1]["content"]
        records = [by_id[i] for i in row.get("feedback_ids") or [] if i in by_id]
        if row.get("source") == "correction":
            if not records:
                continue
            rejected = _clean(records[0]["messages"] + [{"role": "assistant", "content": records[0]["answer"]}], opts)
            if rejected is None:
                removed["filtered"] += 1
                continue
            if _prompt_text([{"role": "a", "content": rejected[-1]["content"]}]) == \
                    _prompt_text([{"role": "a", "content": answer}]):
                removed["same_answer"] += 1
                continue
            data.pairs.append({"prompt": prompt, "chosen": answer, "rejected": rejected[-1]["content"],
                               "rejected_cut": _cut(records[0]), "key": row["key"], "split": "train"})
            paired.add(_prompt_text(prompt))
        elif row.get("source") == "thumbs_up" and row.get("split", "train") == "train":
            data.kto.append({"prompt": prompt, "completion": answer, "label": True, "key": row["key"],
                             "cut": bool(records) and _cut(records[0]), "split": "train"})
    downs = []
    for fbs in by_response.values():
        ups = sum(f["rating"] == "up" for f in fbs)
        if any(f["correction"] for f in fbs) or ups >= len(fbs) - ups:
            continue
        last = max((f for f in fbs if f["rating"] == "down"), key=lambda f: f["seq"])
        msgs = _clean(with_system_prompt(plain(last["messages"]), system_prompt)
                      + [{"role": "assistant", "content": last["answer"]}], opts)
        if msgs is None:
            removed["filtered"] += 1
            continue
        downs.append({"prompt": msgs[:-1], "completion": msgs[-1]["content"], "label": False, "cut": _cut(last),
                      "key": f"feedback:{last['id']}", "user": last["user"] or last.get("response_user"),
                      "seq": last["seq"]})
    seen: set[str] = set()
    kept = []
    for d in sorted(downs, key=lambda d: -d["seq"]):    # newest rating of a prompt wins
        text = _prompt_text(d["prompt"])
        if text in paired or text in seen:
            removed["duplicate_prompt"] += 1
            continue
        seen.add(text)
        kept.append(d)
    capped = _cap_users(kept, opts.max_user_share)
    removed["user_cap"] = len(kept) - len(capped)
    for d in sorted(capped, key=lambda d: d["key"]):
        data.kto.append({k: d[k] for k in ("prompt", "completion", "label", "cut", "key")} | {"split": "train"})
    _holdout(data)
    rated_pairs = _rated_pairs(data)
    liked = sum(r["label"] for r in data.kto)
    data.counts = {"ratings": len(feedback), "thumbs_up": sum(f["rating"] == "up" for f in feedback),
                   "thumbs_down": sum(f["rating"] == "down" for f in feedback),
                   "corrections": sum(bool(f["correction"]) for f in feedback),
                   "pairs": len(data.train_pairs()), "rated_pairs": rated_pairs,
                   "desirable": sum(r["label"] for r in data.train_kto()),
                   "undesirable": sum(not r["label"] for r in data.train_kto()),
                   "heldout": len(data.heldout()), "removed": removed,
                   "liked_total": liked + len(data.pairs) - rated_pairs}
    return data


def _rated_pairs(data: PreferenceData) -> int:
    """A question with a liked and a disliked answer (both training rows) is also a DPO pair: the liked one
    chosen over the disliked one, the most direct lesson two ratings give -> how many were added."""
    liked: dict[str, dict] = {}
    for r in data.kto:
        if r["label"] and r["split"] == "train":
            liked.setdefault(_prompt_text(r["prompt"]), r)
    n = 0
    for r in data.kto:
        up = liked.get(_prompt_text(r["prompt"])) if not r["label"] and r["split"] == "train" else None
        if up is not None:
            data.pairs.append({"prompt": up["prompt"], "chosen": up["completion"], "rejected": r["completion"],
                               "rejected_cut": r.get("cut", False), "key": up["key"], "split": "train",
                               "from": "ratings"})
            n += 1
    return n


def _holdout(data: PreferenceData) -> None:
    """Hold out HOLDOUT_FRACTION of the thumbs-rated answers of each kind (by hash of the prompt; at least one
    of each) when both kinds are plenty. Corrections always train, as in curation: a user who corrected an
    answer expects it learned."""
    for label in (True, False):
        rows = [r for r in data.kto if r["label"] == label]
        if min(sum(r["label"] for r in data.kto), sum(not r["label"] for r in data.kto)) < HOLDOUT_MIN_PER_KIND:
            return
        scores = [_hash(_prompt_text(r["prompt"])) for r in rows]
        picked = [r for r, h in zip(rows, scores) if h < HOLDOUT_FRACTION] or [rows[scores.index(min(scores))]]
        for r in picked:
            r["split"] = "eval"


def supported(counts: dict) -> list[str]:
    """The methods this data supports, in run order."""
    out = ["sft"]
    if counts.get("pairs", 0) >= MIN_PAIRS:
        out.append("dpo")
    if min(counts.get("desirable", 0), counts.get("undesirable", 0)) >= MIN_PER_KIND:
        out.append("kto")
    return out


def describe(counts: dict, methods: list[str]) -> str:
    """"40 ratings, 12 corrections: SFT + DPO + KTO"."""
    return (f"{counts.get('ratings', 0)} ratings ({counts.get('thumbs_up', 0)} up, {counts.get('thumbs_down', 0)} "
            f"down), {counts.get('corrections', 0)} corrections: {' + '.join(m.upper() for m in methods)}")


def parse(method: str) -> list[str] | None:
    """"auto" -> None; "sft+kto" -> ["sft", "kto"]; anything else raises ValueError."""
    if method == "auto":
        return None
    parts = [p.strip().lower() for p in method.replace(",", "+").split("+") if p.strip()]
    if not parts or any(p not in METHODS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"method {method!r}: use auto, or methods joined by '+' from {', '.join(METHODS)} "
                         "(e.g. sft+kto)")
    return [m for m in METHODS if m in parts]


def choose(method: str, counts: dict, n_sft: int, min_examples: int) -> list[str]:
    """The methods a job runs: "auto" those of auto_methods; a named method the data cannot support is
    refused with what it needs. `n_sft`: usable SFT rows (seeds, thumbs-up, corrections); SFT needs
    `min_examples` of them."""
    can = supported(counts)
    wanted = parse(method)
    if wanted is None:     # auto (see AUTO_ORDER)
        wanted = auto_methods(counts, n_sft, min_examples)
        asked_only = [m for m in can if m != "sft" and m not in wanted]
        if not wanted and asked_only:
            names = " or ".join(m.upper() for m in asked_only)
            raise DatasetTooSmall(f"this domain has {n_sft} usable examples after curation; SFT needs at least "
                                  f"{min_examples}. Its ratings support {names}, which auto runs only once "
                                  f"there are {HOLDOUT_MIN_PER_KIND} liked and {HOLDOUT_MIN_PER_KIND} disliked "
                                  f"answers to judge it by: choose method {' or '.join(asked_only)}, or add examples")
        if not wanted:
            raise DatasetTooSmall(_too_little(counts, n_sft, min_examples))
        return wanted
    if "sft" in wanted and n_sft < min_examples:
        raise DatasetTooSmall(_too_little(counts, n_sft, min_examples))
    for m in wanted:
        if m == "dpo" and m not in can:
            raise DatasetTooSmall(f"DPO needs at least {MIN_PAIRS} pairs (a correction of a rated answer, or a "
                                  f"liked and a disliked answer to one question); this domain has "
                                  f"{counts.get('pairs', 0)}: correct more answers, or choose another method")
        if m == "kto" and m not in can:
            raise DatasetTooSmall(_kto_needs(counts))
    return wanted


def auto_methods(counts: dict, n_sft: int, min_examples: int) -> list[str]:
    """What "auto" runs: SFT (with `min_examples` usable rows) and, when the gate can judge it (held-out
    rated answers), the first preference method of AUTO_ORDER for this mix that the data supports."""
    judged = counts.get("heldout", 0) > 0
    corrected = counts.get("pairs", 0) - counts.get("rated_pairs", 0) >= MIN_PAIRS
    order = AUTO_ORDER["corrections" if corrected else "thumbs"]
    extra = [m for m in order if m in supported(counts)][:1] if judged else []
    return [m for m in METHODS if m in extra or (m == "sft" and n_sft >= min_examples)]


def _kto_needs(counts: dict) -> str:
    return (f"learning from ratings (KTO) needs at least {MIN_PER_KIND} ratings of each kind (thumbs-up and "
            f"thumbs-down); this domain has {counts.get('desirable', 0)} usable thumbs-up and "
            f"{counts.get('undesirable', 0)} thumbs-down answers: rate more answers up and down")


def sft_rows(snap, data: PreferenceData) -> int:
    """Usable SFT rows of a curated snapshot: its kept rows less those held out for the preference margin."""
    return snap.report.get("kept", 0) - len(data.heldout_keys())


def _too_little(counts: dict, n_sft: int, min_examples: int) -> str:
    return (f"this domain has {n_sft} usable examples after curation and not enough ratings to learn from "
            f"them alone: training needs at least {min_examples} examples (seeds, thumbs-up answers or "
            f"corrections), or {_kto_needs(counts)}")


def class_weights(counts: dict) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight): the rarer kind weighs the count ratio (at most
    MAX_CLASS_WEIGHT), so both kinds pull about equally."""
    d, u = max(counts.get("desirable", 0), 1), max(counts.get("undesirable", 0), 1)
    if d < u:
        return min(u / d, MAX_CLASS_WEIGHT), 1.0
    return 1.0, min(d / u, MAX_CLASS_WEIGHT)


# A job's preference data: built in the server with the snapshot, read back by the job process -------------
FILE_HASH_CHARS = 16


def for_job(settings, store, domain: str, snap, method: str, min_examples: int) -> dict:
    """Build the preference rows of a curated snapshot `snap`, choose the methods (DatasetTooSmall when the
    data supports none that was asked for), and write the rows next to the snapshot, named by their hash:
    -> the job record's "preference" entry (hash, counts, supported, methods, summary)."""
    from assistant.files import atomic_write_bytes
    from assistant.settings import group_settings
    opts = group_settings(settings, "curation")
    data = build(snap.rows, store.list_feedback(domain), opts)
    methods = choose(method, data.counts, sft_rows(snap, data), min_examples)
    blob = data.to_jsonl()
    digest = hashlib.sha256(blob).hexdigest()[:FILE_HASH_CHARS]
    path = _path(settings, domain, digest)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, blob)
    return {"hash": digest, "counts": data.counts, "supported": supported(data.counts), "methods": methods,
            "summary": describe(data.counts, methods)}


def _path(settings, domain: str, digest: str) -> Path:
    return Path(settings.state_path) / "snapshots" / domain / f"preference-{digest}.jsonl"


def shared_name(digest: str) -> str:
    """The name the rows of `for_job` go by in the database's snapshot files (a worker on another machine)."""
    return f"preference-{digest}"


def load_for_job(settings, domain: str, entry: dict, store=None) -> PreferenceData:
    """The rows `for_job` wrote (the job record holds their hash, never a path); from the database's copy
    when they were prepared on another machine."""
    path = _path(settings, domain, entry["hash"])
    if not path.is_file() and store is not None \
            and (content := store.get_snapshot_file(domain, shared_name(entry["hash"]))) is not None:
        from assistant.files import atomic_write_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, content)
    if not path.is_file():
        raise DatasetTooSmall(f"the rated answers of {domain!r} prepared for this job are missing: train again")
    return PreferenceData.from_jsonl(path, entry.get("counts"))
