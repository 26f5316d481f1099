"""Canary rollouts in the store: which version serves which share of a domain's conversations beside the
live one, since when, and how its answers and the live version's were rated since then.

One repository with one owner (monitoring/canary.py decides; this only records). One rollout per domain
runs at a time (a unique index); ending one is a compare-and-set on `status = 'running'`, so among
replicas sharing the database exactly one ends it, and only that one acts on the verdict.
"""

from __future__ import annotations

import json
import time

from assistant.errors import Conflict

STATUSES = ("running", "promoted", "rolled back", "stopped")


class Rollouts:
    def __init__(self, store):
        self.store = store

    def start(self, domain: str, version: str, baseline: str | None, share: float, by: str | None = None) -> dict:
        """A running rollout of domain@version against `baseline` -> its record; Conflict while one runs."""
        def insert(c):
            if c.execute("SELECT 1 FROM rollouts WHERE domain = ? AND status = 'running'" + c.for_update,
                         (domain,)).fetchone():
                return None
            seq = c.next_seq()[0]
            return c.execute("INSERT INTO rollouts (domain, version, baseline, share, status, start_seq, started_by, "
                             "started_at) VALUES (?,?,?,?,?,?,?,?) RETURNING id",
                             (domain, version, baseline, float(share), "running", seq, by, time.time())).fetchone()[0]
        try:
            rid = self.store._write(insert)
        except self.store.db.IntegrityError:
            rid = None
        if rid is None:
            running = self.running(domain)
            raise Conflict(f"{domain}@{running['version'] if running else '?'} is already out as a canary: stop it "
                           f"(DELETE /api/domains/{domain}/canary) or let its users' ratings decide first")
        return self.get(rid)

    def get(self, rollout_id: int) -> dict | None:
        rows = self.store._read("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        return _rollout(rows[0]) if rows else None

    def running(self, domain: str) -> dict | None:
        rows = self.store._read("SELECT * FROM rollouts WHERE domain = ? AND status = 'running'", (domain,))
        return _rollout(rows[0]) if rows else None

    def latest(self, domain: str) -> dict | None:
        """The running rollout of `domain`, or else its last one."""
        rows = self.store._read("SELECT * FROM rollouts WHERE domain = ? ORDER BY id DESC LIMIT 1", (domain,))
        return _rollout(rows[0]) if rows else None

    def set_share(self, rollout_id: int, share: float) -> bool:
        return self.store._write(lambda c: c.execute(
            "UPDATE rollouts SET share = ? WHERE id = ? AND status = 'running'", (float(share), rollout_id)).rowcount > 0)

    def record_verdict(self, rollout_id: int, verdict: dict) -> None:
        self.store._write(lambda c: c.execute("UPDATE rollouts SET verdict = ? WHERE id = ?",
                                              (json.dumps(verdict), rollout_id)))

    def end(self, rollout_id: int, status: str, verdict: dict | None = None) -> bool:
        """End a running rollout -> True for the one caller that ended it (False: it had ended already)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"status={status!r}: use one of {', '.join(STATUSES[1:])}")

        def update(c):
            cur = c.execute("UPDATE rollouts SET status = ?, ended_at = ?, verdict = COALESCE(?, verdict) "
                            "WHERE id = ? AND status = 'running'",
                            (status, time.time(), None if verdict is None else json.dumps(verdict), rollout_id))
            return cur.rowcount > 0
        return self.store._write(update)

    def arms(self, rollout: dict) -> dict[str | None, tuple[int, int]]:
        """{version: (rated answers, rated down)} of the rollout's two versions since it started: each
        person's standing rating of an answer counts once (a thumb taken back does not count)."""
        rows = self.store._read(
            "SELECT r.adapter_version, COUNT(*), SUM(CASE WHEN f.rating = 'down' THEN 1 ELSE 0 END) "
            "FROM feedback f JOIN responses r ON r.id = f.response_id "
            "WHERE r.domain = ? AND r.seq > ? AND f.withdrawn_at IS NULL GROUP BY r.adapter_version",
            (rollout["domain"], rollout["start_seq"]))
        counts = {r[0]: (int(r[1]), int(r[2] or 0)) for r in rows}
        return {v: counts.get(v, (0, 0)) for v in (rollout["baseline"], rollout["version"])}

    def ratings(self, rollout: dict) -> list[tuple[str | None, bool]]:
        """The rollout's standing ratings in the order they were given: (version rated, rated down)."""
        rows = self.store._read(
            "SELECT r.adapter_version, f.rating FROM feedback f JOIN responses r ON r.id = f.response_id "
            "WHERE r.domain = ? AND r.seq > ? AND f.withdrawn_at IS NULL ORDER BY f.seq",
            (rollout["domain"], rollout["start_seq"]))
        return [(r[0], r[1] == "down") for r in rows]


def _rollout(row) -> dict:
    d = dict(row)
    d["verdict"] = json.loads(d["verdict"]) if d.get("verdict") else None
    return d
