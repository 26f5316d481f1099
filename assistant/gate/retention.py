"""What a new version kept of the general answers the live one gave, and what of its training leaked into
them: the numbers the gate's retention and leakage checks judge.

Retention is judged per question, on content: of the probes (gate/probes.py) the reference (the live version,
or the base when none is live) knows, the share the candidate still knows. Each is asked twice, with the
domain's system prompt and without one. The reference knows a probe when both its answers give the right
content; the candidate keeps it when either does. A small model gets some answers right by the luck of
one phrasing, and any change of weights flips those either way (on the embedded SmolLM2, 7 of the 39
answers it got right with one system prompt were wrong without it; an adapter taught nine facts flipped
one or two more of the rest in one context only), so a single greedy answer says little about what was
forgotten; a fact lost in both contexts was. A taught name turning up in an answer is caught by the
leakage check in either case. A shorter or reworded answer that keeps the fact is kept; a changed style is
not forgetting.

Leakage is taught material turning up where it does not belong: a rare word of the training rows (a name
like "Lammens", an invented term) in the candidate's answer to a general question, when neither that
question nor the reference's answer has it. A word is rare when it is not a whole word of the embedding
model's vocabulary (about 21,000 common English words and names) and has at least MIN_RARE_WORD_LEN
letters.

`probe_conversations` also says which probes are left out because a training row asks the same question:
a probe is a general question only while nothing taught answers it.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from assistant.gate.probes import PROBES, Probe, gives_content, normalize

log = logging.getLogger(__name__)

MIN_RARE_WORD_LEN = 4          # shorter words are too often abbreviations and fragments to call a leak
MIN_RETENTION_BASIS = 10       # probes the reference must answer right before retention can judge
MAX_SHOWN_LOST = 12            # lost questions listed in a verdict (all are counted)
_WORD = re.compile(r"[^\W\d_]+")


def active_probes(rows: list[dict], limit: int = 0) -> tuple[list[Probe], int]:
    """(the probes no training row asks, at most `limit` of them evenly spread (0: all), how many were left
    out because a training row asks them)."""
    asked = {normalize(m["content"]) for r in rows for m in r.get("messages", ()) if m.get("role") == "user"}
    kept = [p for p in PROBES if normalize(p.question) not in asked]
    n_left_out = len(PROBES) - len(kept)
    if 0 < limit < len(kept):
        kept = [kept[i * len(kept) // limit] for i in range(limit)]
    return kept, n_left_out


@lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    """The whole words of the embedding model's WordPiece vocabulary, lower-cased (empty when missing)."""
    try:
        from assistant.data.embeddings import model_path
        text = (model_path() / "vocab.txt").read_text(encoding="utf-8")
    except Exception as e:  # noqa: BLE001 - without the list the leakage check is skipped, and says so
        log.warning("no vocabulary for the leakage check: %s", e)
        return frozenset()
    return frozenset(w for w in text.split() if w.isalpha() and not w.startswith("##"))


def rare_words(texts: list[str], common: frozenset[str]) -> set[str]:
    """Lower-cased rare words of `texts` (see the module docstring)."""
    return {w for t in texts for w in (x.lower() for x in _WORD.findall(t))
            if len(w) >= MIN_RARE_WORD_LEN and w not in common}


def taught_texts(rows: list[dict]) -> list[str]:
    """Every message of the training rows (questions, answers and system prompts alike)."""
    return [m.get("content") or "" for r in rows if r.get("split", "train") == "train" for m in r.get("messages", ())]


def judge(probes: list[Probe], reference: list[str], candidate: list[str], rows: list[dict],
          system_prompt: str | None = None, reference_plain: list[str] | None = None,
          candidate_plain: list[str] | None = None) -> dict:
    """Retention and leakage of `candidate` against `reference` on `probes` (answers in the same order, with
    the system prompt; the `*_plain` answers without it, None: not asked):
    {"retention", "n_reference_right", "n_kept", "lost": [{question, reference, candidate}],
     "leakage", "n_leaked", "leaked": [{question, answer, words}], "rare_taught_words"}."""
    plain = reference_plain if reference_plain is not None else reference
    cand_plain = candidate_plain if candidate_plain is not None else candidate
    right = [gives_content(a, p.keys) and gives_content(b, p.keys) for p, a, b in zip(probes, reference, plain)]
    kept = [r and (gives_content(c, p.keys) or gives_content(d, p.keys))
            for p, r, c, d in zip(probes, right, candidate, cand_plain)]
    lost = [{"question": p.question, "reference": a, "candidate": c}
            for p, r, k, a, c in zip(probes, right, kept, reference, candidate) if r and not k]
    basis = sum(right)
    out = {"n_probes": len(probes), "n_reference_right": basis, "n_kept": sum(kept),
           "retention": (sum(kept) / basis) if basis else None, "lost": lost}
    common = common_words()
    if not common:
        return {**out, "leakage": None, "n_leaked": 0, "leaked": [], "rare_taught_words": 0}
    # words the domain's own prompt and the reference already use are not leaks
    ordinary = rare_words(reference + [system_prompt or ""], common)
    taught = rare_words(taught_texts(rows), common) - ordinary
    leaked = []
    for p, ref, c in zip(probes, reference, candidate):
        words = sorted((rare_words([c], common) & taught) - rare_words([p.question, ref], common))
        if words:
            leaked.append({"question": p.question, "answer": c, "words": words})
    return {**out, "leakage": len(leaked) / len(probes) if probes else None, "n_leaked": len(leaked),
            "leaked": leaked, "rare_taught_words": len(taught)}
