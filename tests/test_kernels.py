"""The C kernels (assistant/engine/kernels.c): the LoRA delta, RMSNorm and the whole decode step, each against the
torch path it replaces on CPU."""

from __future__ import annotations

import pytest
import torch

from assistant.engine.kernels import lora_kernel, step_kernel
from assistant.engine.lora import Group, LoraBank

GROUPS = [Group("qkv", 64, (("q_proj", 64), ("k_proj", 32), ("v_proj", 32))),
          Group("o", 64, (("o_proj", 64),)),
          Group("gate_up", 64, (("gate_proj", 96), ("up_proj", 96))),
          Group("down", 96, (("down_proj", 64),))]
PARTS = {p: (g, i) for g in GROUPS for i, (p, _) in enumerate(g.parts)}

needs_kernel = pytest.mark.skipif(lora_kernel() is None,
                                  reason="no C kernel (no compiler, or ASSISTANT_KERNELS=0): the torch path serves")


def _adapter(folder, rank: int, seed: int, layers: int = 2):
    """A PEFT-format adapter folder with random weights for GROUPS' modules."""
    import json

    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for li in range(layers):
        for part, (grp, _i) in PARTS.items():
            out = dict(grp.parts)[part]
            owner = "self_attn" if grp.name in ("qkv", "o") else "mlp"
            base = f"base_model.model.model.layers.{li}.{owner}.{part}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(rank, grp.in_features, generator=g) * 0.1
            tensors[f"{base}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
    return folder


def _bank(tmp_path, dtype, *, kernel: bool):
    bank = LoraBank(2, GROUPS, "model.layers", max_slots=3, dtype=dtype, device="cpu")
    if not kernel:
        bank.kernel = None
    for s, (rank, seed) in enumerate(((8, 1), (16, 2), (4, 3))):
        folder = tmp_path / f"{dtype}-{kernel}-{s}"
        bank.load(f"a{s}", _adapter(folder, rank, seed))
    return bank


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_torch_path(tmp_path, dtype):
    fast, slow = _bank(tmp_path, dtype, kernel=True), _bank(tmp_path, dtype, kernel=False)
    assert fast.kernel is not None
    if dtype == torch.bfloat16:
        # Weights are stored in bfloat16 for the kernel: compare against the same rounded weights.
        for li in range(2):
            for gi in range(len(GROUPS)):
                slow.A[li][gi].copy_(fast.A[li][gi].float())
                slow.Bt[li][gi].copy_(fast.Bt[li][gi].float())
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([1, 0, 2, 3, 2])                     # mixed slots, one row on the base
    for li in range(2):
        for gi, grp in enumerate(GROUPS):
            h = torch.randn(len(rows), grp.in_features, generator=g).to(dtype)
            base = torch.randn(len(rows), grp.out_features, generator=g).to(dtype)
            a, b = base.clone(), base.clone()
            fast.delta(li, gi, h, rows, None, a)
            slow.delta(li, gi, h, rows, None, b)
            assert torch.equal(a[1], base[1])                 # slot 0: untouched
            assert not torch.equal(a[0], base[0])
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@needs_kernel
def test_a_row_does_not_depend_on_its_batch(tmp_path):
    bank = _bank(tmp_path, torch.bfloat16, kernel=True)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 64, generator=g).to(torch.bfloat16)
    base = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    alone = base.clone()
    bank.delta(0, 0, h, torch.tensor([2]), 2, alone)
    others = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    batch_h = torch.cat([others[:2], h, others[2:]])
    batch_out = torch.cat([torch.randn(2, 256, generator=g), base, torch.randn(1, 256, generator=g)]).to(torch.bfloat16)
    bank.delta(0, 0, batch_h, torch.tensor([1, 3, 2, 0]), None, batch_out)
    assert torch.equal(batch_out[2:3], alone)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from assistant.engine.kernels import rms_kernel
    from assistant.engine.runner import _rms
    assert rms_kernel() is not None
    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=g) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(5, 576, generator=g) * 3).to(dtype)
    got, want = _rms(x, norm.weight.detach(), 1e-5), norm(x).detach()
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:   # a different summation order may move a value that sits on a rounding boundary by one step
        assert (got != want).float().mean() < 0.01
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)


# --- the whole decode step ---------------------------------------------------------------------------

needs_step = pytest.mark.skipif(
    step_kernel() is None, reason="no C decode step (no compiler, no shared OpenMP, or ASSISTANT_KERNELS=0): torch ops serve")


