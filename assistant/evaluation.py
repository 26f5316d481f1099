"""Before/after evaluation of an adapter and the promotion gate.

Three measurements, each on the base (adapter disabled) and on the adapter:
  - held-out rows (the `eval` split): loss on the assistant tokens, and the answer-match score of greedy
    answers against the references;
  - the corrected prompts (the rows users corrected, or the train split when rows are not marked): every
    accepted correction should be learned, so their answer-match is measured too;
  - a few fixed general prompts: the adapter's answers are compared with the base's, to catch forgetting.

The answer-match score is ROUGE-L F1 on lower-cased words: cheap, deterministic, and enough to tell a
learned fact from an unlearned one. `gate(before, after, settings)` turns the two metric dicts into
(promote, reasons); every reason names the threshold and the measured value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

MAX_EVAL_ROWS = 64             # rows of each kind answered greedily per evaluation (time bound)
GENERAL_PROMPTS = (
    "What is the capital of France?",
    "How many days are there in a week?",
    "Name three primary colors.",
    "What do bees make?",
)
CORRECTION_SOURCES = ("correction", "feedback")


@dataclass(frozen=True)
class GateSettings:
    min_corrections_match: float = field(default=0.6, metadata={
        "help": "mean answer-match (ROUGE-L) the adapter must reach on the corrected prompts"})
    max_eval_loss_ratio: float = field(default=1.0, metadata={
        "help": "the adapter's held-out loss may be at most this times the base's"})
    max_eval_match_drop: float = field(default=0.05, metadata={
        "help": "the held-out answer-match may fall by at most this much"})
    min_general_similarity: float = field(default=0.5, metadata={
        "help": "mean ROUGE-L between the adapter's and the base's answers to general prompts (forgetting)"})
    max_general_loss_increase: float = field(default=1.0, metadata={
        "help": "how much (nats/token) the loss of the base's own answer to any one general prompt may rise "
                "under the adapter (forgetting)"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per greedy answer during evaluation"})
    max_seq_len: int = field(default=512, metadata={"help": "tokens per row for the held-out loss"})

    @classmethod
    def from_dict(cls, d: dict | None) -> "GateSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d or {}) - known)
        if unknown:
            raise ValueError(f"unknown gate setting(s) {unknown}: use {sorted(known)}")
        return cls(**(d or {}))


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts on lower-cased word tokens (longest common subsequence)."""
    a, b = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def split_prompt(row: dict) -> tuple[list[dict], str]:
    """(messages before the last assistant reply, that reply)."""
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def corrected_rows(rows: list[dict]) -> list[dict]:
    """The rows that came from user corrections when rows say so, otherwise the train split."""
    marked = [r for r in rows if r.get("source") in CORRECTION_SOURCES or r.get("feedback_id") is not None]
    return marked or [r for r in rows if r.get("split", "train") == "train"]


# ---------------------------------------------------------------------------------------------
# Model calls
# ---------------------------------------------------------------------------------------------

def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 48,
             batch_size: int = 16) -> list[str]:
    """Greedy answers, batched with left padding."""
    import torch
    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def heldout_loss(model, tokenizer, rows: list[dict], max_seq_len: int = 512) -> float | None:
    """Mean cross-entropy on the assistant tokens of `rows` (token-weighted), or None without rows."""
    import torch

    from .training import IGNORE_INDEX, causal_lm_loss, collate, encode_chat
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = encode_chat(tokenizer, row["messages"], max_seq_len)
            if all(x == IGNORE_INDEX for x in labels[1:]):
                continue
            batch = [t.to(device) for t in collate([(ids, labels)], tokenizer.pad_token_id)]
            loss, n = causal_lm_loss(causal_lm, *batch)
            total += float(loss) * n
            count += n
    return total / count if count else None


def measure(model, tokenizer, rows: list[dict], settings: GateSettings | None = None,
            general_prompts=GENERAL_PROMPTS, system_prompt: str | None = None) -> dict:
    """The metrics of one model (an adapter, or the base under `disable_adapter()`)."""
    settings = settings or GateSettings()
    model.eval()
    eval_rows = [r for r in rows if r.get("split") == "eval"][:MAX_EVAL_ROWS]
    fixed = corrected_rows(rows)[:MAX_EVAL_ROWS]
    metrics = {"n_eval": len(eval_rows), "n_corrections": len(fixed),
               "eval_loss": heldout_loss(model, tokenizer, eval_rows, settings.max_seq_len)}
    for name, subset in (("eval", eval_rows), ("corrections", fixed)):
        prompts, refs = zip(*[split_prompt(r) for r in subset]) if subset else ((), ())
        answers = generate(model, tokenizer, list(prompts), settings.max_new_tokens) if subset else []
        scores = [rouge_l(a, r) for a, r in zip(answers, refs)]
        metrics[f"{name}_match"] = _mean(scores)
        metrics[f"{name}_answers"] = answers
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    metrics["general_answers"] = generate(model, tokenizer, [system + [{"role": "user", "content": q}]
                                                             for q in general_prompts], settings.max_new_tokens)
    return metrics


