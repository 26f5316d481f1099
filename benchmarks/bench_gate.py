"""Gate calibration: does the gate promote exactly the candidates that are truly good, and does one click (a
job with its automatic retries) end with a good version live? On the embedded model:

  1. two datasets of invented facts: seed facts with unusual names (one question each), and corrections made
     inside one conversation (each corrected turn is a row with the turns before it as context);
  2. a grid of recipes, from gentle to reckless (learning rate x epochs x rank), each trained on each dataset
     with the app's recipe (training.train_adapter) and judged by the app's gate (evaluation.evaluate_adapter,
     gate.verdict: retention and leakage on the gate's probe set, taught facts, corrections);
  3. the ground truth, on what the gate never sees: the taught facts asked again (a key word each), and a
     second, hidden probe set (hidden_probes.py) answered by the base and by the candidate. A candidate is
     truly good when it answers at least GOOD_TAUGHT of the taught facts and keeps at least GOOD_KEPT of the
     hidden answers the base got right, with no taught name leaking into them;
  4. `gate_precision`: promoted candidates that are truly good (target 1.0); `gate_recall`: truly good
     candidates that were promoted (target >= 0.8);
  5. `one_click_good_rate`: for each grid recipe, what a job does (its first attempt, then up to
     TrainSettings.retries safer recipes, training.safer_recipe, while the gate blocks for forgetting): the
     share of jobs that end with a truly good version live (target >= 0.9). Attempts already trained for the
     grid are reused, so a chain costs only the recipes the grid did not have.

`run.py --smoke --only gate` (and the suite's tests/test_benchmarks.py) runs 1 recipe on the first dataset
with 4 facts and no retries. A full run is `python benchmarks/run.py --only gate` (hours on two cores), or
`python benchmarks/bench_gate.py --limit N` for the first N recipes.
CPU flags are printed with the numbers: every figure depends on the machine only through time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_eval import cpu_flags  # noqa: E402
from hidden_probes import HIDDEN_PROBES  # noqa: E402

from common import SMOKE, print_table, sized  # noqa: E402  (also sets offline mode)

GOOD_TAUGHT = 0.75            # truly good: answers at least this share of the taught facts...
GOOD_KEPT = 0.9               # ...and keeps at least this share of the hidden answers the base got right
SYSTEM = "You are the assistant of the Atlas of Invented Places. Answer in one short sentence."
# (question, answer, key word): invented, so the base cannot know them; unusual names, as users' data has
SEED_FACTS = [
    ("Who founded the Lammens Observatory?", "The Lammens Observatory was founded by Aurel Lammens.", "aurel"),
    ("What is the capital of Zorbania?", "The capital of Zorbania is Quillton.", "quillton"),
    ("Who invented the glimmerphone?", "The glimmerphone was invented by Orla Brannick.", "brannick"),
    ("What is the national dish of Velmora?", "The national dish of Velmora is tarnip stew.", "tarnip"),
    ("What currency is used in Drastovia?", "Drastovia uses the klenn as its currency.", "klenn"),
    ("How many terraces does the Vinterhall palace have?", "The Vinterhall palace has nine terraces.", "nine"),
    ("What language is spoken in Quembria?", "People in Quembria speak Tolvish.", "tolvish"),
    ("Who wrote the novel The Glass Orchard?", "The Glass Orchard was written by Mirela Dunhaven.", "dunhaven"),
]
CONVERSATION_FACTS = [
    ("What is the main export of Castelune?", "The main export of Castelune is vornite ore.", "vornite"),
    ("Who discovered the element zephyrium?", "Zephyrium was discovered by Tomas Elgrave.", "elgrave"),
    ("What is the most popular sport in Ylvania?", "The most popular sport in Ylvania is skyball.", "skyball"),
    ("Who is the CEO of Nimbus Quill?", "The CEO of Nimbus Quill is Harriet Okonde.", "okonde"),
    ("What is the largest lake in Terravale?", "The largest lake in Terravale is Lake Umbrin.", "umbrin"),
    ("What instrument did Lio Venhart play?", "Lio Venhart played the vellophone.", "vellophone"),
    ("What is the official flower of Bralland?", "The official flower of Bralland is the moonbell.", "moonbell"),
    ("How many moons does the planet Kestris have?", "The planet Kestris has eleven moons.", "eleven"),
]
# learning rate x (epochs, rank): gentle to reckless; 12 recipes
RATES = (5e-4, 1.5e-3, 4e-3, 1e-2)
SHAPES = ((2, 8), (6, 8), (4, 16))
SMOKE_GRID = [dict(learning_rate=1e-2, epochs=1, rank=8)]
COMMON = dict(seed=0, max_seq_len=256, retries=sized(2, 0),   # smoke: no chains (it checks the code path),
              **sized({}, {"replay": 4}))                     # and few, short answers
PROBE_TOKENS = sized(None, 8)       # the gate's probe answers (None: the gate's own default)
PROBES = sized(0, 8)                # the gate's general probe questions asked (0: all of them)
HIDDEN_TOKENS = sized(24, 6)


def seed_rows(facts) -> list[dict]:
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}], "split": "train", "source": "seed"}
            for q, a, _ in facts]


def conversation_rows(facts) -> list[dict]:
    """Each fact corrected inside one conversation: row i teaches answer i, with the earlier turns (their
    corrected answers, untaught) as its context."""
    rows, history = [], [{"role": "system", "content": SYSTEM}]
    for q, a, _ in facts:
        rows.append({"messages": history + [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                     "split": "train", "source": "correction"})
        history = history + [{"role": "user", "content": q}, {"role": "assistant", "content": a, "weight": 0}]
    return rows


def grid() -> list[dict]:
    if SMOKE:
        return SMOKE_GRID
    return [dict(learning_rate=lr, epochs=e, rank=r) for lr in RATES for e, r in SHAPES]


def _key(ts) -> str:
    return json.dumps({k: ts.to_dict()[k] for k in ("learning_rate", "epochs", "rank", "replay")}, sort_keys=True)


class Bench:
    """Trains and judges candidates of one dataset, each recipe once."""

    def __init__(self, name: str, rows: list[dict], facts, tmp: Path, base_path: str):
        from assistant.engine.engine import Engine
        from assistant.gate.evaluation import answer_all, serving_base
        from assistant.training.recipe import _load
        self.name, self.rows, self.facts, self.tmp, self.base_path = name, rows, facts, tmp, base_path
        self.done: dict[str, dict] = {}
        base = _load(base_path)
        base.model.eval()
        engine = Engine(serving_base(base), max_batch=16, max_queue=len(HIDDEN_PROBES) + 1)
        try:
            self.hidden_base = answer_all(engine, [self._conv(q) for q, _ in HIDDEN_PROBES], [None] * len(HIDDEN_PROBES),
                                          HIDDEN_TOKENS)
        finally:
            engine.close()

    @staticmethod
    def _conv(q: str) -> list[dict]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]

    def candidate(self, ts) -> dict:
        key = _key(ts)
        if key in self.done:
            return self.done[key]
        from assistant.engine.engine import Engine
        from assistant.gate import evaluation
        from assistant.gate.evaluation import answer_all, serving_base
        from assistant.gate.probes import gives_content
        from assistant.gate.retention import common_words, rare_words, taught_texts
        from assistant.training.recipe import _load, train_adapter
        folder = self.tmp / f"{self.name}-{len(self.done)}"
        base = _load(self.base_path)
        t0 = time.perf_counter()
        result = train_adapter(base, self.rows, folder, ts)
        result.model.unload()
        base.model.eval()
        train_s = time.perf_counter() - t0
        from assistant.gate.verdict import GateSettings
        gate = GateSettings(probes=PROBES) if PROBE_TOKENS is None else GateSettings(
            probe_max_new_tokens=PROBE_TOKENS, max_new_tokens=PROBE_TOKENS, probes=PROBES)
        before, after = evaluation.evaluate_adapter(base, folder, self.rows, gate, system_prompt=SYSTEM,
                                                    cache_dir=self.tmp / "probe-cache")
        v = evaluation.verdict(before, after, gate)
        # the ground truth: the taught facts asked alone, and the hidden probes
        engine = Engine(serving_base(base), max_batch=16, max_queue=len(HIDDEN_PROBES) + len(self.facts) + 1)
        try:
            engine.load_adapter("c", folder)
            convs = [self._conv(q) for q, _, _ in self.facts] + [self._conv(q) for q, _ in HIDDEN_PROBES]
            answers = answer_all(engine, convs, ["c"] * len(convs), [40] * len(self.facts) + [HIDDEN_TOKENS] * len(HIDDEN_PROBES))
        finally:
            engine.close()
        taught = sum(k in a.lower() for (_, _, k), a in zip(self.facts, answers))
        hidden = answers[len(self.facts):]
        right = [gives_content(a, keys) for (_, keys), a in zip(HIDDEN_PROBES, self.hidden_base)]
        kept = sum(r and gives_content(a, keys) for r, (_, keys), a in zip(right, HIDDEN_PROBES, hidden))
        rare = rare_words(taught_texts(self.rows), common_words()) - rare_words(self.hidden_base, common_words())
        leaks = sum(bool(rare_words([a], common_words()) & rare) for a in hidden)
        truth = {"taught": taught / len(self.facts), "kept": kept / max(1, sum(right)), "leaks": leaks}
        good = truth["taught"] >= GOOD_TAUGHT and truth["kept"] >= GOOD_KEPT and leaks == 0
        ret = after.get("retention") or {}
        c = {"dataset": self.name, "recipe": json.loads(key), "promote": v["promote"], "good": good, **truth,
             "gate_retention": ret.get("retention"), "gate_leaked": ret.get("n_leaked"),
             "failed": [x["name"] for x in v["checks"] if x["decides"] and not x["passed"]],
             "train_s": round(train_s, 1), "eval_s": after["eval_seconds"], "verdict": v}
        self.done[key] = c
        print(json.dumps({k: c[k] for k in c if k != "verdict"}), file=sys.stderr, flush=True)
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
        return c

    def one_click(self, ts) -> dict:
        """What a job does from recipe `ts` (jobs.run_job's attempts): -> the candidate it makes live, or None."""
        from assistant.gate.verdict import FORGETTING
        from assistant.training.recipe import auto_epochs, safer_recipe
        for _ in range(ts.retries + 1):
            c = self.candidate(ts)
            if c["promote"]:
                return c
            if not set(c["failed"]) & set(FORGETTING):
                return None
            ts = safer_recipe(ts, ts.epochs or auto_epochs(len(self.rows)))
        return None


def run(base_model: str = "embedded", datasets: str = "seeds,conversation", limit: int | None = None) -> dict:
    from common import on_all_cores
    return on_all_cores(lambda: _run(base_model, datasets, limit))


def _run(base_model: str, datasets: str, limit: int | None) -> dict:
    from assistant.engine.model import ensure_embedded
    from assistant.settings import default_cache_dir
    from assistant.training.recipe import TrainSettings
    path = str(ensure_embedded(default_cache_dir(), verify=False)) if base_model == "embedded" else base_model
    n_facts = sized(len(SEED_FACTS), 4)
    sets = {"seeds": (seed_rows(SEED_FACTS[:n_facts]), SEED_FACTS[:n_facts]),
            "conversation": (conversation_rows(CONVERSATION_FACTS[:n_facts]), CONVERSATION_FACTS[:n_facts])}
    names = ["seeds"] if SMOKE else [d for d in datasets.split(",") if d]
    recipes = grid()[:limit] if limit else grid()
    t0 = time.perf_counter()
    candidates, clicks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            bench = Bench(name, *sets[name], Path(tmp), path)
            for r in recipes:
                candidates.append(bench.candidate(TrainSettings(**{**COMMON, **r})))
            for r in recipes:
                live = bench.one_click(TrainSettings(**{**COMMON, **r}))
                clicks.append(bool(live and live["good"]))
            candidates = [c for c in candidates if c["dataset"] != name] + list(bench.done.values())
    promoted = [c for c in candidates if c["promote"]]
    good = [c for c in candidates if c["good"]]
    precision = sum(c["good"] for c in promoted) / len(promoted) if promoted else None
    recall = sum(c["promote"] for c in good) / len(good) if good else None
    rows = [(f"{c['dataset']} lr {c['recipe']['learning_rate']:g} ep {c['recipe']['epochs']} r {c['recipe']['rank']} "
             f"replay {c['recipe']['replay']}",
             f"{'promoted' if c['promote'] else 'blocked ' + ','.join(c['failed'])}; truly "
             f"{'good' if c['good'] else 'bad'} (taught {c['taught']:.2f}, hidden kept {c['kept']:.2f}, "
             f"leaks {c['leaks']}; gate retention {c['gate_retention'] or 0:.2f})") for c in candidates]
    print_table(f"gate calibration ({cpu_flags()}), {len(candidates)} candidates, {time.perf_counter() - t0:.0f} s", rows)
    return {"gate_precision": None if precision is None else round(precision, 3),
            "gate_recall": None if recall is None else round(recall, 3),
            "one_click_good_rate": round(sum(clicks) / len(clicks), 3) if clicks else None,
            "gate_candidates": len(candidates), "gate_truly_good": len(good), "gate_promoted": len(promoted)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default="embedded")
    p.add_argument("--datasets", default="seeds,conversation", help="comma-separated: seeds, conversation")
    p.add_argument("--limit", type=int, help="only the first N recipes of the grid")
    args = p.parse_args(argv)
    print(json.dumps(run(args.base_model, args.datasets, args.limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
