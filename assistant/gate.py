"""The promotion gate: before/after metrics -> a verdict a person can read.

`verdict(before, after, settings)` returns
    {"promote": bool, "summary": "one sentence",
     "checks": [{"name", "passed", "value", "bound", "meaning", "advice"}], "reasons": ["ok: ...", ...]}
A check whose data is missing (no corrections, no holdout) is left out, and said so in `reasons`.
With rated answers held out (preference.py), the new version's preference margin must not fall below the
current version's (preference_eval.py).
`gate(before, after, settings)` is the (promote, reasons) pair of the same verdict.

Forgetting is measured twice, both tolerant of rewording: the loss (NLL per token) of the base model's own
answers to general prompts under the adapter vs under the base (a ratio), and the MiniLM cosine between
the base's and the adapter's answers to those prompts. The bounds were set on the embedded SmolLM2: an
adapter taught 10 distinct facts (default recipe) measured NLL ratio 1.32 and similarity 0.86; one that
answers everything with one fixed sentence measured 18.6 and 0.05. The slow tests
(tests/test_gate_calibration.py, tests/test_retrain_e2e.py) check both sides.
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
                "at most this times the base's (forgetting; rewording the answers does not move it)"})
    min_general_embedding_similarity: float = field(default=0.6, metadata={
        "help": "mean MiniLM cosine between the base's and the adapter's answers to general prompts"})
    max_preference_margin_drop: float = field(default=0.0, metadata={
        "help": "on held-out rated answers, the new version's preference margin (log-likelihood per token of "
                "liked minus disliked answers) may fall at most this much below the current version's"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per greedy answer during evaluation"})
    max_seq_len: int = field(default=512, metadata={"help": "tokens per row for the losses"})

    @classmethod
    def from_dict(cls, d: dict | None) -> "GateSettings":
        from .settings import checked_values
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
}
MEANING_PASSED = {
    "corrections": "the adapter gives the answers users corrected",
    "taught": "the adapter reproduces the examples it was taught",
    "heldout_loss": "the adapter predicts held-out examples at least as well as the base",
    "heldout_match": "answers to held-out examples are as good as the base's",
    "general_nll": "the base's own answers to general questions stay likely: general skills are kept",
    "general_similarity": "answers to general questions stay close to the base's",
    "preference_margin": "the new version prefers the answers users liked at least as much as the current one",
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
}


def _ratio(a, b):
    return a / b if a is not None and b else None


def checks(before: dict, after: dict, s: GateSettings) -> tuple[list[dict], list[str]]:
    """The gate's checks that have data -> (checks, names of checks skipped with why)."""
    out, skipped = [], []

    def add(name, passed, value, bound, n=None):
        out.append({"name": name, "passed": bool(passed), "value": None if value is None else round(float(value), 4),
                    "bound": bound, "label": LABEL[name].format(n=n),
                    "meaning": (MEANING_PASSED if passed else MEANING)[name], "advice": "" if passed else ADVICE[name]})

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
    ratio = _ratio(after.get("general_nll"), before.get("general_nll"))
    if ratio is not None:
        add("general_nll", ratio <= s.max_general_nll_ratio, ratio, f"<= {s.max_general_nll_ratio}")
    sim = after.get("general_embedding_similarity")
    if sim is not None:
        add("general_similarity", sim >= s.min_general_embedding_similarity, sim,
            f">= {s.min_general_embedding_similarity}")
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
    failed = [c for c in found if not c["passed"]]
    reasons = [f"{'ok' if c['passed'] else 'blocked'}: {c['label']} {c['value']:.2f}, needs {c['bound']}"
               for c in sorted(found, key=lambda c: c["passed"])]
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
        summary = (f"Not activated: {first['meaning']}{more}. What to do: {first['advice']}; "
                   "or activate this version anyway from the Adapters tab.")
    return {"promote": not failed, "summary": summary, "checks": found, "reasons": reasons}


def gate(before: dict, after: dict, settings: GateSettings | None = None) -> tuple[bool, list[str]]:
    """(promote, reasons): one line per check, failed ones first."""
    v = verdict(before, after, settings)
    return v["promote"], v["reasons"]
