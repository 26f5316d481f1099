"""The store: responses, feedback, seed examples, review decisions, dataset snapshots, training jobs and
the embedding cache, in SQLite (a file: the embedded default) or PostgreSQL (a URL: several app replicas
and training workers on one database), with one set of queries (data/db.py holds the connections and the
few dialect shims).

Durability and concurrency: every write is one transaction, committed (on disk) when its method returns,
so acknowledged feedback survives a crash of the app; concurrent writers from threads, processes and
replicas queue instead of failing. If the database stays busy past all retries the caller gets
`errors.Busy`, never the driver's message.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, Callable, Sequence

from assistant.cluster.coordination import Coordination
from assistant.data import migrations
from assistant.data.db import BUSY_TIMEOUT_MS, Row, open_database  # noqa: F401 - BUSY_TIMEOUT_MS: part of the store's contract
from assistant.data.stages import pending_stages, public_gate
from assistant.errors import Conflict, NotFound
from assistant.settings import API_KEY_PRINCIPAL, CONTROL_PRINCIPAL

SQL_IN_CHUNK = 500              # values per `IN (...)` query: well under SQLite's limit on bound variables
JOB_ID_CHARS = 16               # hex characters of a job id
RATINGS = ("up", "down")
REVIEW_STATUSES = ("approved", "rejected")
ROLES = ("system", "user", "assistant")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_JOB_STATUSES = ("queued", "running")
JOB_FIELDS = {"status", "progress", "step", "total_steps", "loss", "adapter_version", "promoted", "metrics",
              "error", "pid", "started_at", "finished_at", "log", "settings", "stage", "stages", "worker"}


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _state(row) -> dict:
    """What a feedback record says, for its history."""
    return {k: row[k] for k in ("rating", "correction", "reason", "created_at")}


def _counted(principal: str | None, user: str | None) -> str | None:
    """Whose item it is for the per-user cap: the signed-in person when there is one (with per-person sign-in
    a body's `user` cannot spread one person's data under many names), else the end user the request named
    (an API-key holder speaks for many users)."""
    return principal if principal and principal not in (API_KEY_PRINCIPAL, CONTROL_PRINCIPAL) else user


def validate_messages(messages) -> str | None:
    """Why `messages` is not a usable chat example in the OpenAI/TRL "messages" format, or None."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {role, content}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object with role and content"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role must be one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}].content must be a string"
    if not any(m["role"] == "user" for m in messages):
        return "messages need at least one user message"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer"
    if not messages[-1]["content"].strip():
        return "the assistant's answer is empty"
    return None


