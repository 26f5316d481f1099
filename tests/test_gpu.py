"""What only a CUDA GPU can check (skipped elsewhere): decode steps replayed from CUDA graphs give the
logits of eager decode, dense and NF4, in all three LoRA forms, and graphs are really captured."""

from __future__ import annotations

import pytest
import torch

from assistant.settings import Settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ([5, 17, 99, 3], [8, 2, 41, 7, 66, 12, 9], [31, 4])
STEPS = 4


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_cuda_graph_decode_matches_eager(tiny_llama, two_fact_adapters, quantization):
    from assistant.engine.graph_step import StaticStep
    from assistant.engine.model import load_base
    from assistant.engine.runner import LlamaRunner
    base = load_base(Settings(base_model=str(tiny_llama), dtype="bfloat16", quantization=quantization,
                              device="cuda"), verbose=False)
    runner = LlamaRunner(base.model, max_slots=4, max_batch=4, device="cuda")
    assert runner.graph_step is not None
    a, b = (runner.bank.load(f"d{i}", f) for i, f in enumerate(two_fact_adapters))
    eager = StaticStep(runner, graphs=False)
    for slots in ([0, 0, 0], [a, a, a], [a, b, 0]):
        tokens = [[int(runner.prefill(row, ids, s).argmax())] for row, (ids, s) in enumerate(zip(PROMPTS, slots))]
        for step in range(STEPS):
            positions = [len(p) + step for p in PROMPTS]
            last = [t[-1] for t in tokens]
            want = eager(last, positions, slots).clone()
            got = runner.decode(last, positions, slots)            # from a graph (same k and v written)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * float(want.abs().max()))
            for row in range(3):
                tokens[row].append(int(want[row].argmax()))
    assert not runner.graph_step.failed and len(runner.graph_step.captured) >= 3
