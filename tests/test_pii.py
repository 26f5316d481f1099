"""PII detection: what is found and replaced, and what must not be (checksums keep digit runs safe)."""

import random

from assistant.data import pii


def test_each_kind_is_found_and_replaced():
    cases = {
        "write to jane.doe+shop@example.co.uk today": ("EMAIL", "jane.doe+shop@example.co.uk"),
        "card 4111 1111 1111 1111 was declined": ("CARD", "4111 1111 1111 1111"),
        "amex 3782-822463-10005 please": ("CARD", "3782-822463-10005"),
        "pay to DE89 3704 0044 0532 0130 00 now": ("IBAN", "DE89 3704 0044 0532 0130 00"),
        "iban GB82WEST12345698765432": ("IBAN", "GB82WEST12345698765432"),
        "my ssn is 123-45-6789": ("SSN", "123-45-6789"),
        "server 192.168.10.254 is down": ("IP", "192.168.10.254"),
        "call +1 415-555-0132 now": ("PHONE", "+1 415-555-0132"),
        "ring (020) 7946 0958 please": ("PHONE", "(020) 7946 0958"),
        "phone 06 12 34 56 78": ("PHONE", "06 12 34 56 78"),
    }
    for text, (kind, value) in cases.items():
        found = pii.find(text)
        assert [(f.kind, f.value) for f in found] == [(kind, value)], (text, found)
        scrubbed, n = pii.scrub(text)
        assert n == 1 and value not in scrubbed and f"[{kind}]" in scrubbed


def test_checksums_and_shapes_keep_ordinary_numbers():
    for text in ["card 4111 1111 1111 1112 (bad Luhn)",
                 "iban DE00 3704 0044 0532 0130 00 (bad check digits)",
                 "order 1234567890123456 shipped", "the total is 1,234,567.89 EUR",
                 "meeting on 2024-05-01 at 10:30", "version 1.2.3 released", "score 3-1",
                 "ip 999.1.1.1", "reference 20240501", "room 12, floor 3", "call me at 5pm"]:
        assert pii.find(text) == [], (text, pii.find(text))
    assert pii.scrub("nothing here") == ("nothing here", 0)


def test_random_digit_runs_are_rarely_flagged():
    rng = random.Random(0)
    runs = ["".join(rng.choice("0123456789") for _ in range(16)) for _ in range(2000)]
    flagged = sum(bool(pii.find(f"order {r} shipped")) for r in runs)
    # Luhn alone passes 10%; with issuer prefixes ~3% remain, and those are valid-looking card numbers.
    assert flagged / len(runs) < 0.04


def test_luhn_and_iban_checks():
    assert pii.luhn_ok("79927398713") and not pii.luhn_ok("79927398710")
    assert pii.iban_ok("FR14 2004 1010 0505 0001 3M02 606") and not pii.iban_ok("FR15 2004 1010 0505 0001 3M02 606")


def test_several_findings_in_one_text():
    text = "Mail bob@corp.com or call +44 20 7946 0958; card 5555 5555 5555 4444."
    scrubbed, n = pii.scrub(text)
    assert n == 3
    assert scrubbed == "Mail [EMAIL] or call [PHONE]; card [CARD]."
