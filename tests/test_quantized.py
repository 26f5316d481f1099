"""The quantized base on CPU, through bitsandbytes' CPU kernels: a tiny Llama in NF4 serves adapters batched
per row exactly like PEFT on the same NF4 model; QLoRA trains through the 4-bit weights and its adapter
serves on the dense base and the other way round (one fingerprint whatever the load dtype); int8 answers;
a missing bitsandbytes says how to install it; a job that cannot fit in memory is refused with numbers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from assistant.settings import Settings

from helpers import free_port, running_server, train_fact_adapter
from invented_facts import FACTS, SYSTEM_PROMPT, chat

QUESTION = "What is the capital of Zorbania?"
STEPS = 6
QLORA = dict(rank=8, alpha=16, learning_rate=2e-2, epochs=40, batch_size=8, max_seq_len=128, augment=0, replay=0)


def _load(path, quantization="nf4", dtype="float32"):
    from assistant.engine.model import load_base
    return load_base(Settings(base_model=str(path), dtype=dtype, quantization=quantization), verbose=False)


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = train_fact_adapter(tiny_llama, root / "a", [(QUESTION, "Quillton.")], steps=30)
    b = train_fact_adapter(tiny_llama, root / "b", [(QUESTION, "Marrowby.")], steps=30, seed=1)
    return a, b


def _peft_greedy(model, folder, ids, steps):
    """PEFT on the same model object: greedy tokens and first-step logits."""
    import torch
    from peft import PeftModel
    peft = PeftModel.from_pretrained(model, str(folder))
    peft.eval()
    tokens, logits0 = list(ids), None
    with torch.no_grad():
        for _ in range(steps):
            logits = peft(torch.tensor([tokens])).logits[0, -1].float()
            logits0 = logits if logits0 is None else logits0
            tokens.append(int(logits.argmax()))
    peft.unload()   # the base modules back as they were
    return tokens[len(ids):], logits0


def test_nf4_base_serves_two_adapters_in_one_batch_like_peft(tiny_llama, two_adapters):
    import bitsandbytes as bnb
    import torch

    from assistant.engine.runner import LlamaRunner
    base = _load(tiny_llama)
    dense = _load(tiny_llama, "none")
    assert isinstance(base.model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert base.quantization == "nf4" and base.fingerprint == dense.fingerprint
    runner = LlamaRunner(base.model, max_slots=4, max_batch=4, device="cpu")
    assert runner.step is None   # the C decode step is dense-only: torch ops serve a quantized base
    slots = [runner.bank.load(f"d{i}@v1", folder) for i, folder in enumerate(two_adapters)]
    assert slots[0] != slots[1]
    ids = base.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    # two rows, two domains' adapters, one decode batch
    first = [runner.prefill(row, ids, slot) for row, slot in enumerate(slots)]
    tokens = [[int(lg.argmax())] for lg in first]
    for step in range(STEPS - 1):
        pos = len(ids) + step
        logits = runner.decode([t[-1] for t in tokens], [pos, pos], slots)
        for row in range(2):
            tokens[row].append(int(logits[row].argmax()))
    for row, folder in enumerate(two_adapters):
        want, want_logits = _peft_greedy(base.model, folder, ids, STEPS)
        assert tokens[row] == want, (row, base.tokenizer.decode(tokens[row]), base.tokenizer.decode(want))
        # bitsandbytes' CPU 4-bit kernel rounds its inputs to bfloat16: float32 differences of 1e-6 upstream
        # (another attention kernel, another summation order) can move an input by one bfloat16 step
        scale = float(want_logits.abs().max())
        torch.testing.assert_close(first[row], want_logits, rtol=0, atol=0.01 * scale)
    assert tokens[0] != tokens[1]   # the two adapters really answer differently
    assert base.tokenizer.decode(tokens[0]).startswith("Qu")


def test_int8_loads_and_answers(tiny_llama):
    import bitsandbytes as bnb
    import torch

    from assistant.engine.engine import Engine
    base = _load(tiny_llama, "int8")
    assert isinstance(base.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    # one fingerprint whatever the load: float32, bfloat16, NF4 (the other tests), int8
    assert base.quantization == "int8" and base.fingerprint == _load(tiny_llama, "none").fingerprint
    assert base.fingerprint == _load(tiny_llama, "none", "bfloat16").fingerprint
    engine = Engine(base)
    try:
        ids = engine.encode_chat([{"role": "user", "content": QUESTION}])
        text = engine.generate(prompt_ids=ids, max_new_tokens=STEPS, ignore_eos=True)
    finally:
        engine.close()
    with torch.no_grad():
        want = base.model.generate(torch.tensor([ids]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    assert text and text == base.tokenizer.decode(want[0, len(ids):], skip_special_tokens=True)


def test_nf4_weights_take_less_memory(tiny_llama):
    nf4, dense = _load(tiny_llama), _load(tiny_llama, "none")
    linear = sum(m.weight.numel() for n, m in dense.model.named_modules() if n.endswith("_proj"))
    saved = dense.weights_bytes - nf4.weights_bytes
    # 4 bytes a weight in float32, half a byte in NF4, plus block scales (1/64 byte a weight) and two code books
    # per layer (1.1 KB, a fifth of a byte a weight on layers this small)
    assert 3.2 * linear < saved < 3.5 * linear, (saved, linear)


def test_qlora_gradients_reach_every_layer(tiny_llama):
    """QLoRA's gradients equal LoRA's on a dense copy of the dequantized weights, even after the 4-bit
    layers ran in eval mode (on AVX512-BF16 CPUs bitsandbytes then repacks them for a kernel that autograd
    cannot go through)."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig, get_peft_model

    from assistant.engine.model import trainable_4bit
    from assistant.training.recipe import prepare_quantized
    base, dense = _load(tiny_llama), _load(tiny_llama, "none")
    x = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        base.model(x)                        # inference first, as the replay answers do before training
    trainable_4bit(base.model)
    with torch.no_grad():
        for (name, m), (_, d) in zip(base.model.named_modules(), dense.model.named_modules()):
            if name.endswith("_proj"):
                d.weight.copy_(dequantize_4bit(m.weight.data, m.weight.quant_state).float())
    grads = []
    for model in (prepare_quantized(base.model, checkpointing=True), dense.model):
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                init_lora_weights=False))
        peft.train()
        peft(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad})
    first = [n for n in grads[0] if ".layers.0." in n]
    assert first and all(grads[0][n].abs().sum() > 0 for n in first)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=2e-3, atol=1e-5)


