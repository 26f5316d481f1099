"""Preference benchmark: does learning from thumbs (KTO) teach a style that SFT on the liked answers alone
does not? On the embedded model, in one run:

  1. the base samples its own answers to general questions (short factual ones, which it answers briefly or
     at length, and "explain" ones, which it answers at length);
  2. a fixed rule rates them, thumbs only, no corrections: an answer of at most MAX_LIKED_WORDS words is
     liked, a longer one disliked (the style raters dislike: overlong answers);
  3. the ratings go through the app's own path: logged as responses with feedback in a store, curated
     (curation.curate), turned into preference rows (preference.build);
  4. two adapters are trained from the same data and the app's default settings (self-replay of the base's
     general answers included): SFT only (the thumbs-up answers), and the preference method the data
     supports (SFT + KTO: thumbs-up desirable, thumbs-down undesirable);
  5. each answers held-out questions of both kinds greedily; `preference_gain` is the share of those answers in the liked
     style, preference minus SFT-only (target >= 0.2). `preference_gain_sampled` is the same on EVAL_SAMPLES
     seeded samples per question (the same seeds for both adapters): four times the answers, a steadier
     estimate of the same difference. `preference_general_nll_ratio` is the gate's
     NLL figure for the preference adapter: the loss of the base's own answers to some of the gate's
     general probe questions, adapter / base (shown beside the gate's retention check, bound 2.0).

`run(small=True)` is the few-minute version the test suite runs. CPU flags are printed with the numbers.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_eval import cpu_flags  # noqa: E402

from assistant.gate.probes import PROBES  # noqa: E402

from common import print_table  # noqa: E402  (also sets offline mode)

MAX_LIKED_WORDS = 30          # the rule: an answer of at most this many words is liked
MAX_NEW_TOKENS = 64           # per sampled / evaluated answer (an answer cut here is overlong)
SAMPLES_PER_PROMPT = 4
SAMPLE_TEMPERATURE = 0.9
EVAL_SAMPLES = 4              # seeded samples per held-out prompt and adapter, besides its greedy answer
# Short factual questions (the base answers some briefly, some at length) mixed with "explain" questions
# (it answers those at length): both kinds of rating occur, and the held-out share has room to move.
SHORT = ["What is the capital of Peru?", "How many legs does an ant have?", "What colour is a ripe banana?",
         "Who wrote Hamlet?", "What is the capital of Kenya?", "How many days are in a leap year?",
         "What is the largest planet?", "What do cows drink?", "What is frozen water called?",
         "How many wheels does a bicycle have?", "What is the capital of Norway?", "Which animal says moo?",
         "What is the chemical symbol for gold?", "How many continents are there?", "What colour is grass?",
         "What is the capital of Egypt?", "Who painted the Mona Lisa?", "How many hours are in a day?",
         "What is the opposite of cold?", "Which planet is closest to the Sun?", "What is 9 times 9?",
         "What is the capital of Chile?", "How many sides does a hexagon have?", "What do bees collect?"]
TOPICS = ["photosynthesis", "gravity", "the water cycle", "an earthquake", "a volcano", "inflation", "a vaccine",
          "the internet", "a black hole", "democracy", "evolution", "a solar eclipse", "electricity",
          "the immune system", "a tsunami", "DNA", "a hurricane", "recycling", "a glacier", "an atom", "a magnet",
          "the ozone layer", "a battery", "friction"]
TEMPLATES = ["What is {t}?", "Can you explain {t}?", "How does {t} work?"]
SETTINGS = dict(seed=0, max_seq_len=256)   # and the app's defaults: self-replay, augmentation, LoRA, rates
# questions of each kind, training settings, seeded samples per held-out prompt (0: the greedy answer only)
SMALL = dict(train=6, heldout=3, settings=dict(epochs=1, preference_epochs=1, replay=4), samples=0)
FULL = dict(train=18, heldout=6, settings={}, samples=EVAL_SAMPLES)
METHOD = "sft+kto"            # the preference method compared with SFT alone
# the general questions of the NLL figure: every ninth of the gate's probe set (facts, arithmetic, language)
GENERAL_PROMPTS = tuple(p.question for p in PROBES[::9])


def liked(answer: str) -> bool:
    return len(answer.split()) <= MAX_LIKED_WORDS


def questions(seed: int, n_train: int, n_heldout: int) -> tuple[list[str], list[str]]:
    """(train, held-out) questions: `n` of each kind, disjoint, shuffled by `seed`."""
    rng = random.Random(seed)
    short, topics = rng.sample(SHORT, len(SHORT)), rng.sample(TOPICS, len(TOPICS))
    explain = [TEMPLATES[i % len(TEMPLATES)].format(t=t) for i, t in enumerate(topics)]
    train = [q for pair in zip(short[:n_train], explain[:n_train]) for q in pair]
    heldout = [q for pair in zip(short[n_train:n_train + n_heldout], explain[n_train:n_train + n_heldout])
               for q in pair]
    return train, heldout


def sample(engine, questions: list[str], n: int, seed: int, adapter: str | None = None) -> list[tuple[str, str, str]]:
    """(question, answer, finish reason): `n` answers of the serving engine (with `adapter`) to each question,
    sampled (seeded: the same seeds for every adapter)."""
    from assistant.engine.engine import Request
    handles = [(q, engine.submit(Request(prompt_ids=engine.encode_chat([{"role": "user", "content": q}]),
                                         max_new_tokens=MAX_NEW_TOKENS, temperature=SAMPLE_TEMPERATURE, top_p=0.95,
                                         seed=seed * 100_000 + i * n + k, adapter=adapter,
                                         slot=engine.pin_adapter(adapter) if adapter else 0)))
               for i, q in enumerate(questions) for k in range(n)]
    return [(q, text.strip(), finish_reason) for q, h in handles for text, finish_reason in [h.result()]]


def rated_store(folder: Path, rated: list[tuple[str, str, str]]):
    """A store and settings in `folder` holding the rated answers as logged responses with thumbs."""
    from assistant.data.registry import Registry
    from assistant.data.store import Store
    from assistant.settings import Settings
    settings = Settings(home=folder).ensure_dirs()
    store = Store(settings.db_path)
    Registry(settings.adapters_path).create_domain("explain", "", "benchmark")
    for q, a, finish_reason in rated:
        rid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        store.log_response(id=rid, domain="explain", adapter_version=None, model="explain",
                           messages=[{"role": "user", "content": q}], answer=a, prompt_tokens=1, completion_tokens=1,
                           latency_ms=1.0, ttft_ms=None, finish_reason=finish_reason)
        store.add_feedback(response_id=rid, rating="up" if liked(a) else "down")
    return settings, store


def general_nll_ratio(model, tok, base_answers: list[str]) -> float:
    from assistant.gate.evaluation import heldout_loss
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(GENERAL_PROMPTS, base_answers) if a]
    after = heldout_loss(model, tok, rows, 256)
    with model.disable_adapter():
        before = heldout_loss(model, tok, rows, 256)
    return after / before


def run(small: bool = False, seed: int = 0, overrides: dict | None = None, method: str = METHOD) -> dict:
    from common import on_all_cores
    return on_all_cores(lambda: _run(small, seed, overrides or {}, method))


def _run(small: bool, seed: int = 0, overrides: dict | None = None, method: str = METHOD) -> dict:
    from assistant.data import preference
    from assistant.data.curation import curate
    from assistant.engine.engine import Engine
    from assistant.engine.lm import generate
    from assistant.engine.model import ensure_embedded
    from assistant.gate.evaluation import answer_all, serving_base
    from assistant.settings import default_cache_dir, group_settings
    from assistant.training.preference import PreferencePlan
    from assistant.training.recipe import TrainSettings, _load, train_adapter
    size = SMALL if small else FULL
    t_start = time.perf_counter()
    path = str(ensure_embedded(default_cache_dir(), verify=False))
    train_q, heldout_q = questions(seed, size["train"], size["heldout"])
    convs = [[{"role": "user", "content": q}] for q in heldout_q]

    base = _load(path)          # float32, as a job trains it; the engine answers in the serving dtype
    base.model.eval()
    engine = Engine(serving_base(base), max_batch=16, max_queue=4 * len(train_q) + 16)
    try:
        rated = sample(engine, train_q, SAMPLES_PER_PROMPT, seed)
    finally:
        engine.close()
    print(f"rated {len(rated)} sampled answers: {sum(liked(a) for _, a, _ in rated)} liked, "
          f"{sum(end == 'length' for _, _, end in rated)} cut at {MAX_NEW_TOKENS} tokens", file=sys.stderr, flush=True)
    base_general = generate(base.model, base.tokenizer, [[{"role": "user", "content": q}] for q in GENERAL_PROMPTS],
                            48)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings, store = rated_store(Path(tmp) / "home", rated)
        snap = curate(store, "explain", settings)
        data = preference.build(snap.rows, store.list_feedback("explain"), group_settings(settings, "curation"))
        methods = preference.choose(method, data.counts, len(snap.rows), 1)
        held = data.heldout_keys()
        rows = [r for r in snap.rows if r["key"] not in held]
        ts = TrainSettings(**{**SETTINGS, **size["settings"], **(overrides or {})})
        for name, plan in (("sft", None), ("+".join(methods), PreferencePlan(data, methods))):
            t = time.perf_counter()
            result = train_adapter(base, rows, Path(tmp) / name, ts, preference=plan)
            model = result.model.eval()
            results[name] = {"seconds": time.perf_counter() - t,
                             "nll_ratio": general_nll_ratio(model, base.tokenizer, base_general)}
            model.unload()            # LoRA layers out: the same base trains the next adapter
            print(f"trained {name} in {results[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
        engine = Engine(serving_base(base), max_batch=16, max_queue=4 * len(convs) + 4)
        try:
            names = list(results)
            for name in names:
                engine.load_adapter(name, Path(tmp) / name)
            answers = answer_all(engine, convs * (len(names) + 1), [None] * len(convs) + [
                n for n in names for _ in convs], MAX_NEW_TOKENS)
            for name in names:       # a second estimate, of the adapter's answers as sampled rather than greedy
                results[name]["sampled"] = [a for _, a, _ in sample(engine, heldout_q, size["samples"], seed + 1, name)]
        finally:
            engine.close()
    base_heldout = answers[:len(convs)]
    for i, name in enumerate(names, start=1):
        mine = answers[i * len(convs):(i + 1) * len(convs)]
        sampled = results[name]["sampled"]
        results[name].update(share=sum(map(liked, mine)) / len(mine), example=mine[0],
                             sampled_share=sum(map(liked, sampled)) / len(sampled) if sampled else float("nan"))
    pref_name = "+".join(methods)
    gain = results[pref_name]["share"] - results["sft"]["share"]
    gain_sampled = results[pref_name]["sampled_share"] - results["sft"]["sampled_share"]
    counts = data.counts
    print_table(f"preference: {len(train_q)} prompts x {SAMPLES_PER_PROMPT} sampled answers rated by length "
                f"(<= {MAX_LIKED_WORDS} words liked), {len(heldout_q)} held-out prompts, embedded model, "
                f"CPU flags: {cpu_flags()}", [
        ("ratings", preference.describe(counts, methods)),
        ("base: liked share (held-out)", f"{sum(map(liked, base_heldout)) / len(base_heldout):.2f}"),
        ("SFT only: liked share", f"{results['sft']['share']:.2f}  ({results['sft']['seconds']:.0f} s)"),
        (f"{pref_name.upper()}: liked share", f"{results[pref_name]['share']:.2f}  ({results[pref_name]['seconds']:.0f} s)"),
        ("preference_gain", f"{gain:.2f}  (target >= 0.2)"),
        *([(f"sampled: liked share, SFT only / {pref_name.upper()}",
             f"{results['sft']['sampled_share']:.2f} / {results[pref_name]['sampled_share']:.2f}  "
             f"({size['samples']} seeded samples per held-out prompt)"),
           ("preference_gain_sampled", f"{gain_sampled:.2f}")] if size["samples"] else []),
        ("preference_general_nll_ratio", f"{results[pref_name]['nll_ratio']:.2f}  (gate bound <= 2.0; SFT only "
                                         f"{results['sft']['nll_ratio']:.2f})"),
        ("example (preference, held-out)", results[pref_name]["example"][:100]),
        ("total seconds", f"{time.perf_counter() - t_start:.0f}"),
    ])
    return {"preference_gain": round(gain, 3),
            "preference_gain_sampled": round(gain_sampled, 3) if size["samples"] else None,
            "preference_general_nll_ratio": round(results[pref_name]["nll_ratio"], 3),
            "preference_methods": pref_name}


if __name__ == "__main__":
    import json
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the few-minute version the tests run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a training setting for both adapters, e.g. --set beta=0.5 (a JSON value)")
    p.add_argument("--method", default=METHOD, help=f"the preference method (default {METHOD})")
    a = p.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
    print(json.dumps(run(a.small, a.seed, overrides, a.method)))
