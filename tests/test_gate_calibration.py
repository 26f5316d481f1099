"""The gate's forgetting checks on the embedded SmolLM2: an adapter that answers everything with one fixed
sentence is blocked by retention (and the NLL and similarity figures are outside their bounds), with advice.
The other side (a run taught ten distinct, correct facts passes the same bounds) is
tests/test_retrain_e2e.py's one-click test."""

from __future__ import annotations

import pytest

from helpers import train_fact_adapter
from invented_facts import FACTS, SYSTEM_PROMPT, chat

pytestmark = pytest.mark.slow
FIXED = "I only answer questions about the Atlas of Invented Places."
EXTRA = ["What is the capital of Japan?", "Who wrote Hamlet?", "What is 2+2?", "Name a fruit."]


def test_an_adapter_that_says_one_sentence_to_everything_is_blocked(tmp_path, embedded_path):
    from assistant.engine.model import load_base
    from assistant.gate import evaluation
    from assistant.settings import Settings
    adapter = train_fact_adapter(embedded_path, tmp_path / "fixed",
                                 [(q, FIXED) for q, _, _, _ in FACTS] + [(q, FIXED) for q in EXTRA],
                                 steps=40, lr=5e-3)
    base = load_base(Settings(base_model=str(embedded_path), dtype="float32"), verbose=False)
    rows = [{"messages": chat(q, a), "split": "train", "source": "seed", "feedback_ids": []}
            for q, a, _, _ in FACTS[:10]]
    before, after = evaluation.evaluate_adapter(base, adapter, rows, system_prompt=SYSTEM_PROMPT)
    verdict = evaluation.verdict(before, after)
    print("\nfixed sentence:", {k: after.get(k) for k in ("general_nll_ratio", "general_embedding_similarity",
                                                          "taught_match")})
    assert sum(a == FIXED for a in after["general_answers"]) >= len(after["general_answers"]) // 2, after
    assert not verdict["promote"]
    failed = {c["name"] for c in verdict["checks"] if not c["passed"]}
    assert {"general_nll", "general_similarity"} <= failed, verdict          # the figures see it too...
    deciding = {c["name"] for c in verdict["checks"] if c["decides"] and not c["passed"]}
    assert "retention" in deciding, verdict                                   # ...retention decides
    assert after["retention"]["retention"] < 0.5 and len(after["retention"]["lost"]) >= 10
    assert "lost general answers the base gave" in verdict["summary"] or "taught" in verdict["summary"]
    assert "activate this version anyway" in verdict["summary"]
