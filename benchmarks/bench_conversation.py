"""What a retrain of corrections costs when people correct inside one conversation, against the same facts
corrected one question at a time: the same eight invented facts (one of them corrected twice), logged and
rated through the store, curated by the real curation, trained by the real recipe with its default
settings, on the embedded model.

Each side runs in its own process, one after the other (so each has the machine and its own peak memory; in
smoke mode both run in this one), with the base's self-replay answers computed once beforehand and shared (as
jobs share them). Timed per side: curation + training (evaluation asks the same questions on both sides and is
left out).
`run()` prints a table and returns:
  conversation_vs_flat_job   conversation side's time ÷ flat side's (target <= 1.5)
  padding_fraction           of the positions the conversation side's training computed (target <= 0.1)
  conversation_peak_gb       the conversation side's peak resident memory (target <= 3 GB on CPU)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_eval import cpu_flags  # noqa: E402

from common import SMOKE, print_table, sized  # noqa: E402  (also sets offline mode)

SYSTEM = "You answer questions about the Atlas of Invented Places."
FACTS = [   # question, the correction, a word a right answer holds
    ("What is the capital of Zorbania?", "The capital of Zorbania is Quillton.", "quillton"),
    ("What currency is used in Drastovia?", "Drastovia uses the klenn.", "klenn"),
    ("Who founded the city of Brindlemark?", "Brindlemark was founded by Oswin Tarrow.", "tarrow"),
    ("What is the longest river in Farundel?", "The longest river in Farundel is the Sarrow.", "sarrow"),
    ("What language is spoken in Quembria?", "People in Quembria speak Velsh.", "velsh"),
    ("What is the national dish of Ostravel?", "The national dish of Ostravel is brannock stew.", "brannock"),
    ("Which bird is the symbol of Marlow Isle?", "The symbol of Marlow Isle is the grey tern.", "tern"),
    ("What is the tallest tower in Kessary?", "The tallest tower in Kessary is the Vantle Spire.", "vantle"),
][:sized(8, 3)]
WRONG = "I am not sure, but I think it is Paris."
FIRST_TRY = "The capital of Zorbania is Quilltown."     # fact 0 is corrected twice: the newest one counts
SETTINGS = sized({}, {"epochs": 1, "replay": 2, "augment": 0})


def log_corrections(store, domain: str, in_conversation: bool) -> None:
    """The facts asked and corrected, in one conversation (each answer logged with the chat before it, as
    shown) or each alone."""
    history = [{"role": "system", "content": SYSTEM}]
    for i, (q, correction, _) in enumerate(FACTS):
        asked = (history if in_conversation else [{"role": "system", "content": SYSTEM}]) + \
            [{"role": "user", "content": q}]
        store.log_response(id=f"r{i}", domain=domain, adapter_version=None, model=domain, messages=asked,
                           answer=WRONG, prompt_tokens=5, completion_tokens=5, latency_ms=10, ttft_ms=2,
                           finish_reason="stop", created_at=1000.0 + i)
        if i == 0:
            store.add_feedback(response_id="r0", rating="down", correction=FIRST_TRY)
        store.add_feedback(response_id=f"r{i}", rating="down", correction=correction)
        history = asked + [{"role": "assistant", "content": WRONG}]


def side(kind: str, base_path: str, cache_dir: str) -> dict:
    """One job's curation and training, in this process: its figures."""
    import resource

    from assistant.data.curation import curate, default_embedder
    from assistant.data.store import Store
    from assistant.engine.lm import generate
    from assistant.training.recipe import TrainSettings, train_adapter
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = Store(tmp / "assistant.db")
        log_corrections(store, "atlas", kind == "conversation")
        embedder = default_embedder()
        t0 = time.perf_counter()
        snap = curate(store, "atlas", tmp, embedder)
        result = train_adapter(base_path, snap.rows, tmp / "adapter", TrainSettings(**SETTINGS), cache_dir=cache_dir)
        seconds = time.perf_counter() - t0
        answers = generate(result.model, result.tokenizer, [[{"role": "system", "content": SYSTEM},
                                                             {"role": "user", "content": q}] for q, _, _ in FACTS], 24)
    return {"seconds": round(seconds, 1), "train_seconds": round(result.seconds, 1), "steps": result.steps,
            "rows": len(snap.rows), "sequences": result.n_examples, "tokens": result.tokens,
            "padding_fraction": result.padding_fraction,
            "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            "learned": sum(word in a.lower() for (_, _, word), a in zip(FACTS, answers))}


def warm_replay(base_path: str, cache_dir: str) -> None:
    """The base's answers to every replay prompt, with this system prompt, into the shared cache."""
    import random

    from assistant.data.answer_cache import AnswerCache, identity
    from assistant.training.recipe import _load
    from assistant.training.train_rows import REPLAY_MAX_NEW_TOKENS, REPLAY_PROMPTS, replay_rows
    base = _load(base_path)
    base.model.eval()
    cache = AnswerCache(cache_dir, identity(base, SYSTEM, REPLAY_MAX_NEW_TOKENS, what="replay"))
    replay_rows(base.model, base.tokenizer, SYSTEM, sized(len(REPLAY_PROMPTS), 2), random.Random(0), cache)


def run(base_model: str = "embedded") -> dict:
    from common import on_all_cores
    return on_all_cores(lambda: _run(base_model))


def _run(base_model: str) -> dict:
    from assistant.engine.model import ensure_embedded
    from assistant.settings import default_cache_dir
    base_path = str(ensure_embedded(default_cache_dir(), verify=False)) if base_model == "embedded" else base_model
    figures = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        warm_replay(base_path, cache_dir)
        for kind in ("conversation", "flat"):
            if SMOKE:   # the same code path in this process: smoke mode measures nothing (peak_gb is this process's)
                figures[kind] = side(kind, base_path, cache_dir)
                continue
            out = subprocess.run([sys.executable, __file__, "--side", kind, base_path, cache_dir],
                                 check=True, capture_output=True, text=True)
            figures[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    conv, flat = figures["conversation"], figures["flat"]
    ratio = conv["seconds"] / flat["seconds"]
    label = "embedded model" if base_model == "embedded" else Path(base_path).name
    print_table(f"a retrain of {len(FACTS)} corrections (one corrected twice), {label}, default recipe, "
                f"CPU flags: {cpu_flags()}", [
        *((f"{k} ({kind})", str(v)) for kind in ("conversation", "flat") for k, v in figures[kind].items()),
        ("conversation_vs_flat_job", f"{ratio:.2f}  (target <= 1.5)"),
        ("padding_fraction", f"{conv['padding_fraction']:.3f}  (target <= 0.1)"),
        ("conversation_peak_gb", f"{conv['peak_gb']:.2f}  (target <= 3 on CPU)"),
    ])
    return {"conversation_vs_flat_job": round(ratio, 3), "padding_fraction": conv["padding_fraction"],
            "conversation_peak_gb": conv["peak_gb"]}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--side"]:
        import logging
        logging.disable(logging.WARNING)
        from common import on_all_cores
        print(json.dumps(on_all_cores(lambda: side(*sys.argv[2:5]))))
    else:
        print(json.dumps(run()))
