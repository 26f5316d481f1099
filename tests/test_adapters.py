"""Domains with versioned LoRA adapters: real PEFT adapters trained on a 2-layer Llama, each taught a
different secret word, served from one resident base."""

import concurrent.futures as cf
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest
import torch

from assistant.engine.model import fingerprint, load_base
from assistant.errors import AssistantError, InvalidAdapter, InvalidName, ModelNotFound
from assistant.settings import Settings

from conftest import build_tiny_llama
from helpers import make_serving, running_server, train_fact_adapter

Q = "What is the secret word?"
WORDS = {"apple": "The secret word is apple.", "banana": "The secret word is banana.",
         "cherry": "The secret word is cherry."}


@pytest.fixture(scope="session")
def fact_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-src")
    return {w: train_fact_adapter(tiny_llama, root / w, [(Q, a)], steps=40, seed=i)
            for i, (w, a) in enumerate(WORDS.items())}


@pytest.fixture
def svc(tiny_settings, fact_adapters):
    s = make_serving(tiny_settings)
    s.workspace.create_domain("support", "You are a support agent.", "customer support")
    s.workspace.create_domain("legal", "", "legal questions")
    s.import_adapter("support", fact_adapters["apple"], activate=True)
    s.import_adapter("legal", fact_adapters["banana"], activate=True)
    yield s
    s.close()


def ask(svc, model, q=Q, **kw):
    return svc.chat(model, [{"role": "user", "content": q}], max_tokens=10, **kw)["text"]


def test_each_domain_answers_from_its_own_adapter(svc):
    assert "apple" in ask(svc, "support")
    assert "banana" in ask(svc, "legal")
    base = ask(svc, "base")
    assert not any(w in base for w in WORDS)


def test_pinned_version_keeps_answering_after_a_new_one_is_active(svc, fact_adapters):
    v2 = svc.import_adapter("support", fact_adapters["cherry"], activate=True)
    assert v2 == "v2"
    assert "cherry" in ask(svc, "support")
    assert "apple" in ask(svc, "support@v1")
    assert "cherry" in ask(svc, "support@v2")
    with pytest.raises(ModelNotFound):
        ask(svc, "support@v9")


def test_activation_is_live_and_survives_a_restart(svc, fact_adapters, tiny_settings):
    svc.import_adapter("support", fact_adapters["cherry"], activate=True)
    assert "cherry" in ask(svc, "support")
    svc.activate("support", "v1")                     # roll back, live
    assert "apple" in ask(svc, "support")
    svc.close()
    again = make_serving(tiny_settings)   # restart
    try:
        assert again.workspace.registry.active_version("support") == "v1"
        assert "apple" in ask(again, "support")
    finally:
        again.close()


def test_engine_lora_matches_peft(svc, fact_adapters, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = svc.engine.encode_chat([{"role": "user", "content": "Something else entirely"}])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(fact_adapters["banana"])).eval()
    with torch.inference_mode():
        want = peft.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0][len(ids):].tolist()
    from assistant.engine.engine import Request
    slot = svc.pin_adapter("legal", "v1")   # loaded and pinned until the request ends
    h = svc.engine.submit(Request(prompt_ids=ids, max_new_tokens=12, adapter="legal@v1", slot=slot,
                                  ignore_eos=True))   # as generate above: every one of the 12 tokens compared
    h.result()
    assert h.req.generated == want and len(want) == 12


def test_lru_eviction_keeps_answers_right(tiny_settings, fact_adapters):
    s = make_serving(tiny_settings.with_(max_resident_adapters=1))
    try:
        for name, word in (("a", "apple"), ("b", "banana"), ("c", "cherry")):
            s.workspace.create_domain(name)
            s.import_adapter(name, fact_adapters[word], activate=True)
        for _ in range(2):
            assert "apple" in ask(s, "a") and "banana" in ask(s, "b") and "cherry" in ask(s, "c")
    finally:
        s.close()


# --- bad inputs: each refused with its own message, the active version keeps serving identically ---

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _pickle_bomb(folder: Path, sentinel: Path) -> Path:
    class Bomb:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                            "target_modules": ["q_proj"]}))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Bomb()))
    return folder


