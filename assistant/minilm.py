"""all-MiniLM-L6-v2 in numpy: the BERT encoder's forward pass, mean pooling and L2 normalization.

The same computation as sentence-transformers' `SentenceTransformer(model).encode(normalize_embeddings=True)`
for this model (per-text cosine >= 0.99999 against it, see tests/test_embeddings.py), without torch:
importing torch alone takes seconds, longer than curating a small domain.

- tokens: the `tokenizers` library reads tokenizer.json; inputs are truncated to `max_seq_length` (256,
  sentence_bert_config.json, not tokenizer.json's 128) and padded to the longest text of their batch;
- embeddings: word + position + token type (all type 0), then LayerNorm;
- 6 layers: multi-head self-attention (padding masked out) + residual + LayerNorm, then a GELU
  feed-forward (exact erf GELU, as BERT's) + residual + LayerNorm;
- pooling: the mean of the last hidden states over the real (unmasked) tokens, then unit length.

Everything is float32. Texts are sorted by length into batches so that little is spent on padding.
Matrix products go to numpy's BLAS; the elementwise work is single-threaded in numpy, so `encode` can
spread batches over threads (numpy releases the GIL in both), each running BLAS on one core.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FFN_ROWS = 256   # the feed-forward runs on this many tokens at a time: its (rows, 1536) activations stay in cache

# Abramowitz & Stegun 7.1.26: erf(z) = 1 - (a1 t + ... + a5 t^5) exp(-z^2), t = 1 / (1 + p z), z >= 0, with an
# absolute error <= 1.5e-7, about float32's resolution near 1. Here z = |x| / sqrt 2 (see `gelu`).
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_T_SCALE = np.float32(_ERF_P / math.sqrt(2))
_HALF_A = [np.float32(a / 2) for a in _ERF_A]


def gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x) = x (1 + erf(x / sqrt 2)) / 2, elementwise in float32; x is kept.

    With q = (1 - erf(|x| / sqrt 2)) / 2, that is x (1 - q) for x >= 0 and x q for x < 0: max(x, 0) - |x| q."""
    ax = np.abs(x)
    t = ax * _T_SCALE
    t += 1
    np.reciprocal(t, out=t)
    q = t * _HALF_A[-1]
    for a in _HALF_A[-2::-1]:
        q += a
        q *= t
    np.square(x, out=t)
    t *= np.float32(-0.5)
    np.exp(t, out=t)               # exp(-z^2) = exp(-x^2 / 2)
    q *= t
    q *= ax
    np.maximum(x, 0, out=t)
    np.subtract(t, q, out=t)
    return t


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis; x is overwritten (and returned)."""
    x -= x.mean(axis=-1, keepdims=True)
    var = np.einsum("...i,...i->...", x, x)[..., None]
    var /= x.shape[-1]
    var += np.float32(eps)
    np.sqrt(var, out=var)
    x /= var
    x *= weight
    x += bias
    return x


class Layer:
    """One encoder layer's weights, laid out for `x @ w` (query, key and value in one matrix)."""

    def __init__(self, w: dict[str, np.ndarray], prefix: str):
        def dense(name):
            return np.ascontiguousarray(w[f"{prefix}.{name}.weight"].T), w[f"{prefix}.{name}.bias"]
        q, k, v = (dense(f"attention.self.{n}") for n in ("query", "key", "value"))
        self.qkv_w = np.ascontiguousarray(np.concatenate([q[0], k[0], v[0]], axis=1))
        self.qkv_b = np.concatenate([q[1], k[1], v[1]])
        self.out_w, self.out_b = dense("attention.output.dense")
        self.ln1 = w[f"{prefix}.attention.output.LayerNorm.weight"], w[f"{prefix}.attention.output.LayerNorm.bias"]
        self.up_w, self.up_b = dense("intermediate.dense")
        self.down_w, self.down_b = dense("output.dense")
        self.ln2 = w[f"{prefix}.output.LayerNorm.weight"], w[f"{prefix}.output.LayerNorm.bias"]


