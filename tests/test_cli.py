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


TORCH_FREE_SECONDS = 3.0   # `curate` and `export` of small data already embedded: no model, no torch


def test_help_lists_every_command_and_every_settings_group_without_importing_torch(home):
    r = cli(home, "--help")
    for cmd in ("serve", "chat", "curate", "train", "adapters", "eval", "export", "feedback", "logs"):
        assert cmd in r.stdout
    r = cli(home, "serve", "--help")
    for flag in ("--train.epochs", "--curation.near-dup-threshold", "--gate.min-corrections-match",
                 "--monitor.lookback-seconds", "--config", "--base-model", "--quantization"):
        assert flag in r.stdout, flag
    assert "peak AdamW learning rate" in r.stdout       # the field's own help text
    probe = ("import sys, time; t = time.perf_counter(); from assistant.cli import build_parser; "
             "build_parser().format_help(); print(time.perf_counter() - t, 'torch' in sys.modules)")
    seconds, torch_loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                           check=True).stdout.split()
    assert torch_loaded == "False" and float(seconds) < TORCH_FREE_SECONDS


def test_settings_come_from_a_config_file_and_flags_win(home):
    from assistant.cli import build_parser
    from assistant.flags import settings_from
    config = home / "assistant.toml"
    config.write_text('state_dir = "elsewhere"\n[train]\nepochs = 4\nrank = 8\n[curation]\npii = "drop"\n')
    args = build_parser().parse_args(["train", "ops", "--config", str(config), "--epochs", "2"])
    s = settings_from(args)
    assert s.train == {"epochs": 2, "rank": 8} and s.curation == {"pii": "drop"} and s.state_dir.name == "elsewhere"
    config.write_text("[train]\nepochs = \"lots\"\n")
    r = cli(home, "train", "ops", "--config", str(config), check=False)
    assert r.returncode == 2 and "epochs must be a whole number" in r.stderr and "Traceback" not in r.stderr
    r = cli(home, "curate", "ops", "--curation.near-dup-threshold", "high", check=False)
    assert r.returncode == 2 and "--curation.near-dup-threshold" in r.stderr and "'high'" in r.stderr


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


def test_curate_and_export_of_embedded_data_do_not_import_torch(home):
    """The embedding model (sentence-transformers, on torch) loads only for texts it has not embedded yet:
    the first curate of new examples loads it; curating and exporting them again reads the stored vectors
    and never imports torch."""
    cli(home, "adapters", "create", "support")
    seed = home / "seed.jsonl"
    seed.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"How do I change the delivery address of order {i}?"},
        {"role": "assistant", "content": f"Open order {i}, choose Edit address and save before it ships."}]})
        for i in range(5)))
    env = dict(os.environ, ASSISTANT_HOME=str(home), HF_HUB_OFFLINE="1")
    for args, embeds in ((("curate", "support", "--examples", str(seed)), True), (("curate", "support"), False),
                         (("export", "support", "-o", str(home / "snap.jsonl")), False)):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env,
                           cwd=str(home), timeout=300)
        elapsed = time.perf_counter() - start
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"torch imported: {embeds}" in r.stderr, (args, r.stderr[-2000:])
        if not embeds:
            assert elapsed < TORCH_FREE_SECONDS, f"{args[0]} took {elapsed:.1f} s"
    assert len((home / "snap.jsonl").read_text().splitlines()) == 5


def test_errors_are_one_clear_line(home):
    r = cli(home, "adapters", "create", "../evil", check=False)
    assert r.returncode == 2 and "not allowed" in r.stderr and "Traceback" not in r.stderr
    r = cli(home, "curate", "--domain", "missing", check=False)
    assert r.returncode == 2 and "create it first" in r.stderr
    r = cli(home, "serve", "--share", check=False)
    assert r.returncode == 2 and "--auth" in r.stderr


def test_logs_show_answers_with_their_feedback_and_feedback_is_taken(home, tiny_settings):
    from helpers import make_serving
    serving = make_serving(tiny_settings)
    try:
        serving.workspace.create_domain("ops")
        ids = [serving.chat(model, [{"role": "user", "content": q}], max_tokens=3)["id"]
               for model, q in (("base", "first question"), ("ops", "which port?"))]
    finally:
        serving.close()
    r = cli(home, "feedback", ids[1], "down", "--correction", "Port 8080.", "--reason", "wrong port")
    assert "recorded" in r.stdout
    r = cli(home, "logs", "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["id"] for x in rows] == ids[::-1]                       # newest first
    assert rows[0]["feedback"][0]["correction"] == "Port 8080." and rows[1]["feedback"] == []
    r = cli(home, "logs", "--domain", "ops")
    assert ids[1] in r.stdout and ids[0] not in r.stdout and "Q: which port?" in r.stdout
    assert "correction: Port 8080." in r.stdout and "reason: wrong port" in r.stdout
    r = cli(home, "feedback", "chatcmpl-nope", "up", check=False)
    assert r.returncode == 2 and "no response with id" in r.stderr
