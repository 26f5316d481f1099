"""Run every benchmark (or `--only NAME,...`), print readable tables, and as the LAST line one JSON
object mapping each ratio named in the issues to its value. Both sides of every ratio are measured in
the same run, on the embedded model unless `--base-model` says otherwise."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
BENCHES = {
    "engine": "bench_engine",
    "adapters": "bench_adapters",
    "scheduling": "bench_scheduling",  # oversubscribed_vs_fit: 4 domains on 2 adapter slots / on 4
    "curation": "bench_curation",
    "embeddings": "bench_embeddings",  # sentence-transformers throughput (and its ONNX backend when installed)
    "dedup": "bench_dedup",          # merge precision / recall, calibration vs test set
    "training": "bench_training",
    "conversation": "bench_conversation",  # conversation_vs_flat_job: corrections in one chat vs one by one
    "eval": "bench_eval",            # eval_vs_train_time of one job
    "structured": "bench_structured",  # constrained_vs_free_decode: JSON-schema decoding vs free
    "vllm": "bench_vllm",            # the app in front of a vLLM server (--engine vllm)
    "replicas": "bench_replicas",    # two app replicas on one PostgreSQL: feedback writes, activation propagation
    "preference": "bench_preference",  # SFT-only vs preference tuning from thumbs: preference_gain (tens of minutes)
    "gate": "bench_gate",            # gate precision / recall and one-click good rate over a recipe grid (hours)
    "canary": "bench_canary",        # the canary rule on simulated ratings: false decisions (A/A), ratings to a verdict
}
ON_REQUEST = ("vllm", "replicas", "preference", "gate")   # these with --only: a vLLM server, PostgreSQL, or long
LOCAL = [name for name in BENCHES if name not in ON_REQUEST]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--base-model", default="embedded")
    p.add_argument("--smoke", action="store_true",
                   help="every benchmark's code path on tiny sizes, in seconds: checks that they run, measures nothing")
    p.add_argument("--engine", choices=["local", "vllm"], default="local",
                   help="vllm: the proxy benchmark against a vLLM server the app starts (needs the vLLM environment "
                        "of scripts/setup.sh --test)")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["BENCH_SMOKE"] = "1"    # read by common.py, imported by each benchmark below
    names = args.only.split(",") if args.only else (["vllm"] if args.engine == "vllm" else LOCAL)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}: choose from {', '.join(BENCHES)}")
    ratios, failed = {}, []
    for name in names:
        t = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        try:
            mod = importlib.import_module(BENCHES[name])
            kwargs = {"base_model": args.base_model} if "base_model" in mod.run.__code__.co_varnames else {}
            ratios.update(mod.run(**kwargs))
        except Exception:  # noqa: BLE001 - report and go on with the others
            traceback.print_exc()
            failed.append(name)
        print(f"({name}: {time.perf_counter() - t:.0f} s)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    print(json.dumps(ratios))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
