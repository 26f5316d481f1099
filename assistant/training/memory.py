"""What a training job needs in device memory, estimated before it starts, so that a job that cannot fit
is refused with numbers ("needs ~9.1 GB, 6.0 GB free: lower ...") instead of dying mid-run when it shares
a GPU with the server.

`estimate_training_bytes` is pure arithmetic on the model's shapes and the job's settings:

    weights      linear layers at their stored width (NF4: 4 bits + block scales; int8: 1 byte) plus the
                 embeddings, LM head and norms in the compute dtype
    LoRA         rank x (in + out) per adapted module, float32 weights + gradients + AdamW's two moments
    activations  what backward keeps per token and layer (all of it without gradient checkpointing; the
                 layer inputs plus one recomputed layer with it) and the loss's chunk of float32 logits
    overhead     the allocator's slack (a fraction) and, on CUDA, the job process's own context

`check_training_memory` compares it with the free memory (a parameter, so tests can pass a figure).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from assistant.engine.lm import LOSS_CHUNK_TOKENS
from assistant.errors import AssistantError, InsufficientMemory
from assistant.training.recipe import QUANTIZED

log = logging.getLogger(__name__)

GB = 1e9
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)   # 4-bit codes, an 8-bit scale per 64, double-quantized
INT8_BYTES_PER_WEIGHT = 1.0 + 4 / 4096                  # int8 codes and a float32 scale per row (rough)
LORA_BYTES_PER_PARAM = 16                # float32 weight, gradient, AdamW's exp_avg and exp_avg_sq
# Per token and layer, the tensors a Llama layer keeps for backward, in elements: normed inputs, q/k/v,
# attention output, residuals (about 8 hidden-wide), k and v (2 kv-wide), gate, up, their product and
# activation (about 5 intermediate-wide).
ACT_HIDDEN_PER_LAYER = 8
ACT_KV_PER_LAYER = 2
ACT_INTER_PER_LAYER = 5
LOGIT_COPIES = 3                          # the chunk's float32 logits, their softmax and its gradient
FLOAT32_BYTES = 4                         # the loss computes logits in float32 whatever the weights' dtype
ALLOCATOR_SLACK = 0.10                    # fragmentation and caching allocator rounding
CUDA_CONTEXT_BYTES = 600 * 2**20          # the job process's CUDA context and cuBLAS workspace
TARGET_SHAPES = {  # module -> (in, out) as functions of (hidden, intermediate, q width, kv width)
    "q_proj": lambda h, i, q, kv: (h, q), "k_proj": lambda h, i, q, kv: (h, kv),
    "v_proj": lambda h, i, q, kv: (h, kv), "o_proj": lambda h, i, q, kv: (q, h),
    "gate_proj": lambda h, i, q, kv: (h, i), "up_proj": lambda h, i, q, kv: (h, i),
    "down_proj": lambda h, i, q, kv: (i, h),
}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        heads = d["num_attention_heads"]
        return cls(hidden=d["hidden_size"], intermediate=d["intermediate_size"], layers=d["num_hidden_layers"],
                   heads=heads, kv_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads, vocab=d["vocab_size"],
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        args = (self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim)
        return {name: f(*args) for name, f in TARGET_SHAPES.items()}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    lora: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.overhead

    def describe(self) -> str:
        return (f"~{self.total / GB:.1f} GB (weights {self.weights / GB:.1f}, LoRA and optimizer {self.lora / GB:.1f}, "
                f"activations {self.activations / GB:.1f}, overhead {self.overhead / GB:.1f})")


def weight_bytes_per_param(quantization: str, dtype_bytes: int) -> float:
    return {"nf4": NF4_BYTES_PER_WEIGHT, "int8": INT8_BYTES_PER_WEIGHT}.get(quantization, float(dtype_bytes))


def estimate_training_bytes(shape: ModelShape, *, quantization: str, dtype_bytes: int, rank: int,
                            target_modules, batch_size: int, max_seq_len: int, checkpointing: bool,
                            cuda: bool) -> MemoryEstimate:
    """Device bytes a LoRA/QLoRA job needs at its peak (see the module docstring for the terms)."""
    modules = shape.module_shapes()
    linear = shape.layers * sum(i * o for i, o in modules.values())
    other = shape.vocab * shape.hidden * (1 if shape.tie_word_embeddings else 2) + (2 * shape.layers + 1) * shape.hidden
    weights = linear * weight_bytes_per_param(quantization, dtype_bytes) + other * dtype_bytes
    lora_params = shape.layers * sum(rank * (modules[m][0] + modules[m][1]) for m in target_modules if m in modules)
    lora = lora_params * LORA_BYTES_PER_PARAM
    tokens = batch_size * max_seq_len
    per_layer = (ACT_HIDDEN_PER_LAYER * shape.hidden + ACT_KV_PER_LAYER * shape.kv_heads * shape.head_dim
                 + ACT_INTER_PER_LAYER * shape.intermediate) * tokens * dtype_bytes
    kept = shape.layers * tokens * shape.hidden * dtype_bytes + per_layer if checkpointing else shape.layers * per_layer
    logits = min(tokens, LOSS_CHUNK_TOKENS) * shape.vocab * FLOAT32_BYTES * LOGIT_COPIES
    activations = kept + logits
    overhead = ALLOCATOR_SLACK * (weights + lora + activations) + (CUDA_CONTEXT_BYTES if cuda else 0)
    return MemoryEstimate(weights=weights, lora=lora, activations=activations, overhead=overhead)


def check_training_memory(estimate: MemoryEstimate, free_bytes: float, *, batch_size: int, max_seq_len: int,
                          where: str) -> None:
    """Refuse (InsufficientMemory) a job whose estimate exceeds `free_bytes`, naming both and what to lower."""
    if estimate.total <= free_bytes:
        log.info("training needs %s; %.1f GB free on %s", estimate.describe(), free_bytes / GB, where)
        return
    raise InsufficientMemory(
        f"this training job needs {estimate.describe()} on {where}, and {free_bytes / GB:.1f} GB is free: lower "
        f"batch_size (now {batch_size}) or max_seq_len (now {max_seq_len}), or stop other jobs", param="settings")


def base_shape(settings) -> ModelShape | None:
    """The shapes of the configured base, read from its config (no weights loaded); None if unreadable."""
    from transformers import AutoConfig

    from assistant.engine.model import ensure_embedded, resolve_source
    try:
        if settings.base_model == "embedded":   # the cached folder as it is: no checksum pass before each job
            source, gguf_file = str(ensure_embedded(settings.cache_dir, verify=False)), None
        else:
            _, source, gguf_file = resolve_source(settings.base_model, settings.cache_dir)
        config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
        return ModelShape.from_config(config)
    except (OSError, ValueError, KeyError, AssistantError) as e:
        log.warning("cannot read the shapes of %s (%s): no memory check before training", settings.base_model, e)
        return None


def check_job_memory(settings, train_settings, free_bytes: float | None = None) -> MemoryEstimate | None:
    """Estimate a job on the configured base and refuse it if it cannot fit. `free_bytes` None measures the
    GPU's free memory; on CPU there is then no check (the kernel overcommits and swaps, so free RAM predicts
    little; a job killed for memory is reported as such by jobs/run.py). Returns the estimate, or None."""
    from assistant.engine.model import resolve_device, resolve_dtype, resolve_quantization
    from assistant.training.recipe import training_base_settings
    device = resolve_device(settings.train_device or settings.device)
    cuda = device.startswith("cuda")
    if free_bytes is None and not cuda:
        return None
    shape = base_shape(settings)
    if shape is None:
        return None
    planned = training_base_settings(settings)
    quantization = resolve_quantization(planned.quantization, device)
    dtype = resolve_dtype(planned.dtype, device)
    checkpointing = train_settings.gradient_checkpointing == "on" or (
        train_settings.gradient_checkpointing == "auto" and (cuda or quantization in QUANTIZED))
    estimate = estimate_training_bytes(shape, quantization=quantization, dtype_bytes=dtype.itemsize,
                                       rank=train_settings.rank, target_modules=train_settings.target_modules,
                                       batch_size=train_settings.batch_size, max_seq_len=train_settings.max_seq_len,
                                       checkpointing=checkpointing, cuda=cuda)
    if free_bytes is None:
        import torch
        free_bytes = torch.cuda.mem_get_info(torch.device(device))[0]
    check_training_memory(estimate, free_bytes, batch_size=train_settings.batch_size,
                          max_seq_len=train_settings.max_seq_len, where=device)
    return estimate
