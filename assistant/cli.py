"""The command line: `assistant serve | worker | chat | curate | export | train | eval | adapters | feedback | users |
logs`.

Each command parses its flags into Settings (flags.py generates them from the settings dataclasses) and
calls the same Workspace or Serving method the UI and the API call. Commands on data (curate, export,
train, eval, adapters list/create, feedback, logs) run on a Workspace and never load the chat model;
`chat`, `adapters activate` and `adapters import` (which check an adapter against the base's weights)
load it. With a server running on the same state (its server file, cluster/remote.py), `adapters activate|import`
and `train` go through that server instead, so the version is loaded where it serves before it goes live.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from assistant.flags import add_config_flag, add_group_flags, add_settings_flags, settings_from
from assistant.workspace import DEFAULT_LOG_ROWS

WORKSPACE_FLAGS = ("state_dir", "adapters_dir", "database_url")
MODEL_FLAGS = ("base_model", "quantization", "dtype", "device")
TRAIN_FLAGS = ("train_device", "train_gpus")
LIMIT_FLAGS = ("engine", "vllm_url", "vllm_max_lora_rank")   # what the serving engine accepts (checked before training)
SERVER_FLAGS = ("host", "port", "api_key", "session_secret", "max_resident_adapters", "max_batch", "max_queue",
                "engine", "vllm_url", "vllm_adapters_path", "vllm_max_lora_rank", "vllm_api_key",
                "gpu_memory_utilization", "embedded_worker", "user_requests_per_minute",
                "user_tokens_per_day", "access_log") + TRAIN_FLAGS
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ANSWER_PREVIEW_CHARS = 100      # `assistant logs`: characters of each question and answer shown


def _workspace(args):
    from assistant.workspace import Workspace
    return Workspace(settings_from(args))


def _serving(args):
    """The CLI's one builder of a Serving (and its engine): the server's, without recovering jobs."""
    from assistant.server import build
    return build(settings_from(args), recover_jobs=False)[1]


def _domain(args) -> str:
    domain = args.domain or args.domain_flag
    if not domain:
        raise ValueError(f"name the domain: `assistant {args.cmd} DOMAIN`")
    return domain


# Commands --------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from assistant.server import serve
    settings = settings_from(args)
    setup_access_log(settings.access_log)
    return serve(settings)


def cmd_chat(args) -> int:
    serving = _serving(args)
    try:
        call = serving.start_chat(args.model, [{"role": "user", "content": args.message}],
                                  max_tokens=args.max_tokens, temperature=args.temperature)
        for ev in call.handle:
            if ev.kind == "token":
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif ev.kind == "error":
                raise ev.error
        sys.stdout.write("\n")
        serving.finish_chat(call)
        sys.stderr.write(f"[{call.id} model={call.target.model} adapter={call.target.version or 'none'}]\n")
    finally:
        serving.close()
    return 0


def cmd_curate(args) -> int:
    ws, domain = _workspace(args), _domain(args)
    if args.examples:
        with open(args.examples, encoding="utf-8", errors="replace") as f:
            res = ws.import_seed_jsonl(domain, f.read())
        sys.stderr.write(res["message"] + "\n")
    snap = ws.curate(domain)
    sys.stdout.write(json.dumps(snap.report, indent=1) + "\n")
    return 0


def cmd_export(args) -> int:
    ws, domain = _workspace(args), _domain(args)
    snap = ws.curate(domain)
    with open(snap.path, "rb") as f:
        data = f.read()
    if args.output and args.output != "-":
        with open(args.output, "wb") as f:
            f.write(data)
        sys.stderr.write(f"wrote {snap.report['kept']} rows to {args.output} (snapshot {snap.hash[:12]})\n")
    else:
        sys.stdout.buffer.write(data)
    return 0


def _running_server(args):
    """The server running on this state (its server file, see cluster/remote.py), or None."""
    from assistant.cluster.remote import find_server
    return find_server(settings_from(args))


def _follow(domain: str):
    """A progress bar fed with the job records a running server reports."""
    from tqdm import tqdm
    bar = tqdm(total=None, desc=f"training {domain} on the server", unit="step")

    def update(job):
        if job.get("total_steps"):
            bar.total, bar.n = job["total_steps"], job.get("step") or 0
        if job.get("loss") is not None:
            bar.set_postfix(loss=f"{job['loss']:.3f}", stage=job.get("stage") or job["status"])
        bar.refresh()
    return bar, update


def cmd_worker(args) -> int:
    ran = _workspace(args).work(max_jobs=args.max_jobs)
    sys.stdout.write(f"ran {ran} job(s)\n")
    return 0


def cmd_train(args) -> int:
    server = _running_server(args)
    if server is not None:   # the server trains and activates, as its Train button would
        domain = _domain(args)
        bar, update = _follow(domain)
        try:
            job = server.train(domain, settings_from(args).train, on_update=update)
        finally:
            bar.close()
    else:
        job = _workspace(args).train(_domain(args))
    keys = ("job_id", "status", "adapter_version", "promoted", "metrics", "error")
    sys.stdout.write(json.dumps({k: job.get(k) for k in keys}, indent=1, default=str) + "\n")
    return 0 if job.get("status") == "succeeded" else 1


def cmd_retry(args) -> int:
    job = _workspace(args).retry_job(args.job_id, wait=True)
    keys = ("job_id", "status", "adapter_version", "promoted", "metrics", "error")
    out = {k: job.get(k) for k in keys}
    out["data"] = (job.get("settings") or {}).get("data_summary")    # "40 ratings, ...: SFT + DPO + KTO"
    sys.stdout.write(json.dumps(out, indent=1, default=str) + "\n")
    return 0 if job.get("status") == "succeeded" else 1


def cmd_eval(args) -> int:
    result = _workspace(args).evaluate(_domain(args), args.version)
    sys.stdout.write(json.dumps(result, indent=1, default=str) + "\n")
    return 0


def cmd_adapters(args) -> int:
    if args.action == "list":
        ws = _workspace(args)
        for d in ws.list_domains():
            if args.domain and d["name"] != args.domain:
                continue
            sys.stdout.write(f"{d['name']}: active={d['active_version'] or '-'} "
                             f"versions={','.join(d['versions']) or '-'}\n")
            for a in ws.adapters(d["name"]):
                m = a["card"].get("metrics", {})
                sys.stdout.write(f"  {'*' if a['active'] else ' '} {a['version']}  "
                                 f"created={time.ctime(a['card'].get('created_at', 0))}  "
                                 f"metrics={json.dumps(m)[:120]}\n")
        return 0
    if not args.domain:
        raise ValueError(f"name the domain: `assistant adapters {args.action} DOMAIN`")
    if args.action == "create":
        _workspace(args).create_domain(args.domain, args.system_prompt or "", args.description or "")
        sys.stdout.write(f"created domain {args.domain}\n")
        return 0
    if args.action == "activate" and not args.version:
        raise ValueError(f"name the version: `assistant adapters activate {args.domain} vN`")
    if args.action == "import" and not args.path:
        raise ValueError("--path: name a zip or folder holding a PEFT LoRA adapter")
    server = _running_server(args)
    if server is not None:   # the running server validates, loads on its engine, then moves the pointer
        if args.action == "activate":
            server.activate(args.domain, args.version, override=args.override)
            sys.stdout.write(f"{args.domain}: active version is now {args.version} (on the server at {server.url})\n")
        else:
            v = server.import_adapter(args.domain, args.path, activate=args.activate)
            sys.stdout.write(f"imported {args.path} as {args.domain}@{v}" + (" (active)" if args.activate else "")
                             + f" on the server at {server.url}\n")
        return 0
    serving = _serving(args)   # no server: activate and import validate the adapter against the base's weights
    try:
        if args.action == "activate":
            serving.activate(args.domain, args.version, override=args.override)
            sys.stdout.write(f"{args.domain}: active version is now {args.version}\n")
        else:
            v = serving.import_adapter(args.domain, args.path, activate=args.activate)
            sys.stdout.write(f"imported {args.path} as {args.domain}@{v}" + (" (active)" if args.activate else "") + "\n")
    finally:
        serving.close()
    return 0


def cmd_feedback(args) -> int:
    fid = _workspace(args).feedback(args.response_id, args.rating, args.correction, args.reason, args.user)
    sys.stdout.write(f"feedback {fid} recorded on {args.response_id}\n")
    return 0


def _password(args, prompt: str = "password: ") -> str:
    """A password from a prompt (asked twice) or, with --password-stdin, standard input: never a flag."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    import getpass
    first = getpass.getpass(prompt)
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ: nothing was changed")
    return first


