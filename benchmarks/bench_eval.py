"""Evaluation vs training time of one retraining job on the embedded model: the train stage
(`train_adapter`, default settings) and the evaluate stage (`evaluation.evaluate_adapter`: base and
adapter answers through the serving engine, the losses, the MiniLM similarity) on the same rows, measured
in the same run, as a job runs them (all cores). Target: `eval_vs_train_time` <= 0.25."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
from common import on_all_cores, print_table, sized  # noqa: E402  (also sets offline mode)

N_FACTS = sized(10, 2)       # a new user's first retrain: ten taught facts, one of them a correction
SMOKE_TRAIN = {"epochs": 1, "replay": 0, "augment": 0, "max_seq_len": 128}   # smoke: one short pass


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return ",".join(f for f in ("avx512_bf16", "avx2") if f" {f}" in text) or "neither avx512_bf16 nor avx2"


def _run(base_model: str) -> dict:
    from assistant.engine.model import ensure_embedded
    from assistant.gate import evaluation
    from assistant.gate.verdict import GateSettings
    from assistant.settings import Settings, default_cache_dir
    from assistant.training.recipe import TrainSettings, _load, train_adapter

    from invented_facts import FACTS, SYSTEM_PROMPT, chat
    path = ensure_embedded(default_cache_dir(), verify=False) if base_model == "embedded" else base_model
    base = _load(Settings(base_model=str(path)))
    rows = [{"messages": chat(q, a), "split": "train", "source": "seed", "feedback_ids": []}
            for q, a, _, _ in FACTS[:N_FACTS]]
    rows[0] = {**rows[0], "source": "correction", "feedback_ids": [1]}
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = train_adapter(base, rows, Path(out) / "a", TrainSettings(**sized({}, SMOKE_TRAIN)))
        train_s = time.perf_counter() - t0
        result.model.unload()
        base.model.eval()
        t0 = time.perf_counter()
        gate = GateSettings(max_new_tokens=sized(GateSettings().max_new_tokens, 4),
                            probe_max_new_tokens=sized(GateSettings().probe_max_new_tokens, 4),
                            probes=sized(0, 8))
        before, after = evaluation.evaluate_adapter(base, Path(out) / "a", rows, gate, system_prompt=SYSTEM_PROMPT)
        eval_s = time.perf_counter() - t0
    verdict = evaluation.verdict(before, after, gate)
    ratio = eval_s / train_s
    label = "embedded model" if base_model == "embedded" else Path(path).name
    print_table(f"one job, {N_FACTS} facts, {label}, CPU flags: {cpu_flags()}", [
        ("train stage s (loop s)", f"{train_s:.1f} ({result.seconds:.1f}), {result.steps} steps"),
        ("evaluate stage s (generation s)", f"{eval_s:.1f} ({after['generate_seconds']:.1f})"),
        ("gate", f"{'pass' if verdict['promote'] else 'blocked'}: {verdict['summary']}"),
        ("eval_vs_train_time", f"{ratio:.3f}  (target <= 0.25)"),
    ])
    return {"eval_vs_train_time": round(ratio, 3)}


def run(base_model: str = "embedded") -> dict:
    return on_all_cores(lambda: _run(base_model))    # a job's child process uses all cores (assistant/engine/threads.py)


if __name__ == "__main__":
    import json
    print(json.dumps(run()))
