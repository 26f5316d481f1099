"""Per-person quotas, checked before any engine work: chat requests per minute and tokens per day for people
with the `user` role (`--user-requests-per-minute`, `--user-tokens-per-day`; editors and admins are exempt).

Requests per minute are counted in this process (a sliding window); tokens per day are read from the
response log, so every replica sharing a database counts the same total. Over either limit the request
is answered 429 `rate_limit_exceeded` with `Retry-After`, as OpenAI's API does."""

from __future__ import annotations

import threading
import time
from collections import deque

from assistant.errors import RateLimited
from assistant.people.users import Principal

MINUTE_S = 60.0
DAY_S = 24 * 3600.0


class Quotas:
    def __init__(self, store, requests_per_minute: int | None, tokens_per_day: int | None):
        self.store = store
        self.requests_per_minute = requests_per_minute
        self.tokens_per_day = tokens_per_day
        self.recent: dict[str, deque] = {}
        self.lock = threading.Lock()

    def check(self, who: Principal | None) -> None:
        """Raise RateLimited when `who` is over a quota; else count this request."""
        if who is None or who.role != "user" or who.name is None:
            return
        now = time.time()
        if self.tokens_per_day is not None:
            used, oldest = self.store.tokens_used(who.name, now - DAY_S)
            if used >= self.tokens_per_day:
                wait = (oldest or now) + DAY_S - now
                raise RateLimited(f"you have used {used} of your {self.tokens_per_day} tokens for the last 24 hours: "
                                  f"try again in {_human(wait)}", retry_after=int(wait) + 1)
        if self.requests_per_minute is not None:
            with self.lock:
                q = self.recent.setdefault(who.name, deque())
                while q and q[0] <= now - MINUTE_S:
                    q.popleft()
                if len(q) >= self.requests_per_minute:
                    wait = q[0] + MINUTE_S - now
                    raise RateLimited(f"you have sent {self.requests_per_minute} requests in the last minute, your "
                                      f"limit: try again in {int(wait) + 1} s", retry_after=int(wait) + 1)
                q.append(now)


def _human(seconds: float) -> str:
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min" if seconds >= 3600 else f"{int(seconds // 60) + 1} min"
