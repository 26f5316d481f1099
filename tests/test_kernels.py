"""The C kernel for LoRA deltas (assistant/kernels.py) against the torch path it replaces on CPU."""

from __future__ import annotations

import pytest
import torch

from assistant.kernels import lora_kernel
from assistant.lora import Group, LoraBank

GROUPS = [Group("qkv", 64, (("q_proj", 64), ("k_proj", 32), ("v_proj", 32))),
          Group("o", 64, (("o_proj", 64),)),
          Group("gate_up", 64, (("gate_proj", 96), ("up_proj", 96))),
          Group("down", 96, (("down_proj", 64),))]
PARTS = {p: (g, i) for g in GROUPS for i, (p, _) in enumerate(g.parts)}

needs_kernel = pytest.mark.skipif(lora_kernel() is None, reason="no C kernel (no compiler, or ASSISTANT_KERNELS=0): the torch path serves")


def _adapter(folder, rank: int, seed: int, layers: int = 2):
    """A PEFT-format adapter folder with random weights for GROUPS' modules."""
    import json

    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for li in range(layers):
        for part, (grp, i) in PARTS.items():
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

    from assistant.engine import _rms
    from assistant.kernels import rms_kernel
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
