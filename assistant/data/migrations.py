"""Schema of the store as an append-only list of named migrations, one list for SQLite and PostgreSQL.

Never edit or reorder a migration that has shipped: add a new one at the end. `migrate(conn)` applies
the missing ones in order inside the caller's transaction and records each name in `migrations`, so
a database of any age is brought up to date, and applying twice is a no-op. On PostgreSQL the
transaction first takes an advisory lock, so replicas that start together migrate once, one after the
other (the later ones find nothing left to do).

Statements are written in SQLite's dialect; `conn.ddl` maps the column types Postgres spells otherwise
(AUTOINCREMENT, REAL, BLOB). A migration whose SQL must differ carries its Postgres text in `postgresql`.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from assistant.data.db import MIGRATION_LOCK_KEY, SqliteConn


@dataclass(frozen=True)
class Migration:
    name: str
    statements: tuple[str, ...]   # one SQL statement each (no executescript: it would COMMIT)
    postgresql: tuple[str, ...] | None = None   # the statements on PostgreSQL, where they differ

    def for_kind(self, kind: str) -> tuple[str, ...]:
        return self.postgresql if kind == "postgresql" and self.postgresql is not None else self.statements


SEQ_TABLES = ("responses", "feedback", "examples", "jobs")
SEQ_COLUMNS = tuple(stmt for t in SEQ_TABLES for stmt in (
    f"ALTER TABLE {t} ADD COLUMN seq BIGINT",
    f"UPDATE {t} SET seq = CAST(created_at * 1000000 AS BIGINT)"))
SEQ_MAX = " UNION ALL ".join(f"SELECT COALESCE(MAX(seq), 0) AS m FROM {t}" for t in SEQ_TABLES)

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
        "ALTER TABLE jobs ADD COLUMN stages TEXT NOT NULL DEFAULT '[]'",   # JSON: see assistant/data/stages.py
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
        "SELECT f.id, r.domain, r.adapter_version, f.rating, CASE WHEN f.correction IS NULL THEN 0 ELSE 1 END, "
        "f.created_at "
        "FROM feedback f JOIN responses r ON r.id = f.response_id ORDER BY f.id",
    )),
    # A user who rates or corrects one answer again updates the record; what it said before is kept in
    # `history` (JSON list of {rating, correction, reason, created_at}, oldest first). An undone rating
    # keeps its record with `withdrawn_at` set: it counts nowhere and trains nothing.
    Migration("m010_feedback_history", (
        "ALTER TABLE feedback ADD COLUMN history TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE feedback ADD COLUMN withdrawn_at REAL",
    )),
    # who authenticated (an API key holder, a signed-in user), apart from the `user` a request declares
    Migration("m011_principal_apart_from_user", (
        "ALTER TABLE responses ADD COLUMN principal TEXT",
        "ALTER TABLE feedback ADD COLUMN principal TEXT",
    )),
    # The order transactions committed in, for counting only-growing totals across replicas: on PostgreSQL
    # an id is taken before its transaction commits, so "every id up to the largest seen" can miss one
    # still in flight; every transaction id below the oldest one still running has ended (see
    # Store.response_totals). SQLite commits one writer at a time, so there rowids are that order already.
    Migration("m012_commit_order", (
        "ALTER TABLE responses ADD COLUMN txid INTEGER",
        "ALTER TABLE feedback_events ADD COLUMN txid INTEGER",
    ), postgresql=(
        "ALTER TABLE responses ADD COLUMN txid BIGINT NOT NULL DEFAULT txid_current()",
        "CREATE INDEX responses_txid ON responses(txid)",
        "ALTER TABLE feedback_events ADD COLUMN txid BIGINT NOT NULL DEFAULT txid_current()",
        "CREATE INDEX feedback_events_txid ON feedback_events(txid)",
    )),
    # Training workers: one queued-or-running job per domain (jobs of other domains queue beside it), and
    # which worker runs each job ("host:pid"), so a dead worker's job can be told from a live one's.
    Migration("m013_job_workers", (
        "DROP INDEX jobs_one_active",
        "CREATE UNIQUE INDEX jobs_one_active_per_domain ON jobs(domain) WHERE status IN ('queued', 'running')",
        "CREATE INDEX jobs_status ON jobs(status, created_at)",
        "ALTER TABLE jobs ADD COLUMN worker TEXT",
    )),
    # Activations across replicas that share the database and the adapters folder. "done": one made by a
    # serving replica, which the others learn of (NOTIFY on PostgreSQL, polling this table otherwise) to load
    # the version before their next answer; "requested": a training worker elsewhere asks whichever serving
    # replica claims it first to activate (the one activation path), and waits for "done" or "failed".
    Migration("m014_activations", (
        """CREATE TABLE activations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            domain TEXT NOT NULL,
            version TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('requested', 'claimed', 'done', 'failed')),
            requested_by TEXT,                -- the job that asked, or the replica that did it
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX activations_status ON activations(status, id)",
    )),
    # A job's dataset snapshot file, for a worker on another machine (its state folder does not have it).
    Migration("m015_snapshot_files", (
        """CREATE TABLE snapshot_files (
            domain TEXT NOT NULL,
            hash TEXT NOT NULL,
            content BLOB NOT NULL,            -- the snapshot's JSON Lines, as written
            PRIMARY KEY (domain, hash)
        )""",
    )),
    # People and their powers (people/users.py): stored users with a role ('user', 'editor', 'admin') and the domains
    # an editor is limited to (JSON list, empty: all); personal API keys kept as hashes; the audit log of what
    # editors and admins did; sessions signed out before they expired. `feedback.role`: the role of whoever
    # rated, so a user's feedback waits for review before training (data/curation.py).
    Migration("m016_users_keys_audit", (
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,      -- argon2id
            role TEXT NOT NULL CHECK (role IN ('user', 'editor', 'admin')),
            domains TEXT NOT NULL DEFAULT '[]',
            session_epoch INTEGER NOT NULL DEFAULT 0,   -- raised by a password change: older sessions end
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            owner TEXT NOT NULL,
            label TEXT NOT NULL DEFAULT '',
            hash TEXT NOT NULL UNIQUE,        -- sha256 of the key: the key itself is shown once
            hint TEXT NOT NULL,               -- its first characters, to tell keys apart in a list
            created_at REAL NOT NULL,
            last_used_at REAL,
            revoked_at REAL
        )""",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            who TEXT,
            role TEXT,
            action TEXT NOT NULL,
            domain TEXT,
            target TEXT,
            detail TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX audit_domain ON audit(domain, id)",
        """CREATE TABLE revoked_sessions (
            id TEXT PRIMARY KEY,
            expires_at REAL NOT NULL
        )""",
        "ALTER TABLE feedback ADD COLUMN role TEXT",
    )),
    # Who claimed an activation request (a replica's worker name): a worker waiting on a claim whose claimant
    # died stops waiting (cluster/members.py: request_activation).
    Migration("m017_activation_claimant", (
        "ALTER TABLE activations ADD COLUMN claimed_by TEXT",
    )),
    # "Newest" is the database's word, not a clock's: one sequence numbers every answer, rating (again on a
    # change), seed example and job as it is written (`conn.next_seq`), so replicas whose clocks disagree
    # still agree which correction is the newest. Rows written before it keep their time order (their
    # microseconds since the epoch), and the sequence continues above them all.
    Migration("m018_sequence", (
        "CREATE TABLE sequence (n INTEGER NOT NULL)",
        *SEQ_COLUMNS,
        "INSERT INTO sequence (n) SELECT MAX(m) FROM (" + SEQ_MAX + ") AS maxima",
        "CREATE INDEX responses_domain_seq ON responses(domain, seq)",
    ), postgresql=(
        "CREATE SEQUENCE assistant_seq",
        *SEQ_COLUMNS,
        "SELECT setval('assistant_seq', GREATEST(1, (SELECT MAX(m) FROM (" + SEQ_MAX + ") AS maxima)))",
        "CREATE INDEX responses_domain_seq ON responses(domain, seq)",
    )),
    # Canary rollouts (data/rollouts.py): a version serving a share of a domain's conversations beside the
    # live one, judged by its users' ratings. One running rollout per domain; answers after `start_seq` in
    # the store's sequence count for its arms.
    Migration("m019_rollouts", (
        """CREATE TABLE rollouts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            domain TEXT NOT NULL,
            version TEXT NOT NULL,            -- the canary
            baseline TEXT,                    -- the live version when it started (NULL: the base weights)
            share REAL NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'promoted', 'rolled back', 'stopped')),
            start_seq BIGINT NOT NULL,
            started_by TEXT,
            started_at REAL NOT NULL,
            ended_at REAL,
            verdict TEXT                      -- JSON: the rule's last verdict, in words
        )""",
        "CREATE UNIQUE INDEX rollouts_one_running ON rollouts(domain) WHERE status = 'running'",
    )),
    Migration("m020_stored_responses", (
        """CREATE TABLE stored_responses (
            id TEXT PRIMARY KEY,              -- resp_...: also the id the answer is logged and rated under
            owner TEXT,                       -- who authenticated (NULL: the app is open)
            created_at REAL NOT NULL,
            conversation TEXT NOT NULL,       -- JSON: the chat turns up to and including this answer
            body TEXT NOT NULL                -- JSON: the Response object as it was answered
        )""",
    )),
]


def _wrap(conn):
    return SqliteConn(conn) if isinstance(conn, sqlite3.Connection) else conn


def applied(conn) -> list[str]:
    """Names of the migrations recorded in this database, in the order they were applied."""
    conn = _wrap(conn)
    if conn.kind == "postgresql":
        if conn.execute("SELECT to_regclass('migrations')").fetchone()[0] is None:
            return []
        return [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY seq")]
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='migrations'").fetchone()
    if not exists:
        return []
    return [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY rowid")]


def migrate(conn, migrations: list[Migration] | None = None) -> list[str]:
    """Apply the missing migrations in order, in the caller's transaction; returns the names applied.
    `conn`: the store's connection (db.SqliteConn / db.PostgresConn) or a plain sqlite3 connection."""
    conn = _wrap(conn)
    migrations = MIGRATIONS if migrations is None else migrations
    if conn.kind == "postgresql":
        conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))   # held until commit
        conn.execute("CREATE TABLE IF NOT EXISTS migrations (seq BIGINT GENERATED ALWAYS AS IDENTITY, "
                     "name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
    else:
        conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = set(applied(conn))
    ran = []
    for m in migrations:
        if m.name in done:
            continue
        for statement in m.for_kind(conn.kind):
            conn.execute(conn.ddl(statement))
        conn.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (m.name, time.time()))
        ran.append(m.name)
    return ran
