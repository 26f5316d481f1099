"""Training benchmark: tokens/s of our recipe (`assistant.training.recipe.train_adapter`) against a plain PEFT loop
(get_peft_model + AdamW + padded batches in dataset order + the model's own loss over full logits) on the
same rows, the same embedded model, the same LoRA settings and the same number of optimizer steps.

Tokens are the real (non-padding) tokens of the rows, counted the same way on both sides; only the
training loops are timed. The two sides alternate and each keeps its best run, so other load on the
machine disturbs both alike. `run()` prints a table and returns {"train_vs_plain_peft": ratio} (target >= 1.0).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from common import print_table, sized  # noqa: E402  (also sets offline mode)

ROWS = sized(24, 4)
REPEATS = sized(2, 1)
# augment/replay off: both sides train on exactly the same rows.
SETTINGS = dict(rank=16, alpha=32, learning_rate=1e-3, epochs=1, batch_size=sized(8, 2), max_seq_len=sized(512, 64), seed=0,
                augment=0, replay=0)


def bench_rows(n: int = ROWS, seed: int = 0) -> list[dict]:
    """Chat rows of mixed lengths (short facts to multi-sentence answers): padding matters, as in real data."""
    rng = random.Random(seed)
    topics = ["the billing page", "a refund", "the mobile app", "two-factor login", "the export button",
              "the weekly report", "a damaged parcel", "the API key"]
    rows = []
    for i in range(n):
        topic = rng.choice(topics)
        sentences = [f"Step {k + 1}: open {topic} settings and check option {rng.randint(1, 99)}."
                     for k in range(rng.choice([1, 1, 2, 4, 8]))]
        rows.append({"messages": [{"role": "system", "content": "You are a support assistant."},
                                  {"role": "user", "content": f"How do I fix {topic} (case {i})?"},
                                  {"role": "assistant", "content": " ".join(sentences)}], "split": "train"})
    return rows


def plain_peft_tokens_per_s(model_path: str, rows: list[dict]) -> tuple[float, int]:
    """The textbook loop: full-sequence labels masked to assistant tokens, batches in dataset order,
    padded to the longest row, HF's own loss (full [batch, seq, vocab] logits)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.engine.lm import collate, encode_chat
    from assistant.training.recipe import DEFAULT_TARGETS
    tok = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(SETTINGS["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=SETTINGS["rank"], lora_alpha=SETTINGS["alpha"],
                                             target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=SETTINGS["learning_rate"])
    examples = [encode_chat(tok, r["messages"], SETTINGS["max_seq_len"]) for r in rows]
    bs = SETTINGS["batch_size"]
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(examples), bs):
        input_ids, labels, mask = collate(examples[i:i + bs], tok.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(mask.sum())
    return tokens / (time.perf_counter() - t0), tokens


def ours_tokens_per_s(model_path: str, rows: list[dict]) -> tuple[float, int]:
    from assistant.training.recipe import TrainSettings, train_adapter
    with tempfile.TemporaryDirectory() as out:
        result = train_adapter(model_path, rows, Path(out) / "a", TrainSettings(**SETTINGS))
    return result.tokens_per_second, result.tokens


def run(base_model: str = "embedded") -> dict:
    from common import on_all_cores
    return on_all_cores(lambda: _run(base_model))   # training jobs run on all cores (assistant/engine/threads.py)


def _run(base_model: str) -> dict:
    import torch

    from assistant.engine.model import ensure_embedded
    from assistant.settings import default_cache_dir
    path = str(ensure_embedded(default_cache_dir(), verify=False)) if base_model == "embedded" else base_model
    rows = bench_rows()
    ours, plain = [], []
    for _ in range(REPEATS):
        ours.append(ours_tokens_per_s(path, rows))
        plain.append(plain_peft_tokens_per_s(path, rows))
    best_ours, best_plain = max(t for t, _ in ours), max(t for t, _ in plain)
    assert ours[0][1] == plain[0][1], "both sides must train on the same tokens"
    ratio = best_ours / best_plain
    label = "embedded model" if base_model == "embedded" else Path(path).name
    print_table(f"training: {len(rows)} rows, {ours[0][1]} tokens, {label}, "
                       f"{torch.get_num_threads()} threads", [
        ("ours tokens/s (runs)", ", ".join(f"{t:.0f}" for t, _ in ours)),
        ("plain PEFT tokens/s (runs)", ", ".join(f"{t:.0f}" for t, _ in plain)),
        ("train_vs_plain_peft", f"{ratio:.2f}  (target >= 1.0)"),
    ])
    return {"train_vs_plain_peft": round(ratio, 3)}


if __name__ == "__main__":
    import json
    print(json.dumps(run()))
