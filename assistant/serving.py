"""Serving: the resident base model, the engine with its adapter slots, chat, and the response log. It
answers on top of a `Workspace` (workspace.py), which holds everything else.

A request names a model: `base`, `<domain>` (its active version) or `<domain>@vN`. `start_chat` resolves
it to one adapter version, pins that version's slot for the whole answer, and queues it; one thread logs
every finished answer exactly once, under exactly that version, so feedback always finds it.
"""

from __future__ import annotations

import functools
import logging
import queue
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from assistant.data.registry import parse_model_name, safe_unzip, validate_adapter
from assistant.engine.lm import with_system_prompt
from assistant.engine.protocol import EngineProtocol
from assistant.engine.toolcalls import plain as plain_turns
from assistant.errors import (
    AdapterRefused,
    AssistantError,
    Busy,
    Conflict,
    DomainBroken,
    InvalidAdapter,
    InvalidName,
    ModelNotFound,
    NotFound,
)
from assistant.jobs.limits import check_adapter_folder, engine_limits
from assistant.monitoring.canary import Canary
from assistant.settings import BASE, MAX_LORA_RANK, MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_UPLOAD_BYTES
from assistant.workspace import Workspace

ROLES = ("system", "developer", "user", "assistant", "tool")
ADAPTER_SLOT_WAIT_S = 10.0   # engines without a waiting room (vLLM), activation: how long to wait for a slot
LOG_WAIT_S = 10.0            # how long a caller waits for a finished response to reach the log
SLOT_POLL_S = 0.5            # while every slot is pinned: how often a waiting load tries again
SAME_AS_USER = object()      # `principal` default: the caller authenticated as the `user` it names (the UI)

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
    user: str | None = None        # the end user the request names
    principal: str | None = None   # who authenticated: the API key holder or the signed-in user
    tools: str | None = None     # how the answer carries tool calls: "auto" (tags in text), "call" (JSON)
    tool_names: frozenset = frozenset()
    index: int = 0               # which of the request's n answers


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
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if not isinstance(content, str) and not (content is None and calls):
            raise AssistantError(f"messages[{i}].content must be text", param="messages")
        if content is not None and len(content) > MAX_MESSAGE_CHARS:
            raise AssistantError(f"messages[{i}] is {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}: "
                                 "shorten it", param="messages")
        item = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        if calls:
            item["tool_calls"] = calls
        if m["role"] == "tool":
            item["tool_call_id"] = m.get("tool_call_id")
        out.append(item)
    return out


