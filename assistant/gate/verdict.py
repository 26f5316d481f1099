"""The promotion gate: before/after metrics -> a verdict a person can read.

`verdict(before, after, settings)` returns
    {"promote": bool, "summary": "one sentence",
     "checks": [{"name", "passed", "decides", "value", "bound", "meaning", "advice"}], "reasons": ["ok: ...", ...],
     "retention": {"kept", "basis", "lost": [{question, reference, candidate}], "leaked": [...]} or absent}
A check whose data is missing (no corrections, no holdout) is left out, and said so in `reasons`.
With rated answers held out (data/preference.py), the new version's preference margin must not fall below the
current version's (gate/preference.py).
`gate(before, after, settings)` is the (promote, reasons) pair of the same verdict.

Forgetting is judged per question, on content (gate/retention.py): of the general probe questions the live
version (or the base) knows, the new version must still know at least `min_retention`, and rare words of
its training must not turn up in more than `max_leakage` of its general answers. A shorter or reworded
answer with the same content passes, so a change of style is not taken for forgetting. Two figures are
shown beside them and decide nothing (`decides: false`), unless the reference knows too few probes for
retention to judge (then neither retention nor leakage decides, and the figures do): the loss (NLL per
token) of the base's own probe answers under the adapter vs under the base, and the MiniLM cosine between
the two models' answers. Both are means: they hide a catastrophe on a few questions, and they move with
style as much as with forgetting. tests/test_retention.py, tests/test_gate_recovers.py and
benchmarks/bench_gate.py check the checks on the embedded SmolLM2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateSettings:
    min_corrections_match: float = field(default=0.6, metadata={
        "help": "mean answer-match (ROUGE-L) the adapter must reach on every accepted correction"})
    min_taught_match: float = field(default=0.5, metadata={
        "help": "mean answer-match the adapter must reach on the examples it was taught (seeds, thumbs-up)"})
    max_eval_loss_ratio: float = field(default=1.0, metadata={
        "help": "the adapter's held-out loss may be at most this times the base's (only with a holdout)"})
    max_eval_match_drop: float = field(default=0.05, metadata={
        "help": "the held-out answer-match may fall by at most this much (only with a holdout)"})
    max_general_nll_ratio: float = field(default=2.0, metadata={
        "help": "the loss per token of the base's own answers to general prompts, under the adapter, may be "
                "at most this times the base's (shown; it decides only when retention cannot judge)"})
    min_general_embedding_similarity: float = field(default=0.6, metadata={
        "help": "mean MiniLM cosine between the base's and the adapter's answers to general prompts (shown; it "
                "decides only when retention cannot judge)"})
    min_retention: float = field(default=0.95, metadata={
        "help": "of the general probe questions the live version (or the base) knows (answers right with the "
                "domain's system prompt and without it), the share the new version must still know (answer right "
                "in at least one of the two)"})
    max_leakage: float = field(default=0.02, metadata={
        "help": "share of the new version's answers to general probe questions that may contain a rare word "
                "of its training data (a taught name turning up where it does not belong)"})
    probe_max_new_tokens: int = field(default=40, metadata={"help": "tokens per answer to a general probe question"})
    probes: int = field(default=0, metadata={
        "help": "general probe questions asked, evenly spread over the set; 0 = all of them. Fewer make a faster "
                "gate that judges retention and leakage on fewer questions (retention decides only when the "
                "reference knows enough of them)"})
    max_preference_margin_drop: float = field(default=0.0, metadata={
        "help": "on held-out rated answers, the new version's preference margin (log-likelihood per token of "
                "liked minus disliked answers) may fall at most this much below the current version's"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per greedy answer during evaluation"})
    max_seq_len: int = field(default=512, metadata={"help": "tokens per row for the losses"})

    def __post_init__(self):
        from assistant.errors import InvalidSetting
        if self.probes < 0:
            raise InvalidSetting(f"gate setting probes must be 0 (all) or more, not {self.probes}", param="probes")

    @classmethod
    def from_dict(cls, d: dict | None) -> "GateSettings":
        from assistant.settings import checked_values
        return cls(**checked_values(cls, dict(d or {}), "gate"))


MEANING = {
    "corrections": "the adapter does not yet give the answers users corrected",
    "taught": "the adapter does not reproduce the examples it was taught",
    "heldout_loss": "the adapter predicts held-out examples worse than the base: it may have memorized "
                    "instead of learning",
    "heldout_match": "answers to held-out examples got worse than the base's",
    "general_nll": "the adapter finds the base's own answers to general questions much less likely: it may "
                   "have forgotten general skills",
    "general_similarity": "answers to general questions changed a lot: the adapter may have forgotten general "
                          "skills",
    "preference_margin": "the new version prefers the answers users disliked more than the current version does",
    "retention": "it lost general answers the {reference} gave",
    "leakage": "words it was taught turn up in its answers to unrelated general questions",
}
MEANING_PASSED = {
    "corrections": "the adapter gives the answers users corrected",
    "taught": "the adapter reproduces the examples it was taught",
    "heldout_loss": "the adapter predicts held-out examples at least as well as the base",
    "heldout_match": "answers to held-out examples are as good as the base's",
    "general_nll": "the base's own answers to general questions stay likely: general skills are kept",
    "general_similarity": "answers to general questions stay close to the base's",
    "preference_margin": "the new version prefers the answers users liked at least as much as the current one",
    "retention": "it still gives the general answers the {reference} gave",
    "leakage": "what it was taught stays out of its answers to unrelated questions",
}
ADVICE = {
    "corrections": "train again with more epochs (or a higher learning rate), and check that corrections of the "
                   "same question agree",
    "taught": "train again with more epochs (or a higher learning rate); make sure each question has one answer",
    "heldout_loss": "add more varied examples, or lower epochs",
    "heldout_match": "add more varied examples, or lower epochs",
    "general_nll": "add more varied examples, lower epochs or the learning rate, or activate anyway if general "
                   "questions do not matter for this domain",
    "general_similarity": "add more varied examples, lower epochs or the learning rate, or activate anyway if "
                          "general questions do not matter for this domain",
    "preference_margin": "train with a preference method (method sft+kto or sft+dpo), or rate more answers",
    "retention": "train again with a lower learning rate or fewer epochs (retries do this by themselves), or add "
                 "more varied examples; activate anyway only if those questions do not matter for this domain",
    "leakage": "train again with a lower learning rate or fewer epochs (retries do this by themselves), or add "
               "examples that use the taught names only where they belong",
}
LABEL = {
    "corrections": "answer-match on the {n} corrected answers",
    "taught": "answer-match on {n} taught examples",
    "heldout_loss": "held-out loss vs base",
    "heldout_match": "held-out answer-match",
    "general_nll": "loss of the base's general answers, adapter / base",
    "general_similarity": "similarity of general answers to the base's",
    "preference_margin": "preference margin (liked minus disliked, log-likelihood per token) on {n} held-out "
                         "rated answers",
    "retention": "general answers kept, of the {n} the {reference} gave right",
    "leakage": "general answers with a rare taught word, of {n}",
}
FORGETTING = ("retention", "leakage")   # the checks a safer recipe can mend (jobs retry on them)
FIGURES = ("general_nll", "general_similarity")   # shown; they decide only when retention cannot judge


def _ratio(a, b):
    return a / b if a is not None and b else None


def s_min_basis() -> int:
    from assistant.gate.retention import MIN_RETENTION_BASIS
    return MIN_RETENTION_BASIS


def checks(before: dict, after: dict, s: GateSettings) -> tuple[list[dict], list[str]]:
    """The gate's checks that have data -> (checks, names of checks skipped with why)."""
    out, skipped = [], []

    ret = after.get("retention") or {}
    reference = "live version" if ret.get("reference") == "live" else "base"
    judged = ret.get("retention") is not None and (ret.get("n_reference_right") or 0) >= s_min_basis()

    def add(name, passed, value, bound, n=None, decides=True):
        words = {"reference": reference}
        out.append({"name": name, "passed": bool(passed), "decides": decides,
                    "value": None if value is None else round(float(value), 4),
                    "bound": bound, "label": LABEL[name].format(n=n, reference=reference),
                    "meaning": (MEANING_PASSED if passed else MEANING)[name].format(**words),
                    "advice": "" if passed else ADVICE[name]})

    cm = after.get("corrections_match")
    if cm is not None:
        add("corrections", cm >= s.min_corrections_match, cm, f">= {s.min_corrections_match}",
            after.get("n_corrections"))
    else:
        skipped.append("corrections (no accepted corrections in the dataset)")
    tm = after.get("taught_match")
    if tm is not None:
        add("taught", tm >= s.min_taught_match, tm, f">= {s.min_taught_match}", after.get("n_taught"))
    bl, al = before.get("eval_loss"), after.get("eval_loss")
    if bl is not None and al is not None:
        add("heldout_loss", al <= bl * s.max_eval_loss_ratio, _ratio(al, bl), f"<= {s.max_eval_loss_ratio}")
        bm, am = before.get("eval_match"), after.get("eval_match")
        if bm is not None and am is not None:
            add("heldout_match", am >= bm - s.max_eval_match_drop, am, f">= {bm - s.max_eval_match_drop:.3f}")
    else:
        skipped.append("held-out loss (no holdout: small datasets are trained on in full)")
    if judged:
        add("retention", ret["retention"] >= s.min_retention, ret["retention"], f">= {s.min_retention}",
            ret["n_reference_right"])
    elif ret:
        skipped.append(f"retention (the {reference} answered {ret.get('n_reference_right') or 0} general probe "
                       f"questions right: too few to judge; the general-answer figures decide)")
    if ret.get("leakage") is not None:    # like retention, it decides only where there are general answers to keep
        add("leakage", ret["leakage"] <= s.max_leakage, ret["leakage"], f"<= {s.max_leakage}", ret.get("n_probes"),
            decides=judged)
    elif ret:
        skipped.append("leakage (no vocabulary to tell rare words from common ones)")
    ratio = _ratio(after.get("general_nll"), before.get("general_nll"))
    if ratio is not None:
        add("general_nll", ratio <= s.max_general_nll_ratio, ratio, f"<= {s.max_general_nll_ratio}", decides=not judged)
    sim = after.get("general_embedding_similarity")
    if sim is not None:
        add("general_similarity", sim >= s.min_general_embedding_similarity, sim,
            f">= {s.min_general_embedding_similarity}", decides=not judged)
    pb, pa = before.get("preference_margin"), after.get("preference_margin")
    if pb is not None and pa is not None:
        add("preference_margin", pa >= pb - s.max_preference_margin_drop, pa,
            f">= {pb - s.max_preference_margin_drop:.3f} ({after.get('preference_reference', 'current')}'s margin)",
            after.get("n_preference_heldout"))
    elif after.get("preference_skipped"):
        skipped.append(f"preference margin ({after['preference_skipped']})")
    return out, skipped


