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

import re
import unicodedata
from dataclasses import dataclass

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
_WORD = re.compile(r"[^\W_]+(?:[.,:/'][^\W_]+)*", re.UNICODE)   # keeps 2.50, 7:30, 1,200, it's together
_SENTENCE_END = re.compile(r"[.!?:;]\s*$")


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _stem(word: str) -> str:
    """A light, deterministic stem: plural and possessive endings only (days/day, city's/city)."""
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) < STEM_MIN_LEN or any(c.isdigit() for c in word):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def content_tokens(text: str) -> frozenset[str]:
    """Content words of `text`, case-folded and lightly stemmed, numbers kept whole ("2.50", "7:30")."""
    out = set()
    for w in _WORD.findall(_fold(text).replace("\u2019", "'").casefold()):
        if w in STOPWORDS:
            continue
        out.add(_stem(w))
    return frozenset(out)


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
        shared = ", ".join(self.shared_answer_tokens[:8]) or "none"
        if self.same:
            return f"embedding similarity {similarity:.2f}; same answer content ({shared})"
        differ = sorted(set(self.answer_only_in_a) | set(self.answer_only_in_b))
        if differ:
            return f"answers differ in {', '.join(differ[:8])}"
        return f"questions name different things ({', '.join(self.question_entities_differ[:8])})"


def last(messages: list[dict], role: str) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == role), "")


def compare(a: list[dict], b: list[dict]) -> Comparison:
    """The lexical check of two conversations: same answer content, and questions naming the same
    entities (their other words may differ: paraphrases)."""
    ta, tb = content_tokens(last(a, "assistant")), content_tokens(last(b, "assistant"))
    qa, qb = entity_tokens(last(a, "user")), entity_tokens(last(b, "user"))
    ea, eb = entity_tokens(last(a, "assistant")), entity_tokens(last(b, "assistant"))
    # an entity named in one question and answered in the other (Lisbon? -> "In Lisbon, ...") is no conflict
    q_differ = (qa - qb - eb) | (qb - qa - ea)
    same = ta == tb and not q_differ
    return Comparison(same, tuple(sorted(ta & tb)), tuple(sorted(ta - tb)), tuple(sorted(tb - ta)),
                      tuple(sorted(q_differ)))


def same_question(a: list[dict], b: list[dict]) -> bool:
    """The same question asked again (case, spacing and punctuation aside)."""
    norm = lambda t: " ".join(_WORD.findall(_fold(t).casefold()))   # noqa: E731
    return norm(last(a, "user")) == norm(last(b, "user")) != ""


class ReadOnlyCache:
    """An embedding cache that reads from `cache` and never writes (curation for display)."""

    def __init__(self, cache):
        self.cache = cache

    def get_embeddings(self, model: str, hashes: list[str]) -> dict[str, bytes]:
        return self.cache.get_embeddings(model, hashes) if self.cache is not None else {}

    def put_embeddings(self, model: str, vectors: dict[str, bytes]) -> None:
        return None
