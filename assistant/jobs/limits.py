"""What the serving engine accepts, checked before any work starts: a training job whose adapter the engine
would refuse is refused at the start (422, naming the limit and the flag that raises it), and so is an
imported adapter, instead of passing the gate, going live and then failing on every server.

- the embedded engine: LoRA rank up to MAX_LORA_RANK, on any linear module of the base;
- vLLM: rank up to `--vllm-max-lora-rank` (the managed server is started with it, default
  VLLM_MAX_LORA_RANK; servers of --vllm-url do not report theirs, so without the flag vLLM's own default,
  VLLM_DEFAULT_MAX_LORA_RANK, is assumed), on the projections vLLM's LoRA layers wrap (VLLM_LORA_MODULES);
- either: an adapter file of at most MAX_UPLOAD_BYTES.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from assistant.errors import EngineLimit
from assistant.settings import MAX_LORA_RANK, MAX_UPLOAD_BYTES

VLLM_MAX_LORA_RANK = 64          # the managed vLLM server's --max-lora-rank unless --vllm-max-lora-rank says otherwise
VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM's own default --max-lora-rank: what a --vllm-url server is assumed to accept
VLLM_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class EngineLimits:
    engine: str                                  # "local" | "vllm"
    max_rank: int
    rank_flag: str                               # the flag that raises max_rank
    modules: tuple[str, ...] | None = None       # module names LoRA may target (None: any linear module)
    max_bytes: int = MAX_UPLOAD_BYTES

    def check(self, rank: int, target_modules, *, what: str = "the adapter") -> None:
        """Raise EngineLimit when `rank` or a module in `target_modules` is past what the engine serves."""
        if isinstance(rank, int) and rank > self.max_rank:
            raise EngineLimit(f"{what} has LoRA rank {rank}; the serving engine ({self.engine}) accepts at most rank "
                              f"{self.max_rank}: use rank {self.max_rank} or less, or raise the limit with "
                              f"{self.rank_flag}", param="rank")
        if self.modules is not None:
            names = [target_modules] if isinstance(target_modules, str) else list(target_modules or ())
            bad = sorted({m.rsplit(".", 1)[-1] for m in names if isinstance(m, str)} - set(self.modules))
            if bad:
                raise EngineLimit(f"{what} targets {', '.join(bad)}; the serving engine ({self.engine}) applies LoRA "
                                  f"only to {', '.join(self.modules)}: train on those modules (target_modules)",
                                  param="target_modules")


def engine_limits(settings) -> EngineLimits:
    """The limits of the engine these settings serve with."""
    if settings.engine != "vllm":
        return EngineLimits("local", MAX_LORA_RANK, "nothing: the embedded engine's cap is fixed")
    rank = settings.vllm_max_lora_rank
    if rank is None:
        rank = VLLM_DEFAULT_MAX_LORA_RANK if settings.vllm_url else VLLM_MAX_LORA_RANK
    return EngineLimits("vllm", rank, "--vllm-max-lora-rank (and the vLLM servers' --max-lora-rank)"
                        if settings.vllm_url else "--vllm-max-lora-rank", VLLM_LORA_MODULES)


def check_adapter_folder(limits: EngineLimits, folder: Path) -> None:
    """An adapter folder (an import) against the engine's limits: its rank, modules and size."""
    if limits.engine == "local":
        return   # validate_adapter holds the embedded engine's cap (MAX_LORA_RANK), as TrainSettings does
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return   # validate_adapter says what is wrong with it
    if not isinstance(config, dict):
        return
    weights = folder / "adapter_model.safetensors"
    if weights.is_file() and weights.stat().st_size > limits.max_bytes:
        raise EngineLimit(f"the adapter's weights are {weights.stat().st_size >> 20} MiB; at most "
                          f"{limits.max_bytes >> 20} MiB are accepted: train a smaller rank", param="adapter")
    from assistant.data.registry import _module_of, tensor_shapes
    from assistant.errors import InvalidAdapter
    modules = []
    if weights.is_file():   # what the weights wrap (adapter_config's target_modules may be a pattern)
        try:
            names = tensor_shapes(weights)
        except InvalidAdapter:
            return   # validate_adapter says what is wrong with it
        modules = [m[0] for m in map(_module_of, names) if m is not None]
    limits.check(config.get("r"), modules)
