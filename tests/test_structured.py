"""Per-row controls inside the continuous batch, on a tiny random Llama: a JSON-schema row always parses and
validates; constrained, free, penalised and logprob rows decoded together each equal the same request served
alone; `n` rows from one prefill equal single requests with seeds seed, seed+1, ...; greedy logprobs name the
token that was chosen as the most likely."""

from __future__ import annotations

import json

import pytest

from assistant.engine.chat_options import build_requests

SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y", "z"]}, "b": {"type": "boolean"},
                                           "c": {"type": "integer"}},
          "required": ["a", "b", "c"], "additionalProperties": False}
FMT = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from assistant.engine.engine import Engine
    from assistant.engine.model import load_base
    from assistant.settings import Settings
    e = Engine(load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False), max_batch=8)
    yield e
    e.close()


def one(engine, prompt, fmt=None, n=1, **kw):
    ids = engine.encode_chat([{"role": "user", "content": prompt}])
    return build_requests(ids, n, None, None, fmt, adapter=None, max_tokens=kw.pop("max_tokens", 40), **kw)[0]


def test_schema_rows_parse_and_mixed_batches_equal_rows_alone(engine):
    asks = [("tell me", FMT, {}), ("json please", FMT, {"temperature": 1.0, "seed": 3}), ("free", None, {}),
            ("free sampled", None, {"temperature": 0.9, "seed": 4}),
            ("penalised", None, {"frequency_penalty": 1.0, "presence_penalty": 0.5, "logit_bias": {5: 3.0}}),
            ("with logprobs", None, {"logprobs": 2})]
    alone = []
    for prompt, fmt, kw in asks:
        [r] = one(engine, prompt, fmt, **dict(kw))
        alone.append(engine.submit(r).result())
    reqs = [one(engine, p, f, **dict(kw))[0] for p, f, kw in asks]
    handles = [engine.submit(r) for r in reqs]
    together = [h.result() for h in handles]
    assert together == alone
    for (text, reason), (_, fmt, _) in zip(together, asks):
        if fmt is not None:
            assert reason == "stop"
            obj = json.loads(text)
            assert set(obj) == {"a", "b", "c"} and obj["a"] in "xyz" and isinstance(obj["b"], bool)
            assert isinstance(obj["c"], int) and abs(obj["c"]) < 2 ** 53
    lp = reqs[-1].token_logprobs
    assert len(lp) == len(reqs[-1].generated) and all(t.top[0][0] == t.id and len(t.top) == 2 for t in lp)


def test_n_rows_from_one_prefill_equal_seeded_single_requests(engine):
    group = one(engine, "a story", n=3, temperature=1.0, seed=11, max_tokens=12)
    texts = [h.result()[0] for h in engine.submit_group(group)]
    singles = []
    for s in (11, 12, 13):
        [r] = one(engine, "a story", temperature=1.0, seed=s, max_tokens=12)
        singles.append(engine.submit(r).result()[0])
    assert texts == singles and len(set(texts)) > 1


def test_a_schema_the_compiler_refuses_is_a_400_naming_response_format(engine):
    from assistant.errors import AssistantError
    with pytest.raises(AssistantError) as e:
        engine.submit(one(engine, "x", {"type": "json_schema", "json_schema": {"schema": {"type": "banana"}}})[0])
    assert e.value.param == "response_format" and e.value.status == 400
