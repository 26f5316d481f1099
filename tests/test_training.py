"""The training recipe on a tiny random Llama: labels, learning, reproducibility, settings, stopping.
(That it makes the embedded SmolLM2 learn twenty invented facts is tested end to end in test_retrain_e2e.py.)"""

from __future__ import annotations

import json

import pytest

from invented_facts import FACTS, SYSTEM_PROMPT, chat

TINY = dict(rank=4, alpha=8, learning_rate=2e-2, epochs=4, batch_size=4, max_seq_len=128, augment=0,
            replay=0)


def _tiny_rows(n=8):
    return [{"messages": chat(q, a), "split": "train"} for q, a, _, _ in FACTS[:n]] + \
           [{"messages": chat(FACTS[-1][0], FACTS[-1][1]), "split": "eval"}]


def test_labels_cover_assistant_tokens_only(tiny_llama):
    from transformers import AutoTokenizer

    from assistant.training.recipe import IGNORE_INDEX, encode_chat
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    messages = chat("What is the capital of Zorbania?", "The capital of Zorbania is Quillton.")
    messages += [{"role": "user", "content": "And its river?"}, {"role": "assistant", "content": "The Sarrow."}]
    ids, labels = encode_chat(tok, messages, 512)
    assert len(ids) == len(labels)
    learned = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX])
    assert learned == "The capital of Zorbania is Quillton.<|im_end|>The Sarrow.<|im_end|>"
    assert all(y in (IGNORE_INDEX, t) for t, y in zip(ids, labels))
    # the system prompt and user turns carry no loss
    masked = tok.decode([t for t, y in zip(ids, labels) if y == IGNORE_INDEX])
    assert SYSTEM_PROMPT in masked and "And its river?" in masked and "Quillton" not in masked
    # truncation keeps ids and labels aligned, and cuts the oldest context, not the last taught answer
    ids8, labels8 = encode_chat(tok, messages, 8)
    end = max(i for i, y in enumerate(labels) if y != IGNORE_INDEX) + 1
    assert ids8 == ids[end - 8:end] and labels8 == labels[end - 8:end]


def test_train_on_tiny_llama(tiny_llama, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from assistant.training.recipe import TrainSettings, train_adapter

    seen = []
    result = train_adapter(tiny_llama, _tiny_rows(), tmp_path / "a", TrainSettings(**TINY),
                           progress=lambda step, total, loss: seen.append((step, total, loss)))
    # progress reported every step; the loss goes down
    assert [s for s, _, _ in seen] == list(range(1, result.steps + 1)) and seen[-1][1] == result.steps
    assert result.steps == 4 * 2 and result.n_train == 8            # eval row not trained on
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[-2:]) / 2
    assert last < first * 0.9, result.losses
    assert 0 < result.label_tokens < result.tokens

    # a standard PEFT folder, safetensors only
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == set(TrainSettings().target_modules)

    # every trainable LoRA parameter moved from its initial value (B starts at zero, A is random)
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert len(saved) == 2 * 7 * 2                                   # A and B, 7 modules, 2 layers
    torch.manual_seed(TINY.get("seed", 0))
    from peft import LoraConfig, get_peft_model
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(TrainSettings().target_modules),
                                      task_type="CAUSAL_LM"))
    initial = {k: v.detach().clone() for k, v in fresh.named_parameters() if v.requires_grad}
    trained = {k: v for k, v in result.model.named_parameters() if v.requires_grad}
    assert set(initial) == set(trained) and len(trained) == len(saved)
    unmoved = [k for k in trained if torch.equal(initial[k], trained[k].detach())]
    assert unmoved == []

    # loadable by peft onto a fresh base, and it changes the outputs
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        plain = base(x).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "a"))(x).logits
    assert not torch.allclose(plain, adapted)


def test_same_seed_same_adapter(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from assistant.training.recipe import TrainSettings, train_adapter
    s = TrainSettings(**{**TINY, "dropout": 0.1, "augment": 1})
    a = train_adapter(tiny_llama, _tiny_rows(), tmp_path / "a", s)
    b = train_adapter(tiny_llama, _tiny_rows(), tmp_path / "b", s)
    other_seed = TrainSettings(**{**TINY, "dropout": 0.1, "augment": 1, "seed": 1})
    train_adapter(tiny_llama, _tiny_rows(), tmp_path / "c", other_seed)
    wa, wb, wc = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "abc")
    assert a.losses == b.losses
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert any(not (wa[k] == wc[k]).all() for k in wa)


