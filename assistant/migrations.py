"""Schema of the SQLite store as an append-only list of named migrations.

Never edit or reorder a migration that has shipped: add a new one at the end. `migrate(conn)` applies
the missing ones in order inside the caller's transaction and records each name in `migrations`, so
a database of any age is brought up to date, and applying twice is a no-op.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    name: str
    statements: tuple[str, ...]   # one SQL statement each (no executescript: it would COMMIT)


MIGRATIONS: list[Migration] = [
    Migration("m001_responses", (
        """CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            domain TEXT NOT NULL,
            adapter_version TEXT,
            model TEXT NOT NULL,
            messages TEXT NOT NULL,           -- JSON list of {role, content}: the full prompt
            answer TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            latency_ms REAL NOT NULL DEFAULT 0,
            ttft_ms REAL,
            finish_reason TEXT NOT NULL DEFAULT 'stop',
            user TEXT,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX responses_domain_time ON responses(domain, created_at)",
    )),
    Migration("m002_feedback", (
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            response_id TEXT NOT NULL REFERENCES responses(id),
            rating TEXT NOT NULL CHECK (rating IN ('up', 'down')),
            correction TEXT,
            reason TEXT,
            user TEXT,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX feedback_response ON feedback(response_id)",
    )),
    Migration("m003_examples", (
        """CREATE TABLE examples (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            domain TEXT NOT NULL,
            messages TEXT NOT NULL,           -- JSON list of {role, content}, last one assistant
            source TEXT NOT NULL DEFAULT 'seed',
            user TEXT,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX examples_domain ON examples(domain)",
    )),
    Migration("m004_reviews", (
        """CREATE TABLE reviews (
            domain TEXT NOT NULL,
            item_key TEXT NOT NULL,           -- 'example:12', 'feedback:7'
            status TEXT CHECK (status IN ('approved', 'rejected')),
            edited_messages TEXT,             -- JSON, replaces the candidate's messages when set
            updated_at REAL NOT NULL,
            PRIMARY KEY (domain, item_key)
        )""",
    )),
    Migration("m005_snapshots", (
        """CREATE TABLE snapshots (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            domain TEXT NOT NULL,
            hash TEXT NOT NULL,
            report TEXT NOT NULL,             -- JSON: the curation report
            path TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX snapshots_domain ON snapshots(domain, id)",
    )),
    Migration("m006_jobs", (
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            domain TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            settings TEXT NOT NULL DEFAULT '{}',
            progress REAL NOT NULL DEFAULT 0,
            step INTEGER NOT NULL DEFAULT 0,
            total_steps INTEGER NOT NULL DEFAULT 0,
            loss REAL,
            adapter_version TEXT,
            promoted INTEGER NOT NULL DEFAULT 0,
            metrics TEXT NOT NULL DEFAULT '{}',
            error TEXT,
            pid INTEGER,
            log TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL
        )""",
        # One training job at a time, for any domain: enforced by the database, not by a check-then-insert.
        "CREATE UNIQUE INDEX jobs_one_active ON jobs((1)) WHERE status IN ('queued', 'running')",
        "CREATE INDEX jobs_domain ON jobs(domain, created_at)",
        """CREATE TABLE job_losses (
            job_id TEXT NOT NULL REFERENCES jobs(id),
            step INTEGER NOT NULL,
            loss REAL NOT NULL,
            PRIMARY KEY (job_id, step)
        )""",
    )),
    Migration("m007_embeddings", (
        """CREATE TABLE embeddings (
            model TEXT NOT NULL,
            content_hash TEXT NOT NULL,       -- sha256 of the embedded text
            vector BLOB NOT NULL,             -- float32, normalized
            PRIMARY KEY (model, content_hash)
        ) WITHOUT ROWID""",
    )),
    Migration("m008_job_stages", (
        "ALTER TABLE jobs ADD COLUMN stage TEXT",                          # the current stage's name
        "ALTER TABLE jobs ADD COLUMN stages TEXT NOT NULL DEFAULT '[]'",   # JSON: see assistant/stages.py
    )),
    # Every rating given, append-only (a feedback row is updated in place when its user rates again): what
    # the Prometheus counters count, so they only go up. Older ratings are carried over as one event each.
    Migration("m009_feedback_events", (
        """CREATE TABLE feedback_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            feedback_id INTEGER NOT NULL REFERENCES feedback(id),
            domain TEXT NOT NULL,             -- of the rated response, copied so counting needs no join
            adapter_version TEXT,
            rating TEXT NOT NULL CHECK (rating IN ('up', 'down')),
            corrected INTEGER NOT NULL DEFAULT 0,   -- this rating came with a correction
            created_at REAL NOT NULL
        )""",
        "INSERT INTO feedback_events (feedback_id, domain, adapter_version, rating, corrected, created_at) "
        "SELECT f.id, r.domain, r.adapter_version, f.rating, f.correction IS NOT NULL, f.created_at "
        "FROM feedback f JOIN responses r ON r.id = f.response_id ORDER BY f.id",
    )),
    # A user who rates or corrects one answer again updates the record; what it said before is kept in
    # `history` (JSON list of {rating, correction, reason, created_at}, oldest first). An undone rating
    # keeps its record with `withdrawn_at` set: it counts nowhere and trains nothing.
    Migration("m010_feedback_history", (
        "ALTER TABLE feedback ADD COLUMN history TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE feedback ADD COLUMN withdrawn_at REAL",
    )),
]


def applied(conn: sqlite3.Connection) -> list[str]:
    """Names of the migrations recorded in this database, in the order they were applied."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='migrations'").fetchone()
    if not exists:
        return []
    return [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY rowid")]


def migrate(conn: sqlite3.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply the missing migrations in order, in the caller's transaction; returns the names applied."""
    migrations = MIGRATIONS if migrations is None else migrations
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = set(applied(conn))
    ran = []
    for m in migrations:
        if m.name in done:
            continue
        for statement in m.statements:
            conn.execute(statement)
        conn.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (m.name, time.time()))
        ran.append(m.name)
    return ran
