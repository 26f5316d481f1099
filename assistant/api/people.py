"""HTTP routes for people: who am I, stored users, personal API keys, the audit log, and the review queue;
and `authorizer`, the dependency every API route runs before its handler (people/permissions.py's table), which
also writes the audit log of what editors and admins changed."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from assistant.api.executors import on_chat, on_control
from assistant.api.openai_schema import KeyRequest, PasswordRequest, ReviewRequest, UserRequest
from assistant.errors import InvalidSetting, PermissionDenied
from assistant.people.permissions import check, rule_for
from assistant.people.users import Principal

log = logging.getLogger(__name__)

MAX_REVIEW_KEYS = 1000   # items decided by one review call
CHAT_PATHS = ("/v1/chat/completions", "/v1/completions")   # the routes a person's quotas count


def principal(request: Request) -> Principal | None:
    """Who the auth middleware let in (users.OPEN when the app is open)."""
    return getattr(request.state, "principal", None)


def authorizer(workspace):
    """The dependency that checks every API route against permissions.RULES, and records in the audit log
    each change an editor or admin made (after it succeeded)."""
    async def authorize(request: Request):
        route = request.scope.get("route")
        path = getattr(route, "path", request.url.path)
        rule = rule_for(request.method, path)
        who = principal(request)
        domain = request.path_params.get("name")
        job_id = request.path_params.get("job_id")
        if job_id and rule.scoped:
            try:
                domain = (await on_control(workspace.job, job_id)).get("domain")
            except Exception:   # no such job: the route answers it
                domain = None
        check(who, rule, domain)
        if path in CHAT_PATHS:
            await on_chat(workspace.quotas.check, who)
        yield
        if request.method not in ("GET", "HEAD") and rule.role in ("editor", "admin") and who is not None:
            target = request.path_params.get("version") or job_id or request.path_params.get("user")
            try:
                await on_control(workspace.directory.audit, who, f"{request.method} {path}", domain, target)
            except Exception:
                log.exception("could not write the audit log for %s %s", request.method, path)
    return authorize


def add_people_routes(r: APIRouter, workspace) -> None:
    def directory():
        return workspace.directory

    @r.get("/api/me")
    async def me(request: Request):
        who = principal(request)
        return {"name": who.name, "role": who.role, "domains": list(who.domains), "via": who.kind}

    # Users (admin) -------------------------------------------------------------------------------------
    @r.get("/api/users")
    async def list_users(request: Request):
        return await on_control(directory().list)

    @r.post("/api/users", status_code=201)
    async def add_user(body: UserRequest, request: Request):
        user = await on_control(directory().add, body.name, body.password, body.role, body.domains)
        return JSONResponse(user, status_code=201)

    @r.delete("/api/users/{user}")
    async def remove_user(user: str, request: Request):
        await on_control(directory().remove, user)
        return {"removed": user}

    @r.post("/api/users/{user}/password")
    async def change_password(user: str, body: PasswordRequest, request: Request):
        """One's own password, or anyone's for an admin. Their sessions end on every replica."""
        who = principal(request)
        if who.name != user and who.role != "admin":
            raise PermissionDenied("you can change only your own password: ask an admin")
        await on_control(directory().set_password, user, body.password)
        await on_control(directory().audit, who, "password changed", None, user)
        return {"changed": user}

    # Personal API keys ---------------------------------------------------------------------------------
    @r.get("/api/keys")
    async def list_keys(request: Request):
        """One's own keys (an admin: everyone's), without their secrets."""
        who = principal(request)
        return await on_control(directory().keys, None if who.role == "admin" else who.name)

    @r.post("/api/keys", status_code=201)
    async def create_key(request: Request, body: KeyRequest | None = None):
        """A new personal key, shown in this answer only. It acts with its owner's role."""
        who = principal(request)
        body = body or KeyRequest()
        owner = body.owner or who.name
        if owner != who.name and who.role != "admin":
            raise PermissionDenied("you can make keys only for yourself: ask an admin")
        if owner is None or (who.kind in ("open", "api-key", "control") and body.owner is None):
            raise InvalidSetting("owner: personal keys belong to stored users: name the owner (assistant users "
                                 "add creates one)", param="owner")
        key = await on_control(directory().create_key, owner, body.label)
        await on_control(directory().audit, who, "key created", None, owner, key_id=key["id"])
        return JSONResponse(key, status_code=201)

    @r.delete("/api/keys/{key_id}")
    async def revoke_key(key_id: int, request: Request):
        who = principal(request)
        await on_control(directory().revoke_key, key_id, None if who.role == "admin" else who.name)
        await on_control(directory().audit, who, "key revoked", None, str(key_id))
        return {"revoked": key_id}

    # Audit (admin) -------------------------------------------------------------------------------------
    @r.get("/api/audit")
    async def audit(request: Request, domain: str | None = None, target: str | None = None, limit: int = 200):
        return await on_control(directory().audit_log, domain, target, limit)

    # Review before training (editors) ------------------------------------------------------------------
    @r.get("/api/domains/{name}/review")
    async def review_queue(name: str, request: Request, status: str | None = None):
        """The domain's candidates with their decision: ?status=pending|approved|rejected to filter."""
        items = await on_control(workspace.review_queue, name)
        out = [{k: it.get(k) for k in ("key", "source", "messages", "rating", "user", "review_status", "removed",
                                       "pending", "created_at")} for it in items]
        for it in out:
            it["status"] = it["review_status"] or ("pending" if it["pending"] else None)
        return [it for it in out if status is None or it["status"] == status]

    @r.post("/api/domains/{name}/review")
    async def review(name: str, body: ReviewRequest, request: Request):
        """Approve, reject or clear (status null) candidates by key, one or many."""
        if body.status not in ("approved", "rejected", None):
            raise InvalidSetting("status: use 'approved', 'rejected' or null", param="status")
        if not body.keys or len(body.keys) > MAX_REVIEW_KEYS:
            raise InvalidSetting(f"keys: name 1 to {MAX_REVIEW_KEYS} items (GET .../review lists them)", param="keys")
        n = await on_control(workspace.review_many, name, body.keys, body.status)
        return {"reviewed": n, "status": body.status}
