"""Shared pieces of the benchmarks: timing helpers, memory bandwidth, the embedded base, and the smoke mode.

Smoke mode (`run.py --smoke`, or BENCH_SMOKE=1): every benchmark runs its own code path on tiny sizes, in
seconds, so that a broken benchmark fails the build (tests/test_benchmarks.py). Its figures mean nothing."""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from assistant.engine.threads import defaults, on_all_cores  # noqa: E402 - after the sys.path line above

defaults()   # before torch: the CPU thread policy the CLI applies (assistant/engine/threads.py)

LONG_PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to paint."}]


def sized(full, smoke):
    """`full` in a real run, `smoke` in smoke mode (the same code path on tiny sizes)."""
    return smoke if SMOKE else full


def best_of(fn, repeat: int = 3) -> float:
    """The fastest of `repeat` runs (seconds): the least disturbed by other load on the machine."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def median(xs):
    return statistics.median(xs)


def copy_bandwidth(nbytes: int = 512 << 20, repeat: int = 5) -> float:
    """Bytes copied per second between two touched buffers (memcpy-style, N/t), on all cores."""
    def measure():
        import torch
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.zeros_like(src)
        dst.copy_(src)
        return nbytes / best_of(lambda: dst.copy_(src), repeat)
    return on_all_cores(measure)


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows) + 2
    print(f"\n{title}")
    print("-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}{v}")
