"""Language-model helpers shared by training and evaluation: a conversation's token ids with loss labels on
the assistant's replies, batching them, the loss over labelled positions, and greedy batched answers with
transformers' generate. torch is imported inside the functions, so importing this module stays cheap."""

from __future__ import annotations

IGNORE_INDEX = -100            # label of a position that carries no loss
LOSS_CHUNK_TOKENS = 1024       # labelled positions projected onto the vocabulary at a time


def taught(message: dict) -> bool:
    """Does this message carry loss? Assistant replies do, unless marked `"weight": 0` (the OpenAI
    fine-tuning format's mark of a context turn: an answer in the conversation nobody confirmed)."""
    return message.get("role") == "assistant" and message.get("weight", 1) != 0


def plain(messages: list[dict]) -> list[dict]:
    """The conversation as a chat template sees it: role and content only (no weights)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_chat(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are IGNORE_INDEX except on the taught assistant
    replies (their content and end-of-turn token, or the content alone for a reply marked `"cut": true`,
    one its token limit ended; see `taught`). Spans are found by rendering each prefix
    of the conversation with the chat template and mapping character offsets to tokens, which is exact
    for any template that renders prefixes as prefixes. Past `max_seq_len` tokens the window ends at the
    last taught token: the oldest context is cut, never the answer being taught."""
    weights = [taught(m) for m in messages]
    cut = [bool(m.get("cut")) for m in messages]
    messages = plain(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, is_taught in enumerate(weights):
        if not is_taught:
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False).rstrip()
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise ValueError("the chat template does not render conversation prefixes as prefixes; "
                             "cannot mask the loss to assistant tokens")
        end = len(upto)
        if cut[i]:     # an answer its token limit cut: its words are taught, not an end-of-turn after them
            at = upto.find(messages[i]["content"], len(prompt))
            end = at + len(messages[i]["content"]) if at >= 0 else end
        spans.append((len(prompt), end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE_INDEX for tok, (a, _) in zip(ids, offsets)]
    end = max((i + 1 for i, y in enumerate(labels) if y != IGNORE_INDEX), default=len(ids))
    start = max(0, end - max_seq_len)
    return ids[start:start + max_seq_len], labels[start:start + max_seq_len]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    import torch
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(examples):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, :len(lab)] = torch.tensor(lab)
        mask[r, :len(ids)] = 1
    return input_ids, labels, mask


def pack(examples: list[tuple[list[int], list[int]]], pad_id: int, capacity: int):
    """Rows laid end to end in as few sequences of at most `capacity` tokens (or the longest row) as a
    balanced fill gives, of nearly even lengths: (input_ids, labels, position_ids, real tokens). Position
    ids restart at each row, which is how the model keeps attention within a row (transformers builds a
    block-causal mask from them when no attention mask is given); a row's first label never counts (no
    token before it in its row predicts it). The few padding tokens left at the end of a sequence continue
    its last row's positions and carry no label."""
    import torch
    lengths = [len(ids) for ids, _ in examples]
    capacity = max(capacity, *lengths)
    n_bins = max(1, -(-sum(lengths) // capacity))
    while True:   # the longest rows first, each into the emptiest sequence: sequences of even lengths
        bins: list[list[int]] = [[] for _ in range(n_bins)]
        sizes = [0] * n_bins
        for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
            b = min(range(n_bins), key=sizes.__getitem__)
            bins[b].append(i)
            sizes[b] += lengths[i]
        if max(sizes) <= capacity or n_bins >= len(examples):
            break
        n_bins += 1
    width = max(sizes)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            ids, lab = examples[i]
            n = len(ids)
            input_ids[r, at:at + n] = torch.tensor(ids)
            labels[r, at + 1:at + n] = torch.tensor(lab[1:])
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(n, n + width - at)
    return input_ids, labels, position_ids, sum(sizes)


def _chunk_loss_sum(hidden, head, targets):
    import torch.nn.functional as F
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss(causal_lm, input_ids, labels, attention_mask, *, checkpoint_chunks: bool = False,
                   position_ids=None):
    """Mean next-token cross-entropy over labelled positions. `causal_lm` is the (LoRA-wrapped) HF model.
    Packed rows (`pack`) come with `position_ids` and no attention mask."""
    import torch
    from torch.utils.checkpoint import checkpoint
    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=False).last_hidden_state          # [B, T, H]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX                                                # [B, T-1]
    h = hidden[:, :-1][keep]                                                      # [N, H]
    y = targets[keep]                                                             # [N]
    head = causal_lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], LOSS_CHUNK_TOKENS):
        hc, yc = h[i:i + LOSS_CHUNK_TOKENS], y[i:i + LOSS_CHUNK_TOKENS]
        if checkpoint_chunks and hc.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, hc, head, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hc, head, yc)
    return total / max(int(y.numel()), 1), int(y.numel())


def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 48,
             batch_size: int = 16) -> list[str]:
    """Greedy answers, batched with left padding."""
    import torch
    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation as the model sees it: the domain's system prompt first, unless the conversation
    brings its own system message."""
    if not system_prompt or (messages and messages[0].get("role") == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}] + list(messages)
