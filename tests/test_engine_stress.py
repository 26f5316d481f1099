"""The engine under a seeded random mix of requests (tests/engine_stress.py): every greedy or seeded answer
equals the same request served alone, no valid request fails, invalid ones are refused, and at the end the
engine is idle and consistent. A short run on the 2-layer Llama here; a longer one on the embedded model."""

from __future__ import annotations

import random

import engine_stress
import pytest

from assistant.engine.engine import Engine
from assistant.engine.model import load_base
from assistant.settings import Settings

from helpers import random_lora_adapter


def stress(base, folders: dict, *, seed: int, n: int, slots: int, max_tokens_cap: int, max_batch: int = 6,
           max_queue_s: float = 120.0):
    engine = Engine(base, max_batch=max_batch, max_resident_adapters=slots, max_queue_s=max_queue_s)
    try:
        rng = random.Random(seed)
        specs = engine_stress.make_specs(rng, n, len(base.tokenizer), engine.max_context, sorted(folders),
                                         max_tokens_cap=max_tokens_cap)
        alone = {s.n: engine_stress.solo(engine, s, folders) for s in specs}
        engine_stress.mixed(engine, specs, folders)
        found = engine_stress.problems(specs, alone) + engine_stress.idle_problems(engine)
    finally:
        engine.close()
    assert not found, "\n".join(found)


@pytest.fixture(scope="module")
def tiny_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("stress-adapters")
    return {f"d{i}": random_lora_adapter(tiny_llama, root / f"d{i}", rank=4, std=0.3, seed=i + 1,
                                         targets=("q_proj", "v_proj", "gate_proj"))
            for i in range(3)}


@pytest.mark.parametrize("seed", [1, 2])
def test_a_random_mix_on_the_tiny_model_answers_as_alone(tiny_llama, tiny_adapters, seed):
    base = load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False)
    stress(base, tiny_adapters, seed=seed, n=14, slots=2, max_tokens_cap=160)


@pytest.mark.long
@pytest.mark.slow
def test_a_longer_random_mix_on_the_embedded_model(embedded_path, tmp_path):
    folders = {f"d{i}": random_lora_adapter(embedded_path, tmp_path / f"d{i}", rank=8, std=0.05, seed=i + 1)
               for i in range(3)}
    base = load_base(Settings(base_model="embedded", home=tmp_path / "home"), verbose=False)
    # Answers of up to 512 tokens on a busy CPU take minutes: the queue deadline (tested elsewhere) is set above
    # the service time, as the server's 120 s is above its usual one.
    stress(base, folders, seed=7, n=24, slots=2, max_tokens_cap=512, max_batch=8, max_queue_s=3600)
