"""Data-parallel training (--train-gpus N) on CPU: the recipe trained by 2 processes (gloo, through accelerate)
gives the adapter one process gives on the same batches; stopping kills the ranks and saves nothing; the
settings reach the job's process and the CLI."""

from __future__ import annotations

import logging
import os
import re

import pytest

from invented_facts import FACTS, chat

JOB_TIMEOUT = 300
# 7 rows in batches of 3: batches of 3, 3 and 1 rows, so the ranks' shares hold different numbers of
# tokens, and in the last batch rank 1 has no row at all.
TINY = dict(rank=4, alpha=8, learning_rate=2e-2, epochs=3, batch_size=3, max_seq_len=128, augment=0, replay=0)


def _rows(n=7):
    return [{"messages": chat(q, a), "split": "train"} for q, a, _, _ in FACTS[:n]]


@pytest.mark.slow   # two training processes, each importing peft: 15-35 s here
def test_two_processes_train_the_adapter_one_process_trains(tiny_llama, tmp_path, caplog):
    import torch
    from safetensors.torch import load_file

    from assistant.training.recipe import TrainSettings, train_adapter

    settings = TrainSettings(**TINY)
    one = train_adapter(tiny_llama, _rows(), tmp_path / "one", settings)
    seen = []
    with caplog.at_level(logging.INFO, logger="assistant.training.ddp"):
        two = train_adapter(tiny_llama, _rows(), tmp_path / "two", settings, processes=2,
                            progress=lambda step, total, loss: seen.append((step, total, loss)))

    # two processes, neither of them this one, each trained on its share of the tokens
    pids = {int(pid) for pid in re.findall(r"of 2 \(pid (\d+), cpu\) trained on [1-9]\d* tokens", caplog.text)}
    assert len(pids) == 2 and os.getpid() not in pids, caplog.text
    assert len(set(re.findall(r"its LoRA weights: (\w+)", caplog.text))) == 1     # the same on both ranks
    assert two.world_size == 2 and two.summary()["world_size"] == 2 and "world_size" not in one.summary()
    # rank 0's progress arrives here, every step; the loss goes down
    assert [s for s, _, _ in seen] == list(range(1, two.steps + 1)) == list(range(1, 3 * 3 + 1))
    assert two.losses == [loss for _, _, loss in seen] and two.losses[-1] < two.losses[0] * 0.9
    # the same batches: the same token counts, the same losses and the same weights as one process
    assert (two.tokens, two.label_tokens) == (one.tokens, one.label_tokens)
    assert max(abs(a - b) for a, b in zip(one.losses, two.losses)) < 1e-4, (one.losses, two.losses)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    w1, w2 = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("one", "two"))
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4
    assert max(float(w2[k].abs().max()) for k in w2 if "lora_B" in k) > 1e-2     # B moved from zero
    # the result's model is the trained adapter on this process's base
    trained = {k: v for k, v in two.model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(trained[k.replace(".weight", ".default.weight")], w2[k]) for k in w2)


def test_stopping_two_processes_kills_them_and_saves_nothing(tiny_llama, tmp_path):
    import psutil

    from assistant.training.recipe import TrainingStopped, TrainSettings, train_adapter

    calls, ranks = [], []

    def stop() -> bool:
        calls.append(1)
        ranks[:] = [p for p in psutil.Process().children() if "assistant.training.ddp_rank" in p.cmdline()] or ranks
        return len(calls) > 3 and bool(ranks)   # once the ranks run

    with pytest.raises(TrainingStopped, match="stopped at step"):
        train_adapter(tiny_llama, _rows(), tmp_path / "a", TrainSettings(**TINY), should_stop=stop, processes=2)
    assert not (tmp_path / "a").exists()
    assert len(ranks) == 2 and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


def test_a_failed_rank_fails_the_run_with_its_message(tiny_llama, tmp_path, monkeypatch):
    from assistant.errors import RankFailed
    from assistant.training.recipe import TrainSettings, train_adapter

    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "__init__.py").write_text("raise ImportError('accelerate is broken here')\n")
    with pytest.raises(RankFailed, match=r"process \d of 2 ended with exit code 1: .*accelerate is broken here"):
        train_adapter(tiny_llama, _rows(), tmp_path / "a", TrainSettings(**TINY), processes=2)
    assert not (tmp_path / "a").exists()


def test_train_device_and_train_gpus_reach_the_job_and_the_cli(tiny_llama, tmp_path):
    from assistant.cli import build_parser
    from assistant.flags import settings_from
    from assistant.jobs.process import _settings_from_json, _settings_json
    from assistant.settings import Settings
    from assistant.training.recipe import training_base_settings

    settings = Settings(home=tmp_path, base_model=str(tiny_llama), device="cpu", train_device="cuda:1", train_gpus=2)
    back = _settings_from_json(_settings_json(settings))
    assert (back.train_device, back.train_gpus, back.device) == ("cuda:1", 2, "cpu")
    default = _settings_from_json(_settings_json(Settings(home=tmp_path)))
    assert (default.train_device, default.train_gpus) == (None, 1)
    assert training_base_settings(Settings(home=tmp_path, device="cpu", train_device="cpu")).device == "cpu"
    with pytest.raises(ValueError, match="train_gpus"):
        Settings(train_gpus=0)
    for cmd in ("serve", "train"):
        args = build_parser().parse_args([cmd, "--train-device", "cuda:1", "--train-gpus", "2"]
                                         + (["d"] if cmd == "train" else []))
        s = settings_from(args)
        assert (s.train_device, s.train_gpus) == ("cuda:1", 2)


