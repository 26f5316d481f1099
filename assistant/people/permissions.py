"""What each role may do: one table, a rule per route, checked once for every API request.

`RULES` maps (method, route path) to the least role the route needs (users.ROLES: user < editor < admin);
`PUBLIC` routes need no sign-in at all. A rule marked `scoped` is about one domain: an editor limited to
some domains passes it only for those (the domain is the path's `name`, or the job's domain for the job
routes). A route with no rule is refused to everyone but admins, so a new route can't be open by
accident; tests/test_roles.py fails on it.

Ownership (what is whose) is not a route's rule: a user rates only their own answers and sees only their
own ratings (serving.py, api/routes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from assistant.errors import PermissionDenied
from assistant.people.users import RANK, Principal


@dataclass(frozen=True)
class Rule:
    role: str                 # the least role: "user", "editor" or "admin"; "public" needs no sign-in
    scoped: bool = False      # about the domain in the path: an editor's domains limit it
    what: str = ""            # said in the 403: "train a domain"


PUBLIC = Rule("public")

RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/api/health"): PUBLIC,
    ("GET", "/health"): PUBLIC,
    ("GET", "/api/me"): Rule("user"),
    # chat through the OpenAI routes, and one's own ratings
    ("GET", "/v1/models"): Rule("user"),
    ("GET", "/v1/models/{model_id}"): Rule("user"),
    ("POST", "/v1/chat/completions"): Rule("user"),
    ("POST", "/v1/completions"): Rule("user"),
    ("POST", "/v1/embeddings"): Rule("user"),
    ("POST", "/v1/responses"): Rule("user"),     # a stored response is its owner's (api/responses.py)
    ("GET", "/v1/responses/{response_id}"): Rule("user"),
    ("DELETE", "/v1/responses/{response_id}"): Rule("user"),
    ("POST", "/api/feedback"): Rule("user"),
    ("POST", "/api/feedback/withdraw"): Rule("user"),
    ("GET", "/api/feedback"): Rule("user"),
    ("GET", "/api/domains"): Rule("user"),
    # personal keys and one's own password (an admin may manage anyone's)
    ("GET", "/api/keys"): Rule("user"),
    ("POST", "/api/keys"): Rule("user"),
    ("DELETE", "/api/keys/{key_id}"): Rule("user"),
    ("POST", "/api/users/{user}/password"): Rule("user"),
    # the loop: data, training, versions, monitoring
    ("POST", "/api/domains"): Rule("editor", what="create domains"),
    ("POST", "/api/domains/{name}/examples"): Rule("editor", True, "add examples"),
    ("GET", "/api/domains/{name}/dataset"): Rule("editor", True, "read the dataset"),
    ("GET", "/api/domains/{name}/dataset/export"): Rule("editor", True, "export the dataset"),
    ("GET", "/api/domains/{name}/review"): Rule("editor", True, "review feedback"),
    ("POST", "/api/domains/{name}/review"): Rule("editor", True, "review feedback"),
    ("GET", "/api/domains/{name}/adapters"): Rule("editor", True, "see the versions"),
    ("POST", "/api/domains/{name}/adapters/{version}/activate"): Rule("editor", True, "activate versions"),
    ("POST", "/api/domains/{name}/adapters"): Rule("editor", True, "import adapters"),
    ("POST", "/api/domains/{name}/adapters/{version}/canary"): Rule("editor", True, "send out canaries"),
    ("GET", "/api/domains/{name}/canary"): Rule("editor", True, "see the canary"),
    ("DELETE", "/api/domains/{name}/canary"): Rule("editor", True, "stop canaries"),
    ("POST", "/api/domains/{name}/train"): Rule("editor", True, "train"),
    ("GET", "/api/jobs/{job_id}"): Rule("editor", True, "follow training jobs"),
    ("DELETE", "/api/jobs/{job_id}"): Rule("editor", True, "cancel training jobs"),
    ("POST", "/api/jobs/{job_id}/retry"): Rule("editor", True, "retry training jobs"),
    ("GET", "/api/domains/{name}/metrics"): Rule("editor", True, "see the domain's monitoring"),
    # people and the record of what they did
    ("GET", "/api/users"): Rule("admin", what="list users"),
    ("POST", "/api/users"): Rule("admin", what="add users"),
    ("DELETE", "/api/users/{user}"): Rule("admin", what="remove users"),
    ("GET", "/api/audit"): Rule("admin", what="read the audit log"),
    ("GET", "/metrics"): Rule("admin", what="read the server's metrics"),
}
UNLISTED = Rule("admin", what="use this route")
# The catch-all that answers 404/405 for unknown paths: anyone signed in may learn a path does not exist.
CATCH_ALL = ("/v1/{rest:path}", "/api/{rest:path}")
OPENAPI = ("/api/openapi.json", "/api/docs", "/api/docs/oauth2-redirect")


def rule_for(method: str, path: str) -> Rule:
    if path in CATCH_ALL or path in OPENAPI:
        return Rule("user")
    return RULES.get(("GET" if method == "HEAD" else method, path), UNLISTED)


def check(who: Principal | None, rule: Rule, domain: str | None = None) -> None:
    """Raise PermissionDenied unless `who` may pass `rule` (for `domain`, when the rule is scoped)."""
    if rule.role == "public":
        return
    if who is None:
        raise PermissionDenied("sign in first")
    if not who.has(rule.role, domain if rule.scoped else None):
        what = f" to {rule.what}" if rule.what else ""
        if RANK[who.role] >= RANK[rule.role]:
            raise PermissionDenied(f"your {who.role} role covers the domains {', '.join(who.domains)}, not "
                                   f"{domain!r}: an admin can add it to your domains")
        raise PermissionDenied(f"the {rule.role} role is needed{what}; you are signed in as a {who.role}: ask an "
                               "admin")
