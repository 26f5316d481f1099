"""Before/after evaluation of an adapter: the numbers the promotion gate (gate.py) judges.

Measured on the base and on the adapter, in one run of the serving engine (engine.py: the same batched
decode path as chat, the adapter loaded into a slot from its folder), greedy:
  - every accepted correction (the snapshot rows whose source is `correction`): answer-match;
  - the examples it was taught (seeds, thumbs-up; at most MAX_PROMPTS_PER_CATEGORY): answer-match;
  - held-out rows, only when the dataset has a holdout: answer-match and loss on the assistant tokens;
  - GENERAL_PROMPTS: forgetting, as the loss (NLL per token) of the base's own answers under the adapter
    vs under the base, and the MiniLM cosine between the two models' answers. Both tolerate rewording.

The answer-match score is ROUGE-L F1 on lower-cased words: cheap, deterministic, and enough to tell a
learned fact from an unlearned one. `progress(done, total)` is called as answers and losses come in.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time

from .gate import GateSettings, gate, verdict  # noqa: F401 - re-exported: the gate's settings and verdict
from .lm import with_system_prompt

log = logging.getLogger(__name__)

MAX_PROMPTS_PER_CATEGORY = 32  # taught examples, held-out rows: answered per evaluation (time bound)
EVAL_MAX_BATCH = 16            # rows decoded together by the evaluation engine
ADAPTER_KEY = "candidate"      # the evaluated adapter's slot key in the evaluation engine
GENERAL_PROMPTS = (
    "What is the capital of France?",
    "How many days are there in a week?",
    "Name three primary colors.",
    "What do bees make?",
    "Why is the sky blue?",
    "What is the opposite of hot?",
    "How do you say hello in Spanish?",
    "What is 7 plus 5?",
)
CORRECTION_SOURCES = ("correction",)


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
    """(messages before the last assistant reply, role and content only; that reply)."""
    from .lm import plain
    msgs = plain(row["messages"])
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def correction_rows(rows: list[dict]) -> list[dict]:
    """Every accepted correction of the snapshot, found by the rows' source (all of them: the gate
    checks each one the users made)."""
    return [r for r in rows if r.get("source") in CORRECTION_SOURCES]


def taught_rows(rows: list[dict]) -> list[dict]:
    """Train rows that are not corrections (seeds, thumbs-up answers), at most MAX_PROMPTS_PER_CATEGORY."""
    return [r for r in rows if r.get("split", "train") == "train"
            and r.get("source") not in CORRECTION_SOURCES][:MAX_PROMPTS_PER_CATEGORY]


# ---------------------------------------------------------------------------------------------
# Model calls
# ---------------------------------------------------------------------------------------------

def heldout_loss(model, tokenizer, rows: list[dict], max_seq_len: int) -> float | None:
    """Mean cross-entropy on the assistant tokens of `rows` (token-weighted), or None without rows."""
    import torch

    from .lm import IGNORE_INDEX, causal_lm_loss, collate, encode_chat
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


# ---------------------------------------------------------------------------------------------
# Answers through the serving engine
# ---------------------------------------------------------------------------------------------

def answer_all(engine, conversations: list[list[dict]], adapters: list[str | None], max_new_tokens: int,
               tick=None) -> list[str]:
    """Greedy answers to every (conversation, adapter) pair, all submitted at once so the engine batches
    them across adapters; `tick()` after each answer."""
    from .engine import Request
    handles = [engine.submit(Request(prompt_ids=engine.encode_chat(c), max_new_tokens=max_new_tokens,
                                     temperature=0.0, adapter=a, slot=engine.pin_adapter(a) if a else 0))
               for c, a in zip(conversations, adapters)]
    answers = []
    for h in handles:
        answers.append(h.result()[0].strip())
        if tick is not None:
            tick()
    return answers


def serving_base(base):
    """The base as serving runs it: training keeps float32 weights on CPU, serving decodes in the device's
    default dtype (bfloat16 where the CPU has it), so answers are generated on a copy in that dtype."""
    import copy
    import dataclasses

    from .model import resolve_dtype
    want = resolve_dtype("auto", base.device)
    current = next(base.model.parameters()).dtype
    if base.quantization not in ("none", None) or current == want or not current.is_floating_point:
        return base
    model = copy.deepcopy(base.model).to(want).eval()
    return dataclasses.replace(base, model=model, dtype=str(want).removeprefix("torch."))


def _answers_without_engine(base, adapter_dir, convs: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Base then adapter answers with transformers' generate (bases the engine cannot adapt)."""
    from peft import PeftModel

    from .lm import generate
    peft_model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    try:
        peft_model.eval()
        with peft_model.disable_adapter():
            plain = generate(peft_model, base.tokenizer, convs, max_new_tokens)
        return plain + generate(peft_model, base.tokenizer, convs, max_new_tokens)
    finally:
        peft_model.unload()


def _score(answers: list[str], rows: list[dict]) -> float | None:
    return _mean(rouge_l(a, split_prompt(r)[1]) for a, r in zip(answers, rows))