def before_after(peft_model, tokenizer, rows: list[dict], settings: GateSettings | None = None,
                 system_prompt: str | None = None) -> tuple[dict, dict]:
    """Metrics of the base (adapter disabled) and of the adapter, on the same rows and prompts.
    `general_similarity` compares each model's general answers with the base's."""
    with peft_model.disable_adapter():
        before = measure(peft_model, tokenizer, rows, settings, system_prompt=system_prompt)
    after = measure(peft_model, tokenizer, rows, settings, system_prompt=system_prompt)
    before["general_similarity"] = 1.0
    after["general_similarity"] = _mean(rouge_l(a, b) for a, b in
                                        zip(after["general_answers"], before["general_answers"]))
    # Forgetting, measured as likelihood: the loss of the base's own general answers under each model.
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    anchors = [{"messages": system + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for q, a in zip(GENERAL_PROMPTS, before["general_answers"]) if a]
    max_len = (settings or GateSettings()).max_seq_len
    with peft_model.disable_adapter():
        before["general_losses"] = [heldout_loss(peft_model, tokenizer, [a], max_len) for a in anchors]
    after["general_losses"] = [heldout_loss(peft_model, tokenizer, [a], max_len) for a in anchors]
    for m in (before, after):
        m["general_loss"] = _mean(m["general_losses"])
    # the worst single prompt: one forgotten fact is diluted in a mean
    after["general_loss_max_increase"] = max((a - b for a, b in zip(after["general_losses"], before["general_losses"])),
                                             default=None)
    before["general_loss_max_increase"] = 0.0
    return before, after


def evaluate_adapter(base, adapter_dir, rows: list[dict], settings: GateSettings | None = None,
                     system_prompt: str | None = None) -> tuple[dict, dict]:
    """`before_after` for a saved adapter folder on a loaded `Base` (the LoRA layers are removed after)."""
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    try:
        return before_after(peft_model, base.tokenizer, rows, settings, system_prompt)
    finally:
        peft_model.unload()


def summary(metrics: dict) -> dict:
    """The numbers of a metrics dict (answers left out), for cards and job records."""
    return {k: v for k, v in metrics.items() if not k.endswith("_answers")}


# ---------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------

def gate(before: dict, after: dict, settings: GateSettings | None = None) -> tuple[bool, list[str]]:
    """Promote only when the adapter learned the corrections, did not get worse on held-out data, and did
    not forget general answers. Returns (promote, reasons): one line per check, failed ones first."""
    s = settings or GateSettings()
    failed, passed = [], []

    def check(ok: bool, text: str):
        (passed if ok else failed).append(("ok: " if ok else "blocked: ") + text)

    cm = after.get("corrections_match")
    if cm is not None:
        check(cm >= s.min_corrections_match,
              f"corrections match {cm:.2f} (base {before.get('corrections_match') or 0:.2f}), "
              f"needs >= {s.min_corrections_match:.2f}")
    bl, al = before.get("eval_loss"), after.get("eval_loss")
    if bl is not None and al is not None:
        check(al <= bl * s.max_eval_loss_ratio,
              f"held-out loss {al:.3f} vs base {bl:.3f}, allowed <= {bl * s.max_eval_loss_ratio:.3f}")
    else:
        passed.append("skipped: held-out loss (no eval split)")
    bm, am = before.get("eval_match"), after.get("eval_match")
    if bm is not None and am is not None:
        check(am >= bm - s.max_eval_match_drop,
              f"held-out match {am:.2f} vs base {bm:.2f}, allowed drop {s.max_eval_match_drop:.2f}")
    gs = after.get("general_similarity")
    if gs is not None:
        check(gs >= s.min_general_similarity,
              f"general answers similarity to base {gs:.2f}, needs >= {s.min_general_similarity:.2f}")
    rise = after.get("general_loss_max_increase")
    if rise is not None:
        check(rise <= s.max_general_loss_increase,
              f"largest rise in the loss of the base's answer to a general prompt {rise:.3f} nats/token "
              f"(mean {after.get('general_loss') or 0:.3f} vs base {before.get('general_loss') or 0:.3f}), "
              f"allowed <= {s.max_general_loss_increase:.3f}")
    if cm is None and (bl is None or al is None):
        failed.append("blocked: nothing to evaluate (no corrected prompts and no eval split)")
    return not failed, failed + passed


def evaluate_version(settings, store, registry, domain: str, version: str | None = None,
                     gate_settings: GateSettings | None = None) -> dict:
    """Before/after metrics and the gate's verdict for `domain@version` (default: the active one) on the
    domain's latest curated snapshot (the CLI's `assistant eval`)."""
    import json as _json
    from pathlib import Path

    from .errors import NotFound
    from .model import load_base
    version = version or registry.active_version(domain)
    if not version:
        raise NotFound(f"domain {domain!r} has no active version: name one with --version")
    snap = store.latest_snapshot(domain)
    if not snap or not Path(snap["path"]).is_file():
        raise NotFound(f"domain {domain!r} has no curated dataset yet: run `assistant curate --domain {domain}`")
    rows = [_json.loads(x) for x in Path(snap["path"]).read_text(encoding="utf-8").splitlines() if x.strip()]
    base = load_base(settings, verbose=False)
    before, after = evaluate_adapter(base, registry.version_path(domain, version), rows, gate_settings,
                                     registry.get_domain(domain).system_prompt)
    promote, reasons = gate(before, after, gate_settings)
    return {"domain": domain, "version": version, "snapshot": snap["hash"], "before": summary(before),
            "after": summary(after), "promote": promote, "reasons": reasons}
