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

    from assistant.training import TrainSettings, train_adapter

    settings = TrainSettings(**TINY)
    one = train_adapter(tiny_llama, _rows(), tmp_path / "one", settings)
    seen = []
    with caplog.at_level(logging.INFO, logger="assistant.ddp"):
        two = train_adapter(tiny_llama, _rows(), tmp_path / "two", settings, processes=2,
                            progress=lambda step, total, loss: seen.append((step, total, loss)))

    # two processes, neither of them this one, each trained on its share of the tokens
    pids = {int(pid) for pid in re.findall(r"of 2 \(pid (\d+), cpu\) trained on [1-9]\d* tokens", caplog.text)}
    assert len(pids) == 2 and os.getpid() not in pids, caplog.text
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

    from assistant.training import TrainingStopped, TrainSettings, train_adapter

    calls, ranks = [], []

    def stop() -> bool:
        calls.append(1)
        ranks[:] = [p for p in psutil.Process().children() if "assistant.ddp_rank" in p.cmdline()] or ranks
        return len(calls) > 3 and bool(ranks)   # once the ranks run

    with pytest.raises(TrainingStopped, match="stopped at step"):
        train_adapter(tiny_llama, _rows(), tmp_path / "a", TrainSettings(**TINY), should_stop=stop, processes=2)
    assert not (tmp_path / "a").exists()
    assert len(ranks) == 2 and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


def test_a_failed_rank_fails_the_run_with_its_message(tiny_llama, tmp_path, monkeypatch):
    from assistant.errors import RankFailed
    from assistant.training import TrainSettings, train_adapter

    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "__init__.py").write_text("raise ImportError('accelerate is broken here')\n")
    with pytest.raises(RankFailed, match=r"process \d of 2 ended with exit code 1: .*accelerate is broken here"):
        train_adapter(tiny_llama, _rows(), tmp_path / "a", TrainSettings(**TINY), processes=2)
    assert not (tmp_path / "a").exists()


def test_train_device_and_train_gpus_reach_the_job_and_the_cli(tiny_llama, tmp_path):
    from assistant.cli import build_parser
    from assistant.flags import settings_from
    from assistant.job_process import _settings_from_json, _settings_json
    from assistant.settings import Settings
    from assistant.training import training_base_settings

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

    from assistant import jobs
    from assistant.registry import Registry
    from assistant.store import Store
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
    ranks = [p for p in psutil.Process(pid).children() if "assistant.ddp_rank" in p.cmdline()]
    assert len(ranks) == 2 and {os.getpgid(p.pid) for p in ranks} == {pid}     # in the job's process group
    assert jobs.cancel_job(settings, store, job_id)["status"] == "cancelled"
    psutil.wait_procs(ranks, timeout=10)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    assert registry.versions("atlas") == ["v1"]
    assert not list((settings.adapters_path / "atlas").glob(".staging-*"))   # the ranks' work folder with it
