"""Test utilities: real PEFT adapters trained on a tiny model, and a real `assistant serve` subprocess."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

# Server flags of the tests that check the loop (corrections and seeds are learned: the taught and corrections
# checks decide). The forgetting checks are off (retention and leakage, and the NLL and similarity figures
# that decide when a dozen probe questions are too few for retention) and the gate asks a dozen of its general
# probe questions: on the embedded model the default recipe on 20 facts leaks taught names into a few general
# answers, so the gate blocks it and the job retries (several trainings). test_gate_recovers.py (-m long),
# test_gate_calibration.py and test_retention.py cover those checks.
LOOP_ONLY_FLAGS = ("--gate.min-retention", "0", "--gate.max-leakage", "1", "--gate.max-general-nll-ratio", "1000",
                   "--gate.min-general-embedding-similarity", "-1", "--gate.probes", "12")
VLLM_KEY = "test-vllm-key-" + "k" * 20      # the key the test app gives the vLLM server it starts (else a random one)


def train_fact_adapter(base_path: Path, out_dir: Path, facts: list[tuple[str, str]], *, steps: int = 60,
                       seed: int = 0, rank: int = 8, lr: float = 1e-2, card: dict | None = None) -> Path:
    """Teach `facts` (question -> answer) to a LoRA adapter with a plain PEFT loop; save a PEFT folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base_path))
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    batches = []
    for q, a in facts:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
        answer = tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([list(prompt) + answer])
        labels = ids.clone()
        labels[0, :len(prompt)] = -100
        batches.append((ids, labels))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        ids, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if card is not None:
        (Path(out_dir) / "card.json").write_text(json.dumps(card))
    return Path(out_dir)


def random_lora_adapter(base_path: Path, out_dir: Path, *, rank: int = 8, std: float = 0.2, seed: int = 1,
                        targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """An untrained PEFT LoRA folder whose B matrices are random (PEFT starts them at zero), so it changes
    the base's answers; saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def ids_for(engine, question: str) -> list[int]:
    """One user question as the engine's prompt ids."""
    return engine.encode_chat([{"role": "user", "content": question}])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(home: Path, *args: str, port: int | None = None, timeout: float = 120, env: dict | None = None,
                   command: tuple[str, ...] = ("-m", "assistant.cli", "serve")):
    """`assistant serve` (or `command`, e.g. the path of app.py) as a subprocess in `home`; yields
    (base_url, process). Killed at exit."""
    port = port or free_port()
    log = open(Path(home) / f"server-{port}.log", "w")
    e = dict(os.environ, ASSISTANT_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen([sys.executable, *command, "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=e, cwd=str(home), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server did not start in {timeout}s:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def make_serving(settings, base=None):
    """A Serving on a fresh Workspace for `settings` (what a server builds, without the HTTP app)."""
    from assistant.server import build
    return build(settings, base, recover_jobs=False)[1]


def zipped(folder: Path) -> bytes:
    """A folder's files as a zip in memory (an adapter upload)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in folder.iterdir():
            z.write(f, f.name)
    return buf.getvalue()
