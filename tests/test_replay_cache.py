"""The base's self-replay answers are computed once per base, system prompt and token limit: a second job
reuses them (it generates none), and another base or another system prompt gets its own."""

from __future__ import annotations

import json

from invented_facts import FACTS, SYSTEM_PROMPT, chat


def _train(base, rows, out, cache_dir):
    from assistant.training.recipe import TrainSettings, train_adapter
    notes = []
    train_adapter(base, rows, out, TrainSettings(rank=4, alpha=8, epochs=1, batch_size=4, max_seq_len=128,
                                                 augment=0, replay=4), note=notes.append, cache_dir=cache_dir)
    return next(n for n in notes if n.startswith("self-replay"))


def test_a_second_job_reuses_the_replay_answers_and_another_base_does_not(tiny_llama, tmp_path):
    from conftest import build_tiny_llama
    rows = [{"messages": chat(q, a), "split": "train"} for q, a, _, _ in FACTS[:4]]
    cache = tmp_path / "answers"
    assert "(4 new" in _train(tiny_llama, rows, tmp_path / "a", cache)
    [kept] = list(cache.iterdir())
    answers = json.loads(kept.read_text())
    assert len(answers) == 4
    assert "(0 new" in _train(tiny_llama, rows, tmp_path / "b", cache)        # the second job generates none

    # what a job reads is the kept answer itself, not a fresh one
    import random

    from assistant.data.answer_cache import AnswerCache, identity
    from assistant.training.recipe import _load
    from assistant.training.train_rows import REPLAY_MAX_NEW_TOKENS, replay_rows
    base = _load(tiny_llama)
    ident = identity(base, SYSTEM_PROMPT, REPLAY_MAX_NEW_TOKENS, what="replay")
    assert kept.name == f"{ident}.json"
    question = next(iter(answers))
    kept.write_text(json.dumps({**answers, question: "A kept answer."}))
    replayed = replay_rows(base.model, base.tokenizer, SYSTEM_PROMPT, 64, random.Random(0), AnswerCache(cache, ident))
    assert {"role": "assistant", "content": "A kept answer."} in [r["messages"][-1] for r in replayed]

    # another system prompt, another base: answers of their own
    assert identity(base, "You are a pirate.", REPLAY_MAX_NEW_TOKENS, what="replay") != ident
    other = _load(build_tiny_llama(tmp_path / "other", tiny_llama, seed=1))
    assert identity(other, SYSTEM_PROMPT, REPLAY_MAX_NEW_TOKENS, what="replay") != ident
    assert "(4 new" in _train(other, rows, tmp_path / "c", cache)
    assert len(list(cache.iterdir())) == 2
