"""The static-shape decode step that CUDA graphs replay on a GPU (assistant/engine/graph_step.py), run eagerly on
CPU: padded rows, a bucketed attention window with a per-row mask and the three LoRA forms give the same
logits as the runner's own decode, on a dense and an NF4 base."""

from __future__ import annotations

import pytest

from assistant.settings import Settings

PROMPTS = ([5, 17, 99, 3], [8, 2, 41, 7, 66, 12, 9], [31, 4])
STEPS = 4


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_static_step_matches_the_runner_decode(tiny_llama, two_fact_adapters, quantization):
    import torch

    from assistant.engine.graph_step import StaticStep, enabled
    from assistant.engine.model import load_base
    from assistant.engine.runner import LlamaRunner
    assert not enabled("cpu") and enabled("cuda:0")
    base = load_base(Settings(base_model=str(tiny_llama), dtype="float32", quantization=quantization), verbose=False)
    runner = LlamaRunner(base.model, max_slots=4, max_batch=4, device="cpu")
    assert runner.graph_step is None   # CPU: decode as before
    a, b = (runner.bank.load(f"d{i}", f) for i, f in enumerate(two_fact_adapters))
    static = StaticStep(runner, graphs=False)
    for slots in ([0, 0, 0], [a, a, a], [a, b, 0]):          # the three LoRA forms; 3 rows padded to 4
        tokens = [[int(runner.prefill(row, ids, s).argmax())] for row, (ids, s) in enumerate(zip(PROMPTS, slots))]
        for step in range(STEPS):
            positions = [len(p) + step for p in PROMPTS]
            last = [t[-1] for t in tokens]
            want = runner.decode(last, positions, slots)
            got = static(last, positions, slots)             # writes the same k and v at the same places
            assert got.shape == want.shape and got.argmax(-1).tolist() == want.argmax(-1).tolist()
            # bitsandbytes' CPU 4-bit kernel rounds its inputs to bfloat16, so NF4 agrees to bf16 steps
            atol = 1e-4 if quantization == "none" else 0.01 * float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)
            for row in range(3):
                tokens[row].append(int(want[row].argmax()))
