"""Nothing fails silently: every response is logged exactly once and feedback on a just-finished answer
finds it; a response that cannot be logged, a kernel that cannot be built, an active pointer to a missing
version and unreadable domain files are logged and reported where a person looks (the API, /metrics)."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import make_serving, running_server

HI = [{"role": "user", "content": "hi"}]


def _samples(text: str) -> dict:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_feedback_right_after_an_answer_always_finds_it(tiny_settings):
    svc = make_serving(tiny_settings)
    try:
        for _ in range(30):
            call = svc.start_chat("base", HI, max_tokens=2)
            for _ev in call.handle:   # the answer is complete: the user presses thumbs up at once
                pass
            assert svc.feedback(call.id, "up") > 0
        with sqlite3.connect(tiny_settings.db_path) as db:
            assert db.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM responses").fetchone() == (30, 30)
            assert db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 30
    finally:
        svc.close()


def test_a_response_that_cannot_be_logged_is_logged_as_an_error_and_counted(tiny_settings, caplog):
    svc = make_serving(tiny_settings)
    try:
        with sqlite3.connect(tiny_settings.db_path) as db:   # the log table is gone: every insert fails
            db.execute("ALTER TABLE responses RENAME TO responses_gone")
        with caplog.at_level(logging.ERROR, logger="assistant.serving"):
            call = svc.start_chat("base", HI, max_tokens=2)
            for _ev in call.handle:
                pass
            assert svc.finish_chat(call)
        assert svc.log_failures == 1
        assert any(call.id in r.getMessage() and r.exc_info for r in caplog.records)
        metrics = _samples(svc.workspace.prometheus_text())       # the scrape still answers without the responses table
        assert metrics[("assistant_response_log_failures_total", ())] == 1
    finally:
        svc.close()


def test_a_kernel_build_that_fails_is_logged_and_the_torch_path_serves(tmp_path):
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from assistant.engine.kernels import step_kernel, lora_kernel\n"
            "print(step_kernel() is None and lora_kernel() is None)")
    env = dict(os.environ, CC="false", ASSISTANT_CACHE=str(tmp_path), ASSISTANT_KERNELS="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "True"
    assert "building the C kernels with false failed" in p.stderr and "torch path" in p.stderr


@pytest.mark.slow
def test_broken_domains_are_reported_not_served_as_base(tmp_path, tiny_llama):
    from helpers import train_fact_adapter
    adapter = train_fact_adapter(tiny_llama, tmp_path / "a", [("Q?", "A.")], steps=2)
    home = tmp_path / "home"
    home.mkdir()
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32") as (url, _):
        c = httpx.Client(base_url=url, timeout=60)
        for name in ("good", "gone", "garbled"):
            assert c.post("/api/domains", json={"name": name}).status_code == 201
        import io
        import zipfile
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for f in adapter.iterdir():
                z.write(f, f.name)
        assert c.post("/api/domains/gone/adapters?activate=true", content=buf.getvalue(),
                      headers={"Content-Type": "application/zip"}).status_code == 201
        assert c.post("/api/domains/good/adapters?activate=true", content=buf.getvalue(),
                      headers={"Content-Type": "application/zip"}).status_code == 201
        adapters = home / "adapters"
        import shutil
        shutil.rmtree(adapters / "gone" / "v1")                     # the active version disappears
        (adapters / "garbled" / "domain.toml").write_text("system_prompt = [unclosed")
        (adapters / "good" / "v1" / "card.json").write_text("{half a card")

        domains = {d["name"]: d for d in c.get("/api/domains").json()}
        assert set(domains) == {"good", "gone", "garbled"}           # nothing hidden
        assert domains["good"]["status"] == "ok"
        assert domains["gone"]["status"] == "broken" and "v1" in domains["gone"]["problem"]
        assert domains["garbled"]["status"] == "broken" and "domain.toml" in domains["garbled"]["problem"]
        assert str(home) not in str(domains)                          # no server paths
        r = c.post("/v1/chat/completions", json={"model": "gone", "messages": HI, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "domain_broken", r.text
        assert "activate another version" in r.json()["error"]["message"]
        metrics = _samples(c.get("/metrics").text)
        assert metrics[("assistant_domain_broken", (("domain", "gone"),))] == 1
        assert metrics[("assistant_domain_broken", (("domain", "good"),))] == 0
        card = c.get("/api/domains/good/adapters").json()[0]["card"]
        assert "not valid JSON" in card["problem"]
        # a version can still be activated to repair the broken domain
        assert c.post("/api/domains/good/adapters/v1/activate").status_code == 200
        log = next(home.glob("server-*.log")).read_text()
        assert "active pointer names 'v1'" in log and "domain.toml is unreadable" in log
