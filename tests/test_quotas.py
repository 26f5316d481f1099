"""Per-person quotas on a real store (SQLite and PostgreSQL): tokens per day counted from the response log
(so every replica sharing the database counts the same), requests per minute in a sliding window; editors,
admins and the open app are never counted."""

from __future__ import annotations

import time

import pytest

from assistant.data.store import Store
from assistant.errors import RateLimited
from assistant.people.quotas import DAY_S, Quotas
from assistant.people.users import OPEN, Principal

ULLA = Principal("ulla", "user")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return Store(tmp_path / "s.db")
    return Store(request.getfixturevalue("postgres_url"))


def _answer(store, rid, who, tokens, at):
    store.log_response(id=rid, domain="support", adapter_version=None, model="support",
                       messages=[{"role": "user", "content": "hi"}], answer="hello", prompt_tokens=tokens // 2,
                       completion_tokens=tokens - tokens // 2, latency_ms=1.0, ttft_ms=None, finish_reason="stop",
                       principal=who, created_at=at)


def test_tokens_per_day_come_from_the_response_log(store):
    now = time.time()
    _answer(store, "old", "ulla", 900, now - DAY_S - 60)      # yesterday's: not counted
    _answer(store, "r1", "ulla", 600, now - 3600)
    _answer(store, "r2", "uma", 5000, now - 60)               # someone else's
    one, other = Quotas(store, None, 1000), Quotas(store, None, 1000)   # two replicas on one database
    one.check(ULLA)
    _answer(store, "r3", "ulla", 400, now - 30)
    for replica in (one, other):
        with pytest.raises(RateLimited) as over:
            replica.check(ULLA)
        assert "1000 tokens" in over.value.message and 22 * 3600 < over.value.retry_after <= 23 * 3600 + 1
    for exempt in (Principal("eddie", "editor"), Principal("ada", "admin"), OPEN):
        one.check(exempt)


def test_requests_per_minute_slide(store):
    q = Quotas(store, 2, None)
    q.check(ULLA), q.check(ULLA)
    with pytest.raises(RateLimited) as over:
        q.check(ULLA)
    assert over.value.status == 429 and 1 <= over.value.retry_after <= 61
    q.check(Principal("uma", "user"))                          # per person
    q.recent["ulla"][0] -= 61                                   # a minute later the oldest leaves the window
    q.check(ULLA)