def test_settings_validate_with_names():
    from assistant.training.recipe import MIN_EXAMPLES, TrainSettings, auto_epochs
    with pytest.raises(ValueError, match="rank"):
        TrainSettings(rank=0)
    with pytest.raises(ValueError, match="unknown training setting.*'ranks'"):
        TrainSettings.from_dict({"ranks": 4})
    assert TrainSettings.from_dict({"target_modules": ["q_proj"]}).target_modules == ("q_proj",)
    assert TrainSettings.from_dict(TrainSettings().to_dict()) == TrainSettings()
    assert TrainSettings.from_record(TrainSettings(rank=4).to_dict()) == TrainSettings(rank=4)
    assert auto_epochs(MIN_EXAMPLES) > auto_epochs(1000) == 1


def test_the_one_checker_names_the_field_and_takes_the_server_defaults_first():
    from assistant.errors import AssistantError, InvalidSetting
    from assistant.training.recipe import TrainSettings
    for values, field in (({"rank": 0}, "rank"), ({"epochs": "lots"}, "epochs"), ({"learning_rate": 2.0}, "learning_rate"),
                          ({"warp_speed": 9}, "warp_speed"), ({"batch_size": True}, "batch_size")):
        with pytest.raises(InvalidSetting) as e:
            TrainSettings.from_dict(values)
        assert e.value.param == field and field in e.value.message and isinstance(e.value, AssistantError)
    server = {"rank": 8, "epochs": 2}
    assert TrainSettings.from_dict({"epochs": 3}, server) == TrainSettings(rank=8, epochs=3)
    checked = TrainSettings(rank=4)
    assert TrainSettings.of(checked, server) is checked                 # checked once: passed on as it is
    with pytest.raises(InvalidSetting):
        TrainSettings.from_dict(None, {"rank": -1})                     # a bad server default is named too


def test_augment_rewords_the_question_only():
    import random

    from assistant.training.train_rows import augment_rows
    rows = [{"messages": chat(q, a), "split": "train"} for q, a, _, _ in FACTS[:3]]
    out = augment_rows(rows, 2, random.Random(0))
    assert out[:3] == rows and len(out) == 9
    for new in out[3:]:
        original = next(r for r in rows if r["messages"][2] == new["messages"][2])   # same answer
        assert new["messages"][0] == original["messages"][0]                          # same system prompt
        assert new["messages"][1]["content"] != original["messages"][1]["content"]
        assert original["messages"][1]["content"].rstrip("?")[1:].lower() in new["messages"][1]["content"].lower()
    assert rows[0]["messages"][1]["content"] == FACTS[0][0]                           # inputs untouched


def test_should_stop_saves_nothing(tiny_llama, tmp_path):
    from assistant.errors import TrainingStopped
    from assistant.training.recipe import TrainSettings, train_adapter
    calls = []
    with pytest.raises(TrainingStopped):
        train_adapter(tiny_llama, _tiny_rows(), tmp_path / "a", TrainSettings(**TINY),
                      should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert not (tmp_path / "a").exists()

# The learning acceptance on the embedded model runs end to end over HTTP: tests/test_retrain_e2e.py.


def test_packed_rows_give_the_loss_and_gradients_of_padded_ones(tiny_llama):
    """Rows laid end to end with restarting position ids attend within themselves only: the loss per taught
    token and every gradient equal those of the same rows padded into a batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.engine.lm import causal_lm_loss, collate, encode_chat, pack
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    rows = [chat(q, a) for q, a, _, _ in FACTS[:5]] + [chat("Tell me everything. " * 6, "All of it. " * 9)]
    examples = [encode_chat(tok, r, 512) for r in rows]
    results = []
    for padded in (True, False):
        model.zero_grad()
        if padded:
            ids, labels, mask = collate(examples, tok.pad_token_id)
            loss, n = causal_lm_loss(model, ids, labels, mask)
        else:
            ids, labels, positions, real = pack(examples, tok.pad_token_id, 128)
            assert real == sum(len(e[0]) for e in examples) and ids.shape[0] < len(examples)
            assert (ids.numel() - real) / ids.numel() < 0.2          # little padding left
            loss, n = causal_lm_loss(model, ids, labels, None, position_ids=positions)
        loss.backward()
        results.append((float(loss.detach()), n, [p.grad.clone() for p in model.parameters()]))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b and abs(loss_a - loss_b) < 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(grads_a, grads_b)) < 1e-5
