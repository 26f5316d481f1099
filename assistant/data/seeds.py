"""Seed example files: JSON Lines of {"messages": [...]} parsed once, for the UI, the API's callers and the CLI."""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 5      # problems listed in one message; the rest are counted


def parse_jsonl(text: str) -> tuple[list[dict], list[str]]:
    """-> (examples, problems): one example per non-empty line; a line that is not JSON becomes a problem
    naming its line number, and the others are still imported."""
    examples, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            examples.append(json.loads(line))
        except ValueError:
            problems.append(f"line {n}: not JSON (each line must be one {{\"messages\": [...]}} object)")
    return examples, problems


def summary(added: int, problems: list[str]) -> str:
    """One line saying what was imported and the first few problems."""
    text = f"imported {added} examples"
    if problems:
        text += f"; rejected {len(problems)}: " + "; ".join(problems[:MAX_REPORTED_ERRORS])
        if len(problems) > MAX_REPORTED_ERRORS:
            text += f"; and {len(problems) - MAX_REPORTED_ERRORS} more"
    return text