class MiniLM:
    """`MiniLM(folder).encode(texts)` -> float32 (len(texts), hidden) unit vectors."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        st_config = folder / "sentence_bert_config.json"
        max_len = json.loads(st_config.read_text())["max_seq_length"] if st_config.exists() else 512
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens") or config.get("hidden_act") != "gelu":
            raise ValueError(f"{folder}: only mean pooling over a BERT with exact GELU is implemented")
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        self.max_len = min(max_len, config["max_position_embeddings"])

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()                      # tokenizer.json pads to 128: padding is per batch here
        self.tokenizer.enable_truncation(self.max_len)

        w = load_file(str(folder / "model.safetensors"))
        w = {k.removeprefix("bert."): v.astype(np.float32, copy=False) for k, v in w.items()}
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"]
        self.ln = w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"]
        self.layers = [Layer(w, f"encoder.layer.{i}") for i in range(config["num_hidden_layers"])]
        log.debug("MiniLM loaded from %s: %d layers, hidden %d, max %d tokens",
                  folder, len(self.layers), self.hidden, self.max_len)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch([t.strip() for t in texts])]

    def encode(self, texts: list[str], batch_size: int = 32, threads: int = 1) -> np.ndarray:
        """Unit vectors for `texts`, in batches of about `batch_size` texts of similar length, spread
        over `threads` threads (give each BLAS one core then, see `assistant.threads.one_blas_thread`)."""
        out = np.zeros((len(texts), self.hidden), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batch_size = max(1, min(batch_size, -(-len(ids) // threads)))   # at least one batch per thread
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

        def run(batch: list[int]) -> None:
            out[batch] = self.forward([ids[i] for i in batch])
        if threads > 1 and len(batches) > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="minilm") as pool:
                list(pool.map(run, batches[::-1]))        # longest first: the last ones to finish are short
        else:
            for batch in batches:
                run(batch)
        return out

    def forward(self, ids: list[list[int]]) -> np.ndarray:
        """Token ids of a batch (unpadded) -> (batch, hidden) pooled, normalized embeddings."""
        b, t = len(ids), max(len(x) for x in ids)
        tokens = np.zeros((b, t), dtype=np.int64)
        mask = np.zeros((b, t), dtype=np.float32)
        for i, x in enumerate(ids):
            tokens[i, :len(x)] = x
            mask[i, :len(x)] = 1
        x = self.word[tokens]
        x += self.position[:t]
        x += self.token_type[0]
        x = layer_norm(x, *self.ln, self.eps)
        # Added to the attention scores: 0 for real keys, the float32 minimum for padding (as transformers).
        bias = ((1 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        for layer in self.layers:
            x = self._layer(layer, x, bias)
        pooled = np.einsum("bth,bt->bh", x, mask) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def _layer(self, layer: Layer, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
        b, t, h = x.shape
        heads, d = self.heads, h // self.heads
        qkv = x.reshape(b * t, h) @ layer.qkv_w
        qkv += layer.qkv_b
        q, k, v = qkv.reshape(b, t, 3, heads, d).transpose(2, 0, 3, 1, 4)      # each (b, heads, t, d)
        scores = np.matmul(q * np.float32(1 / math.sqrt(d)), k.transpose(0, 1, 3, 2))
        scores += bias
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        context = np.matmul(scores, v).transpose(0, 2, 1, 3).reshape(b * t, h)
        attn = context @ layer.out_w
        attn += layer.out_b
        attn += x.reshape(b * t, h)
        x = layer_norm(attn, *layer.ln1, self.eps)
        out = np.empty_like(x)
        for i in range(0, len(x), FFN_ROWS):
            rows = x[i:i + FFN_ROWS]
            up = rows @ layer.up_w
            up += layer.up_b
            down = np.matmul(gelu(up), layer.down_w, out=out[i:i + FFN_ROWS])
            down += layer.down_b
            down += rows
        return layer_norm(out, *layer.ln2, self.eps).reshape(b, t, h)
