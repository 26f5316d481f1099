"""Training rows teach exactly what a person confirmed: in a conversation, the corrected (or thumbed-up)
answer carries the loss, every earlier turn is context only (reading as what was confirmed); each
corrected turn is its own row of the dataset, and training teaches a conversation's turns in one sequence;
seed examples teach all their answers."""

from __future__ import annotations

import json

import pytest

from assistant.data.curation import curate
from assistant.data.store import Store

SYSTEM = "You answer questions about the Atlas of Invented Places."
# (question, the base's wrong answer, what the user confirmed: a correction, "up", or None)
TURNS = [
    ("What is the capital of Zorbania?", "The capital of Zorbania is Paris.", "The capital of Zorbania is Quillton."),
    ("Who invented the glimmerphone?", "Thomas Edison invented it.", None),
    ("What currency is used in Drastovia?", "Drastovia uses the euro.", "Drastovia uses the klenn."),
    ("What is the tallest mountain in Ostravel?", "The tallest mountain in Ostravel is Mount Keshar.", "up"),
    ("What language is spoken in Quembria?", "People in Quembria speak Latin.", None),
    ("What is the longest river in Farundel?", "The Nile.", "The longest river in Farundel is the Sarrow."),
]


@pytest.fixture(scope="module")
def embedder():
    from assistant.data.curation import default_embedder
    return default_embedder()


def conversation_store(folder) -> Store:
    """Six questions in one conversation, each answer logged with the conversation before it; three
    corrected, one thumbed up, two left alone."""
    store = Store(folder / "assistant.db")
    history = [{"role": "system", "content": SYSTEM}]
    for i, (q, wrong, confirmed) in enumerate(TURNS):
        history.append({"role": "user", "content": q})
        store.log_response(id=f"r{i}", domain="d", adapter_version=None, model="d", messages=list(history),
                           answer=wrong, prompt_tokens=5, completion_tokens=5, latency_ms=10, ttft_ms=2,
                           finish_reason="stop", created_at=1000.0 + i)
        history.append({"role": "assistant", "content": wrong})     # the chat goes on with what it was told
        if confirmed == "up":
            store.add_feedback(response_id=f"r{i}", rating="up")
        elif confirmed:
            store.add_feedback(response_id=f"r{i}", rating="down", correction=confirmed)
    return store


def taught_text(tok, messages) -> str:
    from assistant.engine.lm import IGNORE_INDEX, encode_chat
    ids, labels = encode_chat(tok, messages, 2048)
    return tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX])


