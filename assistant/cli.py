"""The command line: `assistant serve | chat | curate | train | adapters | eval | export`.
Each command parses its flags into Settings and calls the same functions the UI and the API call."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .threads import use_all_cores


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="SQLite, snapshots, embedding index (default data/)")
    p.add_argument("--adapters-dir", help="domains and adapter versions (default adapters/)")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", help="'embedded' (default), a local HF folder, a .gguf file or a hub id")
    p.add_argument("--quantization", choices=["auto", "nf4", "int8", "none"],
                   help="bitsandbytes weights, on CPU and CUDA alike. auto (default): nf4 on CUDA, none on CPU, "
                        "where NF4 trades speed for memory: bitsandbytes' CPU kernels unpack every weight at "
                        "every call, and the C decode step serves dense weights only")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")


def settings_from(args):
    from .settings import Settings, parse_auth
    kw = {k: getattr(args, k, None) for k in ("state_dir", "adapters_dir", "base_model", "quantization", "dtype",
                                               "device", "host", "port", "api_key", "max_resident_adapters")}
    kw = {k: v for k, v in kw.items() if v is not None}
    if getattr(args, "auth", None) or getattr(args, "auth_file", None):
        kw["auth"] = parse_auth(args.auth, args.auth_file)
    if getattr(args, "share", False):
        kw["share"] = True
    if kw.get("api_key") is None and os.environ.get("ASSISTANT_API_KEY"):
        kw["api_key"] = os.environ["ASSISTANT_API_KEY"]
    return Settings(**kw)


def cmd_serve(args) -> int:
    from .server import serve
    return serve(settings_from(args))


def _service(args):
    from .service import Service
    return Service(settings_from(args))


def cmd_chat(args) -> int:
    svc = _service(args)
    try:
        call = svc.start_chat(args.model, [{"role": "user", "content": args.message}], max_tokens=args.max_tokens,
                              temperature=args.temperature)
        for ev in call.handle:
            if ev.kind == "token":
                print(ev.text, end="", flush=True)
            elif ev.kind == "error":
                raise ev.error
        print()
        call.logged_event.wait(10)
        print(f"[{call.id} model={call.target.model} adapter={call.target.version or 'none'}]", file=sys.stderr)
    finally:
        svc.close()
    return 0


def _store_and_registry(args):
    from .registry import Registry
    from .store import Store
    s = settings_from(args).ensure_dirs()
    return s, Store(s.db_path), Registry(s.adapters_path)


def cmd_curate(args) -> int:
    from .curation import Curator
    s, store, registry = _store_and_registry(args)
    registry.get_domain(args.domain)
    if args.examples:
        from .seeds import parse_jsonl, summary
        rows, problems = parse_jsonl(open(args.examples, encoding="utf-8", errors="replace").read())
        added, rejected = store.add_examples(args.domain, rows, source="seed") if rows else (0, [])
        problems += [f"example {r['index'] + 1}: {r['reason']}" for r in rejected]
        print(summary(added, problems), file=sys.stderr)
    snap = Curator(store, s).curate(args.domain)
    print(json.dumps(snap.report, indent=1))
    return 0


def cmd_export(args) -> int:
    from .curation import Curator
    s, store, registry = _store_and_registry(args)
    registry.get_domain(args.domain)
    snap = Curator(store, s).curate(args.domain)
    data = open(snap.path, "rb").read()
    if args.output and args.output != "-":
        with open(args.output, "wb") as f:
            f.write(data)
        print(f"wrote {snap.report['kept']} rows to {args.output} (snapshot {snap.hash[:12]})", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
    return 0


def cmd_train(args) -> int:
    from . import jobs
    s, store, registry = _store_and_registry(args)
    registry.get_domain(args.domain)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("learning_rate", args.learning_rate),
                                   ("rank", args.rank)) if v is not None}
    use_all_cores()   # this command only trains (see assistant/threads.py)
    job = jobs.run_job_inline(s, store, registry, args.domain, overrides)
    print(json.dumps({k: job.get(k) for k in ("job_id", "status", "adapter_version", "promoted", "metrics", "error")},
                     indent=1, default=str))
    return 0 if job.get("status") == "succeeded" else 1


def cmd_adapters(args) -> int:
    s, store, registry = _store_and_registry(args)
    if args.action == "list":
        for d in registry.list_domains():
            print(f"{d.name}: active={d.active_version or '-'} versions={','.join(d.versions) or '-'}")
            if args.domain and d.name != args.domain:
                continue
            for a in registry.adapters(d.name):
                m = a["card"].get("metrics", {})
                print(f"  {'*' if a['active'] else ' '} {a['version']}  created={time.ctime(a['card'].get('created_at', 0))}"
                      f"  metrics={json.dumps(m)[:120]}")
        return 0
    if args.action == "create":
        registry.create_domain(args.domain, args.system_prompt or "", args.description or "")
        print(f"created domain {args.domain}")
        return 0
    # activate and import validate against the base, so they load it
    from .service import Service
    svc = Service(s, start_jobs=False)
    try:
        if args.action == "activate":
            svc.activate(args.domain, args.version)
            print(f"{args.domain}: active version is now {args.version}")
        elif args.action == "import":
            v = svc.import_adapter(args.domain, args.path, activate=args.activate)
            print(f"imported {args.path} as {args.domain}@{v}" + (" (active)" if args.activate else ""))
    finally:
        svc.close()
    return 0


def cmd_eval(args) -> int:
    from . import evaluation
    s, store, registry = _store_and_registry(args)
    result = evaluation.evaluate_version(s, store, registry, args.domain, args.version)
    print(json.dumps(result, indent=1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="assistant", description="One base LLM, many domain assistants.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="what the server and commands log to stderr (default info)")
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser("serve", help="run the UI and the API on one port")
    _common(sp)
    _model_flags(sp)
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp.add_argument("--auth", action="append", metavar="USER:PASS", help="protect the UI (repeatable)")
    sp.add_argument("--auth-file", help="a file of USER:PASS lines")
    sp.add_argument("--api-key", help="protect the API: clients send 'Authorization: Bearer KEY'")
    sp.add_argument("--share", action="store_true", help="a public Gradio link (requires --auth)")
    sp.add_argument("--max-resident-adapters", type=int)
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("chat", help="one question, answer streamed to stdout")
    _common(sp)
    _model_flags(sp)
    sp.add_argument("message")
    sp.add_argument("--model", default="base", help="base, <domain> or <domain>@vN")
    sp.add_argument("--max-tokens", type=int, default=256)
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.set_defaults(fn=cmd_chat)

    sp = sub.add_parser("curate", help="build the domain's curated snapshot and print its report")
    _common(sp)
    sp.add_argument("--domain", required=True)
    sp.add_argument("--examples", help="import seed examples first (JSONL of {messages: [...]})")
    sp.set_defaults(fn=cmd_curate)

    sp = sub.add_parser("export", help="write the curated snapshot as JSONL")
    _common(sp)
    sp.add_argument("--domain", required=True)
    sp.add_argument("-o", "--output", default="-")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("train", help="train, evaluate and publish a new adapter version (progress bar)")
    _common(sp)
    sp.add_argument("--domain", required=True)
    sp.add_argument("--epochs", type=int)
    sp.add_argument("--learning-rate", type=float)
    sp.add_argument("--rank", type=int)
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("adapters", help="list, create domains, activate or import adapter versions")
    _common(sp)
    _model_flags(sp)
    sp.add_argument("action", choices=["list", "create", "activate", "import"])
    sp.add_argument("domain", nargs="?")
    sp.add_argument("version", nargs="?", help="for activate: vN")
    sp.add_argument("--path", help="for import: a zip or folder holding a PEFT LoRA adapter")
    sp.add_argument("--activate", action="store_true", help="for import: make it live")
    sp.add_argument("--system-prompt")
    sp.add_argument("--description")
    sp.set_defaults(fn=cmd_adapters)

    sp = sub.add_parser("eval", help="evaluate an adapter version on the domain's held-out data")
    _common(sp)
    sp.add_argument("--domain", required=True)
    sp.add_argument("--version")
    sp.set_defaults(fn=cmd_eval)
    return p


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """The one place logging is configured: the library only logs through per-module loggers."""
    import logging
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "httpcore", "urllib3", "sentence_transformers", "faiss"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv=None) -> int:
    from .threads import defaults
    defaults()   # before torch is imported: one OpenMP pool per process (see assistant/threads.py)
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from .errors import AssistantError
    try:
        return args.fn(args) or 0
    except AssistantError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
