"""GPU benchmark: the engine's decode (CUDA graphs) against the memory-bandwidth floor in bf16 and NF4,
mixed-adapter batches, NF4's weights memory, and QLoRA against LoRA (peak memory and time per step).

    python benchmarks/gpu.py            # a CUDA machine: random-init Llama-3-8B shapes (no weights travel)
    python benchmarks/gpu.py --tiny     # anywhere: a 2-layer model on CPU, so the script never rots (CI)

The floor is the copy bandwidth measured here, counted as bytes read plus bytes written per second (what
the memory moves), divided by the bytes a decode step reads (every weight once). Prints the GPU name (or
the CPU's flags), tables, and as its LAST line a JSON object of the ratios. On CPU (--tiny) the peak-memory
ratio comes from assistant/training/memory.py's estimate, since CPU allocations have no peak statistics.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assistant.engine.threads import defaults  # noqa: E402 - after the sys.path line and the thread policy

defaults()   # before torch: the CPU thread policy the CLI applies (assistant/engine/threads.py)

import torch  # noqa: E402 - after the sys.path line and the thread policy

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_TOKENS = 32
DECODE_TOKENS = {"full": 128, "tiny": 16}
WARM_TOKENS = 8                  # decode steps before timing (graph capture happens here)
CONCURRENT = 8                   # rows in the adapter benchmark...
ADAPTERS = 4                     # ...spread over this many adapters
ADAPTER_RANK = 16
TRAIN_BATCH = {"full": (4, 512), "tiny": (2, 64)}    # rows x tokens per training step
TRAIN_STEPS = 3                  # timed steps, after one warm-up step
COPY_BYTES = {"full": 2 << 30, "tiny": 64 << 20}
TARGET = {"gpu_decode_vs_floor_bf16": ">= 0.7", "gpu_decode_vs_floor_nf4": ">= 0.4",
          "nf4_vs_bf16_weights_mem": "<= 0.35", "gpu_mixed_vs_single_adapter": ">= 0.8",
          "qlora_vs_lora_peak_mem": "<= 0.5", "qlora_step_vs_lora_step": ">= 0.6"}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device):
    """Drop what the last measurement left (fused weight copies, optimizer state) before the next one."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def machine(device) -> str:
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    have = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in flags]
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, flags: {' '.join(have) or 'none'}"


def copy_bandwidth(device, nbytes) -> float:
    """Bytes moved per second by a device-to-device copy, reads plus writes (2N/t), best of 5."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


# ---------------------------------------------------------------------------------------------
# Models and adapters of real shapes, random weights
# ---------------------------------------------------------------------------------------------

def build_model(shape: dict, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**shape, tie_word_embeddings=False, initializer_range=0.02, head_dim=None,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)          # built in its dtype on the device: no float32 copy of 8B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    return model


def to_nf4(model, compute_dtype) -> None:
    """Replace the decoder's linear layers by bitsandbytes NF4 layers (double-quantized scales), in place,
    one at a time, as transformers does when it loads with load_in_4bit."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, child in list(owner.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                device = child.weight.device
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=compute_dtype,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q._parameters["weight"] = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                            compress_statistics=True, module=q).to(device)
                setattr(owner, name, q)
                del child
    model.is_loaded_in_4bit = True
    free(str(next(model.parameters()).device))


def write_adapters(model, folder: Path, n: int, rank: int) -> list[Path]:
    """`n` random PEFT LoRA folders for `model`'s shapes (safetensors)."""
    from safetensors.torch import save_file
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for li, layer in enumerate(model.model.layers):
            for owner_name, owner in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
                for name in TARGETS:
                    mod = getattr(owner, name, None)
                    if mod is None:
                        continue
                    key = f"base_model.model.model.layers.{li}.{owner_name}.{name}"
                    tensors[f"{key}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.01
                    tensors[f"{key}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.01
        d = folder / f"adapter{i}"
        d.mkdir(parents=True)
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                           "target_modules": list(TARGETS)}))
        out.append(d)
    return out


