"""What a training run adds to the curated rows: re-worded copies of each question on small datasets
(`augment_rows`), and general prompts answered by the base itself (`replay_rows`, self-replay against
forgetting; the answers are kept between jobs in an AnswerCache, since they depend only on the base, the
system prompt and the prompt)."""

from __future__ import annotations

import random

from assistant.engine.lm import generate, with_system_prompt

# General prompts the base answers itself before training; its answers are mixed into the train rows
# (self-replay) so the adapter keeps general knowledge. Disjoint from probes.PROBES, the general questions
# the gate asks (tests/test_retention.py checks it). They come in the shapes taught facts take ("What is the
# capital of ...?", "Who wrote ...?", "How many ...?"), so a taught answer is learned as the answer to its
# own question rather than to every question of its shape.
REPLAY_PROMPTS = (
    "What is the capital of Japan?", "What is the capital of Italy?", "What is the capital of Canada?",
    "Who wrote Romeo and Juliet?", "What is the largest planet in our solar system?",
    "How many legs does a spider have?", "What is water made of?", "What is the boiling point of water in Celsius?",
    "Who painted the Mona Lisa?",
    "What is the largest ocean on Earth?", "What language is spoken in Brazil?", "What is 12 times 12?",
    "What gas do plants absorb from the air?", "What is the tallest mountain in the world?",
    "What currency is used in the United Kingdom?", "Who was the first person to walk on the Moon?",
    "What is the capital of Greece?", "What is the capital of Portugal?", "What is the capital of India?",
    "What is the capital of Australia?", "What is the capital of Ireland?", "What is the capital of Norway?",
    "What is the capital of Kenya?", "What is the capital of Argentina?",
    "Who wrote Pride and Prejudice?", "Who invented the telephone?", "Who discovered penicillin?",
    "Who composed the Fifth Symphony?", "Who was the first president of the United States?",
    "How many sides does a triangle have?", "How many wheels does a bicycle have?",
    "How many players are on a soccer team?", "How many planets are in our solar system?",
    "How many seconds are in a minute?", "What is 4 plus 5?", "What is 7 times 8?", "What is 50 minus 20?",
    "What is the square root of 16?", "What is the largest country by area?", "What is the longest river in Africa?",
    "What is the smallest planet in our solar system?", "What is the hardest natural substance?",
    "What do caterpillars turn into?", "What is the main ingredient of bread?", "What color are bananas when ripe?",
    "What is the opposite of fast?", "What is the plural of foot?", "What is the past tense of eat?",
    "How do you say goodbye in Spanish?", "What does a thermometer measure?", "Name a vegetable that is orange.",
    "Name a planet other than Earth.", "Name a farm animal.", "What is the official language of Germany?",
    "Which ocean lies between Europe and America?", "What is the national language of Japan?",
    "What instrument has black and white keys?", "What is the chemical symbol for water?",
    "What do you call a baby sheep?", "What do pandas eat?", "Which continent is Kenya in?",
    "What is the freezing point of water in Fahrenheit?", "What is the first month of the year?",
    "What shape has four equal sides?",
)
REPLAY_MAX_NEW_TOKENS = 64
# Surface variants of the last user message, so a fact is learned from more than one wording of its question.
QUESTION_VARIANTS = ("Question: {q}", "{lower}", "Please tell me: {q}", "{q} Answer briefly.",
                     "I'd like to know: {lower}?")


def augment_rows(rows: list[dict], copies: int, rng: random.Random) -> list[dict]:
    """`rows` plus `copies` variants of each, every question whose answer is taught re-worded by a template
    (the last user message of a one-turn row; each confirmed turn's question in a conversation)."""
    from assistant.engine.lm import taught
    out = list(rows)
    for row in rows:
        msgs = row["messages"]
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"
                 and i + 1 < len(msgs) and taught(msgs[i + 1])] or \
            [i for i, m in enumerate(msgs) if m["role"] == "user"][-1:]
        if not users or copies == 0:
            continue
        templates = {i: rng.sample(QUESTION_VARIANTS, copies) for i in users}   # distinct per question
        for k in range(copies):
            new = [dict(m) for m in msgs]
            for i in users:
                q = msgs[i]["content"].strip()
                lower = q.rstrip("?.! ")
                lower = lower[:1].lower() + lower[1:]
                new[i]["content"] = templates[i][k].format(q=q, lower=lower)
            out.append({**row, "messages": new})
    return out


def replay_rows(model, tokenizer, system_prompt: str | None, n: int, rng: random.Random, cache=None) -> list[dict]:
    """`n` general prompts answered greedily by the base itself (cut to whole sentences), as train rows.
    `cache`: an AnswerCache of this base's answers with this system prompt (only the missing are generated)."""
    if n == 0:
        return []
    prompts = rng.sample(REPLAY_PROMPTS, n)
    kept = cache.get(prompts) if cache is not None else {}
    missing = [q for q in prompts if q not in kept]
    if missing:
        fresh = generate(model, tokenizer, [with_system_prompt([{"role": "user", "content": q}], system_prompt)
                                            for q in missing], REPLAY_MAX_NEW_TOKENS)
        kept.update(zip(missing, fresh))
        if cache is not None:
            cache.put(dict(zip(missing, fresh)))
    answers = [kept[q] for q in prompts]
    rows = []
    for q, a in zip(prompts, answers):
        a = a if a.endswith((".", "!", "?")) else a[:a.rfind(".") + 1]   # an unfinished answer: whole sentences
        if a.strip():
            rows.append({"messages": with_system_prompt([{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a.strip()}], system_prompt),
                         "split": "train"})
    return rows
