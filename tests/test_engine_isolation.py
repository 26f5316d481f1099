"""The engine keeps serving whatever one request does: the KV cache survives growth and rows finishing in any
order (in and out of inference mode), a degenerate sampler answers instead of failing its batch, a request's own
failure ends it alone, a failed step fails its rows once and the next request is served."""

import threading

import pytest
import torch

from assistant.engine.engine import Engine, Request
from assistant.engine.model import load_base
from assistant.engine.runner import INITIAL_CACHE_TOKENS, KVCache
from assistant.settings import Settings

from helpers import ids_for

PROMPTS = ["Hello there", "What is two plus two?", "Tell me about cats", "Write a poem", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def base(tiny_llama):
    return load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False)


@pytest.fixture
def engine(base):
    e = Engine(base, max_batch=8)
    yield e
    e.close()


def submit_counted(engine, counts, **kw):
    """Submit a request and count how many times it is finished (the response log's callback)."""
    req = Request(**kw)
    counts[req.id] = 0

    def on_finish():
        counts[req.id] += 1
    return engine.submit(req, on_finish=on_finish)


def solo(engine, **kw):
    h = engine.submit(Request(**kw))
    text, reason = h.result()
    return h.req.generated, reason


@pytest.mark.parametrize("grow_inside", [True, False])
def test_kv_cache_rows_move_in_and_out_of_inference_mode_at_every_growth(grow_inside):
    cache = KVCache(layers=2, rows=3, kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu", cap=4)
    for row in range(3):
        with torch.inference_mode():
            cache.fill(0, row, torch.full((1, 3, 4), float(row + 1)), torch.full((1, 3, 4), -float(row + 1)))
    for tokens in (5, 9, 17, 33):   # every doubling
        if grow_inside:
            with torch.inference_mode():
                cache.ensure(tokens)
        else:
            cache.ensure(tokens)
        assert cache.cap >= tokens
        cache.move_row(2, 1, 3)                # outside inference mode
        with torch.inference_mode():
            cache.move_row(1, 0, 3)            # inside
        k, v = cache.layer(0)
        assert k[0, 0, :3].eq(3).all() and v[1, 0, :3].eq(-3).all()
        for row in range(3):                   # put rows back to 1, 2, 3 for the next boundary
            with torch.inference_mode():
                cache.fill(0, row, torch.full((1, 3, 4), float(row + 1)), torch.full((1, 3, 4), -float(row + 1)))


def test_after_a_long_answer_rows_finishing_out_of_order_all_answer_once(engine):
    """Once the cache grew past its first size (inside a decode step), requests that finish out of order moved
    rows outside inference mode: every later batch failed, and the failure finished requests twice."""
    counts = {}
    long_ids = ids_for(engine, "Talk for a long time")
    h = submit_counted(engine, counts, prompt_ids=long_ids, max_new_tokens=INITIAL_CACHE_TOKENS + 20, ignore_eos=True)
    assert h.result()[1] == "length"
    assert engine.runner.cache.cap > INITIAL_CACHE_TOKENS
    lengths = [3, 40, 9, 25, 1]
    want = [solo(engine, prompt_ids=ids_for(engine, q), max_new_tokens=n, ignore_eos=True)
            for q, n in zip(PROMPTS, lengths)]
    for _ in range(2):   # and again: nothing was left broken
        handles = [submit_counted(engine, counts, prompt_ids=ids_for(engine, q), max_new_tokens=n, ignore_eos=True)
                   for q, n in zip(PROMPTS, lengths)]
        got = []
        for hh in handles:
            hh.result()
            got.append((hh.req.generated, hh.req.finish_reason))
        assert got == want
    engine_idle(engine)
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("temperature,top_p", [(1e-40, 1.0), (5e-324, 1.0), (1e-30, 1e-30), (2.0, 1e-12)])
def test_degenerate_sampling_answers_and_never_fails_the_batch(engine, temperature, top_p):
    ids = [ids_for(engine, q) for q in PROMPTS]
    want = [solo(engine, prompt_ids=i, max_new_tokens=12)[0] for i in ids]
    counts = {}
    handles = [submit_counted(engine, counts, prompt_ids=i, max_new_tokens=12) for i in ids]
    odd = submit_counted(engine, counts, prompt_ids=ids[0], max_new_tokens=12, temperature=temperature, top_p=top_p,
                         seed=5)
    for h in handles:
        h.result()
    assert [h.req.generated for h in handles] == want
    odd.result()
    assert odd.req.finish_reason in ("stop", "length")
    if temperature < 1e-6 or top_p < 1e-6:   # below the floors: the most likely token, every time
        assert odd.req.generated == want[0]
    engine_idle(engine)
    assert set(counts.values()) == {1}


def test_one_requests_failure_ends_it_alone(engine, monkeypatch):
    """A stop-string check that raises (a request's own failure) ends that request with an error, once."""
    ids = [ids_for(engine, q) for q in PROMPTS]
    want = [solo(engine, prompt_ids=i, max_new_tokens=10)[0] for i in ids]
    counts = {}
    handles = [submit_counted(engine, counts, prompt_ids=i, max_new_tokens=10) for i in ids]
    bad = submit_counted(engine, counts, prompt_ids=ids[1], max_new_tokens=10)

    def broken_push(tok):
        raise ValueError("a broken stream")
    bad.req.stream.push = broken_push
    with pytest.raises(Exception, match="generation failed"):
        bad.result()
    assert bad.req.finish_reason == "error"
    for h in handles:
        h.result()
    assert [h.req.generated for h in handles] == want
    engine_idle(engine)
    assert set(counts.values()) == {1}


def test_a_failed_step_fails_its_rows_once_and_the_engine_serves_on(engine, monkeypatch):
    ids = [ids_for(engine, q) for q in PROMPTS]
    counts = {}
    real = engine.runner.decode
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(*a, **kw)
    monkeypatch.setattr(engine.runner, "decode", flaky)
    handles = [submit_counted(engine, counts, prompt_ids=i, max_new_tokens=30, ignore_eos=True) for i in ids]
    outcomes = []
    for h in handles:
        try:
            h.result()
            outcomes.append("ok")
        except Exception as e:  # noqa: BLE001
            outcomes.append(type(e).__name__)
    assert "GenerationFailed" in outcomes
    assert all(h.req.finish_reason in ("length", "error") for h in handles)
    monkeypatch.setattr(engine.runner, "decode", real)
    assert solo(engine, prompt_ids=ids[0], max_new_tokens=5)[1] == "length"
    engine_idle(engine)
    assert set(counts.values()) == {1}


def test_many_threads_mixed_lengths_after_a_long_answer(engine):
    engine.generate(prompt_ids=ids_for(engine, "long"), max_new_tokens=INITIAL_CACHE_TOKENS + 5, ignore_eos=True)
    out, errors = {}, []

    def ask(i):
        try:
            out[i] = engine.generate(prompt_ids=ids_for(engine, PROMPTS[i % 5]), max_new_tokens=1 + (i * 7) % 40)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(out) == 16


def engine_idle(engine):
    """No row, queued request or pinned slot left."""
    import time
    deadline = time.time() + 10
    while (engine.active or not engine.pending.empty()) and time.time() < deadline:
        time.sleep(0.02)
    assert not engine.active and engine.pending.empty()
    if engine.runner:
        assert not any(engine.runner.bank.in_use.values())
