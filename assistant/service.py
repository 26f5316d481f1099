"""The app's one entry point for every job, shared by the API, the UI, the CLI and the tests:
resolve a model name to a domain and adapter version, chat, log responses, take feedback, manage
domains and adapters. Holds the resident base, the engine, the registry and the store.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AssistantError, Busy, Conflict, DomainBroken, InvalidAdapter, InvalidName, ModelNotFound, NotFound
from .registry import Registry, check_name, check_version, parse_model_name, safe_unzip, validate_adapter
from .settings import (
    BASE,
    DEFAULT_MAX_NEW_TOKENS,
    MAX_LORA_RANK,
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_NEW_TOKENS_CAP,
    MAX_UPLOAD_BYTES,
    Settings,
)

ROLES = ("system", "user", "assistant")
SNAPSHOT_NAME_CHARS = 12     # hash characters in an exported snapshot's file name
MAX_STOP_STRINGS = 4
ADAPTER_SLOT_WAIT_S = 10.0   # how long a request waits for a free adapter slot before 503 server_busy
LOG_WAIT_S = 10.0            # how long a caller waits for a finished response to reach the log

log = logging.getLogger(__name__)


@dataclass
class Target:
    model: str                   # what the caller asked for
    domain: str | None
    version: str | None          # adapter version answering, None = base weights
    adapter_key: str | None
    system_prompt: str = ""


@dataclass
class Call:
    """One chat generation in flight."""
    id: str
    target: Target
    messages: list[dict]
    handle: object
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))
    logged: bool = False
    logged_event: threading.Event = field(default_factory=threading.Event)
    user: str | None = None


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise AssistantError("messages must be a non-empty list of {role, content}", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise AssistantError(f"at most {MAX_MESSAGES} messages per request: drop older turns", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise AssistantError(f"messages[{i}].role must be one of {', '.join(ROLES)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise AssistantError(f"messages[{i}].content must be text", param="messages")
        if len(content) > MAX_MESSAGE_CHARS:
            raise AssistantError(f"messages[{i}] is {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}: "
                                 "shorten it", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


class Service:
    def __init__(self, settings: Settings, base=None, *, start_jobs: bool = True):
        from .engine import Engine
        from .model import load_base
        from .store import Store
        self.settings = settings.ensure_dirs()
        self.store = Store(settings.db_path)
        self.registry = Registry(settings.adapters_path)
        self.registry.cleanup_staging()
        self.base = base if base is not None else load_base(settings)
        self.engine = Engine(self.base, max_batch=settings.max_batch, max_queue=settings.max_queue,
                             max_resident_adapters=settings.max_resident_adapters)
        self._active: dict[str, tuple[int, str | None]] = {}
        self._load_lock = threading.Lock()
        self._inflight: dict[str, Call] = {}   # response id -> call, until its response is logged
        self.log_failures = 0                  # responses that could not be logged (counted in /metrics)
        # Responses are logged by one thread as soon as generation ends, whatever the client does.
        self._log_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._logger = threading.Thread(target=self._log_loop, name="response-log", daemon=True)
        self._logger.start()
        if start_jobs:
            try:
                from . import jobs
                jobs.recover_orphans(self.settings, self.store, self.registry)
            except (ImportError, AttributeError):
                pass

    def close(self):
        self.engine.close()
        self._log_queue.put(None)
        self._logger.join(timeout=10)

    def _log_loop(self):
        """The one place responses are logged: each call exactly once, when its generation ends."""
        while (call := self._log_queue.get()) is not None:
            try:
                self._log_response(call)
                call.logged = True
            except Exception:  # noqa: BLE001 - keep logging the next ones
                self.log_failures += 1
                log.exception("could not log response %s (domain %s, version %s): feedback on it will not "
                              "find it", call.id, call.target.domain or BASE, call.target.version)
            finally:
                self._inflight.pop(call.id, None)
                call.logged_event.set()

    # Models ------------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        created = int(self.base.load_seconds and time.time())
        data = [{"id": BASE, "object": "model", "created": created, "owned_by": "domain-assistant",
                 "base_model": self.base.name}]
        for d in self.registry.list_domains():
            data.append({"id": d.name, "object": "model", "created": created, "owned_by": "domain-assistant",
                         "active_version": d.active_version, "versions": d.versions, "description": d.description})
        return data

    def active_version(self, domain: str) -> str | None:
        stamp = self.registry.active_stamp(domain)
        cached = self._active.get(domain)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self.registry.active_version(domain))
            self._active[domain] = cached
        return cached[1]

    def resolve(self, model: str) -> Target:
        if not isinstance(model, str) or not model:
            raise AssistantError("model is required: 'base', '<domain>' or '<domain>@<version>'", param="model")
        try:
            domain, version = parse_model_name(model)
        except InvalidName:
            raise ModelNotFound(f"the model {model!r} does not exist: use 'base', a domain name from GET /v1/models, "
                                "or '<domain>@v<N>'") from None
        if domain is None:
            return Target(model, None, None, None)
        if not self.registry.exists(domain):
            raise ModelNotFound(f"the model {model!r} does not exist: create the domain first or pick one of "
                                f"{', '.join(m['id'] for m in self.models())}")
        info = self.registry.get_domain(domain)
        if info.problem:
            log.warning("request for broken domain %s: %s", domain, info.problem)
            raise DomainBroken(f"domain {domain!r} cannot answer: {info.problem}")
        if version is None:
            version = self.active_version(domain)
        elif version not in self.registry.versions(domain):
            raise ModelNotFound(f"{model!r} does not exist: {domain} has versions "
                                f"{', '.join(self.registry.versions(domain)) or 'none yet'}")
        key = f"{domain}@{version}" if version is not None else None
        return Target(model, domain, version, key, info.system_prompt)

    def ensure_loaded(self, domain: str, version: str) -> None:
        """Validate and load a version (activation and import check it this way); nothing stays pinned."""
        self.engine.unpin(self.pin_adapter(domain, version, wait_s=ADAPTER_SLOT_WAIT_S))

    def pin_adapter(self, domain: str, version: str, *, wait_s: float = ADAPTER_SLOT_WAIT_S) -> int:
        """The slot serving domain@version, loaded if needed and pinned for one request: no other load can
        evict it until `engine.unpin` (the engine unpins when the request ends). When every slot is pinned
        by requests in flight, waits up to `wait_s` for one to free, then raises Busy (503)."""
        key = f"{domain}@{version}"
        deadline = time.monotonic() + wait_s
        while True:
            slot = self.engine.pin_adapter(key)
            if slot is not None:
                return slot
            with self._load_lock:
                slot = self.engine.pin_adapter(key)
                if slot is not None:
                    return slot
                folder = self.registry.version_path(domain, version)
                validate_adapter(folder, self.base.fingerprint, self.engine.module_shapes(), max_rank=MAX_LORA_RANK)
                try:
                    return self.engine.load_adapter(key, folder, pin=True)
                except Busy:
                    if time.monotonic() >= deadline:
                        raise
            self.engine.wait_for_free_slot(max(0.0, min(0.5, deadline - time.monotonic())))

    # Chat --------------------------------------------------------------------------------------
    def start_chat(self, model: str, messages, *, max_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, seed: int | None = None, stop=None, loop=None,
                   user: str | None = None, ignore_eos: bool = False, slot_wait_s: float = ADAPTER_SLOT_WAIT_S) -> Call:
        """Check the request, pin the adapter it resolves to, and queue it. The answer is logged under
        exactly that adapter version, which serves it from the first token to the last."""
        from .engine import Request
        messages = check_messages(messages)
        target = self.resolve(model)
        if target.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": target.system_prompt}] + messages
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_NEW_TOKENS
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_NEW_TOKENS_CAP:
            raise AssistantError(f"max_tokens must be between 1 and {MAX_NEW_TOKENS_CAP}", param="max_tokens")
        temperature = 0.0 if temperature is None else float(temperature)
        if not 0 <= temperature <= 2:
            raise AssistantError("temperature must be between 0 and 2", param="temperature")
        top_p = 1.0 if top_p is None else float(top_p)
        if not 0 < top_p <= 1:
            raise AssistantError("top_p must be in (0, 1]", param="top_p")
        if isinstance(stop, str):
            stop = [stop]
        stop = tuple(s for s in (stop or []) if isinstance(s, str) and s)
        if len(stop) > MAX_STOP_STRINGS:
            raise AssistantError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        ids = self.engine.encode_chat(messages)
        slot = self.pin_adapter(target.domain, target.version, wait_s=slot_wait_s) if target.version else 0
        req = Request(prompt_ids=ids, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      stop=stop, adapter=target.adapter_key, slot=slot, ignore_eos=bool(ignore_eos))
        call = Call(id=f"chatcmpl-{uuid.uuid4().hex}", target=target, messages=messages, handle=None,
                    prompt_tokens=len(ids), user=user)
        self._inflight[call.id] = call
        try:
            call.handle = self.engine.submit(req, loop=loop, on_finish=lambda: self._log_queue.put(call))
        except BaseException:
            self._inflight.pop(call.id, None)
            raise
        return call

    @property
    def context_tokens(self) -> int:
        """The most tokens one conversation may hold here (question and answer together)."""
        return self.engine.max_context

    def count_tokens(self, model: str, messages) -> int:
        """Tokens of a conversation as `start_chat` would send it (with the domain's system prompt)."""
        messages = check_messages(messages)
        try:
            domain, _ = parse_model_name(model)
        except InvalidName:
            raise ModelNotFound(f"the model {model!r} does not exist: use 'base' or a domain name") from None
        prompt = self.require_domain(domain).system_prompt if domain else ""   # no adapter is loaded to count
        if prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": prompt}] + messages
        return len(self.engine.encode_chat(messages))

    def finish_chat(self, call: Call, timeout: float = LOG_WAIT_S) -> bool:
        """Wait until the call's response is logged (the response-log thread logs each call exactly once,
        also partial answers: stopped by the user or a disconnect). True when it is."""
        return call.logged_event.wait(timeout)

    def _log_response(self, call: Call) -> None:
        req = call.handle.req
        now = time.perf_counter()
        self.store.log_response(
            id=call.id, domain=call.target.domain or BASE, adapter_version=call.target.version,
            model=call.target.model, messages=call.messages, answer=req.text,
            prompt_tokens=call.prompt_tokens, completion_tokens=len(req.generated),
            latency_ms=((req.t_done or now) - req.t_submit) * 1000,
            ttft_ms=((req.t_first - req.t_submit) * 1000) if req.t_first else None,
            finish_reason=req.finish_reason or "cancelled", user=call.user)

    def chat(self, model: str, messages, **kw) -> dict:
        """Blocking chat: returns {id, text, finish_reason, model, adapter_version, usage}."""
        call = self.start_chat(model, messages, **kw)
        try:
            text, reason = call.handle.result()
        finally:
            call.handle.cancel()
        self.finish_chat(call)
        return {"id": call.id, "text": text, "finish_reason": reason, "model": call.target.model,
                "domain": call.target.domain, "adapter_version": call.target.version,
                "usage": {"prompt_tokens": call.prompt_tokens, "completion_tokens": len(call.handle.req.generated),
                          "total_tokens": call.prompt_tokens + len(call.handle.req.generated)}}

    # Feedback and data -------------------------------------------------------------------------
    def feedback(self, response_id: str, rating: str, correction: str | None = None, reason: str | None = None,
                 user: str | None = None) -> int:
        if rating not in ("up", "down"):
            raise AssistantError("rating must be 'up' or 'down'", param="rating")
        for name, value in (("correction", correction), ("reason", reason)):
            if value is not None and (not isinstance(value, str) or len(value) > MAX_MESSAGE_CHARS):
                raise AssistantError(f"{name} must be text of at most {MAX_MESSAGE_CHARS} characters", param=name)
        if correction is not None and not correction.strip():
            correction = None
        call = self._inflight.get(response_id) if isinstance(response_id, str) else None
        if call is not None:   # an answer that just finished: its log entry is being written
            call.logged_event.wait(LOG_WAIT_S)
        fid = self.store.add_feedback(response_id=response_id, rating=rating, correction=correction,
                                      reason=reason, user=user)
        self._check_new(response_id, correction, fid, rating)
        return fid

    def _check_new(self, response_id: str, correction: str | None, feedback_id: int, rating: str) -> None:
        """Incremental near-duplicate check when an item arrives: in the background, so a feedback post
        never waits for the embedder. Items that are not near-duplicates join the domain's index."""
        if correction is None and rating != "up":
            return
        if getattr(self, "_indexer", None) is None:
            from concurrent.futures import ThreadPoolExecutor
            self._indexer = ThreadPoolExecutor(1, thread_name_prefix="dedup-index")

        def check():
            try:
                resp = self.store.get_response(response_id)
                if not resp or resp["domain"] == BASE:
                    return
                item = resp["messages"] + [{"role": "assistant", "content": correction or resp["answer"]}]
                curator = self.curator()
                key, sim = curator.check_new(resp["domain"], item)
                if key is None or sim < curator.options.near_dup_threshold:
                    curator.add_to_index(resp["domain"], f"feedback:{feedback_id}", item)
            except Exception:  # noqa: BLE001 - curation re-checks everything anyway
                log.exception("near-duplicate check failed for feedback %s", feedback_id)
        self._indexer.submit(check)

    def curator(self):
        if getattr(self, "_curator", None) is None:
            from .curation import Curator
            self._curator = Curator(self.store, self.settings)
        return self._curator

    def curate(self, domain: str):
        """Curate and write the snapshot (a job taking the data, an export)."""
        self.require_domain(domain)
        return self.curator().snapshot(domain)

    def preview(self, domain: str):
        """The curation report without writing anything (the Data tab, GET .../dataset)."""
        self.require_domain(domain)
        return self.curator().preview(domain)

    def export_dataset(self, domain: str, folder: Path | None = None):
        """The user exports the dataset: the snapshot is written (and recorded); with `folder`, also a copy
        named `<domain>-<hash>.jsonl` there (outside the state folder) -> its path."""
        snap = self.curate(domain)
        if folder is None:
            return snap
        out = Path(folder) / f"{domain}-{snap.hash[:SNAPSHOT_NAME_CHARS]}.jsonl"
        if not out.exists():
            shutil.copyfile(snap.path, out)
        return out

    def import_seed_jsonl(self, domain: str, text: str, user: str | None = None) -> dict:
        """Seed examples from JSON Lines text -> {added, problems: [line/example messages], message}."""
        from .seeds import parse_jsonl, summary
        self.require_domain(domain)
        examples, problems = parse_jsonl(text)
        res = self.add_examples(domain, examples, user=user) if examples else {"added": 0, "rejected": []}
        problems += [f"example {r['index'] + 1}: {r['reason']}" for r in res["rejected"]]
        return {"added": res["added"], "problems": problems, "message": summary(res["added"], problems)}

    def edit_item(self, domain: str, key: str, prompt: str, answer: str) -> None:
        """A reviewer's edit of a candidate's last question and answer; the edited item is approved."""
        item = next((c for c in self.store.candidates(self.require_domain(domain).name) if c["key"] == key), None)
        if item is None:
            raise NotFound("that item is no longer in the review queue: refresh it", param="key")
        messages = [dict(m) for m in item["messages"]]
        for role, text, field_name in (("user", prompt, "prompt"), ("assistant", answer, "answer")):
            if not (text or "").strip():
                raise AssistantError(f"{field_name} is empty: write the text or reject the item", param=field_name)
            idx = max(i for i, m in enumerate(messages) if m["role"] == role)
            messages[idx]["content"] = text
        self.review(domain, key, "approved", messages)

    def add_examples(self, domain: str, examples, user: str | None = None) -> dict:
        self.require_domain(domain)
        if not isinstance(examples, list) or not examples:
            raise AssistantError("examples must be a non-empty list of {\"messages\": [...]} objects",
                                 param="examples")
        added, rejected = self.store.add_examples(domain, examples, source="seed", user=user)
        if not added:   # nothing usable: a client error, and nothing was written
            first = rejected[0]
            raise AssistantError(f"no example was added: examples[{first['index']}]: {first['reason']}"
                                 + (f" (and {len(rejected) - 1} more rejected)" if len(rejected) > 1 else ""),
                                 param="examples")
        return {"added": added, "rejected": rejected}

    # Domains and adapters ----------------------------------------------------------------------
    def require_domain(self, name: str):
        check_name(name)
        if not self.registry.exists(name):
            raise NotFound(f"no domain {name!r}: create it first (POST /api/domains or the Adapters tab)")
        return self.registry.get_domain(name)

    def create_domain(self, name: str, system_prompt: str | None = "", description: str | None = "") -> dict:
        return self.registry.create_domain(name, "" if system_prompt is None else system_prompt,
                                           "" if description is None else description).as_dict()

    def list_domains(self) -> list[dict]:
        out = []
        for d in self.registry.list_domains():
            item = d.as_dict()
            item["examples"] = self.store.count_examples(d.name)
            out.append(item)
        return out

    def adapters(self, domain: str) -> list[dict]:
        self.require_domain(domain)
        return self.registry.adapters(domain)

    def activate(self, domain: str, version: str, *, user: str | None = None, override: bool = False) -> dict:
        """Promote or roll back: the version is validated and loaded before the pointer moves, so a
        broken adapter never replaces the one serving. `override`: a person activates a version the
        gate did not promote; the card records who and when."""
        self.require_domain(domain)
        check_version(version)
        gate = (self.registry.read_card(domain, version).get("metrics") or {}).get("gate") or {}
        if gate.get("promote") is False and not override:
            raise Conflict(f"the gate did not promote {domain}@{version}: {gate.get('summary') or 'see its card'}. "
                           "Activate it anyway with override (the Activate anyway button, or "
                           '{"override": true} in the request body); the card records who did it',
                           param="override")
        self.registry.activate(domain, version, load=self.ensure_loaded)
        if override:
            self.registry.record_override(domain, version, user)
        self._active.pop(domain, None)
        return {"domain": domain, "active_version": version}

    def rollback(self, domain: str, user: str | None = None) -> dict:
        """Activate the newest version older than the active one."""
        self.require_domain(domain)
        return self.activate(domain, self.registry.previous_version(domain), user=user)

    def import_adapter(self, domain: str, upload: Path, *, activate: bool = False) -> str:
        """A zip (or folder) holding a PEFT LoRA adapter -> validated -> the domain's next version."""
        self.require_domain(domain)
        upload = Path(upload)
        with tempfile.TemporaryDirectory(dir=self.settings.state_path) as tmp:
            folder = upload
            if upload.is_file():
                if upload.stat().st_size > MAX_UPLOAD_BYTES:
                    raise InvalidAdapter(f"the upload is over {MAX_UPLOAD_BYTES >> 20} MiB: is it an adapter?")
                folder = Path(tmp) / "adapter"
                safe_unzip(upload, folder, MAX_UPLOAD_BYTES)
            shapes = self.engine.module_shapes()
            version = self.registry.import_folder(domain, folder, self.base.fingerprint, shapes)
        try:
            self.ensure_loaded(domain, version)
        except AssistantError:
            shutil.rmtree(self.registry.domain_dir(domain) / version, ignore_errors=True)
            raise
        if activate:
            self.activate(domain, version)
        return version

    def status(self) -> dict:
        return {"base_model": self.base.name, "device": self.base.device, "dtype": self.base.dtype,
                "quantization": self.base.quantization, "fingerprint": self.base.fingerprint}

    # Training jobs (jobs.py), review and monitoring: thin calls for the API, UI and CLI ----------
    def start_training(self, domain: str, train_settings: dict | None = None) -> str:
        from . import jobs
        self.require_domain(domain)
        return jobs.start_job(self.settings, self.store, self.registry, domain, train_settings or {})

    def job(self, job_id: str) -> dict:
        job = self.store.get_job(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise NotFound(f"no job {str(job_id)[:64]!r}")
        return job

    def cancel_job(self, job_id: str) -> dict:
        from . import jobs
        self.job(job_id)
        jobs.cancel_job(self.settings, self.store, job_id)
        return self.job(job_id)

    def review_queue(self, domain: str) -> list[dict]:
        self.require_domain(domain)
        return self.curator().review_queue(domain)

    def review(self, domain: str, key: str, status: str | None, messages: list | None = None) -> None:
        """Approve / reject (status) a candidate, or replace its messages (an edit)."""
        self.require_domain(domain)
        if not isinstance(key, str) or not key.startswith(("example:", "feedback:")):
            raise AssistantError("pick a row of the review queue first", param="key")
        try:
            self.store.set_review(domain, key, status, messages)
        except ValueError as e:
            raise AssistantError(str(e)) from None

    def metrics(self, domain: str) -> dict:
        from .monitoring import domain_metrics
        self.require_domain(domain)
        return domain_metrics(self, domain)

    def prometheus_text(self) -> str:
        from .monitoring import prometheus_text
        return prometheus_text(self)

    def jobs(self, domain: str | None = None) -> list[dict]:
        if domain is not None:
            self.require_domain(domain)
        return self.store.list_jobs(domain)
