"""Every benchmark runs: `benchmarks/run.py --smoke` takes each one's own code path on tiny sizes and must
exit 0 with every ratio it names in its last line, so a benchmark broken by a change fails the build
(their figures are measured by full runs, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from assistant.vllm.server import vllm_venv, vllm_venv_ready

ROOT = Path(__file__).resolve().parent.parent
SMOKE_TIMEOUT_S = 1800   # a few minutes on a quiet 2-core machine; generous for a busy one

# What each benchmark must report (the ratios README and the issues name).
RATIOS = {
    "engine": ("engine_vs_generate", "engine_vs_bandwidth_floor", "stream_vs_engine", "ttft_overhead_ms"),
    "adapters": ("adapter_select_vs_base_load", "adapter_load_vs_base_load", "adapter_decode_vs_base",
                 "mixed_vs_single_adapter", "concurrent_vs_serial"),
    "curation": ("dedup_cost_10k_vs_1k", "ann_recall", "insert_check_ms"),
    "embeddings": ("embed_texts_per_s",),
    "dedup": ("dedup_chosen_threshold", "dedup_test_precision", "dedup_test_recall", "dedup_test_facts_lost"),
    "training": ("train_vs_plain_peft",),
    "conversation": ("conversation_vs_flat_job", "padding_fraction", "conversation_peak_gb"),
    "eval": ("eval_vs_train_time",),
    "scheduling": ("oversubscribed_vs_fit", "oversubscribed_errors"),
    "structured": ("constrained_vs_free_decode",),
    "vllm": ("vllm_proxy_vs_direct", "vllm_ttft_overhead_ms"),
    "replicas": ("feedback_writes_2_replicas_vs_1", "activation_propagation_s"),
    "preference": ("preference_gain", "preference_general_nll_ratio"),
    "gate": ("gate_precision", "gate_recall", "one_click_good_rate"),
    "canary": ("canary_false_decision_rate", "canary_ratings_to_decision"),
}


def smoke(names: list[str], base_model: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = ["--base-model", base_model] if base_model else []
    try:
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--only", ",".join(names),
                            *base], capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:   # say which benchmark was still running
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"the smoke run took over {SMOKE_TIMEOUT_S} s:\n{out[-3000:]}") from None
    assert r.returncode == 0, f"a benchmark failed in smoke mode:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_local_benchmark_runs_in_smoke_mode(tiny_llama):
    # on request only: vllm (its own test below), replicas (PostgreSQL; the topology is tests/test_replicas.py)
    # and preference (trains twice on the embedded model: tests/test_bench_preference.py, the long tier).
    # Every one that loads a base model runs on the tiny Llama: smoke mode measures nothing, and loading,
    # training and decoding the embedded model was most of their time.
    names = [n for n in RATIOS if n not in ("vllm", "replicas", "preference")]
    ratios = smoke(names, base_model=str(tiny_llama))
    missing = {n: [k for k in RATIOS[n] if k not in ratios] for n in names}
    assert not any(missing.values()), f"ratios missing from the smoke run: {missing}"


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_benchmark_runs_in_smoke_mode():
    if not vllm_venv_ready():
        pytest.fail(f"vLLM is not installed in {vllm_venv()}: run `bash scripts/setup.sh --test` first")
    ratios = smoke(["vllm"])
    assert all(k in ratios for k in RATIOS["vllm"]), ratios


def test_smoke_mode_is_a_flag_of_the_runner():
    """The runner knows every benchmark the test checks, and says what smoke mode is."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    assert set(runner.BENCHES) == set(RATIOS), "a benchmark the smoke test does not check"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert "--smoke" in r.stdout