def verdict(before: dict, after: dict, settings: GateSettings | None = None) -> dict:
    """The gate's decision, written for a person (see the module docstring for its shape)."""
    s = settings or GateSettings()
    found, skipped = checks(before, after, s)
    failed = [c for c in found if not c["passed"] and c["decides"]]
    reasons = [f"{'ok' if c['passed'] else 'blocked' if c['decides'] else 'shown'}: {c['label']} {c['value']:.2f}, "
               f"{'needs' if c['decides'] else 'bound when it decides'} {c['bound']}"
               for c in sorted(found, key=lambda c: (c["passed"] or not c["decides"], not c["decides"]))]
    reasons += [f"skipped: {what}" for what in skipped]
    learned = [c for c in found if c["name"] in ("corrections", "taught", "heldout_loss", "preference_margin")]
    if not learned:
        failed.append({"name": "nothing", "meaning": "there was nothing to check the adapter on",
                       "advice": "add examples or corrections, then train again"})
        reasons.insert(0, "blocked: nothing to evaluate (no taught examples, corrections or holdout)")
    if not failed:
        prefers = any(c["name"] == "preference_margin" for c in found)
        summary = ("The new version learned what it was taught and kept its general answers"
                   + (", and it prefers the answers users liked at least as much as the current version does"
                      if prefers else "") + ", so it goes live.")
    else:
        first = failed[0]
        more = f" (and {len(failed) - 1} more check{'s' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
        example = _lost_example(after) if first["name"] == "retention" else _leak_example(after) \
            if first["name"] == "leakage" else ""
        summary = (f"Not activated: {first['meaning']}{more}{example}. What to do: {first['advice']}; "
                   "or activate this version anyway from the Adapters tab.")
    out = {"promote": not failed, "summary": summary, "checks": found, "reasons": reasons}
    if after.get("retention"):
        out["retention"] = public_retention(after["retention"])
    return out