def _tiny_decoder(arch: str, dtype, head_dim: int = 16):
    """A 2-layer decoder of random weights with GROUPS' shapes: llama, qwen2 (q/k/v biases), qwen3 (q/k norms)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    config = cls(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512, initializer_range=0.2,
                 tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():   # norms and biases away from their neutral initial values
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.3)
    return model.to(dtype).eval()


def _runner(tmp_path, arch, dtype):
    from assistant.engine.runner import LlamaRunner
    runner = LlamaRunner(_tiny_decoder(arch, dtype), max_slots=3, max_batch=4, device="cpu")
    for s, (rank, seed) in enumerate(((8, 1), (16, 2))):
        runner.bank.load(f"a{s}", _adapter(tmp_path / f"{arch}-{dtype}-{s}", rank, seed))
    return runner


def _steps(runner, kernel: bool, rows, n_steps=6):
    """Prefill each (prompt, slot) row, then greedy decode steps with the C step or torch ops:
    -> (logits of every step, the KV cache after the last)."""
    step = runner.step
    runner.step = step if kernel else None
    try:
        toks = [int(runner.prefill(i, ids, slot).argmax()) for i, (ids, slot) in enumerate(rows)]
        pos = [len(ids) for ids, _ in rows]
        out = []
        for _ in range(n_steps):
            logits = runner.decode(toks, pos, [slot for _, slot in rows])
            out.append(logits)
            toks = logits.argmax(-1).tolist()
            pos = [p + 1 for p in pos]
        return torch.stack(out), [k.clone() for k in runner.cache.k]
    finally:
        runner.step = step


ROWS = [(list(range(3, 40)), 1), (list(range(50, 61)), 0), (list(range(100, 123)), 2)]   # mixed adapters


@needs_step
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_decode_step_matches_torch_ops_float32(tmp_path, arch):
    runner = _runner(tmp_path, arch, torch.float32)
    assert runner.step is not None
    fast, fast_k = _steps(runner, True, ROWS)
    slow, slow_k = _steps(runner, False, ROWS)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    for a, b in zip(fast_k, slow_k):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fast[:, 0], fast[:, 1], atol=1e-2)   # the rows really differ


@needs_step
def test_decode_step_matches_torch_ops_bfloat16(tmp_path):
    runner = _runner(tmp_path, "llama", torch.bfloat16)
    assert runner.step is not None and runner.bank.dtype == torch.bfloat16
    fast, _ = _steps(runner, True, ROWS)
    slow, _ = _steps(runner, False, ROWS)
    # Both round to bfloat16 at the same places; sums in another order may land one rounding step apart.
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))
    scale = slow.abs().amax(-1, keepdim=True)
    assert ((fast - slow).abs() / scale).max() < 0.05


@needs_step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_row_does_not_depend_on_its_batch(tmp_path, dtype):
    runner = _runner(tmp_path, "llama", dtype)
    alone, _ = _steps(runner, True, ROWS[2:], n_steps=3)
    batch, _ = _steps(runner, True, ROWS, n_steps=3)
    assert torch.equal(alone[:, 0], batch[:, 2])


@needs_step
@pytest.mark.parametrize("arch,head_dim,dtype", [("qwen3", 32, torch.float32), ("llama", 64, torch.float32),
                                                 ("llama", 64, torch.bfloat16)])
def test_decode_step_with_heads_wider_than_the_hidden_size(arch, head_dim, dtype):
    """heads x head_dim (128, 256) is not the hidden size (64); a head_dim of 64 takes the vector paths."""
    from assistant.engine.runner import LlamaRunner
    runner = LlamaRunner(_tiny_decoder(arch, dtype, head_dim=head_dim), max_slots=1, max_batch=4, device="cpu")
    assert runner.kv_dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    rows = [(ids, 0) for ids, _ in ROWS]
    fast, _ = _steps(runner, True, rows)
    slow, _ = _steps(runner, False, rows)
    if dtype == torch.float32:
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(fast.argmax(-1), slow.argmax(-1))
        assert ((fast - slow).abs() / slow.abs().amax(-1, keepdim=True)).max() < 0.05


@needs_step
def test_the_engine_decodes_with_the_step(tiny_llama):
    from assistant.engine.engine import Engine, Request
    from assistant.engine.model import load_base
    from assistant.settings import Settings
    engine = Engine(load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False), max_batch=2)
    try:
        assert engine.runner.step is not None
        ids = engine.encode_chat([{"role": "user", "content": "Hi"}])
        h = engine.submit(Request(prompt_ids=ids, max_new_tokens=6, ignore_eos=True))
        h.result()
        assert len(h.req.generated) == 6 and engine.runner.step.key is not None   # the step ran
    finally:
        engine.close()
