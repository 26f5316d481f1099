"""Evaluation and the promotion gate: the answer-match score, before/after on a tiny Llama with a real
adapter, and the gate's decisions with reasons that name the threshold."""

from __future__ import annotations

import pytest

from invented_facts import FACTS, chat

from assistant.evaluation import GateSettings, gate, rouge_l


def test_rouge_l():
    assert rouge_l("The capital of Zorbania is Quillton.", "the capital of zorbania is quillton") == 1.0
    assert rouge_l("Paris", "Quillton") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0
    # LCS "capital is quillton" = 3 of 4 and 3 of 6 words
    assert rouge_l("capital is really quillton", "the capital of zorbania is quillton") == pytest.approx(
        2 * (3 / 4) * (3 / 6) / (3 / 4 + 3 / 6))


def _metrics(**kw):
    base = {"eval_loss": 2.0, "eval_match": 0.3, "corrections_match": 0.1, "general_similarity": 1.0,
            "general_loss": 0.5, "general_loss_max_increase": 0.0}
    return {**base, **kw}


def test_gate_promotes_an_improvement():
    ok, reasons = gate(_metrics(), _metrics(eval_loss=1.5, eval_match=0.5, corrections_match=0.9,
                                            general_similarity=0.8))
    assert ok and all(r.startswith(("ok:", "skipped:")) for r in reasons)


@pytest.mark.parametrize("after, blocked", [
    (dict(corrections_match=0.3), "corrections match 0.30"),
    (dict(eval_loss=2.5), "held-out loss 2.500"),
    (dict(eval_match=0.1), "held-out match 0.10"),
    (dict(general_similarity=0.2), "general answers similarity to base 0.20"),
    (dict(general_loss_max_increase=2.0), "largest rise in the loss of the base's answer to a general prompt 2.000"),
])
def test_gate_blocks_with_a_reason(after, blocked):
    good = dict(eval_loss=1.5, eval_match=0.5, corrections_match=0.9, general_similarity=0.8)
    ok, reasons = gate(_metrics(), _metrics(**{**good, **after}))
    assert not ok
    assert reasons[0].startswith("blocked: ") and blocked in reasons[0], reasons


def test_gate_thresholds_are_settings():
    after = _metrics(eval_loss=1.5, corrections_match=0.5, general_similarity=0.8)
    assert not gate(_metrics(), after)[0]
    assert gate(_metrics(), after, GateSettings(min_corrections_match=0.4))[0]
    with pytest.raises(ValueError, match="min_match"):
        GateSettings.from_dict({"min_match": 1})


def test_gate_without_eval_split_skips_loss():
    ok, reasons = gate(_metrics(eval_loss=None, eval_match=None),
                       _metrics(eval_loss=None, eval_match=None, corrections_match=0.9, general_similarity=0.9))
    assert ok and any("skipped: held-out loss" in r for r in reasons)


def test_before_after_on_a_trained_tiny_adapter(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.evaluation import before_after, evaluate_adapter, generate
    from assistant.model import load_base
    from assistant.settings import Settings
    from assistant.training import TrainSettings, train_adapter

    rows = [{"messages": chat(q, a), "split": "train"} for q, a, _, _ in FACTS[:6]] + \
           [{"messages": chat(q, a), "split": "eval"} for q, a, _, _ in FACTS[6:8]]
    result = train_adapter(tiny_llama, rows, tmp_path / "a",
                           TrainSettings(rank=4, alpha=8, learning_rate=2e-2, epochs=3, batch_size=4))
    settings = GateSettings(max_new_tokens=8)
    before, after = before_after(result.model, result.tokenizer, rows, settings)
    for m in (before, after):
        assert m["n_eval"] == 2 and m["n_corrections"] == 6
        assert m["eval_loss"] > 0 and 0 <= m["eval_match"] <= 1 and 0 <= m["corrections_match"] <= 1
        assert len(m["general_answers"]) == 4
    assert before["general_similarity"] == 1.0 and 0 <= after["general_similarity"] <= 1
    assert before["general_loss"] > 0 and after["general_loss"] != before["general_loss"]
    assert len(after["general_losses"]) == 4 and after["general_loss_max_increase"] == pytest.approx(
        max(a - b for a, b in zip(after["general_losses"], before["general_losses"])))
    assert after["eval_loss"] != before["eval_loss"]          # the adapter is really on in "after"

    # "before" is the plain base: same greedy answers as a model without any adapter
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    assert generate(plain, tok, [chat(FACTS[0][0])], 8) == before["corrections_answers"][:1]

    # the same numbers from the saved folder, and the base is left without LoRA layers afterwards
    base = load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False)
    before2, after2 = evaluate_adapter(base, tmp_path / "a", rows, settings)
    assert before2["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-4)
    assert after2["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-4)
    assert not any("lora" in name for name, _ in base.model.named_parameters())
