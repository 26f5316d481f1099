"""People and their powers: stored users with a role, personal API keys, signed-out sessions and the audit log.

Three roles, each able to do what the one before it can:
- `user`: chat, rate and correct their own answers, see and withdraw their own ratings;
- `editor`: create domains, seed, review, train, activate, import and export, in every domain or only in
  the domains named on the user;
- `admin`: everything, including users and keys.

Who holds which role: the `--api-key` holder, `--auth USER:PASS` pairs and local processes holding the
server file's control token are admins; stored users (`assistant users add`, `POST /api/users`) have their
own role; a personal API key acts with its owner's role. An app with neither `--api-key`, `--auth` nor a
stored user is an open local tool, and whoever uses it is an admin (`OPEN`).

Passwords are hashed with argon2id (argon2-cffi); personal keys are random 32-byte tokens kept as SHA-256
hashes (they are not guessable, so a slow hash buys nothing), shown once. A password check costs tens of
milliseconds on purpose, so the result of a good one is remembered for `CHECK_CACHE_S` (HTTP Basic clients
send the password with every request).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

from assistant.errors import Conflict, InvalidSetting, NotFound

ROLES = ("user", "editor", "admin")
RANK = {r: i for i, r in enumerate(ROLES)}
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 256
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
KEY_PREFIX = "da-"
KEY_HINT_CHARS = 8              # of a key (after the prefix), shown in lists
CHECK_CACHE_S = 60.0            # a good password check is remembered this long (per process)
ANY_USERS_CACHE_S = 2.0         # "are there stored users?" is asked per request: remembered this long
MAX_AUDIT_ROWS = 1000
KEY_USE_RECORD_S = 60.0         # a key's `last_used_at` is written at most this often


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may do. `name`: None in the open app. `domains`: the domains an editor
    is limited to (empty: all). `kind`: how they got in ("open", "api-key", "auth", "control", "stored",
    "key")."""
    name: str | None
    role: str
    domains: tuple[str, ...] = ()
    kind: str = "stored"
    key_id: int | None = None
    epoch: int = 0

    def has(self, role: str, domain: str | None = None) -> bool:
        """At least `role`, and for an editor limited to some domains, `domain` among them."""
        if RANK[self.role] < RANK[role]:
            return False
        if self.role == "admin" or domain is None or not self.domains:
            return True
        return domain in self.domains

    @property
    def trusted(self) -> bool:
        """Feedback from an editor or admin trains without review; a user's waits for an editor."""
        return RANK[self.role] >= RANK["editor"]


OPEN = Principal(None, "admin", kind="open")


def _hasher():
    from argon2 import PasswordHasher
    return PasswordHasher()


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidSetting("name: use 1-64 letters, digits and . _ @ - (starting with a letter or digit)",
                             param="name")
    return name


def check_password_text(password) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise InvalidSetting(f"password: use {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters",
                             param="password")
    return password


def check_role(role) -> str:
    if role not in ROLES:
        raise InvalidSetting(f"role: use one of {', '.join(ROLES)}", param="role")
    return role


