"""What app replicas and training workers that share one database tell each other through it (a part of
the Store): who runs which job, and which versions went live.

- **Jobs.** A job is queued by whichever replica the user clicked on; a worker claims the oldest queued
  one (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so two workers never claim the same job; SQLite's
  write lock does the same on one machine) and records itself in `jobs.worker`. The database allows one
  queued-or-running job per domain.
- **Activations.** A replica that activated a version records it ("done"); a training worker that is not
  beside a server asks for one ("requested") and the first replica to claim the request activates it.
  Every change NOTIFYs `CHANNEL_ACTIVATIONS` on PostgreSQL; replicas also poll (replicas.py).

Channels carry no data a listener must trust: a notification only says "look at the table now".
"""

from __future__ import annotations

import time

CHANNEL_JOBS = "assistant_jobs"
CHANNEL_ACTIVATIONS = "assistant_activations"
ACTIVATION_STATUSES = ("requested", "claimed", "done", "failed")


class Coordination:
    """Mixed into `Store`: uses its `_write` and `_read`."""

    # Jobs ----------------------------------------------------------------------------------------
    def claim_job(self, worker: str, job_id: str | None = None) -> str | None:
        """Claim the oldest queued job nobody claimed (or that one job) for `worker` -> its id, or None.
        Idle pollers only read: the write transaction is taken when a job waits."""
        if not job_id and not self._read("SELECT 1 FROM jobs WHERE status = 'queued' AND worker IS NULL LIMIT 1"):
            return None

        def claim(c):
            where, params = ("AND id = ? ", (job_id,)) if job_id else ("", ())
            row = c.execute(f"SELECT id FROM jobs WHERE status = 'queued' AND worker IS NULL {where}"
                            f"ORDER BY seq LIMIT 1{c.skip_locked}", params).fetchone()
            if row is None:
                return None
            c.execute("UPDATE jobs SET worker = ? WHERE id = ?", (worker, row[0]))
            return row[0]
        return self._write(claim)

    def notify_jobs(self, job_id: str) -> None:
        """Wake the workers listening (a job was queued)."""
        self._write(lambda c: c.notify(CHANNEL_JOBS, job_id))

    def owned_jobs(self) -> list[dict]:
        """Queued or running jobs some worker claimed, and running ones no worker did (an older version of
        the app ran them): what a reaper checks."""
        return [{"job_id": r[0], "domain": r[1], "status": r[2], "worker": r[3], "pid": r[4]} for r in self._read(
            "SELECT id, domain, status, worker, pid FROM jobs WHERE (status = 'queued' AND worker IS NOT NULL) "
            "OR status = 'running'")]

    def put_snapshot_file(self, domain: str, snapshot_hash: str, content: bytes) -> None:
        self._write(lambda c: c.execute("INSERT INTO snapshot_files (domain, hash, content) VALUES (?,?,?) "
                                        "ON CONFLICT DO NOTHING", (domain, snapshot_hash, content)))

    def get_snapshot_file(self, domain: str, snapshot_hash: str) -> bytes | None:
        rows = self._read("SELECT content FROM snapshot_files WHERE domain = ? AND hash = ?", (domain, snapshot_hash))
        return bytes(rows[0][0]) if rows else None

    # Activations ---------------------------------------------------------------------------------
    def record_activation(self, domain: str, version: str, *, status: str = "done", by: str | None = None) -> int:
        """A version went live ("done"), or a worker asks for it ("requested") -> the record's id."""
        if status not in ACTIVATION_STATUSES:
            raise ValueError(f"status={status!r}: use one of {', '.join(ACTIVATION_STATUSES)}")
        now = time.time()

        def insert(c):
            aid = c.execute("INSERT INTO activations (domain, version, status, requested_by, created_at, updated_at) "
                            "VALUES (?,?,?,?,?,?) RETURNING id", (domain, version, status, by, now, now)).fetchone()[0]
            c.notify(CHANNEL_ACTIVATIONS, str(aid))
            return aid
        return self._write(insert)

    def claim_activation(self, by: str) -> dict | None:
        """The oldest requested activation, now claimed by `by` (a worker name: the requester checks that it
        lives), or None (idle pollers only read)."""
        if not self._read("SELECT 1 FROM activations WHERE status = 'requested' LIMIT 1"):
            return None

        def claim(c):
            row = c.execute("SELECT id, domain, version FROM activations WHERE status = 'requested' "
                            f"ORDER BY id LIMIT 1{c.skip_locked}").fetchone()
            if row is None:
                return None
            c.execute("UPDATE activations SET status = 'claimed', claimed_by = ?, updated_at = ? WHERE id = ?",
                      (by, time.time(), row[0]))
            return {"id": row[0], "domain": row[1], "version": row[2]}
        return self._write(claim)

    def finish_activation(self, activation_id: int, status: str, error: str | None = None,
                          *, only_from: str | None = None) -> bool:
        """Set an activation's outcome (`only_from`: only if it still has that status) -> whether it changed."""
        def update(c):
            cond, params = ("AND status = ?", (only_from,)) if only_from else ("", ())
            cur = c.execute(f"UPDATE activations SET status = ?, error = ?, updated_at = ? WHERE id = ? {cond}",
                            (status, error, time.time(), activation_id, *params))
            if cur.rowcount:
                c.notify(CHANNEL_ACTIVATIONS, str(activation_id))
            return cur.rowcount > 0
        return self._write(update)

    def get_activation(self, activation_id: int) -> dict | None:
        rows = self._read("SELECT * FROM activations WHERE id = ?", (activation_id,))
        return dict(rows[0]) if rows else None

    def activations_since(self, after: float) -> list[dict]:
        """Activations done or changed at or after `after` (a time), oldest first: what a replica re-checks."""
        return [dict(r) for r in self._read("SELECT * FROM activations WHERE updated_at >= ? AND status = 'done' "
                                            "ORDER BY id", (after,))]