def cmd_users(args) -> int:
    directory = _workspace(args).directory
    if args.action == "list":
        for u in directory.list():
            sys.stdout.write(f"{u['name']}  {u['role']}  domains={','.join(u['domains']) or 'all'}\n")
        return 0
    if not args.name:
        raise ValueError(f"name the user: `assistant users {args.action} NAME`")
    if args.action == "add":
        u = directory.add(args.name, _password(args), args.role, args.domains)
        sys.stdout.write(f"added {u['name']} ({u['role']}"
                         + (f", domains {','.join(u['domains'])}" if u["domains"] else "") + ")\n")
    elif args.action == "remove":
        directory.remove(args.name)
        sys.stdout.write(f"removed {args.name} (their keys are revoked)\n")
    else:
        directory.set_password(args.name, _password(args, "new password: "))
        sys.stdout.write(f"changed the password of {args.name}: their sessions have ended\n")
    return 0


def _short(text: str) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= ANSWER_PREVIEW_CHARS else text[:ANSWER_PREVIEW_CHARS - 1] + "…"


def cmd_logs(args) -> int:
    rows = _workspace(args).logs(args.domain, args.n)
    if args.json:
        for r in rows:
            sys.stdout.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        return 0
    for r in rows:
        question = next((m["content"] for m in reversed(r["messages"]) if m["role"] == "user"), "")
        served = f"{r['domain']}@{r['adapter_version']}" if r["adapter_version"] else r["domain"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        sys.stdout.write(f"{r['id']}  {when}  {served}  {r['completion_tokens']} tokens, {r['latency_ms']:.0f} ms, "
                         f"{r['finish_reason']}\n  Q: {_short(question)}\n  A: {_short(r['answer'])}\n")
        for f in r["feedback"]:
            extra = "".join(f"\n     {k}: {_short(f[k])}" for k in ("reason", "correction") if f.get(k))
            by = f" by {f['user']}" if f.get("user") else ""
            sys.stdout.write(f"  feedback: {'👍' if f['rating'] == 'up' else '👎'} {f['rating']}{by}{extra}\n")
    return 0


# The parser ------------------------------------------------------------------------------------------
def _command(sub, name: str, help_: str, fn, *, flags=WORKSPACE_FLAGS, groups=(), short_group=None, domain=False):
    sp = sub.add_parser(name, help=help_, description=help_)
    add_config_flag(sp)
    add_settings_flags(sp, flags)
    if domain:
        sp.add_argument("domain", nargs="?", help="the domain")
        sp.add_argument("--domain", dest="domain_flag", help=argparse.SUPPRESS)   # the older spelling
    for group in groups:
        add_group_flags(sp, group, short=group == short_group)
    sp.set_defaults(fn=fn)
    return sp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="assistant", description="One base LLM, many domain assistants.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="what the server and commands log to stderr (default info)")
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = _command(sub, "serve", "run the UI and the API on one port", cmd_serve,
                  flags=WORKSPACE_FLAGS + MODEL_FLAGS + SERVER_FLAGS, groups=("canary", "curation", "gate", "monitor", "train"))
    sp.add_argument("--auth", action="append", metavar="USER:PASS",
                    help="an admin sign-in (repeatable); stored users (`assistant users add`) are the safer way: "
                         "hashed passwords, never on a command line, roles narrower than admin")
    sp.add_argument("--auth-file", help="a file of USER:PASS lines")
    sp.add_argument("--share", action="store_true", help="a public Gradio link (requires --auth)")

    sp = _command(sub, "chat", "one question, answer streamed to stdout", cmd_chat, flags=WORKSPACE_FLAGS + MODEL_FLAGS)
    sp.add_argument("message")
    sp.add_argument("--model", default="base", help="base, <domain> or <domain>@vN")
    sp.add_argument("--max-tokens", type=int, default=256)
    sp.add_argument("--temperature", type=float, default=0.0)

    sp = _command(sub, "curate", "build the domain's curated snapshot and print its report", cmd_curate,
                  groups=("curation",), domain=True)
    sp.add_argument("--examples", help="import seed examples first (JSONL of {messages: [...]})")

    sp = _command(sub, "export", "write the curated snapshot as JSONL", cmd_export, groups=("curation",), domain=True)
    sp.add_argument("-o", "--output", default="-", help="a file (default: standard output)")

    _command(sub, "train", "train, evaluate and publish a new adapter version (progress bar)", cmd_train,
             flags=WORKSPACE_FLAGS + MODEL_FLAGS + TRAIN_FLAGS + LIMIT_FLAGS, groups=("train", "gate", "curation"),
             short_group="train", domain=True)

    sp = _command(sub, "retry", "retry a failed training job from evaluation (its trained adapter was kept)",
                  cmd_retry, flags=WORKSPACE_FLAGS + MODEL_FLAGS, groups=("gate",))
    sp.add_argument("job_id", help="the failed job (see GET /api/jobs/<id> or the Train tab)")

    sp = _command(sub, "worker", "claim queued training jobs from the database and run them here, one at a time "
                  "(beside `assistant serve` replicas on one --database-url and adapters folder)", cmd_worker,
                  flags=WORKSPACE_FLAGS + MODEL_FLAGS + TRAIN_FLAGS, groups=("gate", "curation"))
    sp.add_argument("--max-jobs", type=int, help="stop after this many jobs (default: run until stopped)")

    sp = _command(sub, "eval", "evaluate an adapter version on the domain's held-out data", cmd_eval,
                  flags=WORKSPACE_FLAGS + MODEL_FLAGS, groups=("gate",), domain=True)
    sp.add_argument("--version", help="vN (default: the active one)")

    sp = _command(sub, "adapters", "list, create domains, activate or import adapter versions", cmd_adapters,
                  flags=WORKSPACE_FLAGS + MODEL_FLAGS)
    sp.add_argument("action", choices=["list", "create", "activate", "import"])
    sp.add_argument("domain", nargs="?")
    sp.add_argument("version", nargs="?", help="for activate: vN")
    sp.add_argument("--path", help="for import: a zip or folder holding a PEFT LoRA adapter")
    sp.add_argument("--activate", action="store_true", help="for import: make it live")
    sp.add_argument("--override", action="store_true", help="for activate: a version the gate did not promote")
    sp.add_argument("--system-prompt", help="for create")
    sp.add_argument("--description", help="for create")

    sp = _command(sub, "feedback", "rate a logged answer (and give the answer you wanted)", cmd_feedback)
    sp.add_argument("response_id", help="the id a chat answer came with (chatcmpl-...; see `assistant logs`)")
    sp.add_argument("rating", choices=["up", "down"])
    sp.add_argument("--correction", help="the answer it should have given")
    sp.add_argument("--reason", help="what was wrong")
    sp.add_argument("--user", help="who rates (default: nobody named)")

    sp = _command(sub, "users", "stored users and their roles (a running server sees changes at once)", cmd_users)
    sp.add_argument("action", choices=["add", "list", "remove", "passwd"])
    sp.add_argument("name", nargs="?")
    sp.add_argument("--role", default="user", choices=["user", "editor", "admin"],
                    help="user: chat and rate; editor: also seed, review, train, activate; admin: everything")
    sp.add_argument("--domains", help="for an editor: the domains they may edit, comma separated (default all)")
    sp.add_argument("--password-stdin", action="store_true", help="read the password from standard input")

    sp = _command(sub, "logs", "the latest answers with their feedback, newest first", cmd_logs)
    sp.add_argument("--domain", help="only this domain ('base' for answers without an adapter)")
    sp.add_argument("-n", type=int, default=DEFAULT_LOG_ROWS, help=f"how many (default {DEFAULT_LOG_ROWS})")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    return p


def setup_logging(level: str) -> None:
    """The one place logging is configured: the library only logs through per-module loggers."""
    import logging
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "httpcore", "urllib3", "sentence_transformers", "faiss"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def setup_access_log(kind: str) -> None:
    """The access log writes its INFO lines whatever --log-level says (--access-log off stops it; debug adds
    the UI's lines); `json`: bare JSON objects on stderr, outside the log format."""
    import logging

    from assistant.api.access import ACCESS_LOGGER
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.setLevel(min(logging.getLogger().level, logging.INFO))
    if kind == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.handlers, logger.propagate = [handler], False


def main(argv=None) -> int:
    from assistant.engine.threads import defaults
    defaults()   # before torch is imported: one OpenMP pool per process (see assistant/engine/threads.py)
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from assistant.errors import AssistantError
    try:
        return args.fn(args) or 0
    except AssistantError as e:
        sys.stderr.write(f"error: {e.message}\n")
        return 2
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