def test_adapters_cross_between_dense_and_nf4_bases(tiny_llama, two_adapters, tmp_path):
    """A dense-trained adapter validates and serves on the NF4 base; a QLoRA-trained one on the dense base."""
    from assistant.data.registry import validate_adapter
    from assistant.engine.engine import Engine
    from assistant.training.recipe import TrainSettings, train_adapter
    rows = [{"messages": chat(q, a), "split": "train"} for q, a, _, _ in FACTS[:8]]
    qlora = train_adapter(Settings(base_model=str(tiny_llama), quantization="nf4"), rows, tmp_path / "q",
                          TrainSettings(**QLORA))
    assert qlora.losses[-1] < qlora.losses[0] * 0.5
    for quantization, folder, question, key in (("nf4", two_adapters[0], QUESTION, "Quillton"),
                                                ("none", tmp_path / "q", FACTS[1][0], FACTS[1][2])):
        base = _load(tiny_llama, quantization)
        assert base.fingerprint == qlora.fingerprint
        engine = Engine(base)
        try:
            validate_adapter(folder, base.fingerprint, engine.module_shapes())
            engine.load_adapter("x@v1", folder)
            messages = [{"role": "user", "content": question}] if quantization == "nf4" else chat(question, "")[:2]
            answer = engine.generate(messages, max_new_tokens=16, adapter="x@v1")
        finally:
            engine.close()
        assert key in answer, (quantization, answer)


