"""Who is calling: one authentication check in front of every route, declared once as ASGI middleware.

The API routes, the OpenAI routes, `/metrics` and the mounted Gradio UI (its pages, queue, upload and
file routes) all pass through `AuthMiddleware`; no route checks credentials itself. When there is neither
`--api-key`, `--auth` nor a stored user the app is open (a local tool, whoever uses it an admin); otherwise
a request needs one of:
- `Authorization: Bearer <key>`: the API key (admin) or a personal key (its owner's role);
- HTTP Basic with a stored user, a `--auth` user, or any user name and the API key as the password;
- the session cookie that the `/login` page sets after the same check (browsers).
Only the login page itself and the bare health checks (`/api/health`, `/health`) are public. A browser
asking for a page without credentials is sent to `/login`; anything else gets 401 with a JSON error. What a
caller may do once in is people/permissions.py's table. Sessions end on sign-out and on a password change,
on every replica (people/users.py); five failed sign-ins for one name within 15 minutes are answered 429
until the window passes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import secrets
import threading
import time
from urllib.parse import parse_qs, quote

from assistant.people.users import OPEN, Principal
from assistant.settings import API_KEY_PRINCIPAL, CONTROL_PRINCIPAL

log = logging.getLogger(__name__)

SESSION_COOKIE = "assistant_session"
SESSION_SECONDS = 12 * 3600          # a browser login lasts this long (and, without --session-secret, until a restart)
MAX_LOGIN_BODY_BYTES = 4096
MAX_FAILED_SIGN_INS = 5              # failed sign-ins for one name within SIGN_IN_WINDOW_S -> 429 until it passes
SIGN_IN_WINDOW_S = 15 * 60
LOGIN_PATH, LOGOUT_PATH, HEALTH_PATH, PROBE_PATH = "/login", "/logout", "/api/health", "/health"
PUBLIC_PATHS = (LOGIN_PATH, LOGOUT_PATH, HEALTH_PATH, PROBE_PATH)
API_KEY_USER = API_KEY_PRINCIPAL
CONTROL_USER = CONTROL_PRINCIPAL   # a process on this machine holding the server file's control token (cluster/remote.py)
UNAUTHORIZED = ("missing or wrong credentials: send 'Authorization: Bearer <api key>' (or HTTP Basic with a "
                "--auth user), or sign in at /login")


class Credentials:
    """The accepted credentials of one server, and the session cookies it signs."""

    def __init__(self, api_key: str | None, users: tuple[tuple[str, str], ...], secret: str | None = None,
                 directory=None):
        """`secret`: signs the session cookies. Replicas given the same one accept each other's cookies;
        without one, a random secret per process (a restart signs everyone out). `directory`: the stored
        users and personal keys (users.Directory), shared by replicas through the database."""
        self.api_key = api_key
        self.users = tuple(users)
        self.secret = hashlib.sha256(secret.encode()).digest() if secret else secrets.token_bytes(32)
        self.control_token: str | None = None    # what local processes send (cluster/remote.py: the server file's token)
        self.directory = directory
        self.throttle = SignInThrottle()

    @property
    def enabled(self) -> bool:
        return bool(self.api_key or self.users or (self.directory is not None and self.directory.any_users()))

    def check_password(self, user: str, password: str) -> Principal | None:
        """Who (user, password) signs in as: a --auth pair (admin), any name with the API key as the password
        (admin), or a stored user (their role)."""
        ok = None
        for u, p in self.users:   # compare against every pair: the time taken says nothing
            if hmac.compare_digest(user.encode(), u.encode()) & hmac.compare_digest(password.encode(), p.encode()):
                ok = Principal(u, "admin", kind="auth")
        if ok is None and self.api_key and hmac.compare_digest(password.encode(), self.api_key.encode()):
            ok = Principal(user or API_KEY_USER, "admin", kind="api-key")
        if ok is None and self.directory is not None:
            ok = self.directory.check(user, password)
        return ok

    def sign(self, who: Principal, now: float | None = None) -> str:
        expires = int((now or time.time()) + SESSION_SECONDS)
        payload = base64.urlsafe_b64encode(json.dumps([who.name, expires, secrets.token_hex(12), who.kind,
                                                       who.epoch]).encode()).decode()
        mac = hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()
        return f"{payload}.{mac}"

    def _session(self, cookie: str | None) -> tuple[list, str] | None:
        if not cookie or "." not in cookie:
            return None
        payload, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac, hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()):
            return None
        try:
            fields = json.loads(base64.urlsafe_b64decode(payload.encode()))
        except (ValueError, TypeError):
            return None
        if not isinstance(fields, list) or len(fields) != 5 or not isinstance(fields[0], str):
            return None
        return fields, payload

    def session_user(self, cookie: str | None) -> Principal | None:
        got = self._session(cookie)
        if got is None:
            return None
        (name, expires, sid, kind, epoch), _ = got
        if expires <= time.time() or (self.directory is not None and self.directory.session_revoked(sid)):
            return None
        if kind == "stored":   # the role as it is now; a password change since sign-in ends the session
            p = self.directory.principal(name) if self.directory is not None else None
            return p if p is not None and p.epoch == epoch else None
        if kind == "auth" and not any(u == name for u, _ in self.users):
            return None
        if kind == "api-key" and not self.api_key:
            return None
        return Principal(name, "admin", kind=kind) if kind in ("auth", "api-key") else None

    def sign_out(self, cookie: str | None) -> None:
        """End a session on every replica (the cookie itself is also cleared in the browser)."""
        got = self._session(cookie)
        if got is not None and self.directory is not None:
            (_, expires, sid, _, _), _ = got
            self.directory.revoke_session(sid, float(expires))

    def is_control(self, headers) -> bool:
        """Whether the request carries this server's control token (the one in its server file)."""
        scheme, _, value = headers.get("authorization", "").partition(" ")
        return bool(scheme.lower() == "bearer" and self.control_token
                    and hmac.compare_digest(value.strip().encode(), self.control_token.encode()))

    def user_of(self, headers: dict[str, str], cookies: dict[str, str]) -> Principal | None:
        """The caller from an Authorization header or the session cookie, or None."""
        scheme, _, value = headers.get("authorization", "").partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.api_key and hmac.compare_digest(value.encode(), self.api_key.encode()):
            return Principal(API_KEY_USER, "admin", kind="api-key")
        if self.is_control(headers):
            return Principal(CONTROL_USER, "admin", kind="control")
        if scheme == "bearer" and self.directory is not None:
            return self.directory.key_principal(value)
        if scheme == "basic":
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            return self.check_password(user, password)
        return self.session_user(cookies.get(SESSION_COOKIE))


