"""Finished work is never thrown away: when evaluation fails after training, the trained adapter stays in the
job's staging folder, the job says which stage failed and why, and "retry from evaluation" (Workspace, used by
the API and the UI, and the CLI) publishes it without training again."""

from __future__ import annotations

import pytest

from assistant.errors import Conflict

from invented_facts import FACTS, SYSTEM_PROMPT, chat

pytestmark = pytest.mark.slow   # trains the tiny Llama in this process
FAST = {"rank": 4, "alpha": 8, "learning_rate": 0.02, "epochs": 1, "batch_size": 4, "max_seq_len": 128}


@pytest.fixture
def ws(tiny_settings):
    from assistant.workspace import Workspace
    w = Workspace(tiny_settings)
    w.registry.create_domain("atlas", SYSTEM_PROMPT, "invented facts")
    w.store.add_examples("atlas", [{"messages": chat(q, a)} for q, a, _, _ in FACTS])
    return w


def failed_evaluation(ws, monkeypatch) -> dict:
    """A job whose evaluation fails once, the way a busy serving engine once failed it."""
    from assistant.gate import evaluation
    from assistant.jobs import run as jobs
    real = evaluation.evaluate_adapter
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("generation failed on the server")
        return real(*a, **kw)
    monkeypatch.setattr(evaluation, "evaluate_adapter", flaky)
    job = jobs.run_job_inline(ws.settings, ws.store, ws.registry, "atlas", FAST)
    assert job["status"] == "failed"
    assert "evaluate failed" in job["error"] and "generation failed" in job["error"] and "retry" in job["error"]
    assert [st["status"] for st in job["stages"][:3]] == ["done", "done", "failed"]
    assert (jobs.staging_path(ws.registry.root, job) / "adapter_model.safetensors").is_file()
    return job


def test_retry_from_evaluation_publishes_what_was_trained(ws, monkeypatch):
    from assistant.jobs import run as jobs
    job = failed_evaluation(ws, monkeypatch)
    ws.registry.cleanup_staging(keep={jobs.staging_path(ws.registry.root, job).name})   # a restart keeps it
    steps = job["total_steps"]
    out = ws.retry_job(job["job_id"], wait=True)
    assert out["status"] == "succeeded", out["error"]
    assert out["adapter_version"] == "v1" and out["total_steps"] == steps   # not trained again
    assert [st["status"] for st in out["stages"][:4]] == ["done"] * 4
    assert ws.registry.read_card("atlas", "v1")["job_id"] == job["job_id"]
    assert not list((ws.settings.adapters_path / "atlas").glob(".staging-*"))
    with pytest.raises(Conflict, match="only a failed job"):
        ws.retry_job(job["job_id"])


def test_the_cli_retries_a_failed_job(ws, monkeypatch, capsys):
    from assistant import cli
    job = failed_evaluation(ws, monkeypatch)
    s = ws.settings
    rc = cli.main(["retry", job["job_id"], "--base-model", s.base_model, "--dtype", "float32"])
    assert rc == 0, capsys.readouterr()
    assert '"succeeded"' in capsys.readouterr().out


def test_one_trained_adapter_is_kept_per_domain(ws, monkeypatch):
    """Jobs that keep failing after training do not fill the disk: the newest failure's adapter is kept (and
    survives a restart); retrying an older one says to train again."""
    from assistant.gate import evaluation
    from assistant.jobs import run as jobs
    older = failed_evaluation(ws, monkeypatch)
    monkeypatch.setattr(evaluation, "evaluate_adapter", lambda *a, **kw: (_ for _ in ()).throw(
        RuntimeError("generation failed again")))
    newer = jobs.run_job_inline(ws.settings, ws.store, ws.registry, "atlas", FAST)
    assert newer["status"] == "failed" and "retry" in newer["error"]
    kept = [p.name for p in (ws.settings.adapters_path / "atlas").glob(".staging-*")]
    assert kept == [jobs.staging_path(ws.registry.root, newer).name]
    jobs.recover_orphans(ws.settings, ws.store, ws.registry)      # what a restart does
    assert [p.name for p in (ws.settings.adapters_path / "atlas").glob(".staging-*")] == kept
    with pytest.raises(Conflict, match="start training again"):
        ws.retry_job(older["job_id"])