def _key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Directory:
    """The stored users, keys, revoked sessions and audit log of one store (SQLite or PostgreSQL)."""
    store: object
    _checked: dict = field(default_factory=dict)        # (name, sha256(password)) -> (principal, until)
    _any: tuple[float, bool] = (0.0, False)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # Users -------------------------------------------------------------------------------------------
    def add(self, name: str, password: str, role: str = "user", domains=()) -> dict:
        check_name(name), check_password_text(password), check_role(role)
        domains = _domains(domains)
        digest = _hasher().hash(password)

        def add(c):
            if c.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"a user named {name!r} exists: pick another name or change their password",
                               param="name")
            c.execute("INSERT INTO users (name, password_hash, role, domains, created_at) VALUES (?,?,?,?,?)",
                      (name, digest, role, json.dumps(domains), time.time()))
        self.store._write(add)
        self._any = (0.0, False)
        return self.get(name)

    def get(self, name: str) -> dict | None:
        rows = self.store._read("SELECT name, role, domains, created_at FROM users WHERE name = ?", (name,))
        return _user(rows[0]) if rows else None

    def list(self) -> list[dict]:
        return [_user(r) for r in self.store._read("SELECT name, role, domains, created_at FROM users ORDER BY name")]

    def remove(self, name: str) -> None:
        def remove(c):
            if not c.execute("DELETE FROM users WHERE name = ? RETURNING name", (name,)).fetchone():
                raise NotFound(f"no user named {name!r}", param="name")
            c.execute("UPDATE api_keys SET revoked_at = ? WHERE owner = ? AND revoked_at IS NULL", (time.time(), name))
        self.store._write(remove)
        self._forget(name)
        self._any = (0.0, False)

    def set_password(self, name: str, password: str) -> None:
        """A new password; every session signed in with the old one ends (on every replica)."""
        check_password_text(password)
        digest = _hasher().hash(password)

        def change(c):
            if not c.execute("UPDATE users SET password_hash = ?, session_epoch = session_epoch + 1 WHERE name = ? "
                             "RETURNING name", (digest, name)).fetchone():
                raise NotFound(f"no user named {name!r}", param="name")
        self.store._write(change)
        self._forget(name)

    def any_users(self) -> bool:
        at, any_ = self._any
        if time.monotonic() - at > ANY_USERS_CACHE_S:
            any_ = bool(self.store._read("SELECT 1 FROM users LIMIT 1"))
            self._any = (time.monotonic(), any_)
        return any_

    def principal(self, name: str) -> Principal | None:
        rows = self.store._read("SELECT name, role, domains, session_epoch FROM users WHERE name = ?", (name,))
        if not rows:
            return None
        r = rows[0]
        return Principal(r["name"], r["role"], tuple(json.loads(r["domains"])), "stored", epoch=r["session_epoch"])

    def check(self, name: str, password: str) -> Principal | None:
        """The stored user when the password is theirs, else None."""
        if not isinstance(name, str) or not name or not isinstance(password, str):
            return None
        token = (name, hashlib.sha256(password.encode()).hexdigest())
        with self._lock:
            hit = self._checked.get(token)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        rows = self.store._read("SELECT password_hash FROM users WHERE name = ?", (name,))
        if not rows:
            return None
        from argon2.exceptions import Argon2Error
        try:
            _hasher().verify(rows[0]["password_hash"], password)
        except (Argon2Error, ValueError):
            return None
        p = self.principal(name)
        with self._lock:
            self._checked[token] = (p, time.monotonic() + CHECK_CACHE_S)
        return p

    def _forget(self, name: str) -> None:
        with self._lock:
            for k in [k for k in self._checked if k[0] == name]:
                del self._checked[k]

    # Personal API keys -------------------------------------------------------------------------------
    def create_key(self, owner: str, label: str = "") -> dict:
        """A new key for `owner` -> {id, key, ...}: the key is in this answer only."""
        if self.get(owner) is None:
            raise NotFound(f"no user named {owner!r}: keys belong to stored users", param="owner")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        kid = self.store._write(lambda c: c.execute(
            "INSERT INTO api_keys (owner, label, hash, hint, created_at) VALUES (?,?,?,?,?) RETURNING id",
            (owner, str(label or "")[:100], _key_hash(secret), secret[:len(KEY_PREFIX) + KEY_HINT_CHARS], now)
        ).fetchone()[0])
        return {"id": kid, "key": secret, "owner": owner, "label": label or "", "created_at": now}

    def keys(self, owner: str | None = None) -> list[dict]:
        sql = "SELECT id, owner, label, hint, created_at, last_used_at FROM api_keys WHERE revoked_at IS NULL"
        rows = self.store._read(sql + (" AND owner = ?" if owner else "") + " ORDER BY id", (owner,) if owner else ())
        return [dict(r) for r in rows]

    def revoke_key(self, key_id: int, owner: str | None = None) -> None:
        """Revoke a key (only one of `owner`'s when given)."""
        def revoke(c):
            row = c.execute("SELECT owner FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,)).fetchone()
            if row is None or (owner is not None and row["owner"] != owner):
                raise NotFound(f"no key with id {key_id}", param="id")
            c.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
        self.store._write(revoke)

    def key_principal(self, secret: str) -> Principal | None:
        if not secret.startswith(KEY_PREFIX):
            return None
        rows = self.store._read("SELECT id, owner, last_used_at FROM api_keys WHERE hash = ? AND revoked_at IS NULL",
                                (_key_hash(secret),))
        if not rows:
            return None
        now = time.time()
        if (rows[0]["last_used_at"] or 0) < now - KEY_USE_RECORD_S:
            self.store._write(lambda c: c.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, rows[0]["id"])))
        p = self.principal(rows[0]["owner"])
        if p is None:
            return None
        return Principal(p.name, p.role, p.domains, "key", key_id=rows[0]["id"])

    # Sessions ----------------------------------------------------------------------------------------
    def revoke_session(self, sid: str, expires_at: float) -> None:
        def revoke(c):
            c.execute("DELETE FROM revoked_sessions WHERE expires_at < ?", (time.time(),))
            c.execute("INSERT INTO revoked_sessions (id, expires_at) VALUES (?, ?) ON CONFLICT(id) DO NOTHING",
                      (sid, expires_at))
        self.store._write(revoke)

    def session_revoked(self, sid: str) -> bool:
        return bool(self.store._read("SELECT 1 FROM revoked_sessions WHERE id = ?", (sid,)))

    # Audit -------------------------------------------------------------------------------------------
    def audit(self, who: Principal, action: str, domain: str | None = None, target: str | None = None,
              **detail) -> None:
        self.store._write(lambda c: c.execute(
            "INSERT INTO audit (at, who, role, action, domain, target, detail) VALUES (?,?,?,?,?,?,?)",
            (time.time(), who.name or who.kind, who.role, action, domain, target, json.dumps(detail, default=str))))

    def audit_log(self, domain: str | None = None, target: str | None = None, limit: int = MAX_AUDIT_ROWS) -> list[dict]:
        sql, params = "SELECT * FROM audit WHERE 1 = 1", []
        if domain is not None:
            sql, params = sql + " AND domain = ?", [*params, domain]
        if target is not None:
            sql, params = sql + " AND target = ?", [*params, target]
        rows = self.store._read(sql + " ORDER BY id DESC LIMIT ?", (*params, min(int(limit), MAX_AUDIT_ROWS)))
        return [{**dict(r), "detail": json.loads(r["detail"] or "{}")} for r in rows]


def _domains(domains) -> list[str]:
    if domains is None:
        return []
    if isinstance(domains, str):
        domains = [d.strip() for d in domains.split(",") if d.strip()]
    if not isinstance(domains, (list, tuple)) or not all(isinstance(d, str) and d for d in domains):
        raise InvalidSetting("domains: a list of domain names (empty: every domain)", param="domains")
    return sorted(set(domains))


def _user(row) -> dict:
    return {"name": row["name"], "role": row["role"], "domains": json.loads(row["domains"]),
            "created_at": row["created_at"]}