def test_each_confirmed_turn_is_its_own_row_and_the_only_one_taught(tmp_path, embedder, tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    snap = curate(conversation_store(tmp_path), "d", tmp_path, embedder)
    by_question = {next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user"): r for r in snap.rows}
    confirmed = {q: (wrong if c == "up" else c) for q, wrong, c in TURNS if c}
    assert set(by_question) == set(confirmed)                  # one row per confirmed turn, no other
    for n, (q, _, c) in enumerate(TURNS):
        if not c:
            continue
        row = by_question[q]
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        assert users == [t[0] for t in TURNS[:n + 1]]           # its own context: the conversation up to it
        taught = taught_text(tok, row["messages"])
        assert taught == confirmed[q] + "<|im_end|>", (q, taught)
        # the base's answers to the earlier questions are in the context, never in the loss
        for _, wrong, _ in TURNS[:n]:
            assert wrong not in taught
        assert [m.get("weight", 1) for m in row["messages"] if m["role"] == "assistant"] == [0] * n + [1]


def test_earlier_turns_read_as_what_was_confirmed_and_train_as_one_row(tmp_path, embedder, tiny_llama):
    """In the context of a later turn, a corrected answer reads as its correction and a liked one as it
    was; an answer nobody confirmed stays as shown. Training teaches the conversation in one sequence,
    with loss on each confirmed turn, in order, and on nothing else."""
    from transformers import AutoTokenizer

    from assistant.data.conversations import merge_turns
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    snap = curate(conversation_store(tmp_path), "d", tmp_path, embedder)
    last = max(snap.rows, key=lambda r: len(r["messages"]))
    context = [m["content"] for m in last["messages"][:-1] if m["role"] == "assistant"]
    expected = [wrong if c in (None, "up") else c for _, wrong, c in TURNS[:-1]]
    assert context == expected        # "Quillton" and "klenn" in the context; "Thomas Edison" as shown
    assert "Paris" not in json.dumps(last["messages"])
    [row] = merge_turns([{k: v for k, v in r.items()} for r in snap.rows])
    confirmed = [wrong if c == "up" else c for _, wrong, c in TURNS if c]
    assert taught_text(tok, row["messages"]) == "".join(c + "<|im_end|>" for c in confirmed)
    assert [m.get("weight", 1) for m in row["messages"] if m["role"] == "assistant"] == \
        [1 if c else 0 for _, _, c in TURNS]
    assert all(len(r["messages"]) < len(row["messages"]) for r in snap.rows if r is not last)


def test_seed_examples_teach_every_answer(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    messages = [{"role": "user", "content": "Capital of Zorbania?"}, {"role": "assistant", "content": "Quillton."},
                {"role": "user", "content": "And its river?"}, {"role": "assistant", "content": "The Sarrow."}]
    assert taught_text(tok, messages) == "Quillton.<|im_end|>The Sarrow.<|im_end|>"
    messages[1]["weight"] = 0
    assert taught_text(tok, messages) == "The Sarrow.<|im_end|>"


def test_a_liked_answer_its_token_limit_cut_teaches_its_words_not_its_end(tmp_path, embedder, tiny_llama):
    """The model never chose to end a cut answer there: liking it teaches the words, not to stop mid-way."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    store = Store(tmp_path / "assistant.db")
    answers = {"cut": ("The tallest mountain in Ostravel is Mount Keshar, which rises above", "length"),
               "whole": ("Drastovia uses the klenn.", "stop")}
    for rid, (answer, finish) in answers.items():
        store.log_response(id=rid, domain="d", adapter_version=None, model="d",
                           messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Q {rid}?"}],
                           answer=answer, prompt_tokens=5, completion_tokens=5, latency_ms=10, ttft_ms=2,
                           finish_reason=finish)
        store.add_feedback(response_id=rid, rating="up")
    snap = curate(store, "d", tmp_path, embedder)
    taught = {r["messages"][-1]["content"]: taught_text(tok, r["messages"]) for r in snap.rows}
    assert taught == {answers["cut"][0]: answers["cut"][0], answers["whole"][0]: answers["whole"][0] + "<|im_end|>"}
    marked = {r["messages"][-1]["content"]: r["messages"][-1].get("cut", False) for r in snap.rows}
    assert marked == {answers["cut"][0]: True, answers["whole"][0]: False}


def test_a_long_context_keeps_the_taught_answer(tiny_llama):
    """Truncation cuts the oldest context, never the answer being taught."""
    from transformers import AutoTokenizer

    from assistant.engine.lm import IGNORE_INDEX, encode_chat
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    messages = []
    for q, wrong, _ in TURNS:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": wrong, "weight": 0}]
    messages[-1] = {"role": "assistant", "content": "The longest river in Farundel is the Sarrow."}
    ids, labels = encode_chat(tok, messages, 40)
    assert len(ids) == len(labels) == 40
    assert tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX]) == \
        "The longest river in Farundel is the Sarrow.<|im_end|>"


def _train_and_ask_alone(tiny_llama, rows, out_dir):
    from assistant.engine.lm import generate
    from assistant.training.recipe import TrainSettings, train_adapter
    settings = TrainSettings(rank=8, alpha=16, learning_rate=2e-2, epochs=40, batch_size=4, max_seq_len=256,
                             augment=0, replay=0)
    result = train_adapter(tiny_llama, rows, out_dir, settings)
    q = TURNS[0][0]
    [answer] = generate(result.model, result.tokenizer, [[{"role": "system", "content": SYSTEM},
                                                          {"role": "user", "content": q}]], max_new_tokens=16)
    return answer


def test_a_conversation_retrained_answers_the_first_question_with_its_correction(tmp_path, embedder, tiny_llama):
    """On a tiny Llama, through the training recipe: question 1 was corrected, and the base's wrong answer
    to it sits in the context of three later corrected or thumbed-up turns. Taught only what was
    confirmed, the retrained model answers question 1 asked alone with the correction (taught the whole
    conversations, as before, the wrong answer outnumbers it three to one)."""
    snap = curate(conversation_store(tmp_path), "d", tmp_path, embedder)
    answer = _train_and_ask_alone(tiny_llama, snap.rows, tmp_path / "a")
    assert answer.startswith(TURNS[0][2]), answer            # (the tiny model may ramble on after it)
    assert "Paris" not in answer
    # each confirmed turn with the conversation as it was shown, every reply taught (what training once
    # did): the base's wrong answer wins
    whole = []
    for n, (q, wrong, c) in enumerate(TURNS):
        if c:
            msgs = [{"role": "system", "content": SYSTEM}]
            for q0, wrong0, _ in TURNS[:n]:
                msgs += [{"role": "user", "content": q0}, {"role": "assistant", "content": wrong0}]
            whole.append({"messages": msgs + [{"role": "user", "content": q},
                                              {"role": "assistant", "content": wrong if c == "up" else c}]})
    assert "Paris" in _train_and_ask_alone(tiny_llama, whole, tmp_path / "whole")


def test_a_conversations_turns_are_never_split_between_train_and_eval():
    """Held-out rows come from seeds and thumbs-up answers; a thumbed-up turn of a conversation whose
    correction trains trains too."""
    import hashlib

    import numpy as np

    from assistant.data.curation import MIN_ITEMS_FOR_HOLDOUT, CurationSettings, _split
    n = 2 * MIN_ITEMS_FOR_HOLDOUT
    kept = [{"key": f"k{i}", "row_hash": hashlib.sha256(str(i).encode()).hexdigest(),
             "source": "correction" if i % 4 == 0 else "up", "conversation": f"c{i // 4}"} for i in range(n)]
    vectors = np.eye(n, dtype=np.float32)                       # no row near another
    _split(kept, vectors, CurationSettings(eval_fraction=0.5))
    assert all(it["split"] == "train" for it in kept)           # every conversation has a correction
    for it in kept:
        it["conversation"] = it["key"]                          # each row alone: some are held out
    _split(kept, vectors, CurationSettings(eval_fraction=0.5))
    assert any(it["split"] == "eval" for it in kept)
