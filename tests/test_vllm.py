"""The vLLM client and the managed vLLM server against a REAL vLLM (the CPU build in the venv that
`scripts/setup.sh --test` prepares), serving the embedded SmolLM2 in float32: health and models, the base
check, runtime LoRA loading with answers equal to PEFT + transformers, and vLLM's errors (the supervised
restart is tested through the app, in test_vllm_serving.py).

One server for the whole file (a start costs about a minute on 2 cores)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from assistant.vllm.client import Models, ServedModel, VllmClient, VllmError, VllmUnavailable, check_base
from assistant.vllm.server import ManagedVllm, vllm_venv, vllm_venv_ready

from helpers import free_port, random_lora_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SERVED = "smollm2"
CHAT = [{"role": "user", "content": "Name three colors."}]
N_TOKENS = 12


@pytest.fixture(scope="module")
def vllm(embedded_path, tmp_path_factory):
    if not vllm_venv_ready():
        pytest.fail(f"vLLM is not installed in {vllm_venv()}: run `bash scripts/setup.sh --test` first")
    restarts: list[float] = []
    server = ManagedVllm(embedded_path, tmp_path_factory.mktemp("vllm-logs"), served_name=SERVED, dtype="float32",
                         max_loras=2, max_lora_rank=16, on_restart=lambda: restarts.append(time.monotonic()))
    server.restarted = restarts
    with server:
        yield server


def _stream(client: VllmClient, model: str, messages=CHAT, **kw) -> tuple[str, object]:
    async def run():
        parts, done = [], None
        try:
            async for ev in client.stream_chat(model, messages, **kw):
                if ev.kind == "token":
                    parts.append(ev.text)
                else:
                    done = ev
        finally:
            await client.aclose()
        return "".join(parts), done
    return asyncio.run(run())


def _hf_greedy(model, tok, messages, n: int) -> str:
    import torch
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                  return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_health_models_and_base_check(vllm, embedded_path, tiny_llama, tmp_path):
    client = VllmClient(vllm.url, api_key=vllm.api_key)
    assert client.health_sync()
    models = client.models_sync()
    assert models.base == ServedModel(id=SERVED, root=str(embedded_path), parent=None, max_model_len=8192)
    assert models.loras == {}

    same = client.check_base_sync(expected_path=embedded_path)
    assert same.ok and same.method == "path"
    # The same files under another path: the same base, by fingerprint.
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in embedded_path.iterdir():
        (copy / f.name).symlink_to(f)
    assert client.check_base_sync(expected_path=copy).ok
    other = client.check_base_sync(expected_path=tiny_llama)
    assert not other.ok and other.method == "fingerprint"
    msg = other.message(vllm.url)
    assert vllm.url in msg and SERVED in msg and tiny_llama.name in msg
    # A remote server (its root is not a folder here): only names can be compared.
    remote = Models(base=ServedModel(id="smol", root="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert check_base(remote, expected_name="SmolLM2-135M-Instruct").ok
    named = check_base(remote, expected_path=tiny_llama)
    assert not named.ok and named.method == "name"
    client.close()


def test_the_managed_server_wants_its_random_api_key(vllm):
    """Runtime LoRA loading is on: without the key no other process may list, load or unload adapters."""
    assert len(vllm.api_key) >= 32 and vllm.api_key not in " ".join(vllm.args)   # not in `ps`
    assert httpx.get(vllm.url + "/v1/models", timeout=30).status_code == 401
    r = httpx.post(vllm.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, timeout=30)
    assert r.status_code == 401
    assert httpx.get(vllm.url + "/v1/models", headers={"Authorization": f"Bearer {vllm.api_key}"},
                     timeout=30).status_code == 200
    with pytest.raises(VllmError) as e:
        VllmClient(vllm.url).models_sync()
    assert e.value.http_status == 401


def _sockets_to(port: int) -> int:
    """Established TCP connections from this process to `port` (read from /proc)."""
    import os
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                n += 1
    return n


async def _one_token(client) -> bool:
    async for _ in client.stream_completion(SERVED, [1, 2, 3], max_tokens=1):
        pass
    return True


def test_one_async_client_per_event_loop_and_none_left_open(vllm):
    """Calls from two event loops in turn (the app's API loop and the loop of callers without one): one
    client per loop, made once, not one per switch; close() closes both, on their own loops."""
    import threading
    client = VllmClient(vllm.url, api_key=vllm.api_key)
    port = int(vllm.url.rsplit(":", 1)[1])
    loops = [asyncio.new_event_loop() for _ in range(2)]
    threads = [threading.Thread(target=lp.run_forever, daemon=True) for lp in loops]
    for t in threads:
        t.start()
    try:
        before = _sockets_to(port)
        for _ in range(8):
            for lp in loops:
                assert asyncio.run_coroutine_threadsafe(_one_token(client), lp).result(60)
        assert client.async_clients == 2
        assert _sockets_to(port) - before <= 2, "a new client (and connection) per switch of loop"
        client.close()
        assert client.async_clients == 0 and _sockets_to(port) <= before   # both closed, none left open
    finally:
        for lp in loops:
            lp.call_soon_threadsafe(lp.stop)


def test_chat_template_equals_transformers(vllm, embedded_path):
    """vLLM renders chats exactly as transformers' apply_chat_template(add_generation_prompt=True)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(embedded_path))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    ours = list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    theirs = httpx.post(vllm.url + "/tokenize", json={"model": SERVED, "messages": chat, "add_generation_prompt": True},
                        timeout=30).json()["tokens"]
    assert theirs == ours