def bytes_per_token(model) -> int:
    """Bytes one decode step reads: every weight once, less the embedding table (one row is read)."""
    from assistant.engine.model import weights_bytes
    emb = model.model.embed_tokens.weight
    return weights_bytes(model) - emb.numel() * emb.element_size()


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

def decode_rate(runner, slots: list[int], steps: int, device) -> float:
    """Tokens per second of `len(slots)` rows decoding together, greedy, the engine's decode path."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, runner.embed.weight.shape[0], (PROMPT_TOKENS,), generator=g).tolist() for _ in slots]
    tokens = [int(runner.prefill(row, ids, s).argmax()) for row, (ids, s) in enumerate(zip(prompts, slots))]
    pos = PROMPT_TOKENS
    for _ in range(WARM_TOKENS):
        tokens = runner.decode(tokens, [pos] * len(slots), slots).argmax(-1).tolist()
        pos += 1
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        tokens = runner.decode(tokens, [pos] * len(slots), slots).argmax(-1).tolist()   # a sync per step
        pos += 1
    return steps * len(slots) / (time.perf_counter() - t)


def serve(model, device, adapters, steps) -> dict:
    from assistant.engine.runner import LlamaRunner
    runner = LlamaRunner(model, max_slots=ADAPTERS, max_batch=CONCURRENT, device=device)
    slots = [runner.bank.load(f"a{i}", folder) for i, folder in enumerate(adapters)]
    single = decode_rate(runner, [0], steps, device)
    one = decode_rate(runner, [slots[0]] * CONCURRENT, steps, device)
    mixed = decode_rate(runner, [slots[i % ADAPTERS] for i in range(CONCURRENT)], steps, device)
    graphs = runner.graph_step is not None and not runner.graph_step.failed
    del runner
    free(device)
    return {"tok_s": single, "one_adapter_tok_s": one, "mixed_tok_s": mixed, "graphs": graphs}


def train_step_stats(model, device, quantized: bool, rows: int, tokens: int) -> dict:
    """LoRA (or QLoRA on a quantized model) with gradient checkpointing: median seconds per step, peak bytes."""
    from peft import LoraConfig, get_peft_model

    from assistant.training.recipe import causal_lm_loss, prepare_quantized
    if quantized:
        model = prepare_quantized(model, checkpointing=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft = get_peft_model(model, LoraConfig(r=ADAPTER_RANK, lora_alpha=2 * ADAPTER_RANK, target_modules=list(TARGETS),
                                            task_type="CAUSAL_LM"))
    peft.train()
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens), generator=g).to(device)
    labels = ids.clone()
    labels[:, : tokens // 2] = -100                 # loss on the second half, like answers after prompts
    mask = torch.ones_like(ids)
    causal_lm = peft.get_base_model()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(TRAIN_STEPS + 1):
        sync(device)
        t = time.perf_counter()
        loss, _ = causal_lm_loss(causal_lm, ids, labels, mask, checkpoint_chunks=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    peft.unload()                                   # the base back as it was, without LoRA
    model.gradient_checkpointing_disable()
    model.requires_grad_(False)
    del opt, params, peft
    free(device)
    return {"step_s": statistics.median(times), "peak_bytes": peak}


def estimated_peak_ratio(shape: dict, rows: int, tokens: int, dtype_bytes: int) -> float:
    from assistant.training.memory import ModelShape, estimate_training_bytes
    s = ModelShape(hidden=shape["hidden_size"], intermediate=shape["intermediate_size"],
                   layers=shape["num_hidden_layers"], heads=shape["num_attention_heads"],
                   kv_heads=shape["num_key_value_heads"], head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                   vocab=shape["vocab_size"])
    est = {q: estimate_training_bytes(s, quantization=q, dtype_bytes=dtype_bytes, rank=ADAPTER_RANK,
                                      target_modules=TARGETS, batch_size=rows, max_seq_len=tokens,
                                      checkpointing=True, cuda=False).total for q in ("nf4", "none")}
    return est["nf4"] / est["none"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model on CPU (CI), instead of 8B shapes on CUDA")
    args = p.parse_args(argv)
    from assistant.engine.model import weights_bytes
    size = "tiny" if args.tiny else "full"
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA GPU visible: run with --tiny for the CPU version")
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = TINY if args.tiny else LLAMA3_8B
    t_start = time.perf_counter()
    print(f"machine: {machine(device)}", flush=True)
    bandwidth = copy_bandwidth(device, COPY_BYTES[size])
    rows, tokens = TRAIN_BATCH[size]
    steps = DECODE_TOKENS[size]

    model = build_model(shape, dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_adapters(model, Path(tmp), ADAPTERS, ADAPTER_RANK)
        dense_bytes, dense_read = weights_bytes(model), bytes_per_token(model)
        dense = serve(model, device, adapters, steps)
        lora = train_step_stats(model, device, False, rows, tokens)
        to_nf4(model, dtype)
        nf4_bytes, nf4_read = weights_bytes(model), bytes_per_token(model)
        nf4 = serve(model, device, adapters, steps)
        qlora = train_step_stats(model, device, True, rows, tokens)

    floor_dense, floor_nf4 = bandwidth / dense_read, bandwidth / nf4_read
    if lora["peak_bytes"] and qlora["peak_bytes"]:
        peak_ratio, peak_note = qlora["peak_bytes"] / lora["peak_bytes"], "measured"
    else:
        peak_ratio, peak_note = estimated_peak_ratio(shape, rows, tokens, dtype.itemsize), "estimated (CPU)"
    ratios = {
        "gpu_decode_vs_floor_bf16": dense["tok_s"] / floor_dense,
        "gpu_decode_vs_floor_nf4": nf4["tok_s"] / floor_nf4,
        "nf4_vs_bf16_weights_mem": nf4_bytes / dense_bytes,
        "gpu_mixed_vs_single_adapter": dense["mixed_tok_s"] / dense["one_adapter_tok_s"],
        "qlora_vs_lora_peak_mem": peak_ratio,
        "qlora_step_vs_lora_step": lora["step_s"] / qlora["step_s"],
    }
    mib = 2**20
    print(f"\nmodel: {'tiny 2-layer' if args.tiny else 'Llama-3-8B shapes'}, {str(dtype).replace('torch.', '')}, "
          f"{'CUDA graphs' if dense['graphs'] else 'no CUDA graphs'}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (2N/t)")
    rows_out = [("weights bf16 / nf4", f"{dense_bytes / mib:.1f} / {nf4_bytes / mib:.1f} MiB"),
                ("decode floor bf16 / nf4", f"{floor_dense:.1f} / {floor_nf4:.1f} tok/s"),
                ("decode bf16 / nf4 (batch 1)", f"{dense['tok_s']:.1f} / {nf4['tok_s']:.1f} tok/s"),
                (f"{CONCURRENT} rows, one adapter / {ADAPTERS} adapters (bf16)",
                 f"{dense['one_adapter_tok_s']:.1f} / {dense['mixed_tok_s']:.1f} tok/s"),
                (f"{CONCURRENT} rows, one adapter / {ADAPTERS} adapters (nf4)",
                 f"{nf4['one_adapter_tok_s']:.1f} / {nf4['mixed_tok_s']:.1f} tok/s"),
                (f"train step {rows}x{tokens} LoRA / QLoRA", f"{lora['step_s']:.3f} / {qlora['step_s']:.3f} s"),
                ("train peak LoRA / QLoRA", "n/a on CPU" if lora["peak_bytes"] is None else
                 f"{lora['peak_bytes'] / mib:.0f} / {qlora['peak_bytes'] / mib:.0f} MiB")]
    width = max(len(k) for k, _ in rows_out) + 2
    for k, v in rows_out:
        print(f"{k:<{width}}{v}")
    print()
    for k, v in ratios.items():
        print(f"{k:<{width}}{v:.3f}   target {TARGET[k]}" + (f"   ({peak_note})" if k == "qlora_vs_lora_peak_mem" else ""))
    print(f"({time.perf_counter() - t_start:.0f} s)")
    print(json.dumps({k: round(v, 4) for k, v in ratios.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
