"""The preference benchmark's small version on the embedded model: thumbs from a fixed length rule, SFT only
against the preference method the ratings support, both trained through the app's data path. It checks that
the run measures what it says (both numbers present, the method chosen from the data, forgetting within the
gate's bound); the gain target itself is the full benchmark's (benchmarks/bench_preference.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.slow
@pytest.mark.long   # samples, rates and trains twice on the embedded model: three to four minutes on 2 cores
def test_small_preference_benchmark(embedded_path, capsys):
    import bench_preference
    out = bench_preference._run(small=True, seed=0)
    printed = capsys.readouterr().out
    assert out["preference_methods"] == "sft+kto", printed        # thumbs only: SFT + KTO, no DPO
    assert -1.0 <= out["preference_gain"] <= 1.0 and "preference_gain" in printed and "CPU flags" in printed
    assert out["preference_general_nll_ratio"] <= 2.0, printed     # the gate's forgetting bound
    assert bench_preference.liked("a short answer.") and not bench_preference.liked("word " * 41)
