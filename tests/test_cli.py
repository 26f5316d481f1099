"""The command line calls the same functions as the API: create a domain, import seed data, curate,
export, chat, list adapters; errors come out as one line that says what to do."""

import json
import os
import subprocess
import sys


def cli(home, *args, check=True):
    env = dict(os.environ, ASSISTANT_HOME=str(home), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "assistant.cli", *args], capture_output=True, text=True, env=env,
                       cwd=str(home), timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_help_is_fast_and_lists_commands(home):
    r = cli(home, "--help")
    for cmd in ("serve", "chat", "curate", "train", "adapters", "eval", "export"):
        assert cmd in r.stdout


def test_domain_seed_curate_export_and_chat(home, tiny_llama):
    cli(home, "adapters", "create", "support", "--system-prompt", "Be brief.")
    assert (home / "adapters" / "support" / "domain.toml").is_file()
    seed = home / "seed.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"How do I reset password number {i}?"},
                          {"role": "assistant", "content": f"Open settings, choose security, then reset {i}."}]}
            for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})
    seed.write_text("\n".join(json.dumps(r) for r in rows))
    r = cli(home, "curate", "--domain", "support", "--examples", str(seed))
    report = json.loads(r.stdout)
    assert report["candidates"] == 3 and "rejected 1" in r.stderr
    out = home / "snap.jsonl"
    cli(home, "export", "--domain", "support", "-o", str(out))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == report["kept"]
    assert all(set(x) == {"messages", "split", "source", "key", "feedback_ids"} for x in lines)
    r = cli(home, "chat", "Hello", "--model", "support", "--max-tokens", "5", "--base-model", str(tiny_llama),
            "--dtype", "float32")
    assert "adapter=none" in r.stderr and r.stdout.strip()
    r = cli(home, "adapters", "list")
    assert "support: active=-" in r.stdout


def test_errors_are_one_clear_line(home):
    r = cli(home, "adapters", "create", "../evil", check=False)
    assert r.returncode == 2 and "not allowed" in r.stderr and "Traceback" not in r.stderr
    r = cli(home, "curate", "--domain", "missing", check=False)
    assert r.returncode == 2 and "create it first" in r.stderr
    r = cli(home, "serve", "--share", check=False)
    assert r.returncode == 2 and "--auth" in r.stderr
