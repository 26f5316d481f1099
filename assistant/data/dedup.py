"""Do two training items carry the same information? The lexical half of near-duplicate detection.

MiniLM's cosine is dominated by wording: ten facts asked with one template ("Who is the head chef of
<place>?" answered with ten different names) sit at 0.8-0.9 of each other. So an embedding match is only a
candidate; two items merge only when, besides the cosine, their answers carry the same content tokens
(content words after stop-word removal and a light stem, numbers included) and their questions name the
same entities (numbers, and capitalized words that do not start a sentence). A name, number, date, place,
quantity or any other content word that differs keeps both items: losing a taught fact is the worst thing
curation can do, and keeping one redundant row costs almost nothing.
"""

from __future__ import annotations

import difflib
import logging
import re
import unicodedata
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Function words: a difference in these alone is "only wording". Content words are everything else.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just let me more most my myself
no nor not of off on once only or other ought our ours ourselves out over own same she should so some
such than that the their theirs them themselves then there these they this those through to too under
until up very was we were what when where which while who whom why will with would you your yours yourself
yourselves please sure ok okay well yes yeah hi hello thanks thank certainly course indeed simply just
s t d ll m re ve get got go goes going use using tell know like want need answer question
""".split()) - {"no", "not", "nor"}      # negations carry meaning
STEM_MIN_LEN = 4                 # words shorter than this are not stemmed
TEMPLATE_MIN_SHARED = 0.5        # questions sharing this share of their words in order are one template
WHY_MAX_WORDS = 8                # words named in a merge's explanation
_WORD = re.compile(r"[^\W_]+(?:[.,:/'][^\W_]+)*", re.UNICODE)   # keeps 2.50, 7:30, 1,200, it's together
_SENTENCE_END = re.compile(r"[.!?:;]\s*$")


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _stem(word: str) -> str:
    """A light, deterministic stem: possessive, plural, -ed / -ing and a final e (serves, served, serving,
    serve -> serv), so that answers that differ only in grammar compare equal."""
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) < STEM_MIN_LEN or any(c.isdigit() for c in word):
        return word
    if word.endswith("ies"):
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= STEM_MIN_LEN - 1:
            word = word[:-len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > STEM_MIN_LEN else word


def content_words(text: str) -> dict[str, str]:
    """Content words of `text`: stem -> the first word (case-folded) with that stem. Numbers are kept
    whole ("2.50", "7:30")."""
    out: dict[str, str] = {}
    for w in _WORD.findall(_fold(text).replace("\u2019", "'").casefold()):
        if w not in STOPWORDS:
            out.setdefault(_stem(w), w)
    return out


def content_tokens(text: str) -> frozenset[str]:
    """Content words of `text`, case-folded and lightly stemmed."""
    return frozenset(content_words(text))


def entity_tokens(text: str) -> frozenset[str]:
    """Tokens that name something: any token with a digit, and capitalized or all-caps words that do not
    start a sentence (Lisbon, Maria, EUR). Case-folded."""
    out = set()
    text = _fold(text).replace("\u2019", "'")
    for m in _WORD.finditer(text):
        w = m.group(0)
        starts_sentence = not text[:m.start()].strip() or bool(_SENTENCE_END.search(text[:m.start()]))
        if any(c.isdigit() for c in w) or (w[:1].isupper() and not starts_sentence) or (len(w) > 1 and w.isupper()):
            if w.casefold() not in STOPWORDS:
                out.add(_stem(w.casefold()))
    return frozenset(out)


@dataclass(frozen=True)
class Comparison:
    """Why two items are (not) the same information; `same` is the verdict of the lexical check."""
    same: bool
    shared_answer_tokens: tuple[str, ...]
    answer_only_in_a: tuple[str, ...]
    answer_only_in_b: tuple[str, ...]
    question_entities_differ: tuple[str, ...]

    def why(self, similarity: float) -> str:
        shared = ", ".join(self.shared_answer_tokens[:WHY_MAX_WORDS]) or "none"
        if self.same:
            return f"embedding similarity {similarity:.2f}; same answer content ({shared})"
        differ = sorted(set(self.answer_only_in_a) | set(self.answer_only_in_b))
        if differ:
            return f"answers differ in {', '.join(differ[:WHY_MAX_WORDS])}"
        return f"questions name different things ({', '.join(self.question_entities_differ[:WHY_MAX_WORDS])})"


def _words(text: str) -> list[str]:
    return _WORD.findall(_fold(text).replace("\u2019", "'").casefold())


def template_swap(qa: str, qb: str) -> tuple[str, ...]:
    """Content words swapped between two questions of one template ("... of the Lisbon kitchen?" /
    "... of the Porto kitchen?"): the questions differ only by replaced words, share at least
    TEMPLATE_MIN_SHARED of their words in order, and a replaced span holds content words on both sides.
    -> the swapped content words (empty for paraphrases and re-asks)."""
    wa, wb = _words(qa), _words(qb)
    if not wa or not wb:
        return ()
    matcher = difflib.SequenceMatcher(None, wa, wb, autojunk=False)
    ops = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    shared = sum(i2 - i1 for tag, i1, i2, _, _ in matcher.get_opcodes() if tag == "equal")
    if not ops or any(op[0] != "replace" for op in ops) or shared < TEMPLATE_MIN_SHARED * max(len(wa), len(wb)):
        return ()
    swapped = set()
    for _, i1, i2, j1, j2 in ops:
        ca = {_stem(w) for w in wa[i1:i2] if w not in STOPWORDS}
        cb = {_stem(w) for w in wb[j1:j2] if w not in STOPWORDS}
        if ca and cb and ca != cb:
            swapped |= ca ^ cb
    return tuple(sorted(swapped))


def last(messages: list[dict], role: str) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == role), "")


def compare(a: list[dict], b: list[dict]) -> Comparison:
    """The lexical check of two conversations: same answer content, and questions naming the same
    entities (their other words may differ: paraphrases)."""
    wa, wb = content_words(last(a, "assistant")), content_words(last(b, "assistant"))
    ta, tb = set(wa), set(wb)
    qa, qb = entity_tokens(last(a, "user")), entity_tokens(last(b, "user"))
    ea, eb = entity_tokens(last(a, "assistant")), entity_tokens(last(b, "assistant"))
    # an entity named in one question and answered in the other (Lisbon? -> "In Lisbon, ...") is no conflict
    q_differ = (qa - qb - eb) | (qb - qa - ea) | set(template_swap(last(a, "user"), last(b, "user")))
    same = ta == tb and not q_differ
    return Comparison(same, tuple(sorted(wa[t] for t in ta & tb)), tuple(sorted(wa[t] for t in ta - tb)),
                      tuple(sorted(wb[t] for t in tb - ta)), tuple(sorted(q_differ)))


def same_question(a: list[dict], b: list[dict]) -> bool:
    """The same question asked again (case, spacing and punctuation aside)."""
    def norm(t):
        return " ".join(_WORD.findall(_fold(t).casefold()))
    return norm(last(a, "user")) == norm(last(b, "user")) != ""


# Decisions on curation items (dicts of `curation.run`) ----------------------------------------------
def supersede(items: list[dict]) -> None:
    """The newest correction of a question wins, always: every other item asking the same question (an
    older correction, a rated answer, a seed, approved or not) is removed as `superseded` by it, with the
    reason said. Newest is by the store's sequence: when the correction was given (a re-corrected record counts as
    new), in the order the database wrote them, whatever the clocks of the replicas said."""
    live = [it for it in items if it["removed"] is None]
    newest_first = sorted((it for it in live if it.get("source") == "correction"),
                          key=lambda it: (-(it.get("seq") or 0), it["key"]))
    winners: list[dict] = []
    for c in newest_first:
        if not any(same_question(w["messages"], c["messages"]) for w in winners):
            winners.append(c)
    for item in live:
        if any(item is w for w in winners):
            continue
        winner = next((w for w in winners if same_question(w["messages"], item["messages"])), None)
        if winner is not None:
            cmp = compare(item["messages"], winner["messages"])
            older = "an older correction" if item.get("source") == "correction" else "an earlier answer"
            item.update(removed="superseded", near_duplicate_of=winner["key"], similarity=None,
                        shared_answer_tokens=list(cmp.shared_answer_tokens),
                        why=f"{older} of the same question: the newer correction {winner['key']} replaces it")


def removed_entry(it: dict, by_key: dict[str, dict], text_chars: int) -> dict:
    """One removed item in the report: what it was, the filter, and for duplicates the item kept instead
    and why (similarity, shared answer tokens). Texts only for rows that passed the PII filter."""
    entry = {"key": it["key"], "source": it["source"], "filter": it["removed"],
             "duplicate_of": it.get("near_duplicate_of"), "similarity": it.get("similarity"),
             "shared_answer_tokens": it.get("shared_answer_tokens") or [], "why": it.get("why") or it["removed"]}
    if it["removed"] in ("near_duplicate", "exact_duplicate", "superseded", "user_cap"):
        entry["question"] = last(it["messages"], "user")[:text_chars]
        kept = by_key.get(it.get("near_duplicate_of") or "")
        entry["duplicate_question"] = last(kept["messages"], "user")[:text_chars] if kept else None
    return entry


class ReadOnlyCache:
    """An embedding cache that reads from `cache` and never writes (curation for display)."""

    def __init__(self, cache):
        self.cache = cache

    def get_embeddings(self, model: str, hashes: list[str]) -> dict[str, bytes]:
        return self.cache.get_embeddings(model, hashes) if self.cache is not None else {}

    def put_embeddings(self, model: str, vectors: dict[str, bytes]) -> None:
        return None


def merge_quality(items: list[dict], group_of: dict[str, int]) -> dict:
    """Score near-duplicate merges against known groups (`group_of`: item key -> group id; items of one
    group carry the same information). -> precision and recall of the merges (an item removed as a near
    or exact duplicate of an item of its own group is a correct merge), and the groups left with no item
    at all (facts lost)."""
    merged = [it for it in items if it["removed"] in ("near_duplicate", "exact_duplicate")]
    correct = sum(group_of.get(it["key"]) == group_of.get(it.get("near_duplicate_of")) for it in merged)
    sizes: dict[int, int] = {}
    for g in group_of.values():
        sizes[g] = sizes.get(g, 0) + 1
    possible = sum(n - 1 for n in sizes.values())
    kept_groups = {group_of[it["key"]] for it in items if it["removed"] is None and it["key"] in group_of}
    return {"merges": len(merged), "correct": correct, "possible": possible,
            "precision": correct / len(merged) if merged else 1.0,
            "recall": correct / possible if possible else 1.0,
            "groups": len(sizes), "groups_lost": len(set(sizes) - kept_groups)}
