"""The command line calls the same functions as the API: create a domain, import seed data, curate,
export, chat, list adapters; errors come out as one line that says what to do."""

import json
import os
import subprocess
import sys
import time


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


# Runs the CLI like `python -m assistant.cli`, then says on stderr whether torch was imported.
_PROBE = ("import sys; from assistant.cli import main; rc = main(sys.argv[1:]); "
          "print('torch imported:', 'torch' in sys.modules, file=sys.stderr); sys.exit(rc)")


def test_curate_and_export_do_not_import_torch(home):
    cli(home, "adapters", "create", "support")
    seed = home / "seed.jsonl"
    seed.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"How do I change the delivery address of order {i}?"},
        {"role": "assistant", "content": f"Open order {i}, choose Edit address and save before it ships."}]})
        for i in range(5)))
    env = dict(os.environ, ASSISTANT_HOME=str(home), HF_HUB_OFFLINE="1")
    for args in (("curate", "--domain", "support", "--examples", str(seed)), ("curate", "--domain", "support"),
                 ("export", "--domain", "support", "-o", str(home / "snap.jsonl"))):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env,
                           cwd=str(home), timeout=120)
        elapsed = time.perf_counter() - start
        assert r.returncode == 0, r.stderr[-2000:]
        assert "torch imported: False" in r.stderr, (args, r.stderr[-2000:])
        assert elapsed < 3, f"{args[0]} took {elapsed:.1f} s"
    assert len((home / "snap.jsonl").read_text().splitlines()) == 5


def test_errors_are_one_clear_line(home):
    r = cli(home, "adapters", "create", "../evil", check=False)
    assert r.returncode == 2 and "not allowed" in r.stderr and "Traceback" not in r.stderr
    r = cli(home, "curate", "--domain", "missing", check=False)
    assert r.returncode == 2 and "create it first" in r.stderr
    r = cli(home, "serve", "--share", check=False)
    assert r.returncode == 2 and "--auth" in r.stderr