class SignInThrottle:
    """Failed sign-ins per user name (per process): after `MAX_FAILED_SIGN_INS` within `SIGN_IN_WINDOW_S`,
    that name is refused until the oldest failure leaves the window."""

    def __init__(self):
        self.failures: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def wait_s(self, name: str) -> int:
        now = time.time()
        with self.lock:
            recent = [t for t in self.failures.get(name, ()) if t > now - SIGN_IN_WINDOW_S]
            self.failures[name] = recent
            return int(recent[0] + SIGN_IN_WINDOW_S - now) + 1 if len(recent) >= MAX_FAILED_SIGN_INS else 0

    def failed(self, name: str) -> None:
        with self.lock:
            self.failures.setdefault(name, []).append(time.time())

    def succeeded(self, name: str) -> None:
        with self.lock:
            self.failures.pop(name, None)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookies(headers: dict[str, str]) -> dict[str, str]:
    out = {}
    for part in headers.get("cookie", "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out[name] = value
    return out


def principal_from_headers(credentials: Credentials | None, headers) -> Principal:
    """For handlers that only see headers (the UI): who is calling (OPEN when the app is open). The
    middleware has already let them in."""
    if credentials is None or not credentials.enabled:
        return OPEN
    h = {str(k).lower(): str(v) for k, v in dict(headers or {}).items()}
    return credentials.user_of(h, _cookies(h)) or OPEN


def user_from_headers(credentials: Credentials | None, headers) -> str | None:
    """The caller's name (None when the app is open)."""
    return principal_from_headers(credentials, headers).name


async def _send(send, status: int, body: bytes, content_type: str, extra: list | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _login_page(error: str = "", next_path: str = "/") -> bytes:
    note = f'<p class="err">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Sign in · domain-assistant</title><style>
body{{font-family:system-ui,sans-serif;display:flex;justify-content:center;padding-top:12vh;background:#f6f7f9}}
form{{background:#fff;padding:2rem;border-radius:12px;box-shadow:0 2px 12px #0002;width:min(340px,90vw)}}
input{{width:100%;padding:.6rem;margin:.3rem 0 1rem;box-sizing:border-box;border:1px solid #ccd;border-radius:6px}}
button{{width:100%;padding:.7rem;border:0;border-radius:6px;background:#f97316;color:#fff;font-size:1rem}}
.err{{color:#b91c1c}} p.hint{{color:#667;font-size:.85rem}}</style></head><body>
<form method="post" action="{LOGIN_PATH}"><h2>domain-assistant</h2>{note}
<input type="hidden" name="next" value="{html.escape(next_path)}">
<label>User<input name="username" id="username" autocomplete="username" required></label>
<label>Password<input name="password" id="password" type="password" autocomplete="current-password" required></label>
<button type="submit" id="login">Sign in</button>
<p class="hint">Your user name and password, or any name with the API key as the password.</p></form></body></html>""".encode()


def _safe_next(value: str) -> str:
    """Only same-site paths: never redirect a login to another host."""
    return value if value.startswith("/") and not value.startswith("//") and "\\" not in value else "/"


class AuthMiddleware:
    """The one check every request passes (see the module docstring)."""

    def __init__(self, app, credentials: Credentials):
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if not self.credentials.enabled:
            state = scope.setdefault("state", {})
            state["user"], state["principal"] = None, OPEN
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = _headers(scope)
        if scope["type"] == "http" and path == LOGIN_PATH:
            return await self._login(scope, receive, send, headers)
        if scope["type"] == "http" and path == LOGOUT_PATH:
            self.credentials.sign_out(_cookies(headers).get(SESSION_COOKIE))
            return await _send(send, 303, b"", "text/plain", [(b"location", LOGIN_PATH.encode()), (
                b"set-cookie", f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax".encode())])
        who = self.credentials.user_of(headers, _cookies(headers))
        if who is None and path not in (HEALTH_PATH, PROBE_PATH):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            if scope.get("method") == "GET" and "text/html" in headers.get("accept", ""):
                target = f"{LOGIN_PATH}?next={quote(path)}"
                return await _send(send, 303, b"", "text/plain", [(b"location", target.encode())])
            body = json.dumps({"error": {"message": UNAUTHORIZED, "type": "invalid_request_error",
                                         "param": None, "code": "invalid_api_key"}}).encode()
            return await _send(send, 401, body, "application/json",
                               [(b"www-authenticate", b'Bearer realm="domain-assistant"')])
        state = scope.setdefault("state", {})
        state["user"], state["principal"] = (who.name, who) if who is not None else (None, None)
        return await self.app(scope, receive, send)

    async def _login(self, scope, receive, send, headers):
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope.get("method") != "POST":
            page = _login_page(next_path=_safe_next(query.get("next", ["/"])[0]))
            return await _send(send, 200, page, "text/html; charset=utf-8")
        body, more = b"", True
        while more and len(body) <= MAX_LOGIN_BODY_BYTES:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        form = parse_qs(body[:MAX_LOGIN_BODY_BYTES].decode("utf-8", "replace"))
        name = form.get("username", [""])[0][:64]
        next_path = _safe_next(form.get("next", ["/"])[0])
        browser = "next" in form   # the sign-in page posts `next`; API clients (gradio_client) do not
        wait = self.credentials.throttle.wait_s(name)
        if wait:
            log.warning("sign-in for user %r refused: too many failed attempts", name)
            message = f"too many failed sign-ins for this name: try again in {wait // 60 + 1} minutes"
            extra = [(b"retry-after", str(wait).encode())]
            if not browser:
                return await _send(send, 429, json.dumps({"success": False, "error": message}).encode(),
                                   "application/json", extra)
            return await _send(send, 429, _login_page(message, next_path), "text/html; charset=utf-8", extra)
        user = self.credentials.check_password(name, form.get("password", [""])[0])
        if user is None:
            self.credentials.throttle.failed(name)
            log.warning("failed sign-in for user %r", name)
            if not browser:
                return await _send(send, 401, json.dumps({"success": False, "error": "wrong user or password"})
                                   .encode(), "application/json")
            return await _send(send, 401, _login_page("wrong user or password", next_path), "text/html; charset=utf-8")
        self.credentials.throttle.succeeded(name)
        secure = "; Secure" if scope.get("scheme") == "https" or headers.get("x-forwarded-proto") == "https" else ""
        cookie = (f"{SESSION_COOKIE}={self.credentials.sign(user)}; Path=/; Max-Age={SESSION_SECONDS}; HttpOnly; "
                  f"SameSite=Lax{secure}")
        if not browser:   # as Gradio's own /login answers: 200 with the cookie
            return await _send(send, 200, b'{"success": true}', "application/json", [(b"set-cookie", cookie.encode())])
        return await _send(send, 303, b"", "text/plain", [(b"location", next_path.encode()),
                                                         (b"set-cookie", cookie.encode())])