class Serving:
    def __init__(self, workspace: Workspace, engine: EngineProtocol):
        """`engine`: what generates (built by server.build_engine), serving `engine.base`."""
        self.workspace = workspace
        self.base = engine.base
        self.engine = engine
        workspace.engine_refusals = engine.refused   # versions a server refused: visible, not retried per request
        self._active: dict[str, tuple[int, str | None]] = {}
        self._load_lock = threading.Lock()
        self._inflight: dict[str, Call] = {}   # response id -> call, until its response is logged
        # Responses are logged by one thread as soon as generation ends, whatever the client does.
        self._log_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._logger = threading.Thread(target=self._log_loop, name="response-log", daemon=True)
        self._logger.start()
        self.canary = Canary(workspace)

    def close(self):
        self.canary.close()
        self.engine.close()
        self._log_queue.put(None)
        self._logger.join(timeout=LOG_WAIT_S)

    def _log_loop(self):
        """The one place responses are logged: each call exactly once, when its generation ends."""
        while (call := self._log_queue.get()) is not None:
            try:
                self._log_response(call)
                call.logged = True
            except Exception:  # noqa: BLE001 - keep logging the next ones
                self.workspace.log_failures += 1
                log.exception("could not log response %s (domain %s, version %s): feedback on it will not "
                              "find it", call.id, call.target.domain or BASE, call.target.version)
            finally:
                self._inflight.pop(call.id, None)
                call.logged_event.set()

    def _log_response(self, call: Call) -> None:
        req = call.handle.req
        now = time.perf_counter()
        self.workspace.store.log_response(
            id=call.id, domain=call.target.domain or BASE, adapter_version=call.target.version,
            model=call.target.model, messages=call.messages, answer=req.text,
            prompt_tokens=call.prompt_tokens, completion_tokens=len(req.generated),
            latency_ms=((req.t_done or now) - req.t_submit) * 1000,
            ttft_ms=((req.t_first - req.t_submit) * 1000) if req.t_first else None,
            finish_reason=req.finish_reason or "cancelled", user=call.user, principal=call.principal)

    # Models ------------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        created = int(self.base.load_seconds and time.time())
        data = [{"id": BASE, "object": "model", "created": created, "owned_by": "domain-assistant",
                 "base_model": self.base.name}]
        for d in self.workspace.registry.list_domains():
            data.append({"id": d.name, "object": "model", "created": created, "owned_by": "domain-assistant",
                         "active_version": d.active_version, "versions": d.versions, "description": d.description})
        data.append({"id": self.workspace.embedding_model(), "object": "model", "created": created,   # POST /v1/embeddings
                     "owned_by": "domain-assistant", "type": "embedding"})
        return data

    def active_version(self, domain: str) -> str | None:
        """The domain's live version, re-read only when its pointer file changed."""
        registry = self.workspace.registry
        stamp = registry.active_stamp(domain)
        cached = self._active.get(domain)
        if cached is None or cached[0] != stamp:
            cached = (stamp, registry.active_version(domain))
            self._active[domain] = cached
        return cached[1]

    def resolve(self, model: str) -> Target:
        if not isinstance(model, str) or not model:
            raise AssistantError("model is required: 'base', '<domain>' or '<domain>@<version>'", param="model")
        try:
            domain, version = parse_model_name(model)
        except InvalidName:
            if model == self.workspace.embedding_model():
                raise ModelNotFound(f"{model!r} is the embedding model (POST /v1/embeddings): chat with 'base' or a "
                                    "domain", param="model") from None
            raise ModelNotFound(f"the model {model!r} does not exist: use 'base', a domain name from GET /v1/models, "
                                "or '<domain>@v<N>'") from None
        if domain is None:
            return Target(model, None, None, None)
        registry = self.workspace.registry
        if not registry.exists(domain):
            raise ModelNotFound(f"the model {model!r} does not exist: create the domain first or pick one of "
                                f"{', '.join(m['id'] for m in self.models() if m.get('type') != 'embedding')}")
        info = registry.get_domain(domain)
        if info.problem:
            log.warning("request for broken domain %s: %s", domain, info.problem)
            raise DomainBroken(f"domain {domain!r} cannot answer: {info.problem}")
        if version is None:
            version = self.active_version(domain)
        elif version not in registry.versions(domain):
            raise ModelNotFound(f"{model!r} does not exist: {domain} has versions "
                                f"{', '.join(registry.versions(domain)) or 'none yet'}")
        key = f"{domain}@{version}" if version is not None else None
        return Target(model, domain, version, key, info.system_prompt)

    # Adapters ----------------------------------------------------------------------------------
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
                folder = self.workspace.registry.version_path(domain, version)
                validate_adapter(folder, self.base.fingerprint, self.engine.module_shapes(), max_rank=MAX_LORA_RANK)
                try:
                    return self.engine.load_adapter(key, folder, pin=True)
                except Busy:
                    if time.monotonic() >= deadline:
                        raise
            self.engine.wait_for_free_slot(max(0.0, min(SLOT_POLL_S, deadline - time.monotonic())))

    def _adapter_folder(self, domain: str, version: str) -> Path:
        """The version's folder, validated against this base (the engine calls this when it loads it)."""
        folder = self.workspace.registry.version_path(domain, version)
        validate_adapter(folder, self.base.fingerprint, self.engine.module_shapes(), max_rank=MAX_LORA_RANK)
        return folder

    def activate(self, domain: str, version: str, *, user: str | None = None, override: bool = False) -> dict:
        """Promote or roll back (Workspace.activate), loading the version here before the pointer moves. A
        running canary rollout ends: promoted when its version is the one activated, else stopped."""
        out = self.workspace.activate(domain, version, load=self.ensure_loaded, user=user, override=override)
        self._active.pop(domain, None)
        self._rollout_ends(domain, version, user)
        return out

    def _rollout_ends(self, domain: str, version: str, user: str | None) -> None:
        running = self.canary.running(domain)
        if running is not None:
            status = "promoted" if running["version"] == version else "stopped"
            self.canary.end(domain, status, f"{user or 'someone'} made {version} live")

    # Canary rollouts ---------------------------------------------------------------------------
    def start_canary(self, domain: str, version: str, share: float | None = None, *, user: str | None = None) -> dict:
        """domain@version answers `share` of the domain's conversations beside the live version until its
        users' ratings promote or roll it back (monitoring/canary.py); loaded and checked here first, as an
        activation would. On the canary already out: a new share."""
        registry = self.workspace.registry
        self.workspace.require_domain(domain)
        if version not in registry.versions(domain):
            raise NotFound(f"{domain} has no version {version!r}: it has {', '.join(registry.versions(domain)) or 'none'}",
                           param="version")
        live = self.active_version(domain)
        if version == live:
            raise Conflict(f"{domain}@{version} is already live for everyone: send out another version as a canary",
                           param="version")
        self.ensure_loaded(domain, version)
        return self.canary.start(domain, version, live, share, user)

    def stop_canary(self, domain: str, *, user: str | None = None) -> dict:
        """The canary stops serving; everyone gets the live version again. NotFound when none runs."""
        self.workspace.require_domain(domain)
        out = self.canary.end(domain, "stopped", f"{user or 'someone'} stopped it")
        if out is None:
            raise NotFound(f"{domain} has no canary out: start one with POST "
                           f"/api/domains/{domain}/adapters/<version>/canary")
        return out

    def _canary_goes_live(self, domain: str, version: str, override: bool) -> None:
        self.activate(domain, version, user="canary rule", override=override)

    def refresh(self, domain: str) -> None:
        """Another replica activated or rolled back `domain` (replicas.py): forget the cached pointer and load
        the live version now, so the next answer comes from it without waiting for a load."""
        self._active.pop(domain, None)
        version = self.active_version(domain)
        if version is not None:
            try:
                self.ensure_loaded(domain, version)
            except AssistantError as e:
                log.warning("could not load %s@%s that another replica activated: %s", domain, version, e.message)

    def rollback(self, domain: str, user: str | None = None) -> dict:
        out = self.workspace.rollback(domain, load=self.ensure_loaded, user=user)
        self._active.pop(domain, None)
        self._rollout_ends(domain, out["active_version"] or BASE, user)
        return out

    def import_adapter(self, domain: str, upload: Path, *, activate: bool = False, user: str | None = None) -> str:
        """A zip (or folder) holding a PEFT LoRA adapter -> validated against this base -> loaded once ->
        the domain's next version."""
        ws = self.workspace
        ws.require_domain(domain)
        upload = Path(upload)
        with tempfile.TemporaryDirectory(dir=ws.settings.state_path) as tmp:
            folder = upload
            if upload.is_file():
                if upload.stat().st_size > MAX_UPLOAD_BYTES:
                    raise InvalidAdapter(f"the upload is over {MAX_UPLOAD_BYTES >> 20} MiB: is it an adapter?")
                folder = Path(tmp) / "adapter"
                safe_unzip(upload, folder, MAX_UPLOAD_BYTES)
            check_adapter_folder(engine_limits(ws.settings), folder)   # 422 naming the limit and its flag
            version = ws.registry.import_folder(domain, folder, self.base.fingerprint, self.engine.module_shapes(),
                                                card={"imported_by": user} if user else None)
        try:
            self.ensure_loaded(domain, version)
        except AssistantError:
            ws.registry.retire(domain, version)   # out of the list; its number is never given again
            getattr(self.engine, "forget", lambda key: None)(f"{domain}@{version}")
            raise
        if activate:
            self.activate(domain, version, user=user)
        return version

    # Chat --------------------------------------------------------------------------------------
    def start_chat(self, model: str, messages, **kw) -> Call:
        """Check the request, pin the adapter it resolves to, and queue it. The answer is logged under
        exactly that adapter version, which serves it from the first token to the last."""
        return self.start_choices(model, messages, **kw)[0]

    def start_choices(self, model: str, messages=None, *, prompt: str | list[int] | None = None, n: int = 1,
                      tools: list[dict] | None = None, tool_choice=None, response_format: dict | None = None,
                      slot_wait_s: float = ADAPTER_SLOT_WAIT_S, loop=None, user: str | None = None,
                      principal=SAME_AS_USER, id_prefix: str | None = None, **sampling) -> list[Call]:
        """`n` answers to one conversation (or, for legacy completions, to one `prompt`: text or token ids), read
        once and decoded as n rows (engine/chat_options.py says how tools and response_format constrain them). Each answer
        is a Call, logged as its own response; the first's id is the request's. `user`: the end user the
        request names; `principal`: who authenticated (by default `user`: the UI, where they are one);
        `id_prefix`: how the answers' ids begin (the Responses API's are `resp_...`)."""
        from assistant.engine.chat_options import build_requests
        prompt_ids = None
        if isinstance(prompt, list):   # a legacy completion's prompt as token ids: read as they are
            prompt_ids, prompt = self.check_prompt_ids(prompt), self.token_text(prompt)
        if prompt is None:
            messages = check_messages(messages)
        target = self.resolve(model)
        if target.domain is not None and parse_model_name(model)[1] is None:   # a pinned version is never re-routed
            canary = self.canary.version_for(target.domain, messages, prompt, user)
            if canary is not None:
                target = Target(model, target.domain, canary, f"{target.domain}@{canary}", target.system_prompt)
        if prompt is None:
            messages = with_system_prompt(messages, target.system_prompt)
            offered = tools if tool_choice != "none" else None
            ids = self.engine.encode_chat(messages, offered)
            # logged (and so curated and trained on) as text turns: tool calls and results in the Hermes
            # convention of engine/toolcalls.py, the offered tools in the system message
            turns = offered or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
            logged = plain_turns(messages, offered) if turns else messages
        else:
            ids = prompt_ids if prompt_ids is not None else self.engine.encode_text(prompt)
            logged = [{"role": "user", "content": prompt}]
        reqs, mode = build_requests(ids, n, tools, tool_choice, response_format, adapter=target.adapter_key,
                                    **sampling)
        try:
            for r in reqs:
                if target.version and self.engine.schedules_adapters:   # loaded when its turn comes
                    r.adapter_folder = functools.partial(self._adapter_folder, target.domain, target.version)
                elif target.version:
                    r.slot = self.pin_adapter(target.domain, target.version, wait_s=slot_wait_s)
        except AdapterRefused as e:   # this version only: base and the other domains keep answering
            for r in reqs:
                self.engine.unpin(r.slot)
            raise DomainBroken(f"domain {target.domain!r} cannot answer: {e.message}") from None
        except BaseException:
            for r in reqs:
                self.engine.unpin(r.slot)
            raise
        base = (id_prefix or f"{'cmpl' if prompt is not None else 'chatcmpl'}-") + uuid.uuid4().hex
        calls = [Call(id=base if i == 0 else f"{base}-{i}", target=target, messages=logged, handle=None,
                      prompt_tokens=len(ids), user=user, tools=mode, index=i,
                      principal=user if principal is SAME_AS_USER else principal,
                      tool_names=frozenset(t["function"]["name"] for t in tools or ())) for i in range(n)]
        for c in calls:
            self._inflight[c.id] = c
        finish = [lambda c=c: self._log_queue.put(c) for c in calls]
        try:
            if n == 1:
                handles = [self.engine.submit(reqs[0], loop=loop, on_finish=finish[0])]
            else:
                handles = self.engine.submit_group(reqs, loop=loop, on_finish=finish)
        except BaseException:
            for c in calls:
                self._inflight.pop(c.id, None)
            raise
        for c, h in zip(calls, handles):
            c.handle = h
        return calls

    def finish_chat(self, call: Call, timeout: float = LOG_WAIT_S) -> bool:
        """Wait until the call's response is logged (the response-log thread logs each call exactly once,
        also partial answers: stopped by the user or a disconnect). True when it is."""
        return call.logged_event.wait(timeout)

    def chat(self, model: str, messages, **kw) -> dict:
        """Blocking chat: returns {id, text, finish_reason, model, adapter_version, usage}."""
        call = self.start_chat(model, messages, **kw)
        try:
            text, reason = call.handle.result()
        finally:
            self.engine.cancel(call.handle)
        self.finish_chat(call)
        completion = len(call.handle.req.generated)
        return {"id": call.id, "text": text, "finish_reason": reason, "model": call.target.model,
                "domain": call.target.domain, "adapter_version": call.target.version,
                "usage": {"prompt_tokens": call.prompt_tokens, "completion_tokens": completion,
                          "total_tokens": call.prompt_tokens + completion}}

    def check_prompt_ids(self, ids: list[int]) -> list[int]:
        """A prompt sent as token ids, each one checked against the tokenizer's vocabulary."""
        vocab = len(self.engine.tokenizer)
        bad = next((i for i in ids if not (isinstance(i, int) and 0 <= i < vocab)), None)
        if bad is not None or not ids:
            raise AssistantError(f"prompt token ids must be integers from 0 to {vocab - 1} (this model's "
                                 f"vocabulary){f'; {bad} is not one' if bad is not None else ''}", param="prompt")
        return list(ids)

    def token_text(self, ids: list[int]) -> str:
        """The text of token ids as they are, special tokens included (a prompt sent as ids, logged and echoed)."""
        return self.engine.tokenizer.decode(ids, skip_special_tokens=False)

    def token_texts(self, ids) -> dict[int, str]:
        """Each token id's own text (logprobs name tokens by it)."""
        tok = self.engine.tokenizer
        return {i: tok.decode([i]) for i in ids}

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
        prompt = self.workspace.require_domain(domain).system_prompt if domain else ""   # nothing loads to count
        return len(self.engine.encode_chat(with_system_prompt(messages, prompt)))

    def feedback(self, response_id: str, rating: str, correction: str | None = None, reason: str | None = None,
                 user: str | None = None, principal=SAME_AS_USER, role: str | None = None) -> int:
        """Workspace.feedback, after the answer's log entry is written when it has only just finished."""
        call = self._inflight.get(response_id) if isinstance(response_id, str) else None
        if call is not None:
            call.logged_event.wait(LOG_WAIT_S)
        fid = self.workspace.feedback(response_id, rating, correction, reason, user,
                                      user if principal is SAME_AS_USER else principal, role)
        self.canary.rated(response_id, self._canary_goes_live)   # a running rollout is judged again
        return fid

    def withdraw_feedback(self, response_id: str, user: str | None = None, principal=SAME_AS_USER) -> bool:
        """Workspace.withdraw_feedback (an undone thumb)."""
        return self.workspace.withdraw_feedback(response_id, user, user if principal is SAME_AS_USER else principal)

    def status(self) -> dict:
        """The base served and the engine's status (engine_protocol.EngineStatus, the same keys for both)."""
        return {"base_model": self.base.name, "device": self.base.device, "dtype": self.base.dtype,
                "quantization": self.base.quantization, "fingerprint": self.base.fingerprint,
                "engine": self.engine.status()}

    @property
    def log_failures(self) -> int:
        """Answers the response log could not store."""
        return self.workspace.log_failures
