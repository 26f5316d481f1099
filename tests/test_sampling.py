"""Sampling never hands NaN or inf to multinomial: extreme temperatures and top_p values answer."""

import math

import pytest
import torch

from assistant.engine import sampling


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 5e-324, sampling.TEMPERATURE_FLOOR / 2, math.nan, -1.0])
def test_below_the_temperature_floor_is_greedy(temperature):
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sampling.is_greedy(temperature)
    assert sampling.sample(logits, temperature, 1.0, torch.Generator().manual_seed(0)) == 1


@pytest.mark.parametrize("temperature,top_p", [(sampling.TEMPERATURE_FLOOR, 1.0), (2.0, 1e-30), (2.0, 0.0),
                                               (1.0, math.nan), (2.0, 1.0), (1e-4, 0.5)])
def test_extremes_and_bad_logits_never_raise(temperature, top_p):
    g = torch.Generator().manual_seed(1)
    for logits in (torch.tensor([1e38, -1e38, 0.0, 3.0]), torch.tensor([math.inf, 1.0, math.nan, 2.0]),
                   torch.tensor([math.nan, 1.0, -math.inf, 0.5]), torch.tensor([0.0, 0.0, 0.0, 0.0]),
                   torch.tensor([60000.0, 59999.0, 0.0, 1.0], dtype=torch.float16)):
        tok = sampling.sample(logits, temperature, top_p, g)
        assert 0 <= tok < 4 and not math.isnan(float(logits[tok]))


def test_top_p_floor_keeps_only_the_best_token():
    logits = torch.tensor([1.0, 1.5, 0.2])
    g = torch.Generator().manual_seed(3)
    assert {sampling.sample(logits, 2.0, 1e-12, g) for _ in range(50)} == {1}


def test_sampling_spreads_at_ordinary_settings_and_repeats_with_a_seed():
    logits = torch.zeros(50)
    draws = [sampling.sample(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(30)]
    assert len(set(draws)) > 10
    assert draws[:5] == [sampling.sample(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(5)]


def test_no_finite_logit_is_a_sampling_error():
    with pytest.raises(sampling.SamplingError):
        sampling.sample(torch.full((4,), math.nan), 1.0, 1.0, None)
    with pytest.raises(sampling.SamplingError):
        sampling.greedy(torch.tensor([[1.0, 2.0], [math.nan, math.nan]]))


def test_min_p_and_top_k_keep_only_likely_tokens_and_top_k_1_is_greedy():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    probs, ids = sampling.keep_likely(torch.softmax(logits, -1), 0, 0.4)   # keeps p >= 0.2
    assert ids is None and torch.allclose(probs, torch.tensor([0.0, 0.625, 0.375, 0.0]))
    probs, ids = sampling.keep_likely(torch.softmax(logits, -1), 2, 0.0)
    assert ids.tolist() == [1, 2] and torch.allclose(probs, torch.tensor([0.625, 0.375]))
    g = torch.Generator().manual_seed(5)
    assert {sampling.sample(logits, 2.0, 1.0, g, top_k=2) for _ in range(200)} == {1, 2}
    assert {sampling.sample(logits, 1.0, 1.0, g, min_p=0.5) for _ in range(200)} == {1, 2}
    assert {sampling.sample(logits, 2.0, 1.0, g, min_p=0.5) for _ in range(200)} == {1, 2, 3}   # after temperature
    assert {sampling.sample(logits, 2.0, 1.0, g, top_k=1) for _ in range(20)} == {1}
    assert {sampling.sample(logits, 2.0, 1.0, g, top_k=3, min_p=1.0) for _ in range(20)} == {1}


@pytest.mark.parametrize("top_k,min_p", [(1, 0.0), (2, 1.0), (10 ** 9, 0.5), (3, math.nan), (0, 1e-30)])
def test_top_k_and_min_p_extremes_never_raise(top_k, min_p):
    g = torch.Generator().manual_seed(2)
    for logits in (torch.tensor([1e38, -1e38, 0.0, 3.0]), torch.tensor([math.inf, 1.0, math.nan, 2.0]),
                   torch.tensor([0.0, 0.0, 0.0, 0.0])):
        tok = sampling.sample(logits, 1.0, 0.5, g, top_k=top_k, min_p=min_p)
        assert 0 <= tok < 4 and not math.isnan(float(logits[tok]))
