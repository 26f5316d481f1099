"""The gate's preference check: on held-out rated answers, how much more likely a model finds the answers
users liked than the ones they disliked.

margin = mean log-likelihood per token of the liked answers - the same of the disliked answers (per token,
so a style that is merely longer or shorter is not favoured by the length alone). It is measured for the
new version and for the current one (the domain's active version, or the base when none is live), on one
PeftModel holding both adapters; gate/verdict.py's `preference_margin` check wants the new margin not below the
current one.
"""

from __future__ import annotations

import contextlib

NEW, CURRENT = "candidate", "current"


def _last_reply_labels(labels: list[int], ignore: int) -> list[int]:
    """`labels` with only the last assistant reply (the rated answer) labelled."""
    out = [ignore] * len(labels)
    i = len(labels) - 1
    while i >= 0 and labels[i] == ignore:
        i -= 1
    while i >= 0 and labels[i] != ignore:
        out[i] = labels[i]
        i -= 1
    return out


def _mean_logp(peft_model, tokenizer, rows: list[dict], max_seq_len: int) -> list[float]:
    import torch

    from assistant.engine.lm import IGNORE_INDEX, causal_lm_loss, collate, encode_chat
    causal_lm = peft_model.get_base_model()
    device = next(peft_model.parameters()).device
    out = []
    with torch.no_grad():
        for r in rows:
            ids, labels = encode_chat(tokenizer, r["prompt"] + [{"role": "assistant", "content": r["completion"]}],
                                      max_seq_len)
            labels = _last_reply_labels(labels, IGNORE_INDEX)
            if all(x == IGNORE_INDEX for x in labels[1:]):
                continue
            batch = [t.to(device) for t in collate([(ids, labels)], tokenizer.pad_token_id)]
            loss, _ = causal_lm_loss(causal_lm, *batch)
            out.append((-float(loss), bool(r["label"])))
    return out


def margin(scored) -> float | None:
    liked = [s for s, good in scored if good]
    disliked = [s for s, good in scored if not good]
    if not liked or not disliked:
        return None
    return sum(liked) / len(liked) - sum(disliked) / len(disliked)


def margins(base, new_dir, current_dir, heldout: list[dict], max_seq_len: int) -> dict:
    """{"new", "current", "n"}: the preference margins of the adapter in `new_dir` and of the current
    version (`current_dir`, or the base when None) on `heldout` rows ({"prompt", "completion", "label"})."""
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(base.model, str(new_dir), adapter_name=NEW)
    try:
        if current_dir is not None:
            peft_model.load_adapter(str(current_dir), adapter_name=CURRENT)
        peft_model.eval()
        out = {"n": len(heldout)}
        for key, adapter in (("new", NEW), ("current", CURRENT if current_dir is not None else None)):
            if adapter is not None:
                peft_model.set_adapter(adapter)
            ctx = peft_model.disable_adapter() if adapter is None else contextlib.nullcontext()
            with ctx:
                out[key] = margin(_mean_logp(peft_model, base.tokenizer, heldout, max_seq_len))
        return out
    finally:
        peft_model.unload()
