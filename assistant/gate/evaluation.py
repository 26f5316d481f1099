"""Before/after evaluation of an adapter: the numbers the promotion gate (gate/verdict.py) judges.

Measured on the base and on the adapter, in one run of the serving engine (engine/engine.py: the same batched
decode path as chat, the adapter loaded into a slot from its folder), greedy:
  - every accepted correction (the snapshot rows whose source is `correction`): answer-match;
  - the examples it was taught (seeds, thumbs-up; at most MAX_PROMPTS_PER_CATEGORY): answer-match;
  - held-out rows, only when the dataset has a holdout: answer-match and loss on the assistant tokens;
  - the general probe set (gate/probes.py), asked with the domain's system prompt: retention, per question, of
    the content the reference (the live version, or the base when none is live) knows, and leakage of rare
    taught words into those answers (gate/retention.py). These decide. A probe is asked without the system
    prompt too, only where retention reads it: the reference on those it answered right (it knows one only
    when right both ways), the candidate on those of them it missed (it keeps one when right either way).
    Shown beside them, as figures: the loss (NLL per token) of the base's own answers to NLL_PROBES of the
    probes under the adapter vs under the base, and the MiniLM cosine between the two models' answers (they
    move with style as much as with forgetting).

The base's and the reference's probe answers depend only on those models, the system prompt and the
token limit: with `cache_dir` they are kept there (data/answer_cache.py) and reused by the next evaluation (a
retry's, the next job's), so only the candidate answers every probe each time.

The answer-match score is ROUGE-L F1 on lower-cased words: cheap, deterministic, and enough to tell a
learned fact from an unlearned one. `progress(done, total)` is called as answers and losses come in.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time

from assistant.data.answer_cache import AnswerCache, identity
from assistant.engine.lm import with_system_prompt
from assistant.gate.probes import PROBE_SET_VERSION, gives_content
from assistant.gate.verdict import GateSettings, gate, verdict  # noqa: F401 - re-exported: the gate's settings and verdict

log = logging.getLogger(__name__)

MAX_PROMPTS_PER_CATEGORY = 32  # taught examples, held-out rows: answered per evaluation (time bound)
EVAL_MAX_BATCH = 16            # rows decoded together by the evaluation engine
LOSS_BATCH = 8                 # rows per forward pass of the held-out and probe losses
NLL_PROBES = 24                # probes whose base answers' NLL is the general-knowledge loss figure
ADAPTER_KEY = "candidate"      # the evaluated adapter's slot key in the evaluation engine
REFERENCE_KEY = "reference"     # the live version's slot key, when one is live
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
    from assistant.engine.lm import plain
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

    from assistant.engine.lm import IGNORE_INDEX, causal_lm_loss, collate, encode_chat
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    encoded = [encode_chat(tokenizer, row["messages"], max_seq_len) for row in rows]
    encoded = sorted((e for e in encoded if any(x != IGNORE_INDEX for x in e[1][1:])), key=lambda e: len(e[0]))
    total, count = 0.0, 0
    with torch.no_grad():   # rows of similar length together: little padding, one forward per batch
        for i in range(0, len(encoded), LOSS_BATCH):
            batch = [t.to(device) for t in collate(encoded[i:i + LOSS_BATCH], tokenizer.pad_token_id)]
            loss, n = causal_lm_loss(causal_lm, *batch)
            total += float(loss) * n
            count += n
    return total / count if count else None


# ---------------------------------------------------------------------------------------------
# Answers through the serving engine
# ---------------------------------------------------------------------------------------------

def answer_all(engine, conversations: list[list[dict]], adapters: list[str | None], max_new_tokens,
               tick=None) -> list[str]:
    """Greedy answers to every (conversation, adapter) pair, all submitted at once so the engine batches
    them across adapters; `max_new_tokens`: one limit, or one per conversation; `tick()` after each answer."""
    from assistant.engine.engine import Request
    limits = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(conversations)
    handles = [engine.submit(Request(prompt_ids=engine.encode_chat(c), max_new_tokens=n,
                                     temperature=0.0, adapter=a, slot=engine.pin_adapter(a) if a else 0))
               for c, a, n in zip(conversations, adapters, limits)]
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

    from assistant.engine.model import resolve_dtype
    want = resolve_dtype("auto", base.device)
    current = next(base.model.parameters()).dtype
    if base.quantization not in ("none", None) or current == want or not current.is_floating_point:
        return base
    model = copy.deepcopy(base.model).to(want).eval()
    return dataclasses.replace(base, model=model, dtype=str(want).removeprefix("torch."))


def _answers_without_engine(base, adapter_dir, reference_dir, jobs: list[tuple]) -> list[str]:
    """Answers to (conversation, adapter key or None, token limit) with transformers' generate (bases the
    engine cannot adapt), in the order given."""
    from peft import PeftModel

    from assistant.engine.lm import generate
    peft_model = PeftModel.from_pretrained(base.model, str(adapter_dir), adapter_name=ADAPTER_KEY)
    try:
        if reference_dir is not None:
            peft_model.load_adapter(str(reference_dir), adapter_name=REFERENCE_KEY)
        peft_model.eval()
        out: list[str | None] = [None] * len(jobs)
        for key in dict.fromkeys((a, n) for _, a, n in jobs):
            idx = [i for i, (_, a, n) in enumerate(jobs) if (a, n) == key]
            convs = [jobs[i][0] for i in idx]
            if key[0] is None:
                with peft_model.disable_adapter():
                    got = generate(peft_model, base.tokenizer, convs, key[1])
            else:
                peft_model.set_adapter(key[0])
                got = generate(peft_model, base.tokenizer, convs, key[1])
            for i, a in zip(idx, got):
                out[i] = a
        return out
    finally:
        peft_model.unload()


@contextlib.contextmanager
def _answerer(base, adapter_dir, reference_dir, max_queue: int, tick):
    """`ask(jobs) -> answers` for (conversation, adapter key or None, token limit) jobs: through one serving
    engine holding the candidate (and the reference) for the whole evaluation, or transformers' generate for
    bases the engine cannot adapt."""
    from assistant.engine.engine import Engine
    from assistant.engine.runner import FAST_ARCHS
    if getattr(base.model.config, "model_type", "") not in FAST_ARCHS:
        def ask_slowly(jobs):
            out = _answers_without_engine(base, adapter_dir, reference_dir, jobs) if jobs else []
            tick(len(jobs))
            return out
        yield ask_slowly
        return
    engine = Engine(serving_base(base), max_batch=EVAL_MAX_BATCH, max_queue=max_queue + 1, max_resident_adapters=2)
    try:
        engine.load_adapter(ADAPTER_KEY, adapter_dir)
        if reference_dir is not None:
            engine.load_adapter(REFERENCE_KEY, reference_dir)
        yield lambda jobs: answer_all(engine, [c for c, _, _ in jobs], [a for _, a, _ in jobs],
                                      [t for _, _, t in jobs], tick) if jobs else []
    finally:
        engine.close()


def _score(answers: list[str], rows: list[dict]) -> float | None:
    return _mean(rouge_l(a, split_prompt(r)[1]) for a, r in zip(answers, rows))


def evaluate_adapter(base, adapter_dir, rows: list[dict], settings: GateSettings | None = None,
                     system_prompt: str | None = None, progress=None, embedder=None, *,
                     reference_dir=None, cache_dir=None) -> tuple[dict, dict]:
    """(before, after) metrics of the base and of the adapter saved in `adapter_dir`, on a loaded `Base`
    without LoRA layers (they are added for the losses and removed after). `reference_dir`: the live
    version's folder (None: the base is the reference retention is judged against). `cache_dir`: where the
    base's and the reference's probe answers are kept between evaluations (None: not kept)."""
    from peft import PeftModel

    from assistant.gate.retention import active_probes, judge
    s = settings or GateSettings()
    cats = {"corrections": correction_rows(rows), "taught": taught_rows(rows),
            "eval": [r for r in rows if r.get("split") == "eval"][:MAX_PROMPTS_PER_CATEGORY]}
    probes, n_left_out = active_probes(rows, s.probes)
    probe_convs = [with_system_prompt([{"role": "user", "content": p.question}], system_prompt) for p in probes]
    convs = [split_prompt(r)[0] for rows_ in cats.values() for r in rows_]
    plain_convs = [[{"role": "user", "content": p.question}] for p in probes]
    questions = [p.question for p in probes]

    def cache(adapter, system):
        return AnswerCache(cache_dir, identity(base, system, s.probe_max_new_tokens, adapter, what="probes"))
    reference_key = REFERENCE_KEY if reference_dir is not None else None
    base_probes = cache(None, system_prompt).all_of(questions)
    ref_probes = cache(reference_dir, system_prompt).all_of(questions) if reference_dir is not None else base_probes
    ref_plain_kept = cache(reference_dir, None).get(questions)
    # What is decoded, in two rounds. First: base and candidate on the categories, the candidate on the probes
    # with the system prompt, and the base's and the reference's probe answers unless kept from an earlier
    # evaluation. Then, without the system prompt, only what retention reads (retention.judge): the
    # reference on the probes it got right (it "knows" one only when right both ways), and the candidate on
    # those it got wrong with the prompt (it keeps one when right either way).
    jobs = [(c, None, s.max_new_tokens) for c in convs] + [(c, ADAPTER_KEY, s.max_new_tokens) for c in convs]
    jobs += [(c, ADAPTER_KEY, s.probe_max_new_tokens) for c in probe_convs]
    if base_probes is None:
        jobs += [(c, None, s.probe_max_new_tokens) for c in probe_convs]
    if reference_dir is not None and ref_probes is None:
        jobs += [(c, REFERENCE_KEY, s.probe_max_new_tokens) for c in probe_convs]
    n_loss = 2 * (len(cats["eval"]) + min(len(probes), NLL_PROBES))
    total, done = len(jobs) + 2 * len(probes) + n_loss + 1, [0]

    def tick(n=1):
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    t0 = time.perf_counter()
    n, k = len(convs), len(probes)
    with _answerer(base, adapter_dir, reference_dir, len(jobs) + 2 * k, tick) as ask:
        answers = ask(jobs)
        cand_probes, rest = answers[2 * n:2 * n + k], answers[2 * n + k:]
        if base_probes is None:
            base_probes, rest = rest[:k], rest[k:]
            cache(None, system_prompt).put(dict(zip(questions, base_probes)))
        if reference_dir is None:
            ref_probes = base_probes
        elif ref_probes is None:
            ref_probes = rest[:k]
            cache(reference_dir, system_prompt).put(dict(zip(questions, ref_probes)))
        right = [gives_content(a, p.keys) for p, a in zip(probes, ref_probes)]
        ref_ask = [i for i in range(k) if right[i] and questions[i] not in ref_plain_kept]
        cand_ask = [i for i in range(k) if right[i] and not gives_content(cand_probes[i], probes[i].keys)]
        plain = ask([(plain_convs[i], reference_key, s.probe_max_new_tokens) for i in ref_ask]
                    + [(plain_convs[i], ADAPTER_KEY, s.probe_max_new_tokens) for i in cand_ask])
        tick(2 * k - len(plain))
    fresh = {questions[i]: a for i, a in zip(ref_ask, plain)}
    cache(reference_dir, None).put(fresh)
    ref_plain_kept.update(fresh)
    ref_plain = [ref_plain_kept.get(q, "") for q in questions]      # "": not asked, not read
    cand_plain = [""] * k
    for i, a in zip(cand_ask, plain[len(ref_ask):]):
        cand_plain[i] = a
    jobs_done = len(jobs) + len(plain)
    gen_seconds = time.perf_counter() - t0
    before, after = {}, {}
    for m, ans in ((before, answers[:n]), (after, answers[n:2 * n])):
        i = 0
        for name, subset in cats.items():
            m[f"n_{name}"] = len(subset)
            m[f"{name}_answers"] = ans[i:i + len(subset)]
            m[f"{name}_match"] = _score(m[f"{name}_answers"], subset)
            i += len(subset)
    before["general_answers"], after["general_answers"] = base_probes, cand_probes
    after["corrections_feedback_ids"] = sorted({f for r in cats["corrections"] for f in r.get("feedback_ids") or []})
    after["retention"] = judge(probes, ref_probes, cand_probes, rows, system_prompt, ref_plain, cand_plain)
    after["retention"].update(reference="live" if reference_dir is not None else "base",
                              probes_left_out=n_left_out, probe_set=PROBE_SET_VERSION)

    # Losses: the held-out rows, and the base's own probe answers (a figure: moves with style too).
    anchors = [{"messages": with_system_prompt([{"role": "user", "content": p.question},
                                                {"role": "assistant", "content": a}], system_prompt)}
               for p, a in zip(probes, base_probes) if a]
    anchors = anchors[::-(-len(anchors) // NLL_PROBES) or 1]     # evenly spread, at most NLL_PROBES
    peft_model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    try:
        peft_model.eval()
        for m, off in ((before, True), (after, False)):
            ctx = peft_model.disable_adapter() if off else contextlib.nullcontext()
            with ctx:
                m["eval_loss"] = heldout_loss(peft_model, base.tokenizer, cats["eval"], s.max_seq_len)
                tick(len(cats["eval"]))
                m["general_nll"] = heldout_loss(peft_model, base.tokenizer, anchors, s.max_seq_len)
                tick(min(len(probes), NLL_PROBES))
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
    log.info("evaluated %d answers in %.1f s", jobs_done, after["eval_seconds"])
    return before, after


def _embedding_similarity(a: list[str], b: list[str], embedder=None) -> float | None:
    """Mean MiniLM cosine between paired answers (an empty answer against a non-empty one counts 0)."""
    pairs = [(x, y) for x, y in zip(a, b)]
    if not pairs:
        return None
    if embedder is None:
        from assistant.data.curation import default_embedder
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

    from assistant.data.curation import read_snapshot
    from assistant.engine.model import load_base
    from assistant.errors import NotFound
    version = version or registry.active_version(domain)
    if not version:
        raise NotFound(f"domain {domain!r} has no active version: name one with --version")
    snap = store.latest_snapshot(domain)
    if not snap or not Path(snap["path"]).is_file():
        raise NotFound(f"domain {domain!r} has no curated dataset yet: run `assistant curate --domain {domain}`")
    rows = read_snapshot(snap["path"])
    if gate_settings is None:
        from assistant.settings import group_settings
        gate_settings = group_settings(settings, "gate")
    base = load_base(settings, verbose=False)
    before, after = evaluate_adapter(base, registry.version_path(domain, version), rows, gate_settings,
                                     registry.get_domain(domain).system_prompt)
    v = verdict(before, after, gate_settings)
    return {"domain": domain, "version": version, "snapshot": snap["hash"], "before": summary(before),
            "after": summary(after), **v}
