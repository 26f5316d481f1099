"""docs/API.md is the contract users read: every route in its tables exists in the app, and every route
the app defines is in its tables (the sign-in pages are the auth middleware's, not routes)."""

from __future__ import annotations

import re
from pathlib import Path

from assistant.api.auth import LOGIN_PATH, LOGOUT_PATH
from assistant.api.routes import build_api

DOC = Path(__file__).resolve().parent.parent / "docs" / "API.md"
ROW = re.compile(r"^\|\s*(GET|POST|PUT|PATCH|DELETE)\s*\|\s*`([^`]+)`\s*\|", re.M)


def test_every_documented_route_exists_and_every_route_is_documented():
    documented = {(m, p) for m, p in ROW.findall(DOC.read_text())}
    served = {(m, r.path) for r in build_api(None, None).routes if r.include_in_schema   # not the catch-all 404
              for m in r.methods if m != "HEAD"}
    pages = {("GET", LOGIN_PATH), ("POST", LOGIN_PATH), ("GET", LOGOUT_PATH)}
    assert len(served) >= 17
    assert documented - pages == served, {"documented, not served": sorted(documented - pages - served),
                                          "served, not documented": sorted(served - documented)}
    assert pages <= documented


def test_the_repository_stands_alone():
    """No link or reference in code, tests or docs points outside the repository."""
    root = DOC.parent.parent
    bad = re.compile(r"\.\./shared|STYLE\.md|[Ii]ssue #?\d+")
    hits = []
    for path in [*root.glob("*.md"), *root.glob("docs/*.md"), *root.glob("assistant/**/*.py"),
                 *root.glob("tests/*.py"), *root.glob("benchmarks/*.py"), *root.glob("scripts/*")]:
        if path.name == Path(__file__).name or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if bad.search(line):
                hits.append(f"{path.relative_to(root)}:{n}: {line.strip()[:80]}")
    assert not hits, hits