def public_retention(ret: dict) -> dict:
    """What a card and a job record keep of the retention and leakage results (lost and leaked answers
    listed, at most MAX_SHOWN_LOST of each)."""
    from assistant.gate.retention import MAX_SHOWN_LOST
    keep = ("reference", "n_probes", "n_reference_right", "n_kept", "retention", "leakage", "n_leaked",
            "probes_left_out", "probe_set", "rare_taught_words")
    return {**{k: ret.get(k) for k in keep}, "lost": list(ret.get("lost") or [])[:MAX_SHOWN_LOST],
            "leaked": list(ret.get("leaked") or [])[:MAX_SHOWN_LOST]}


def _clip(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _lost_example(after: dict) -> str:
    ret = after.get("retention") or {}
    lost = ret.get("lost") or []
    if not lost:
        return ""
    first = lost[0]
    return (f" ({len(lost)} of {ret.get('n_reference_right')}, e.g. \"{first['question']}\" was answered "
            f"\"{_clip(first['reference'])}\" and now \"{_clip(first['candidate'])}\")")


def _leak_example(after: dict) -> str:
    leaked = (after.get("retention") or {}).get("leaked") or []
    if not leaked:
        return ""
    first = leaked[0]
    return (f" ({len(leaked)} answers, e.g. \"{first['question']}\" is answered \"{_clip(first['answer'])}\", "
            f"with {', '.join(repr(w) for w in first['words'])})")


def gate(before: dict, after: dict, settings: GateSettings | None = None) -> tuple[bool, list[str]]:
    """(promote, reasons): one line per check, failed ones first."""
    v = verdict(before, after, settings)
    return v["promote"], v["reasons"]
