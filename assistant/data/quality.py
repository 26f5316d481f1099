"""Cheap text checks curation runs on every candidate: garbage (control characters, a letter repeated many
times, mostly symbols, a few words said over and over) and prompt-injection markers."""

from __future__ import annotations

import re
import unicodedata

GARBAGE_MIN_CHARS = 12           # shorter texts are judged by too_short, not by the garbage ratios
GARBAGE_MIN_WORDCHAR_RATIO = 0.5  # letters+digits over non-space characters
GARBAGE_MIN_UNIQUE_WORDS = 0.25  # distinct/total words, for texts of GARBAGE_REPEAT_WORDS+ words
GARBAGE_REPEAT_WORDS = 12

INJECTION_RE = re.compile("|".join([
    r"\b(?:ignore|disregard|forget|override)\b[\w\s,]{0,30}?\b(?:previous|prior|above|earlier|preceding|all|your|the)\s+"
    r"(?:instructions?|prompts?|rules|directions|guidelines|context)",
    r"\byou\s+are\s+now\s+(?:in\s+)?(?:dan|developer\s+mode|jailbroken|unrestricted)",
    r"\b(?:reveal|print|show|repeat|output|leak)\b[\w\s]{0,20}\b(?:system|hidden|initial)\s+(?:prompt|instructions?|message)",
    r"\bdo\s+anything\s+now\b", r"\bjailbreak", r"\bdeveloper\s+mode\s+(?:enabled|on)\b",
    r"<\|im_start\|>|<\|system\|>|<\|endoftext\|>|\[/?INST\]|<<SYS>>",
    r"^\s*#{2,}\s*(?:system|new instructions?)\b",
]), re.IGNORECASE | re.MULTILINE)
REPEAT_CHAR_RE = re.compile(r"([^\W\d_])\1{5,}")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def normalize(text: str) -> str:
    """Case-folded NFKC text with punctuation as spaces: what exact duplicates and word counts compare."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def is_garbage(text: str) -> bool:
    if CONTROL_RE.search(text) or REPEAT_CHAR_RE.search(text):
        return True
    chars = [c for c in text if not c.isspace()]
    if len(chars) >= GARBAGE_MIN_CHARS and sum(c.isalnum() for c in chars) / len(chars) < GARBAGE_MIN_WORDCHAR_RATIO:
        return True
    words = normalize(text).split()
    return len(words) >= GARBAGE_REPEAT_WORDS and len(set(words)) / len(words) < GARBAGE_MIN_UNIQUE_WORDS


def has_injection(text: str) -> bool:
    return bool(INJECTION_RE.search(text))