def evaluate_adapter(base, adapter_dir, rows: list[dict], settings: GateSettings | None = None,
                     system_prompt: str | None = None, progress=None, embedder=None) -> tuple[dict, dict]:
    """(before, after) metrics of the base and of the adapter saved in `adapter_dir`, on a loaded `Base`
    without LoRA layers (they are added for the losses and removed after)."""
    from peft import PeftModel

    from .engine import Engine
    from .runner import FAST_ARCHS
    s = settings or GateSettings()
    cats = {"corrections": correction_rows(rows), "taught": taught_rows(rows),
            "eval": [r for r in rows if r.get("split") == "eval"][:MAX_PROMPTS_PER_CATEGORY]}
    convs = [split_prompt(r)[0] for rows_ in cats.values() for r in rows_]
    convs += [with_system_prompt([{"role": "user", "content": q}], system_prompt) for q in GENERAL_PROMPTS]
    n_loss = 2 * (len(cats["eval"]) + len(GENERAL_PROMPTS))
    total, done = 2 * len(convs) + n_loss + 1, [0]

    def tick(n=1):
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    t0 = time.perf_counter()
    if getattr(base.model.config, "model_type", "") in FAST_ARCHS:
        engine = Engine(serving_base(base), max_batch=EVAL_MAX_BATCH, max_queue=2 * len(convs) + 1)
        try:
            engine.load_adapter(ADAPTER_KEY, adapter_dir)
            answers = answer_all(engine, convs + convs, [None] * len(convs) + [ADAPTER_KEY] * len(convs),
                                 s.max_new_tokens, tick)
        finally:
            engine.close()
    else:   # other architectures serve without adapters (engine.py); transformers' generate answers here
        answers = _answers_without_engine(base, adapter_dir, convs, s.max_new_tokens)
        tick(2 * len(convs))
    gen_seconds = time.perf_counter() - t0
    before, after = {}, {}
    for m, ans in ((before, answers[:len(convs)]), (after, answers[len(convs):])):
        i = 0
        for name, subset in cats.items():
            m[f"n_{name}"] = len(subset)
            m[f"{name}_answers"] = ans[i:i + len(subset)]
            m[f"{name}_match"] = _score(m[f"{name}_answers"], subset)
            i += len(subset)
        m["general_answers"] = ans[i:]
    after["corrections_feedback_ids"] = sorted({f for r in cats["corrections"] for f in r.get("feedback_ids") or []})

    # Losses: the held-out rows, and the base's own general answers (forgetting, tolerant of rewording).
    anchors = [{"messages": with_system_prompt([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                               system_prompt)}
               for q, a in zip(GENERAL_PROMPTS, before["general_answers"]) if a]
    peft_model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    try:
        peft_model.eval()
        for m, off in ((before, True), (after, False)):
            ctx = peft_model.disable_adapter() if off else contextlib.nullcontext()
            with ctx:
                m["eval_loss"] = heldout_loss(peft_model, base.tokenizer, cats["eval"], s.max_seq_len)
                tick(len(cats["eval"]))
                m["general_nll"] = heldout_loss(peft_model, base.tokenizer, anchors, s.max_seq_len)
                tick(len(GENERAL_PROMPTS))
    finally:
        peft_model.unload()
    before["general_embedding_similarity"] = 1.0
    after["general_embedding_similarity"] = _embedding_similarity(before["general_answers"],
                                                                  after["general_answers"], embedder)
    after["general_nll_ratio"] = (after["general_nll"] / before["general_nll"]
                                  if after["general_nll"] is not None and before["general_nll"] else None)
    tick()
    after["eval_seconds"] = round(time.perf_counter() - t0, 2)
    after["generate_seconds"] = round(gen_seconds, 2)
    log.info("evaluated %d prompts x 2 in %.1f s", len(convs), after["eval_seconds"])
    return before, after


def _embedding_similarity(a: list[str], b: list[str], embedder=None) -> float | None:
    """Mean MiniLM cosine between paired answers (an empty answer against a non-empty one counts 0)."""
    pairs = [(x, y) for x, y in zip(a, b)]
    if not pairs:
        return None
    if embedder is None:
        from .curation import default_embedder
        embedder = default_embedder()
    va = embedder.embed([x or " " for x, _ in pairs])
    vb = embedder.embed([y or " " for _, y in pairs])
    sims = [float(u @ v) if (x.strip() and y.strip()) else float(x.strip() == y.strip())
            for (x, y), u, v in zip(pairs, va, vb)]
    return sum(sims) / len(sims)


def summary(metrics: dict) -> dict:
    """The numbers of a metrics dict (answers left out), for cards and job records."""
    return {k: v for k, v in metrics.items() if not k.endswith("_answers")}


def evaluate_version(settings, store, registry, domain: str, version: str | None = None,
                     gate_settings: GateSettings | None = None) -> dict:
    """Before/after metrics and the gate's verdict for `domain@version` (default: the active one) on the
    domain's latest curated snapshot (the CLI's `assistant eval`)."""
    from pathlib import Path

    from .curation import read_snapshot
    from .errors import NotFound
    from .model import load_base
    version = version or registry.active_version(domain)
    if not version:
        raise NotFound(f"domain {domain!r} has no active version: name one with --version")
    snap = store.latest_snapshot(domain)
    if not snap or not Path(snap["path"]).is_file():
        raise NotFound(f"domain {domain!r} has no curated dataset yet: run `assistant curate --domain {domain}`")
    rows = read_snapshot(snap["path"])
    if gate_settings is None:
        from .settings import group_settings
        gate_settings = group_settings(settings, "gate")
    base = load_base(settings, verbose=False)
    before, after = evaluate_adapter(base, registry.version_path(domain, version), rows, gate_settings,
                                     registry.get_domain(domain).system_prompt)
    v = verdict(before, after, gate_settings)
    return {"domain": domain, "version": version, "snapshot": snap["hash"], "before": summary(before),
            "after": summary(after), **v}
