"""Greedy answers kept between jobs: the base's self-replay answers (training) and the base's and live
versions' answers to the gate's probe questions (evaluation) depend only on the model, the system prompt
and the token limit, so each is computed once and reused by every later job and retry.

`AnswerCache(folder, identity)` is one JSON file of {question: answer} per identity (everything the answers
depend on, hashed: the base's fingerprint and dtype, an adapter's weights, the system prompt, the limit).
Greedy decoding does not depend on what else is decoded beside it, so a kept answer equals a fresh one.
With `folder` None nothing is kept. A cache that cannot be read or written is only a slower job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def identity(base, system_prompt: str | None, max_new_tokens: int, adapter_dir=None, **more) -> str:
    """The hash of what answers depend on (`more`: anything else, e.g. which generator made them)."""
    h = hashlib.sha256(json.dumps({"base": base.fingerprint, "dtype": str(getattr(base, "dtype", "")),
                                   "system": system_prompt, "tokens": max_new_tokens, **more},
                                  sort_keys=True, default=str).encode())
    if adapter_dir is not None:
        h.update((Path(adapter_dir) / ADAPTER_WEIGHTS).read_bytes())
    return h.hexdigest()[:32]


class AnswerCache:
    def __init__(self, folder, key: str):
        self.path = Path(folder) / f"{key}.json" if folder is not None else None

    def get(self, questions: list[str]) -> dict[str, str]:
        """The kept answers of those of `questions` that have one."""
        if self.path is None:
            return {}
        try:
            kept = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {q: kept[q] for q in questions if isinstance(kept, dict) and isinstance(kept.get(q), str)}

    def all_of(self, questions: list[str]) -> list[str] | None:
        """Answers to every one of `questions`, in order, or None when any is missing."""
        kept = self.get(questions)
        return [kept[q] for q in questions] if len(kept) == len(set(questions)) else None

    def put(self, answers: dict[str, str]) -> None:
        if self.path is None or not answers:
            return
        from assistant.files import atomic_write_text
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                kept = json.loads(self.path.read_text())
            except (OSError, ValueError):
                kept = {}
            atomic_write_text(self.path, json.dumps({**(kept if isinstance(kept, dict) else {}), **answers}))
        except OSError as e:
            log.warning("could not keep answers: %s", e)
