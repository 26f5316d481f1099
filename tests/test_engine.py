"""The engine on a 2-layer Llama: same tokens as transformers' generate, batching that changes nothing,
stop strings, limits, cancellation, sampling with a seed."""

import threading

import pytest
import torch

from assistant.engine.engine import Engine, Request
from assistant.engine.model import load_base
from assistant.errors import Busy, ContextTooLong
from assistant.settings import Settings

from helpers import ids_for

PROMPTS = ["Hello there", "What is two plus two?", "Tell me about cats", "Write a poem", "Why is the sky blue?",
           "List three fruits", "Who are you?", "Explain gravity"]


@pytest.fixture(scope="module")
def base(tiny_llama):
    return load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False)


@pytest.fixture(scope="module")
def engine(base):
    e = Engine(base, max_batch=8)
    yield e
    e.close()


def test_greedy_matches_transformers_generate(base, engine):
    for q in PROMPTS[:3]:
        ids = ids_for(engine, q)
        with torch.inference_mode():
            out = base.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
        want = out[0][len(ids):].tolist()
        h = engine.submit(Request(prompt_ids=ids, max_new_tokens=24, ignore_eos=True))   # as generate: no stop
        h.result()
        assert h.req.generated == want and len(want) == 24


def test_prefill_logits_match_transformers(base, engine):
    ids = ids_for(engine, "Compare the logits")
    with torch.inference_mode():
        want = base.model(torch.tensor([ids])).logits[0, -1].float()
    got = engine.runner.prefill(0, ids, 0)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_concurrent_batch_equals_solo(engine):
    solo = [engine.generate(prompt_ids=ids_for(engine, q), max_new_tokens=16) for q in PROMPTS]
    handles = [engine.submit(Request(prompt_ids=ids_for(engine, q), max_new_tokens=16)) for q in PROMPTS]
    assert [h.result()[0] for h in handles] == solo


def test_greedy_is_deterministic(engine):
    ids = ids_for(engine, "Say something")
    answers = {engine.generate(prompt_ids=ids, max_new_tokens=20) for _ in range(3)}
    assert len(answers) == 1


def test_sampling_is_reproducible_with_seed_and_varies_without(engine):
    ids = ids_for(engine, "Say something random")
    a = engine.generate(prompt_ids=ids, max_new_tokens=12, temperature=1.0, seed=7)
    b = engine.generate(prompt_ids=ids, max_new_tokens=12, temperature=1.0, seed=7)
    c = {engine.generate(prompt_ids=ids, max_new_tokens=12, temperature=1.0, seed=s) for s in range(4)}
    assert a == b
    assert len(c) > 1


def test_max_tokens_gives_length(engine):
    h = engine.submit(Request(prompt_ids=ids_for(engine, "Go on"), max_new_tokens=5))
    text, reason = h.result()
    assert reason == "length" and len(h.req.generated) == 5


def test_stop_string_cuts_answer(engine):
    ids = ids_for(engine, PROMPTS[0])
    full = engine.generate(prompt_ids=ids, max_new_tokens=24)
    assert len(full) > 6
    stop = full[4:7]
    streamed = []
    h = engine.submit(Request(prompt_ids=ids, max_new_tokens=24, stop=(stop,)))
    for ev in h:
        if ev.kind == "token":
            streamed.append(ev.text)
    assert h.req.finish_reason == "stop"
    assert "".join(streamed) == full[:full.find(stop)]
    assert stop not in "".join(streamed)


def test_text_streamed_and_logged_equals_the_decode_of_the_ids(base, engine):
    seen = {}
    for q in PROMPTS[:4]:
        req = Request(prompt_ids=ids_for(engine, q), max_new_tokens=40, temperature=1.0, seed=3)
        h = engine.submit(req, on_finish=lambda req=req: seen.setdefault("text", req.text))
        text, reason = h.result()
        want = base.tokenizer.decode(h.req.generated, skip_special_tokens=True).rstrip("\ufffd")
        assert text == h.req.text == seen.pop("text") == want
        assert "\ufffd" not in text


def test_stop_string_at_the_start_gives_nothing(engine):
    ids = ids_for(engine, PROMPTS[1])
    full = engine.generate(prompt_ids=ids, max_new_tokens=12)
    h = engine.submit(Request(prompt_ids=ids, max_new_tokens=12, stop=(full[:2],)))
    assert h.result() == ("", "stop") and h.req.text == ""


def test_over_long_input_is_refused_with_a_message(engine):
    with pytest.raises(ContextTooLong, match="shorten"):
        engine.submit(Request(prompt_ids=[5] * (engine.max_context + 10)))


def test_cancel_stops_generation(engine):
    h = engine.submit(Request(prompt_ids=ids_for(engine, "Talk forever"), max_new_tokens=400))
    first = next(iter(h))
    assert first.kind == "token"
    h.cancel()
    events = list(h)
    assert events[-1].finish_reason == "cancelled"
    assert len(h.req.generated) < 100


def test_long_answer_does_not_block_a_short_one(engine):
    long_h = engine.submit(Request(prompt_ids=ids_for(engine, "Long"), max_new_tokens=300))
    assert next(iter(long_h)).kind == "token"            # the long answer is generating
    short_h = engine.submit(Request(prompt_ids=ids_for(engine, "Short"), max_new_tokens=3))
    short_h.result()
    assert not long_h.done.is_set()
    long_h.cancel()
    list(long_h)


def test_queue_limit_says_busy(base):
    e = Engine(base, max_batch=1, max_queue=2)
    try:
        ids = ids_for(e, "x")
        hs = [e.submit(Request(prompt_ids=ids, max_new_tokens=200))]
        assert next(iter(hs[0])).kind == "token"           # admitted: it holds the one row, the queue is empty
        with pytest.raises(Busy, match="busy"):
            for _ in range(10):
                hs.append(e.submit(Request(prompt_ids=ids, max_new_tokens=200)))
    finally:
        for h in hs:
            h.cancel()
        e.close()


def test_threads_submitting_at_once_all_complete(engine):
    out = {}

    def ask(i):
        out[i] = engine.generate(prompt_ids=ids_for(engine, PROMPTS[i % len(PROMPTS)]), max_new_tokens=8)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 12
    assert out[0] == out[8]
