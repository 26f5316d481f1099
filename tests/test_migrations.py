"""Migrations on an empty database, on a database of an older schema, and twice."""

import sqlite3

from assistant.data import migrations
from assistant.data.store import Store


def test_empty_database_gets_every_migration_in_order(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    ran = migrations.migrate(conn)
    assert ran == [m.name for m in migrations.MIGRATIONS]
    assert migrations.applied(conn) == ran
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"migrations", "responses", "feedback", "examples", "reviews", "snapshots", "jobs", "job_losses",
            "embeddings"} <= tables
    assert migrations.migrate(conn) == []                      # a second run is a no-op
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_older_database_is_brought_up_to_date(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    first = migrations.MIGRATIONS[:2]
    assert migrations.migrate(conn, first) == [m.name for m in first]
    conn.execute("INSERT INTO responses (id, domain, model, messages, answer, created_at) "
                 "VALUES ('r1', 'd', 'd', '[]', 'hi', 0)")
    conn.execute("INSERT INTO feedback (response_id, rating, correction, created_at) VALUES ('r1', 'down', 'Hello.', 1)")
    conn.close()
    store = Store(tmp_path / "m.db")                           # the store applies the rest on open
    assert store.get_response("r1")["answer"] == "hi"
    assert store.feedback_totals(0)[1] == [{"domain": "d", "adapter_version": None, "rating": "down", "ratings": 1,
                                            "corrections": 1}]   # an older rating is carried over as one event
    conn = sqlite3.connect(tmp_path / "m.db")
    assert migrations.applied(conn) == [m.name for m in migrations.MIGRATIONS]


def test_names_are_unique_and_ordered():
    names = [m.name for m in migrations.MIGRATIONS]
    assert len(set(names)) == len(names) and names == sorted(names)
    assert all(m.statements for m in migrations.MIGRATIONS)


def test_failed_migration_leaves_nothing_half_applied(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    broken = migrations.MIGRATIONS[:1] + [migrations.Migration("m999_broken", ("CREATE TABLE x (a)", "NOT SQL"))]
    conn.execute("BEGIN IMMEDIATE")
    try:
        migrations.migrate(conn, broken)
    except sqlite3.OperationalError:
        conn.execute("ROLLBACK")
    assert migrations.applied(conn) == []
    assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name IN ('x', 'responses')").fetchone()


OPEN_STORE = r"""
import sys, time
from assistant.data.store import Store
while time.time() < float(sys.argv[2]):            # start together
    time.sleep(0.001)
Store(sys.argv[1]).close()
print("ok")
"""


def test_postgres_gets_every_migration_once_when_replicas_start_together(postgres_url):
    import subprocess
    import sys
    import time
    from pathlib import Path
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, postgres_url, str(start)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])
             for _ in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 and o[0].strip() == "ok" for p, o in zip(procs, outs)), [o[1][-800:] for o in outs]
    store = Store(postgres_url)
    rows = store._read("SELECT name FROM migrations ORDER BY seq")
    assert [r[0] for r in rows] == [m.name for m in migrations.MIGRATIONS]     # each applied once, in order
    assert store._write(migrations.migrate) == []
    tables = {r[0] for r in store._read("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"responses", "feedback", "examples", "reviews", "snapshots", "jobs", "job_losses", "embeddings",
            "feedback_events", "activations"} <= tables
    store.close()


def test_postgres_failed_migration_leaves_nothing_half_applied(postgres_url):
    from assistant.data.db import open_database
    db = open_database(postgres_url)
    broken = migrations.MIGRATIONS[:1] + [migrations.Migration("m999_broken", ("CREATE TABLE x (a INTEGER)", "NOT SQL"))]
    try:
        db.write(lambda c: migrations.migrate(c, broken))
    except Exception as e:  # noqa: BLE001 - psycopg's syntax error
        assert "syntax" in str(e).lower()
    assert db.write(migrations.applied) == []
    assert db.read("SELECT to_regclass('x'), to_regclass('responses')")[0][:] == (None, None)
    db.close()
