"""Near-duplicate merge quality: calibrate the embedding threshold on one hand-written set
(tests/dedup_calibration.py, a hotel), report it on another (tests/dedup_testset.py, a restaurant).

For each threshold, with and without the lexical check (`assistant.data.dedup.compare`): merge precision,
recall, and facts lost (groups with no item kept). Prints the chosen threshold: the lowest facts lost,
then the best recall at precision >= MIN_PRECISION, then the highest (most cautious) threshold, on the
calibration set only."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import print_table, sized  # noqa: F401 - sets the thread defaults first

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

THRESHOLDS = sized((0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85), (0.65,))
MIN_PRECISION = 0.98


def build(groups, folder: Path):
    """A store holding every item of `groups` as seed examples -> (store, key -> group id, kind of group)."""
    from assistant.data.store import Store
    store = Store(folder / "assistant.db")
    examples, gids = [], []
    for g, (_, items) in enumerate(groups):
        for q, a in items:
            examples.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            gids.append(g)
    store.add_examples("d", examples)
    keys = [c["key"] for c in store.candidates("d")]
    return store, dict(zip(keys, gids)), [kind for kind, _ in groups]


def score(groups, threshold: float, lexical: bool = True, embedder=None) -> dict:
    """Merge quality of curation on `groups` at `threshold` (lexical=False: the embedding alone)."""
    from assistant.data import curation, dedup
    from assistant.data.curation import CurationSettings
    with tempfile.TemporaryDirectory() as tmp:
        store, group_of, kinds = build(groups, Path(tmp))
        original = dedup.compare
        if not lexical:
            dedup.compare = lambda a, b: dedup.Comparison(True, (), (), (), ())
        try:
            items, _, _, _ = curation.run(store, "d", embedder or curation.default_embedder(),
                                          CurationSettings(near_dup_threshold=threshold), read_only=True)
        finally:
            dedup.compare = original
        out = dedup.merge_quality(items, group_of)
        for kind in sorted(set(kinds)):
            sub = {k: g for k, g in group_of.items() if kinds[g] == kind}
            q = dedup.merge_quality([it for it in items if it["key"] in sub], sub)
            out[f"{kind}_lost"], out[f"{kind}_recall"] = q["groups_lost"], q["recall"]
        store.close()
    return out


def run() -> dict:
    import dedup_calibration
    import dedup_testset
    cal, test = dedup_calibration.groups(), dedup_testset.groups()
    rows, table = {}, []
    for lexical in (False, True):
        for t in THRESHOLDS:
            c, s = score(cal, t, lexical), score(test, t, lexical)
            rows[(lexical, t)] = (c, s)
            table.append((f"{'embedding+lexical' if lexical else 'embedding only'} @ {t:.2f}",
                          f"calibration P {c['precision']:.2f} R {c['recall']:.2f} lost {c['groups_lost']:>2} | "
                          f"test P {s['precision']:.2f} R {s['recall']:.2f} lost {s['groups_lost']:>2} "
                          f"(rosters lost {s['roster_lost']})"))
    print_table("near-duplicate merges (P precision, R recall, lost = facts with no item kept)", table)
    ok = [t for t in THRESHOLDS if rows[(True, t)][0]["precision"] >= MIN_PRECISION]
    chosen = min(ok or THRESHOLDS, key=lambda t: (rows[(True, t)][0]["groups_lost"], -rows[(True, t)][0]["recall"], -t))
    from assistant.data.curation import CurationSettings
    default = CurationSettings().near_dup_threshold
    c, s = rows[(True, default)] if (True, default) in rows else (score(cal, default), score(test, default))
    print(f"\nchosen on calibration: {chosen:.2f}; default {default:.2f}: test precision {s['precision']:.3f}, "
          f"recall {s['recall']:.3f}, facts lost {s['groups_lost']} of {s['groups']}")
    return {"dedup_chosen_threshold": chosen, "dedup_test_precision": round(s["precision"], 3),
            "dedup_test_recall": round(s["recall"], 3), "dedup_test_facts_lost": s["groups_lost"],
            "dedup_calibration_precision": round(c["precision"], 3), "dedup_calibration_recall": round(c["recall"], 3)}


if __name__ == "__main__":
    print(run())