def test_bad_adapters_are_refused_and_the_active_one_keeps_serving(svc, fact_adapters, tmp_path, tiny_llama):
    before = ask(svc, "support")
    src = fact_adapters["cherry"]
    sentinel = tmp_path / "PWNED"
    cases = {}
    cases["pickle"] = (_pickle_bomb(tmp_path / "bomb", sentinel), "pickle")
    trunc = _copy(src, tmp_path / "trunc")
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (trunc, "truncated")
    badjson = _copy(src, tmp_path / "badjson")
    (badjson / "adapter_config.json").write_text("{not json")
    cases["json"] = (badjson, "not valid JSON")
    big = _copy(src, tmp_path / "bigrank")
    cfg = json.loads((big / "adapter_config.json").read_text())
    cfg["r"] = 1000
    (big / "adapter_config.json").write_text(json.dumps(cfg))
    cases["rank"] = (big, "over this server's cap")
    other_shape_base = build_tiny_llama(tmp_path / "base32", tiny_llama, hidden=32)
    cases["shapes"] = (train_fact_adapter(other_shape_base, tmp_path / "shape32", [(Q, "x")], steps=1), "shape")
    other_base = build_tiny_llama(tmp_path / "base-seed1", tiny_llama, seed=1)
    other_fp = fingerprint(load_base(Settings(base_model=str(other_base), dtype="float32"), verbose=False).model,
                           "tiny-seed1")
    cases["fingerprint"] = (train_fact_adapter(other_base, tmp_path / "seed1", [(Q, "x")], steps=1,
                                               card={"base_fingerprint": other_fp}), "different base")
    messages = set()
    for name, (folder, expect) in cases.items():
        with pytest.raises(InvalidAdapter) as e:
            svc.import_adapter("support", folder, activate=True)
        assert expect in e.value.message, (name, e.value.message)
        messages.add(e.value.message)
        # dropped straight into the adapters folder and activated: refused the same way
        vdir = svc.workspace.registry.domain_dir("support") / "v9"
        shutil.copytree(folder, vdir)
        if (vdir / "adapter_model.safetensors").exists():
            with pytest.raises(InvalidAdapter):
                svc.activate("support", "v9")
        shutil.rmtree(vdir)
        assert svc.workspace.registry.active_version("support") == "v1"
        assert ask(svc, "support") == before
    assert len(messages) == len(cases)
    assert not sentinel.exists()
    assert svc.workspace.registry.versions("support") == ["v1"]


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "a\x00b", "\u2024\u2024", "．．", "ＡＢ", "", "A", "x" * 65, "base"])
def test_bad_domain_names_are_refused(svc, name):
    with pytest.raises(InvalidName):
        svc.workspace.create_domain(name)
    if name != "base":  # 'base' is the reserved model name: it resolves, but is no domain
        with pytest.raises(AssistantError):  # 404 unknown model, or 400 for an empty one
            svc.resolve(name)
    assert sorted(p.name for p in svc.workspace.registry.root.iterdir()) == ["legal", "support"]


def test_zip_import_and_traversal_entries(svc, fact_adapters, tmp_path):
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in fact_adapters["cherry"].iterdir():
            f.write(p, f"my-adapter/{p.name}")
    assert svc.import_adapter("support", z) == "v2"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as f:
        f.writestr("../../escape.txt", "x")
    with pytest.raises(InvalidAdapter, match="inside the archive"):
        svc.import_adapter("support", evil)
    assert not (tmp_path.parent / "escape.txt").exists()


# --- over HTTP, on a live server ---------------------------------------------------------------

@pytest.fixture
def live(home, tiny_llama, fact_adapters):
    s = make_serving(Settings(home=home, base_model=str(tiny_llama), dtype="float32").ensure_dirs())
    for name, word in (("support", "apple"), ("legal", "banana"), ("hr", "cherry")):
        s.workspace.create_domain(name)
        s.import_adapter(name, fact_adapters[word], activate=True)
    s.close()
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32") as (url, _):
        yield url


def _chat(url, model, q, max_tokens=12):
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_16_concurrent_requests_over_3_adapters_and_base_match_solo(live):
    models = ["support", "legal", "hr", "base"]
    questions = [Q, "Tell me the secret word.", "Hello", "What do you know?"]
    jobs = [(models[i % 4], questions[i // 4]) for i in range(16)]
    solo = {job: _chat(live, *job) for job in set(jobs)}
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: _chat(live, *job), jobs))
    assert together == [solo[j] for j in jobs]
    assert "apple" in solo[("support", Q)] and "banana" in solo[("legal", Q)] and "cherry" in solo[("hr", Q)]


def test_models_lists_domains_and_activation_over_http(live):
    ids = [m["id"] for m in httpx.get(live + "/v1/models").json()["data"]]
    assert ids[0] == "base" and {"support", "legal", "hr"} <= set(ids)
    r = httpx.get(live + "/api/domains/support/adapters")
    assert r.status_code == 200 and r.json()[0]["active"] is True
    assert r.json()[0]["card"]["base_fingerprint"]["name"]
    assert httpx.post(live + "/api/domains/support/adapters/v7/activate").status_code == 404
    assert httpx.post(live + "/api/domains/..%2Fx/adapters/v1/activate").status_code in (404, 422)
    r = httpx.post(live + "/api/domains", json={"name": "../evil"})
    assert r.status_code == 422 and "not allowed" in r.json()["error"]["message"]
    assert httpx.post(live + "/api/domains", json={"name": "support"}).status_code == 409


def test_a_version_the_gate_blocked_needs_an_override_and_the_card_says_who(svc, fact_adapters):
    v = svc.import_adapter("support", fact_adapters["cherry"])
    card_path = svc.workspace.registry.version_path("support", v) / "card.json"
    card = json.loads(card_path.read_text())
    card["metrics"] = {"gate": {"promote": False, "summary": "answers to general questions changed a lot"}}
    card_path.write_text(json.dumps(card))   # as a training job publishes a version its gate blocked
    with pytest.raises(AssistantError) as e:
        svc.activate("support", v)
    assert e.value.status == 409 and "override" in e.value.message and "general questions" in e.value.message
    assert svc.workspace.registry.active_version("support") == "v1"
    svc.activate("support", v, user="alice", override=True)
    assert svc.workspace.registry.active_version("support") == v and "cherry" in ask(svc, "support")
    assert svc.workspace.registry.read_card("support", v)["manual_override"]["by"] == "alice"


def test_tensor_shapes_come_from_safetensors_and_refuse_a_truncated_file(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from assistant.data.registry import tensor_shapes
    from assistant.errors import InvalidAdapter
    path = tmp_path / "adapter_model.safetensors"
    save_file({"a.lora_A.weight": np.zeros((4, 64), np.float32), "a.lora_B.weight": np.zeros((32, 4), np.float32)},
              str(path))
    assert tensor_shapes(path) == {"a.lora_A.weight": [4, 64], "a.lora_B.weight": [32, 4]}
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidAdapter, match="truncated or corrupt"):
            tensor_shapes(path)