class Store(Coordination):
    """`Store(target)`: a SQLite file path, or a `postgresql://` URL. Safe to share between threads; each
    process opens its own connections. The schema is brought up to date on open (data/migrations.py)."""

    def __init__(self, target: str | os.PathLike):
        self.db = open_database(target)
        self.kind = self.db.kind
        self._write(migrations.migrate)

    def _write(self, fn: Callable[[Any], Any]):
        """Run `fn(conn)` in one transaction, retried as a whole while the database is busy."""
        return self.db.write(fn)

    def _read(self, sql: str, params=()) -> list[Row]:
        return self.db.read(sql, params)

    def describe(self) -> str:
        return self.db.describe()

    def close(self) -> None:
        self.db.close()

    def integrity_check(self) -> str:
        return self.db.integrity_check()

    # Responses -----------------------------------------------------------------------------------
    def log_response(self, *, id: str, domain: str, adapter_version: str | None, model: str,
                     messages: list[dict], answer: str, prompt_tokens: int, completion_tokens: int,
                     latency_ms: float, ttft_ms: float | None, finish_reason: str, user: str | None = None,
                     created_at: float | None = None, principal: str | None = None) -> None:
        """`user`: the end user the request names; `principal`: who authenticated (API key holder, signed-in
        user, or None when the app is open)."""
        row = (id, domain, adapter_version, model, _dumps(messages), answer, int(prompt_tokens),
               int(completion_tokens), float(latency_ms), ttft_ms, finish_reason, user, principal,
               time.time() if created_at is None else created_at)
        self._write(lambda c: c.execute(
            "INSERT INTO responses (id, domain, adapter_version, model, messages, answer, prompt_tokens, "
            "completion_tokens, latency_ms, ttft_ms, finish_reason, \"user\", principal, created_at, seq) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row + tuple(c.next_seq())))

    @staticmethod
    def _response(row: Row) -> dict:
        d = dict(row)
        d.pop("txid", None)
        d["messages"] = json.loads(d["messages"])
        if "history" in d:
            d["history"] = json.loads(d["history"] or "[]")
        return d

    def get_response(self, id: str) -> dict | None:
        rows = self._read("SELECT * FROM responses WHERE id = ?", (id,))
        return self._response(rows[0]) if rows else None

    def list_responses(self, domain: str, since: float | None = None, limit: int | None = None) -> list[dict]:
        sql, params = "SELECT * FROM responses WHERE domain = ?", [domain]
        if since is not None:
            sql += " AND created_at >= ?"
            params.append(since)
        sql += " ORDER BY created_at, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [self._response(r) for r in self._read(sql, params)]

    def tokens_used(self, principal: str, since: float) -> tuple[int, float | None]:
        """(prompt + answer tokens of the answers given to `principal` since `since`, the oldest one's time)."""
        row = self._read("SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0), MIN(created_at) FROM responses "
                         "WHERE principal = ? AND created_at >= ?", (principal, since))[0]
        return int(row[0]), row[1]

    def recent_responses(self, domain: str | None, limit: int) -> list[dict]:
        """The latest `limit` responses, newest first, of one domain or of all."""
        where, params = ("WHERE domain = ? ", [domain]) if domain is not None else ("", [])
        sql = f"SELECT * FROM responses {where}ORDER BY seq DESC LIMIT ?"
        return [self._response(r) for r in self._read(sql, params + [int(limit)])]

    def feedback_for(self, response_ids: list[str]) -> dict[str, list[dict]]:
        """response id -> its feedback records, oldest first."""
        out: dict[str, list[dict]] = {}
        if not response_ids:
            return out
        marks = ",".join("?" * len(response_ids))
        for r in self._read(f"SELECT * FROM feedback WHERE response_id IN ({marks}) ORDER BY id", response_ids):
            out.setdefault(r["response_id"], []).append({**dict(r), "history": json.loads(r["history"] or "[]")})
        return out

    # Feedback ------------------------------------------------------------------------------------
    def add_feedback(self, *, response_id: str, rating: str, correction: str | None = None,
                     reason: str | None = None, user: str | None = None, principal: str | None = None,
                     role: str | None = None) -> int:
        """Record a rating (and the answer the user wanted); durable on disk when this returns.

        One record per answer and person: a second call for the same (response_id, user, principal) updates that
        record in place and returns its id. The rating is replaced; a correction or reason replaces the
        stored one only when given, so adding a reason after a thumbs down keeps the thumbs down. What the
        record said before a change is appended to its `history`; a withdrawn record starts afresh."""
        if rating not in RATINGS:
            raise ValueError(f"rating={rating!r}: use 'up' or 'down'")
        if correction is not None and not correction.strip():
            correction = None

        def upsert(c):
            # the response's row lock (Postgres) makes one record per answer and user also across replicas
            if not c.execute("SELECT 1 FROM responses WHERE id = ?" + c.for_update, (response_id,)).fetchone():
                raise NotFound(f"no response with id {response_id!r}: send feedback for an id that "
                               "/v1/chat/completions returned", param="response_id")
            row = c.execute('SELECT * FROM feedback WHERE response_id = ? AND "user" IS NOT DISTINCT FROM ? '
                            "AND principal IS NOT DISTINCT FROM ? ORDER BY id DESC LIMIT 1",
                            (response_id, user, principal)).fetchone()
            now = time.time()
            if row is not None:
                fresh = row["withdrawn_at"] is not None
                new = (rating, correction if fresh else correction or row["correction"],
                       reason if fresh else reason or row["reason"])
                history = json.loads(row["history"] or "[]")
                if not fresh and new != (row["rating"], row["correction"], row["reason"]):
                    history.append(_state(row))
                c.execute("UPDATE feedback SET rating = ?, correction = ?, reason = ?, created_at = ?, history = ?, "
                          "withdrawn_at = NULL, role = ?, seq = ? WHERE id = ?",
                          (*new, now, _dumps(history), role, *c.next_seq(), row["id"]))
                fid = row["id"]
            else:
                fid = c.execute('INSERT INTO feedback (response_id, rating, correction, reason, "user", principal, '
                                "role, created_at, seq) VALUES (?,?,?,?,?,?,?,?,?) RETURNING id",
                                (response_id, rating, correction, reason, user, principal, role, now,
                                 *c.next_seq())).fetchone()[0]
            c.execute("INSERT INTO feedback_events (feedback_id, domain, adapter_version, rating, corrected, created_at) "
                      "SELECT ?, domain, adapter_version, ?, ?, ? FROM responses WHERE id = ?",
                      (fid, rating, int(correction is not None), now, response_id))
            return fid
        return self._write(upsert)

    def withdraw_feedback(self, *, response_id: str, user: str | None = None, principal: str | None = None) -> bool:
        """Undo a user's rating of an answer (the thumb pressed again): the record stays, with what it said
        moved to its history, but counts nowhere and trains nothing. -> whether there was one to undo."""
        def withdraw(c):
            row = c.execute('SELECT * FROM feedback WHERE response_id = ? AND "user" IS NOT DISTINCT FROM ? '
                            "AND principal IS NOT DISTINCT FROM ? AND withdrawn_at IS NULL ORDER BY id DESC LIMIT 1",
                            (response_id, user, principal)).fetchone()
            if row is None:
                return False
            history = json.loads(row["history"] or "[]") + [_state(row)]
            c.execute("UPDATE feedback SET correction = NULL, reason = NULL, history = ?, withdrawn_at = ? "
                      "WHERE id = ?", (_dumps(history), time.time(), row["id"]))
            return True
        return self._write(withdraw)

    def list_feedback(self, domain: str | None = None) -> list[dict]:
        sql = ("SELECT f.*, r.domain, r.adapter_version, r.messages, r.answer, r.\"user\" AS response_user, "
               "r.principal AS response_principal, r.finish_reason "
               "FROM feedback f JOIN responses r ON r.id = f.response_id WHERE f.withdrawn_at IS NULL")
        params: list = []
        if domain is not None:
            sql += " AND r.domain = ?"
            params.append(domain)
        return [self._response(r) for r in self._read(sql + " ORDER BY f.id", params)]

    # Seed examples -------------------------------------------------------------------------------
    def add_examples(self, domain: str, examples: list[dict], *, source: str = "seed",
                     user: str | None = None) -> tuple[int, list[dict]]:
        """Validate and store seed examples ({"messages": [...]}) -> (added, [{index, reason}])."""
        good, rejected = [], []
        for i, ex in enumerate(examples):
            messages = ex.get("messages") if isinstance(ex, dict) else None
            reason = validate_messages(messages)
            if reason:
                rejected.append({"index": i, "reason": reason})
            else:
                good.append([{"role": m["role"], "content": m["content"]} for m in messages])
        now = time.time()
        if good:
            self._write(lambda c: c.executemany(
                'INSERT INTO examples (domain, messages, source, "user", created_at, seq) VALUES (?,?,?,?,?,?)',
                [(domain, _dumps(m), source, user, now, seq) for m, seq in zip(good, c.next_seq(len(good)))]))
        return len(good), rejected

    def count_examples(self, domain: str) -> int:
        return self._read("SELECT COUNT(*) FROM examples WHERE domain = ?", (domain,))[0][0]

    def list_examples(self, domain: str) -> list[dict]:
        return [self._response(r) for r in self._read("SELECT * FROM examples WHERE domain = ? ORDER BY id",
                                                      (domain,))]

    # Review decisions ----------------------------------------------------------------------------
    def set_review(self, domain: str, item_key: str, status: str | None,
                   edited_messages: list | None = None) -> None:
        """Approve, reject or clear (None) a candidate, optionally replacing its messages."""
        if status is not None and status not in REVIEW_STATUSES:
            raise ValueError(f"status={status!r}: use 'approved', 'rejected' or None")
        if edited_messages is not None:
            reason = validate_messages(edited_messages)
            if reason:
                raise ValueError(f"edited messages: {reason}")
        edited = None if edited_messages is None else _dumps(edited_messages)
        self._write(lambda c: c.execute(
            "INSERT INTO reviews (domain, item_key, status, edited_messages, updated_at) VALUES (?,?,?,?,?) "
            "ON CONFLICT(domain, item_key) DO UPDATE SET status = excluded.status, "
            "edited_messages = excluded.edited_messages, updated_at = excluded.updated_at",
            (domain, item_key, status, edited, time.time())))

    def reviews(self, domain: str) -> dict[str, dict]:
        out = {}
        for r in self._read("SELECT * FROM reviews WHERE domain = ?", (domain,)):
            out[r["item_key"]] = {"status": r["status"], "edited_messages":
                                  None if r["edited_messages"] is None else json.loads(r["edited_messages"])}
        return out

    def candidates(self, domain: str) -> list[dict]:
        """Every training candidate of a domain, with review edits applied and status attached.

        Seed examples; per rated response, its newest correction (prompt + correction replaces the
        answer) or else, when ups outnumber downs, the answer itself (prompt + answer)."""
        out = []
        for ex in self.list_examples(domain):
            out.append({"key": f"example:{ex['id']}", "source": "seed", "messages": ex["messages"],
                        "created_at": ex["created_at"], "seq": ex["seq"], "user": ex["user"], "rating": None, "feedback_ids": [],
                        "response_id": None, "adapter_version": None})
        by_response: dict[str, list[dict]] = {}
        for f in self.list_feedback(domain):
            by_response.setdefault(f["response_id"], []).append(f)
        for response_id, fbs in by_response.items():
            first = fbs[0]
            prompt = [m for m in first["messages"]]
            corrections = [f for f in fbs if f["correction"]]
            ups = sum(f["rating"] == "up" for f in fbs)
            if corrections:     # the newest correction (a record re-corrected later is newer)
                chosen = max(corrections, key=lambda f: f["seq"])
                source, answer = "correction", chosen["correction"]
            elif ups > len(fbs) - ups:
                chosen, source, answer = next(f for f in fbs if f["rating"] == "up"), "up", first["answer"]
            else:
                continue
            reply = {"role": "assistant", "content": answer}
            if source == "up" and first.get("finish_reason") == "length":
                reply["cut"] = True      # its token limit ended it, not the model: lm.encode_chat teaches no end
            out.append({"key": f"feedback:{chosen['id']}", "source": source, "messages": prompt + [reply],
                        "created_at": chosen["created_at"], "seq": chosen["seq"],
                        "user": _counted(chosen["principal"], chosen["user"])
                        or _counted(first["response_principal"], first["response_user"]),
                        "rating": chosen["rating"], "ups": ups, "feedback_ids": [f["id"] for f in fbs],
                        "pending": chosen.get("role") == "user",   # a user account's: waits for review
                        "response_id": response_id, "adapter_version": first["adapter_version"],
                        "shown": first["answer"]})     # what the person saw: later turns carry it as context
        decisions = self.reviews(domain)
        for cand in out:
            cand.setdefault("ups", 0)
            review = decisions.get(cand["key"], {})
            cand["review_status"] = review.get("status")
            cand["edited"] = review.get("edited_messages") is not None
            if cand["edited"]:
                cand["messages"] = review["edited_messages"]
        return out

    # Dataset snapshots ---------------------------------------------------------------------------
    def save_snapshot(self, domain: str, snapshot_hash: str, report: dict, path: str) -> bool:
        """Record a snapshot as the domain's latest; a no-op (False) when it already is, unchanged."""
        def save(c):
            last = c.execute("SELECT hash, report, path FROM snapshots WHERE domain = ? ORDER BY id DESC LIMIT 1",
                             (domain,)).fetchone()
            if last and (last["hash"], json.loads(last["report"]), last["path"]) == (snapshot_hash, report, str(path)):
                return False
            c.execute("INSERT INTO snapshots (domain, hash, report, path, created_at) VALUES (?,?,?,?,?)",
                      (domain, snapshot_hash, _dumps(report), str(path), time.time()))
            return True
        return self._write(save)

    def latest_snapshot(self, domain: str) -> dict | None:
        rows = self._read("SELECT * FROM snapshots WHERE domain = ? ORDER BY id DESC LIMIT 1", (domain,))
        if not rows:
            return None
        d = dict(rows[0])
        d["report"] = json.loads(d["report"])
        return d

    # Training jobs -------------------------------------------------------------------------------
    def create_job(self, domain: str, settings: dict | None = None) -> str:
        """Queue a training job; `Conflict` while a job of the same domain is queued or running."""
        job_id = uuid.uuid4().hex[:JOB_ID_CHARS]

        try:
            self._write(lambda c: c.execute("INSERT INTO jobs (id, domain, status, settings, created_at, seq) "
                                            "VALUES (?,?,?,?,?,?)",
                                            (job_id, domain, "queued", _dumps(settings or {}), time.time(),
                                             *c.next_seq())))
        except self.db.IntegrityError:
            active = self.active_job(domain)
            what = f"job {active['job_id']} ({active['domain']}, {active['status']})" if active else "another job"
            raise Conflict(f"{what} is already training: wait for it to finish or cancel it "
                           "(DELETE /api/jobs/{job_id})") from None
        return job_id

    def update_job(self, job_id: str, **fields) -> None:
        """Set job fields; `log=` appends text, `metrics=`/`settings=` take dicts."""
        unknown = set(fields) - JOB_FIELDS
        if unknown:
            raise ValueError(f"unknown job fields: {', '.join(sorted(unknown))}")
        if "status" in fields and fields["status"] not in JOB_STATUSES:
            raise ValueError(f"status={fields['status']!r}: use one of {', '.join(JOB_STATUSES)}")
        sets, params = [], []
        for name, value in fields.items():
            if name == "log":
                sets.append("log = log || ?")
            else:
                sets.append(f"{name} = ?")
                if name in ("metrics", "settings"):
                    value = _dumps(value or {})
                elif name == "stages":
                    value = _dumps(value or [])
                elif name == "promoted":
                    value = int(bool(value))
            params.append(value)
        if not sets:
            return

        def update(c):
            cur = c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*params, job_id))
            if cur.rowcount == 0:
                raise NotFound(f"no job with id {job_id!r}", param="job_id")
        try:
            self._write(update)
        except self.db.IntegrityError:
            raise Conflict("another job of this domain is already queued or running") from None

    def add_job_loss(self, job_id: str, step: int, loss: float) -> None:
        self._write(lambda c: c.execute(
            "INSERT INTO job_losses (job_id, step, loss) VALUES (?,?,?) "
            "ON CONFLICT (job_id, step) DO UPDATE SET loss = excluded.loss", (job_id, int(step), float(loss))))

    @staticmethod
    def _job(row: Row) -> dict:
        d = dict(row)
        d["job_id"] = d.pop("id")
        d.pop("seq", None)          # the order of jobs, not part of a job
        d["settings"] = json.loads(d["settings"])
        d["metrics"] = json.loads(d["metrics"])
        d["promoted"] = bool(d["promoted"])
        d["stages"] = [{"started_at": None, "finished_at": None, **st}
                       for st in json.loads(d.get("stages") or "[]") or pending_stages()]
        d["gate"] = public_gate(d["metrics"])
        return d

    def get_job(self, job_id: str) -> dict | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = self._job(rows[0])
        job["losses"] = [[r[0], r[1]] for r in
                         self._read("SELECT step, loss FROM job_losses WHERE job_id = ? ORDER BY step", (job_id,))]
        return job

    def list_jobs(self, domain: str | None = None) -> list[dict]:
        if domain is None:
            rows = self._read("SELECT * FROM jobs ORDER BY seq DESC")
        else:
            rows = self._read("SELECT * FROM jobs WHERE domain = ? ORDER BY seq DESC", (domain,))
        return [self._job(r) for r in rows]

    def active_job(self, domain: str | None = None) -> dict | None:
        """The queued or running job of `domain` (of any domain when None), the oldest first."""
        where, params = ("AND domain = ? ", (domain,)) if domain is not None else ("", ())
        rows = self._read(f"SELECT id FROM jobs WHERE status IN ('queued','running') {where}ORDER BY seq",
                          params)
        return self.get_job(rows[0]["id"]) if rows else None

    # Serving totals (monitoring's Prometheus counters and histograms) ----------------------------------
    def response_totals(self, after: int, latency_bounds_ms: Sequence[float],
                        ttft_bounds_ms: Sequence[float]) -> tuple[int, list[dict]]:
        """Responses logged after row `after` (0, or what a previous call returned), summed per domain and
        adapter version -> (the last row summed, [{domain, adapter_version, answers, latency_ms_sum,
        latency_le: [count at or under each bound], ttft_count, ttft_ms_sum, ttft_le}]). Responses are only ever
        inserted, so the sums of successive calls are the totals, and reading only new rows keeps a call cheap."""
        last, new = self._new_rows("responses", "rowid", after)
        if last == after:
            return after, []
        bounds = [*latency_bounds_ms, *ttft_bounds_ms]
        le = "".join(f", SUM(CASE WHEN {col} <= ? THEN 1 ELSE 0 END)" for col in
                     ["latency_ms"] * len(latency_bounds_ms) + ["ttft_ms"] * len(ttft_bounds_ms))
        rows = self._read("SELECT domain, adapter_version, COUNT(*), SUM(latency_ms), COUNT(ttft_ms), "
                          f"COALESCE(SUM(ttft_ms), 0){le} FROM responses WHERE {new} "
                          "GROUP BY domain, adapter_version", (*bounds, after, last))
        n = len(latency_bounds_ms)
        return last, [{"domain": r[0], "adapter_version": r[1], "answers": r[2], "latency_ms_sum": r[3],
                       "ttft_count": r[4], "ttft_ms_sum": r[5], "latency_le": [v or 0 for v in r[6:6 + n]],
                       "ttft_le": [v or 0 for v in r[6 + n:]]} for r in rows]

    def _new_rows(self, table: str, order: str, after: int) -> tuple[int, str]:
        """The mark up to which rows of an insert-only table can be summed, and the condition (two
        parameters: `after`, the mark) selecting those after `after`. SQLite commits one writer at a time,
        so its row order is the commit order. On PostgreSQL the mark is the oldest transaction still
        running: every row of an older transaction is committed (or never will be), so no row is skipped
        or summed twice, whatever order concurrent replicas commit in."""
        if self.kind == "postgresql":
            last = self._read("SELECT txid_snapshot_xmin(txid_current_snapshot())")[0][0]
            return max(int(last), after), "txid >= ? AND txid < ?"
        last = self._read(f"SELECT COALESCE(MAX({order}), 0) FROM {table}")[0][0]
        return max(last, after), f"{order} > ? AND {order} <= ?"

    def feedback_totals(self, after: int) -> tuple[int, list[dict]]:
        """Ratings given after event `after`, counted per domain, adapter version and rating -> (the last event
        counted, [{domain, adapter_version, rating, ratings, corrections}]). Every rating is an event, also one
        that replaces the same user's earlier rating: these counts only grow."""
        last, new = self._new_rows("feedback_events", "id", after)
        if last == after:
            return after, []
        rows = self._read("SELECT domain, adapter_version, rating, COUNT(*), SUM(corrected) FROM feedback_events "
                          f"WHERE {new} GROUP BY domain, adapter_version, rating", (after, last))
        return last, [{"domain": r[0], "adapter_version": r[1], "rating": r[2], "ratings": r[3], "corrections": r[4]}
                      for r in rows]

    # Embedding cache (used by embeddings.Embedder) -----------------------------------------------
    def get_embeddings(self, model: str, hashes: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for i in range(0, len(hashes), SQL_IN_CHUNK):
            chunk = hashes[i:i + SQL_IN_CHUNK]
            rows = self._read(f"SELECT content_hash, vector FROM embeddings WHERE model = ? AND content_hash IN "
                              f"({','.join('?' * len(chunk))})", (model, *chunk))
            out.update({r[0]: r[1] for r in rows})
        return out

    def put_embeddings(self, model: str, vectors: dict[str, bytes]) -> None:
        if vectors:
            self._write(lambda c: c.executemany(
                "INSERT INTO embeddings (model, content_hash, vector) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                [(model, h, v) for h, v in vectors.items()]))