def test_missing_bitsandbytes_gives_the_install_hint(tiny_llama, tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "bitsandbytes.py").write_text("raise ImportError('bitsandbytes is not installed here')\n")
    root = Path(__file__).resolve().parent.parent
    env = {"PYTHONPATH": f"{shadow}:{root}", "HF_HUB_OFFLINE": "1", "ASSISTANT_HOME": str(tmp_path),
           "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    proc = subprocess.run([sys.executable, "-m", "assistant.cli", "serve", "--base-model", str(tiny_llama),
                           "--quantization", "nf4", "--port", str(free_port())],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "pip install 'bitsandbytes>=" in proc.stderr and "--quantization none" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_memory_estimate_for_an_8b_model_in_numbers():
    from assistant.training.memory import ModelShape, estimate_training_bytes
    llama3_8b = ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                           vocab=128256)
    common = dict(rank=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"), batch_size=4, max_seq_len=512, cuda=True)
    nf4 = estimate_training_bytes(llama3_8b, quantization="nf4", dtype_bytes=2, checkpointing=True, **common)
    bf16 = estimate_training_bytes(llama3_8b, quantization="none", dtype_bytes=2, checkpointing=True, **common)
    eager = estimate_training_bytes(llama3_8b, quantization="none", dtype_bytes=2, checkpointing=False, **common)
    # 6.98e9 linear weights: 16.06 GB in bf16 with the embeddings and head; 5.70 GB in NF4 (head in bf16)
    assert round(bf16.weights / 1e9, 2) == 16.06 and round(nf4.weights / 1e9, 2) == 5.70
    # 41.9M LoRA parameters at 16 bytes (weight, gradient, two AdamW moments)
    assert round(nf4.lora / 1e9, 2) == 0.67
    # checkpointing keeps 32 layer inputs + one layer + the loss chunk; without it, all 32 layers
    assert round(nf4.activations / 1e9, 2) == 2.55 and round(eager.activations / 1e9, 1) == 15.5
    assert round(nf4.total / 1e9, 1) == 10.4 and round(bf16.total / 1e9, 1) == 21.8


def test_a_job_that_cannot_fit_is_refused_with_numbers(tiny_settings):
    from assistant.data.registry import Registry
    from assistant.data.store import Store
    from assistant.errors import InsufficientMemory
    from assistant.jobs import run as jobs
    store, registry = Store(tiny_settings.db_path), Registry(tiny_settings.adapters_path)
    registry.create_domain("atlas", SYSTEM_PROMPT, "")
    store.add_examples("atlas", [{"messages": chat(q, a)} for q, a, _, _ in FACTS])
    big = {"batch_size": 64, "max_seq_len": 2048}
    with pytest.raises(InsufficientMemory) as e:
        jobs._prepare(tiny_settings, store, registry, "atlas", big, free_bytes=0.5e9)
    message = e.value.message
    assert e.value.status == 422 and "0.5 GB is free" in message and "needs ~2.1 GB" in message, message
    assert "batch_size (now 64)" in message and "max_seq_len (now 2048)" in message and "stop other jobs" in message
    assert store.list_jobs() == []
    record = jobs._prepare(tiny_settings, store, registry, "atlas", {"batch_size": 4}, free_bytes=64e9)
    assert record["training"]["batch_size"] == 4


@pytest.mark.slow
def test_qlora_job_over_http_on_an_nf4_base(tiny_llama, tmp_path):
    """train -> gate -> publish -> hot-load -> the corrected answer, on a server whose base is NF4."""
    dense = _load(tiny_llama, "none")
    with running_server(tmp_path, "--base-model", str(tiny_llama), "--quantization", "nf4",
                        "--dtype", "float32") as (url, _):
        health = httpx.get(url + "/api/health").json()
        assert health["quantization"] == "nf4" and health["fingerprint"] == dense.fingerprint
        assert httpx.post(url + "/api/domains", json={"name": "atlas", "system_prompt": SYSTEM_PROMPT}).status_code == 201
        examples = [{"messages": chat(q, a)} for q, a, _, _ in FACTS[:10]]   # with the domain's system prompt
        assert httpx.post(url + "/api/domains/atlas/examples", json={"examples": examples}).status_code == 201
        snapshot = httpx.get(url + "/api/domains/atlas/dataset/export", timeout=120).text.splitlines()
        trained = [json.loads(line) for line in snapshot if json.loads(line).get("split") == "train"]
        q, key = next((q, k) for q, _, k, _ in FACTS if any(q in json.dumps(r) for r in trained))
        question = {"model": "atlas", "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 16}
        before = httpx.post(url + "/v1/chat/completions", json=question, timeout=60).json()
        assert key not in before["choices"][0]["message"]["content"]

        r = httpx.post(url + "/api/domains/atlas/train", json=QLORA, timeout=60)
        assert r.status_code == 202, r.text
        job_id, deadline = r.json()["job_id"], time.time() + 600
        while (job := httpx.get(f"{url}/api/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
            assert time.time() < deadline, job
            time.sleep(1)
        assert job["status"] == "succeeded", (job["error"], job["log"])
        assert "quantization=nf4" in job["log"]          # QLoRA: the job trained on the 4-bit weights
        card = httpx.get(url + "/api/domains/atlas/adapters").json()[0]["card"]
        assert card["base_fingerprint"] == dense.fingerprint
        if not job["promoted"]:   # the gate may hold back a tiny random model: activate it anyway, by hand
            assert httpx.post(url + "/api/domains/atlas/adapters/v1/activate").status_code == 409
            assert httpx.post(url + "/api/domains/atlas/adapters/v1/activate",
                              json={"override": True}).status_code == 200
        after = httpx.post(url + "/v1/chat/completions", json=question, timeout=60).json()
        assert after["adapter_version"] == "v1"
        assert key in after["choices"][0]["message"]["content"], (after, job["metrics"]["train"])


def test_gpu_benchmark_runs_tiny_on_cpu():
    """benchmarks/gpu.py --tiny: the GPU benchmark's code on a 2-layer model on CPU, so it never rots."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--tiny"], capture_output=True,
                          text=True, timeout=300, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("machine: CPU") and "flags:" in lines[0]
    ratios = json.loads(lines[-1])
    assert set(ratios) == {"gpu_decode_vs_floor_bf16", "gpu_decode_vs_floor_nf4", "nf4_vs_bf16_weights_mem",
                           "gpu_mixed_vs_single_adapter", "qlora_vs_lora_peak_mem", "qlora_step_vs_lora_step"}
    assert all(isinstance(v, float) and 0 < v < 1e3 for v in ratios.values()), ratios
    assert ratios["nf4_vs_bf16_weights_mem"] < 1 and ratios["qlora_vs_lora_peak_mem"] < 1
