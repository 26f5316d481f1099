"""Find and scrub personal data in training text: emails, card numbers (Luhn-checked), IBANs (mod-97
checked), US social security numbers, IPv4 addresses and phone numbers.

Checksums keep random digit runs (order numbers, amounts) from being flagged. `scrub(text)` replaces
each finding with a typed placeholder such as `[EMAIL]` and says how many it replaced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PHONE_MIN_DIGITS = 7
PHONE_MAX_DIGITS = 15            # E.164
CARD_MIN_DIGITS, CARD_MAX_DIGITS = 13, 19
IBAN_MIN_LEN, IBAN_MAX_LEN = 15, 34

EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w])")
IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
CARD_RE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
SSN_RE = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")
IP_RE = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
PHONE_RE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,5}(?![\w])")
DATE_RE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
# Issuer prefixes of the major card networks: with Luhn, this leaves ~1% of random 16-digit runs.
CARD_PREFIX_RE = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|3[0689]|6(?:011|5|4[4-9]|22)|35|62)")


@dataclass(frozen=True)
class Finding:
    kind: str        # EMAIL | IBAN | CARD | SSN | IP | PHONE
    start: int
    end: int
    value: str


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "").upper()
    if not (IBAN_MIN_LEN <= len(s) <= IBAN_MAX_LEN) or not s[2:4].isdigit():
        return False
    rearranged = s[4:] + s[:4]
    try:
        number = int("".join(str(int(ch, 36)) for ch in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _card(value: str) -> bool:
    digits = re.sub(r"\D", "", value)
    return CARD_MIN_DIGITS <= len(digits) <= CARD_MAX_DIGITS and bool(CARD_PREFIX_RE.match(digits)) \
        and luhn_ok(digits)


def _ssn(match: re.Match) -> bool:
    area, group, serial = match.groups()
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _ip(value: str) -> bool:
    parts = value.split(".")
    return all(int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in parts)


def _phone(value: str) -> bool:
    digits = re.sub(r"\D", "", value)
    if not (PHONE_MIN_DIGITS <= len(digits) <= PHONE_MAX_DIGITS) or DATE_RE.match(value):
        return False
    # A bare run of digits is more often an id or an amount than a phone: require phone-like shape.
    separators = len(re.findall(r"[ .()-]", value))
    return value.startswith("+") or "(" in value or separators >= 2 or (separators == 1 and len(digits) >= 9)


_DETECTORS = (
    ("EMAIL", EMAIL_RE, lambda m: True),
    ("IBAN", IBAN_RE, lambda m: iban_ok(m.group(0))),
    ("CARD", CARD_RE, lambda m: _card(m.group(0))),
    ("SSN", SSN_RE, _ssn),
    ("IP", IP_RE, lambda m: _ip(m.group(0))),
    ("PHONE", PHONE_RE, lambda m: _phone(m.group(0))),
)


def find(text: str) -> list[Finding]:
    """Non-overlapping findings, in text order; earlier detectors win overlaps."""
    found: list[Finding] = []
    taken: list[tuple[int, int]] = []
    for kind, regex, check in _DETECTORS:
        for m in regex.finditer(text):
            start, end = m.span()
            value = m.group(0).rstrip(" .-")
            end = start + len(value)
            if any(start < e and s < end for s, e in taken) or not check(m):
                continue
            found.append(Finding(kind, start, end, value))
            taken.append((start, end))
    return sorted(found, key=lambda f: f.start)


def scrub(text: str) -> tuple[str, int]:
    """Replace each finding with `[KIND]` -> (scrubbed text, number replaced)."""
    findings = find(text)
    if not findings:
        return text, 0
    parts, pos = [], 0
    for f in findings:
        parts += [text[pos:f.start], f"[{f.kind}]"]
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts), len(findings)