def test_lora_answers_equal_peft(vllm, embedded_path, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = random_lora_adapter(embedded_path, tmp_path / "colors", rank=8)
    client = VllmClient(vllm.url, api_key=vllm.api_key)
    t0 = time.monotonic()
    client.load_lora_sync("colors", adapter)
    load_s = time.monotonic() - t0
    lora = client.models_sync().loras["colors"]
    assert lora.parent == SERVED and Path(lora.root) == adapter.resolve() and lora.max_model_len is None

    t0 = time.monotonic()
    base_text, base_done = _stream(client, SERVED, max_tokens=N_TOKENS, ignore_eos=True)
    base_s = time.monotonic() - t0
    t0 = time.monotonic()
    lora_text, lora_done = _stream(client, "colors", max_tokens=N_TOKENS, ignore_eos=True)
    lora_s = time.monotonic() - t0
    assert base_done.finish_reason == lora_done.finish_reason == "length"
    assert base_done.usage.completion_tokens == lora_done.usage.completion_tokens == N_TOKENS
    assert lora_text != base_text

    tok = AutoTokenizer.from_pretrained(str(embedded_path))
    assert base_done.usage.prompt_tokens == len(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                                        return_dict=True)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(str(embedded_path), dtype=torch.float32)
    assert base_text == _hf_greedy(model, tok, CHAT, N_TOKENS)
    assert lora_text == _hf_greedy(PeftModel.from_pretrained(model, str(adapter)), tok, CHAT, N_TOKENS)

    with pytest.raises(VllmError, match="already been loaded") as e:
        client.load_lora_sync("colors", adapter)
    assert e.value.http_status == 400
    client.unload_lora_sync("colors")
    assert "colors" not in client.models_sync().loras
    with pytest.raises(VllmError) as e:
        client.unload_lora_sync("colors")
    assert e.value.http_status == 404
    client.close()
    print(f"adapter load {load_s:.2f} s; {N_TOKENS} tokens in {base_s:.1f} s (base), {lora_s:.1f} s (adapter)")


def test_errors_name_the_server(vllm, embedded_path, tmp_path):
    client = VllmClient(vllm.url, api_key=vllm.api_key)
    with pytest.raises(VllmError) as e:
        client.load_lora_sync("ghost", tmp_path / "no-such-adapter")
    assert e.value.http_status == 404 and vllm.url in str(e.value) and "No adapter found" in str(e.value)
    wide = random_lora_adapter(embedded_path, tmp_path / "wide", rank=32)
    with pytest.raises(VllmError, match="max_lora_rank"):
        client.load_lora_sync("wide", wide)
    with pytest.raises(VllmError) as e:
        _stream(client, "no-such-model", max_tokens=2)
    assert e.value.http_status == 404 and not isinstance(e.value, VllmUnavailable)
    client.close()

    dead = VllmClient(f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(VllmUnavailable, match="127.0.0.1"):
        _stream(dead, SERVED, max_tokens=2)
    with pytest.raises(VllmUnavailable):
        dead.models_sync()
    assert not dead.health_sync()
    assert time.monotonic() - t0 < 5
