"""Evaluation and the promotion gate: the answer-match score, before/after on a tiny Llama with a real
adapter (through the serving engine), and the gate's verdict: checks with a meaning and advice, reasons
that name the bound, a summary for a person."""

from __future__ import annotations

import pytest

from assistant.gate.evaluation import GateSettings, gate, rouge_l, verdict
from assistant.gate.probes import PROBES

from invented_facts import FACTS, chat


def test_rouge_l():
    assert rouge_l("The capital of Zorbania is Quillton.", "the capital of zorbania is quillton") == 1.0
    assert rouge_l("Paris", "Quillton") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0
    # LCS "capital is quillton" = 3 of 4 and 3 of 6 words
    assert rouge_l("capital is really quillton", "the capital of zorbania is quillton") == pytest.approx(
        2 * (3 / 4) * (3 / 6) / (3 / 4 + 3 / 6))


def _metrics(**kw):
    base = {"eval_loss": 2.0, "eval_match": 0.3, "corrections_match": 0.1, "n_corrections": 2, "taught_match": 0.1,
            "n_taught": 10, "general_nll": 0.5, "general_embedding_similarity": 1.0}
    return {**base, **kw}


GOOD = dict(eval_loss=1.5, eval_match=0.5, corrections_match=0.9, taught_match=0.9, general_nll=0.6,
            general_embedding_similarity=0.8)


def test_gate_promotes_an_improvement():
    v = verdict(_metrics(), _metrics(**GOOD))
    assert v["promote"] and all(r.startswith(("ok:", "skipped:")) for r in v["reasons"])
    assert {c["name"] for c in v["checks"]} == {"corrections", "taught", "heldout_loss", "heldout_match",
                                                "general_nll", "general_similarity"}
    assert all(c["passed"] for c in v["checks"]) and "goes live" in v["summary"]
    assert gate(_metrics(), _metrics(**GOOD)) == (True, v["reasons"])


@pytest.mark.parametrize("after, name, blocked", [
    (dict(corrections_match=0.3), "corrections", "answer-match on the 2 corrected answers 0.30"),
    (dict(taught_match=0.2), "taught", "answer-match on 10 taught examples 0.20"),
    (dict(eval_loss=2.5), "heldout_loss", "held-out loss vs base 1.25"),
    (dict(eval_match=0.1), "heldout_match", "held-out answer-match 0.10"),
    (dict(general_nll=1.5), "general_nll", "loss of the base's general answers, adapter / base 3.00"),
    (dict(general_embedding_similarity=0.2), "general_similarity", "similarity of general answers to the base's 0.20"),
])
def test_gate_blocks_with_a_reason_a_meaning_and_advice(after, name, blocked):
    v = verdict(_metrics(), _metrics(**{**GOOD, **after}))
    assert not v["promote"]
    assert v["reasons"][0].startswith("blocked: ") and blocked in v["reasons"][0], v["reasons"]
    failed = [c for c in v["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == [name]
    assert failed[0]["meaning"] and failed[0]["advice"] and failed[0]["bound"]
    assert failed[0]["meaning"] in v["summary"] and "activate this version anyway" in v["summary"]


def test_gate_thresholds_are_settings():
    after = _metrics(**{**GOOD, "corrections_match": 0.5})
    assert not gate(_metrics(), after)[0]
    assert gate(_metrics(), after, GateSettings(min_corrections_match=0.4))[0]
    with pytest.raises(ValueError, match="min_match"):
        GateSettings.from_dict({"min_match": 1})


def test_gate_without_holdout_or_corrections_skips_them_and_says_so():
    none = dict(eval_loss=None, eval_match=None, corrections_match=None, n_corrections=0)
    v = verdict(_metrics(**none), _metrics(**{**GOOD, **none}))
    assert v["promote"] and any("skipped: held-out loss" in r for r in v["reasons"])
    assert any("skipped: corrections" in r for r in v["reasons"])
    empty = dict(none, taught_match=None)
    assert not verdict(_metrics(**empty), _metrics(**{**GOOD, **empty}))["promote"]


def test_evaluation_scores_exactly_the_corrections_on_a_trained_tiny_adapter(tiny_llama, tmp_path):
    """Corrections planted among seed rows are found by their source: the correction score is computed on
    exactly those (their feedback ids are listed), through the serving engine."""

    from assistant.engine.model import load_base
    from assistant.gate.evaluation import evaluate_adapter
    from assistant.settings import Settings
    from assistant.training.recipe import TrainSettings, train_adapter

    rows = [{"messages": chat(q, a), "split": "train", "source": "seed", "feedback_ids": []}
            for q, a, _, _ in FACTS[:6]]
    planted = {2: [41], 4: [57, 58]}
    for i, ids in planted.items():
        rows[i] = {**rows[i], "source": "correction", "feedback_ids": ids}
    rows += [{"messages": chat(q, a), "split": "eval", "source": "seed", "feedback_ids": []}
             for q, a, _, _ in FACTS[6:8]]
    train_adapter(tiny_llama, rows, tmp_path / "a",
                  TrainSettings(rank=4, alpha=8, learning_rate=2e-2, epochs=3, batch_size=4, replay=0))
    base = load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False)
    ticks = []
    before, after = evaluate_adapter(base, tmp_path / "a", rows, GateSettings(max_new_tokens=8),
                                     progress=lambda done, total: ticks.append((done, total)))
    corrected, taught = [rows[2], rows[4]], [rows[i] for i in (0, 1, 3, 5)]
    for m in (before, after):
        assert m["n_corrections"] == 2 and m["n_taught"] == 4 and m["n_eval"] == 2
        assert len(m["corrections_answers"]) == 2 and len(m["general_answers"]) == len(PROBES)
        assert m["eval_loss"] > 0 and m["general_nll"] > 0
        for name, subset in (("corrections", corrected), ("taught", taught)):   # each score is of its own rows
            scores = [rouge_l(a, r["messages"][-1]["content"]) for a, r in zip(m[f"{name}_answers"], subset)]
            assert m[f"{name}_match"] == pytest.approx(sum(scores) / len(scores)), name
    assert after["corrections_feedback_ids"] == [41, 57, 58]
    assert after["eval_loss"] != before["eval_loss"]            # the adapter is really on in "after"
    assert before["general_embedding_similarity"] == 1.0
    from assistant.data.curation import default_embedder
    pairs = list(zip(before["general_answers"], after["general_answers"]))
    vectors = default_embedder().embed([x or " " for pair in pairs for x in pair])
    cosines = [float(vectors[2 * i] @ vectors[2 * i + 1]) if a.strip() and b.strip() else float(a.strip() == b.strip())
               for i, (a, b) in enumerate(pairs)]
    assert after["general_embedding_similarity"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
    assert ticks[-1][0] == ticks[-1][1] and [d for d, _ in ticks] == sorted(d for d, _ in ticks)
    _, few = evaluate_adapter(base, tmp_path / "a", rows, GateSettings(max_new_tokens=8, probes=6))
    assert len(few["general_answers"]) == few["retention"]["n_probes"] == 6        # a faster gate asks fewer
    assert set(few["general_answers"]) <= set(after["general_answers"])

    # "before" is the plain base: the serving engine's greedy answers on it, with no adapter loaded at all
    from assistant.engine.engine import Engine
    from assistant.gate.evaluation import serving_base
    plain = Engine(serving_base(load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False)))
    try:
        want = plain.generate(rows[2]["messages"][:-1], max_new_tokens=8).strip()
    finally:
        plain.close()
    assert [want] == before["corrections_answers"][:1]
    assert not any("lora" in name for name, _ in base.model.named_parameters())