@pytest.mark.slow   # two jobs, each a child process starting two ranks: over a minute here
def test_a_two_process_job_publishes_and_cancel_kills_its_ranks(tiny_settings):
    import time

    import psutil

    from assistant.data.registry import Registry
    from assistant.data.store import Store
    from assistant.jobs import run as jobs
    settings = tiny_settings.with_(train_gpus=2)
    store, registry = Store(settings.db_path), Registry(settings.adapters_path)
    registry.create_domain("atlas", "", "invented facts")
    store.add_examples("atlas", [{"messages": chat(q, a)} for q, a, _, _ in FACTS])

    def wait(job_id, until):
        deadline = time.monotonic() + JOB_TIMEOUT
        while store.get_job(job_id)["status"] not in until and time.monotonic() < deadline:
            time.sleep(0.1)
        return store.get_job(job_id)

    fast = {**TINY, "epochs": 1, "batch_size": 4}
    job = wait(jobs.start_job(settings, store, registry, "atlas", fast), ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", (job["error"], job["log"])
    assert "training in 2 processes" in job["log"] and job["metrics"]["train"]["world_size"] == 2
    assert job["step"] == job["total_steps"] == len(job["losses"]) > 0 and job["adapter_version"] == "v1"

    job_id = jobs.start_job(settings, store, registry, "atlas", {**fast, "epochs": 50})
    deadline = time.monotonic() + JOB_TIMEOUT
    while store.get_job(job_id)["step"] < 1 and store.get_job(job_id)["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, store.get_job(job_id)
        time.sleep(0.1)
    pid = store.get_job(job_id)["pid"]
    ranks = [p for p in psutil.Process(pid).children() if "assistant.training.ddp_rank" in p.cmdline()]
    assert len(ranks) == 2 and {os.getpgid(p.pid) for p in ranks} == {pid}     # in the job's process group
    assert jobs.cancel_job(settings, store, job_id)["status"] == "cancelled"
    psutil.wait_procs(ranks, timeout=10)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    assert registry.versions("atlas") == ["v1"]
    assert not list((settings.adapters_path / "atlas").glob(".staging-*"))   # the ranks' work folder with it


def _preference_plan(methods):
    """Corrections as DPO pairs, short answers liked and overlong ones disliked as KTO rows."""
    from assistant.data.preference import PreferenceData
    from assistant.training.preference import PreferencePlan
    long = " It is a fact that many people have asked about over the years, in many places and at many times."
    pairs = [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": "I am not sure, sorry." + long,
              "split": "train"} for q, a, _, _ in FACTS[:8]]
    kto = [{"prompt": [{"role": "user", "content": p}], "completion": a + (long if i % 2 else ""),
            "label": not i % 2, "split": "train"} for i, (_, a, _, p) in enumerate(FACTS[:12])]
    counts = {"up": 6, "down": 6, "pairs": 8, "rated_pairs": 0}
    return PreferencePlan(PreferenceData(pairs=pairs, kto=kto, counts=counts), methods)


def _logp(model, tok, prompt: str, answer: str) -> float:
    """log p(answer | prompt) under `model`: the chat template's assistant turn, summed."""
    import torch
    msgs = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(head + answer, add_special_tokens=False, return_tensors="pt").input_ids
    n = len(tok(head, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return float(logits[n - 1:].gather(-1, ids[0, n:, None]).sum())


@pytest.mark.slow   # SFT, then DPO and KTO through trl, in two gloo processes: about a minute here
def test_two_processes_run_the_preference_phases(tiny_llama, tmp_path, caplog):
    from assistant.training.recipe import TrainSettings, train_adapter

    settings = TrainSettings(**{**TINY, "batch_size": 4, "epochs": 1, "preference_epochs": 2,
                                "preference_learning_rate": 5e-3})
    plan = _preference_plan(["sft", "dpo", "kto"])
    sft = train_adapter(tiny_llama, _rows(), tmp_path / "sft", settings)
    seen = []
    with caplog.at_level(logging.INFO, logger="assistant.training.ddp"):
        two = train_adapter(tiny_llama, _rows(), tmp_path / "two", settings, processes=2, preference=plan,
                            progress=lambda step, total, loss: seen.append((step, total, loss)))
    assert len(set(re.findall(r"of 2 \(pid (\d+), cpu\)", caplog.text))) == 2, caplog.text
    # the gradients were shared: both ranks ended with the same weights, DPO and KTO included
    assert len(set(re.findall(r"its LoRA weights: (\w+)", caplog.text))) == 1, caplog.text
    # one progress line per step, SFT's then DPO's then KTO's, against one total known from the start
    assert [s for s, _, _ in seen] == list(range(1, two.steps + 1)) and {t for _, t, _ in seen} == {two.steps}
    assert two.methods == ["sft", "dpo", "kto"] and two.world_size == 2
    assert [(p["method"], p["processes"], p["steps"]) for p in plan.phases] == [
        ("dpo", 2, plan.phase_steps("dpo", settings, 2)), ("kto", 2, plan.phase_steps("kto", settings, 2))]
    assert two.steps == sft.steps + plan.steps(settings, 2) and len(two.losses) == two.steps
    # each process took 2 of every 4 rows: the same steps as one process with the whole batch
    assert plan.batch_size("dpo", settings, 2) == 2 and plan.steps(settings, 2) == plan.steps(settings, 1)
    # what the preference phases taught: on the rated rows, liked answers gained on disliked ones
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))

    def margin(folder):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(folder)).eval()
        return sum(_logp(model, tok, r["prompt"][0]["content"], r["completion"]) * (1 if r["label"] else -1)
                   for r in plan.data.kto) / len(plan.data.kto)
    assert margin(tmp_path / "two") > margin(tmp_path / "sft") + 1.0
