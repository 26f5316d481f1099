"""What the serving engine accepts is checked before work starts: a training job or an import past the
engine's LoRA rank or modules is refused with 422, naming the limit and the flag that raises it (the CLI,
and the Workspace method the API and the UI's form call). A version taken back keeps its number."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from assistant.errors import DatasetTooSmall, EngineLimit
from assistant.jobs.limits import check_adapter_folder, engine_limits
from assistant.settings import Settings

from helpers import random_lora_adapter


def test_training_past_the_engines_rank_or_modules_is_refused_before_it_starts(home):
    from assistant.workspace import Workspace
    ws = Workspace(Settings(home=home, engine="vllm"))     # the managed vLLM server: --max-lora-rank 64
    ws.create_domain("ops")
    with pytest.raises(EngineLimit) as e:
        ws.start_training("ops", {"rank": 128})
    assert e.value.status == 422 and "rank 128" in e.value.message and "at most rank 64" in e.value.message
    assert "--vllm-max-lora-rank" in e.value.message and e.value.param == "rank"
    with pytest.raises(EngineLimit, match="lm_head") as e:
        ws.start_training("ops", {"target_modules": ["q_proj", "lm_head"]})
    assert e.value.param == "target_modules"
    assert ws.store.list_jobs() == []
    raised = Workspace(Settings(home=home, engine="vllm", vllm_max_lora_rank=128))
    with pytest.raises(DatasetTooSmall):            # past the limit check: the next check speaks
        raised.start_training("ops", {"rank": 128})
    external = engine_limits(Settings(home=home, engine="vllm", vllm_url=("http://gpu1:8000",)))
    assert external.max_rank == 16 and "--vllm-max-lora-rank" in external.rank_flag   # vLLM's default
    assert engine_limits(Settings(home=home)).max_rank == 256


def test_an_import_past_the_engines_rank_is_refused(tiny_llama, tmp_path):
    wide = random_lora_adapter(tiny_llama, tmp_path / "wide", rank=32)
    check_adapter_folder(engine_limits(Settings(home=tmp_path, engine="vllm")), wide)      # 64 holds 32
    with pytest.raises(EngineLimit, match="rank 32.*at most rank 16.*--vllm-max-lora-rank"):
        check_adapter_folder(engine_limits(Settings(home=tmp_path, engine="vllm", vllm_url=("http://x:1",))), wide)


def test_the_cli_refuses_naming_the_flag(home):
    env = dict(os.environ, ASSISTANT_HOME=str(home), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "assistant.cli", "adapters", "create", "ops"], env=env, cwd=home,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "assistant.cli", "train", "ops", "--engine", "vllm", "--train.rank", "128"],
                       env=env, cwd=home, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--vllm-max-lora-rank" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    # the API's 422 is tested against a real vLLM server (test_vllm_serving.py)


def test_a_retired_version_keeps_its_number(tmp_path, tiny_llama):
    from assistant.data.registry import Registry
    adapter = random_lora_adapter(tiny_llama, tmp_path / "a", rank=4)
    reg = Registry(tmp_path / "adapters")
    reg.create_domain("ops", "", "")
    from assistant.engine.model import load_base
    base = load_base(Settings(home=tmp_path, base_model=str(tiny_llama), dtype="float32"))
    shapes = {n.removesuffix(".base_layer"): (m.in_features, m.out_features)
              for n, m in base.model.named_modules() if type(m).__name__ == "Linear"}
    assert reg.import_folder("ops", adapter, base.fingerprint, shapes) == "v1"
    reg.retire("ops", "v1")
    assert reg.versions("ops") == []
    assert reg.import_folder("ops", adapter, base.fingerprint, shapes) == "v2"   # v1 is never given again
