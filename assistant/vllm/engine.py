"""Generation on vLLM servers: the engine `Serving` uses when `--engine vllm`. The app stays the front door
(API, response ids, the response log with the exact adapter version, feedback, auth, UI); the servers only
generate.

It implements the engine interface (engine/protocol.py: `submit`, `pin_adapter`, `load_adapter`, `unpin`,
`status`, ...), so `Serving` does not know which engine it drives:

- **Prompts are token ids.** The app applies the chat template once (the same tokenizer as the servers,
  checked equal) and sends the ids to `/v1/completions`; text and token ids stream back chunk by chunk.
- **Adapter versions** are loaded under the name `<domain>@vN` (a new name for every version, never a
  reload under an old one: vLLM could serve stale prefix-cache entries). A version is loaded on every
  reachable server before `load_adapter` returns, so activation moves the pointer only when all of them
  serve it; if one refuses, the error names it and why, and the servers that took it drop it again.
- **Pins.** A request pins its version from admission to its last chunk. A version that nothing pins and
  that is not live is unloaded once more than `max_resident` versions are loaded.
- **Reconciling.** At start and every RECONCILE_S the engine asks each server what it has loaded
  (`GET /v1/models`) and loads the live versions it lacks, so a restarted server is brought back in line
  without a person. A server is routed to only once it is reconciled.
- **Routing.** Requests for the same adapter prefer the same server (its adapter stays warm), unless it has
  ROUTE_SLACK more requests in flight than the least loaded; servers that fail are skipped until a health
  check passes again. A server that dies mid-answer ends that answer with a clear error, logged as such.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from assistant.engine.engine import MAX_CONTEXT_TOKENS, Event, Handle, Request, check_admission
from assistant.engine.protocol import EngineProtocol, EngineStatus
from assistant.engine.textstream import chat_prompt_ids
from assistant.errors import AdapterRefused, AssistantError, GenerationFailed, ModelLoadError, VllmError, VllmUnavailable
from assistant.vllm.client import VllmClient
from assistant.vllm.requests import already_loaded, vllm_logprobs, vllm_options

RECONCILE_S = 15.0           # how often every server's health and loaded adapters are checked
ROUTE_SLACK = 2              # affinity holds while the preferred server has at most this many more requests in flight
START_WAIT_S = 30.0          # at start: how long to wait for a server that does not answer yet
UNLOAD_WAIT_S = 130.0        # a load of a version being unloaded waits for that (2 servers' unload timeouts + slack)
BASE_KEY = ""                # the affinity key of requests without an adapter
REFUSED_BACKOFF_S = (30.0, 120.0, 600.0, 1800.0)   # a refused version is tried again after these (the last repeats)

log = logging.getLogger(__name__)


@dataclass
class Refusal:
    """A version a server refused: vLLM's reason, and when loading it is tried again (with backoff)."""
    reason: str
    attempts: int = 1
    retry_at: float = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.retry_at


@dataclass(eq=False)
class Server:
    """One vLLM server as the app sees it."""
    client: VllmClient
    base_id: str = ""                 # the name it serves the base under
    healthy: bool = False
    ready: bool = False               # base checked and live adapters loaded: requests may go here
    loaded: set[str] = field(default_factory=set)
    inflight: int = 0
    served: int = 0                   # answers sent here since the app started
    problem: str | None = None        # why it is not ready, for logs and status
    added: set[str] = field(default_factory=set)     # loaded here while a reconcile of it ran...
    removed: set[str] = field(default_factory=set)   # ...and unloaded: what its listing may not know yet
    reconciling: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return self.client.url


class VllmEngine(EngineProtocol):
    def __init__(self, base, urls: list[str], *, adapters_root: Path, served_adapters_root: str | None = None,
                 live: Callable[[], dict[str, Path]] | None = None, max_resident: int = 8, managed=None,
                 api_key: str | None = None):
        """`base`: the described base (model.describe_base). `urls`: the servers. `adapters_root`: the app's
        adapters folder; `served_adapters_root`: where the servers see that folder, when mounted elsewhere.
        `live`: {adapter key: folder} that every server must have loaded (the domains' active versions).
        `managed`: a ManagedVllm this engine started and stops. `api_key`: what the servers expect
        (vLLM's --api-key; the managed server's own random key)."""
        if not urls:
            raise ModelLoadError("--engine vllm needs at least one server: --vllm-url URL[,URL...]")
        self.base = base
        self.tokenizer = base.tokenizer
        self.max_context = min(base.max_context, MAX_CONTEXT_TOKENS)
        self.adapters_root = Path(adapters_root).resolve()
        self.served_adapters_root = served_adapters_root
        self.live = live or dict
        self.max_resident = max_resident
        self.managed = managed
        self.servers = [Server(VllmClient(u, api_key=api_key)) for u in urls]
        self._refused: dict[str, Refusal] = {}    # adapter key -> why a server refused it, and when to retry
        self._lock = threading.RLock()
        self._freed = threading.Condition(self._lock)
        self._pins: dict[str, int] = {}
        self._slots: dict[str, int] = {}          # adapter key -> the int a Request carries as its slot
        self._keys: dict[int, str] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()   # adapter keys, least recently used first
        self._leaving: set[str] = set()           # keys being unloaded (their HTTP calls run without the lock)
        self._affinity: dict[str, Server] = {}
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()     # streams of callers without an event loop (CLI, UI) run here
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="vllm-streams", daemon=True)
        self._loop_thread.start()
        self._start()
        self._reconciler = threading.Thread(target=self._reconcile_loop, name="vllm-reconcile", daemon=True)
        self._reconciler.start()
        if managed is not None:
            managed.on_restart = self.reconcile

    # Start and reconcile -----------------------------------------------------------------------
    def _start(self) -> None:
        """Every server must serve this base (one that serves another is refused, naming both); at least one
        must answer now. The others are brought in by the reconciler when they do."""
        deadline = time.monotonic() + START_WAIT_S
        while True:
            for s in self.servers:
                if not s.ready:
                    self._reconcile_one(s, at_start=True)
            if any(s.ready for s in self.servers):
                return
            if time.monotonic() >= deadline:
                problems = "; ".join(f"{s.url}: {s.problem}" for s in self.servers)
                self.close()
                raise ModelLoadError(f"no vLLM server answers ({problems}): start them, or check --vllm-url")
            time.sleep(1.0)

    def reconcile(self) -> None:
        """Check every server now (also called when the managed server restarted)."""
        for s in self.servers:
            self._reconcile_one(s)

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(RECONCILE_S):
            try:
                self.reconcile()
                self._evict()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("reconciling the vLLM servers failed")

    def _reconcile_one(self, s: Server, *, at_start: bool = False) -> None:
        """Health, base check and live adapters of one server. A live version the server refuses is marked
        refused (with vLLM's reason, retried with backoff) and the server stays in rotation for the base and
        every other domain; only an unreachable server is taken out."""
        with s.reconciling:
            with self._lock:
                s.added.clear()
                s.removed.clear()
            self._reconcile_locked(s, at_start)

    def _reconcile_locked(self, s: Server, at_start: bool) -> None:
        c = s.client
        try:
            if not c.health_sync():
                raise VllmUnavailable(s.url, "health check failed")
            models = c.models_sync()
            if not s.base_id:
                check = c.check_base_sync(expected_path=self.base.path, expected_name=self.base.name)
                if not check.ok:
                    message = check.message(s.url)
                    if at_start:
                        self.close()
                        raise ModelLoadError(f"{message}: start it with --model {self.base.path} (the same base "
                                             "as --base-model), or leave it out of --vllm-url")
                    s.problem, s.healthy, s.ready = message, False, False
                    log.error("%s: not routing to it", message)
                    return
                s.base_id = models.base.id
            s.healthy = True
            loaded = set(models.loras)
            for key, folder in self.live().items():
                if key in loaded or not self._may_try(key):
                    continue
                try:
                    c.load_lora_sync(key, self._served_path(folder))
                except VllmUnavailable:
                    raise
                except VllmError as e:
                    if not already_loaded(e):
                        self._refuse(key, e)
                        continue
                loaded.add(key)
                self._accept(key)
                log.info("reloaded %s on %s (it did not have it)", key, s.url)
            with self._lock:   # what was loaded or unloaded meanwhile wins over the listing read before it
                was_ready, s.ready, s.problem = s.ready, True, None
                s.loaded = (loaded - s.removed - self._leaving) | s.added
            if not was_ready:
                log.info("vLLM server %s ready (base %s, %d adapters loaded)", s.url, s.base_id, len(loaded))
        except VllmError as e:
            with self._lock:
                if s.ready:
                    log.warning("vLLM server %s is out of rotation: %s", s.url, e.message)
                s.healthy = s.ready = False
                s.problem = e.message

    # Refused versions --------------------------------------------------------------------------
    def _may_try(self, key: str) -> bool:
        with self._lock:
            r = self._refused.get(key)
            return r is None or r.due()

    def _refuse(self, key: str, e: VllmError) -> Refusal:
        """Remember that a server refused `key`: it is not tried again before its backoff runs out."""
        reason = e.vllm_message or e.message
        with self._lock:
            r = self._refused.get(key)
            attempts = r.attempts + 1 if r is not None else 1
            r = self._refused[key] = Refusal(reason, attempts, time.monotonic()
                                             + REFUSED_BACKOFF_S[min(attempts, len(REFUSED_BACKOFF_S)) - 1])
        log.error("vLLM server %s refused %s (attempt %d, next try in %.0f s): %s", e.url, key, attempts,
                  r.retry_at - time.monotonic(), reason)
        return r

    def _accept(self, key: str) -> None:
        with self._lock:
            if self._refused.pop(key, None) is not None:
                log.info("%s loads again", key)

    def forget(self, key: str) -> None:
        """Drop what is remembered about `key` (a version taken out of the list)."""
        with self._lock:
            self._refused.pop(key, None)

    def refused(self) -> dict[str, dict]:
        """{adapter key: {"reason", "attempts", "retry_in_s"}} of the versions a server refused."""
        now = time.monotonic()
        with self._lock:
            return {k: {"reason": r.reason, "attempts": r.attempts, "retry_in_s": round(max(0.0, r.retry_at - now), 1)}
                    for k, r in self._refused.items()}

    def _served_path(self, folder: Path) -> str:
        folder = Path(folder).resolve()
        if self.served_adapters_root is None:
            return str(folder)
        return f"{self.served_adapters_root.rstrip('/')}/{folder.relative_to(self.adapters_root).as_posix()}"

    # The engine protocol: adapters -------------------------------------------------------------
    def module_shapes(self) -> dict:
        return self.base.extra["module_shapes"]

    def _slot(self, key: str) -> int:
        if key not in self._slots:
            self._slots[key] = n = len(self._slots) + 1
            self._keys[n] = key
        return self._slots[key]

    def pin_adapter(self, key: str) -> int | None:
        """Pin `key` for one request when every ready server has it loaded; else None (load it first)."""
        with self._lock:
            ready = [s for s in self.servers if s.ready]
            if not ready or any(key not in s.loaded for s in ready):
                return None
            self._pins[key] = self._pins.get(key, 0) + 1
            self._recent.pop(key, None)
            self._recent[key] = None
            return self._slot(key)

    def load_adapter(self, key: str, folder, *, pin: bool = False) -> int:
        """Load a version on every reachable server under the name `key`. All or nothing: when one refuses,
        the ones that took it drop it and the error names the server and its reason. A refusal is
        remembered: until its backoff runs out, the same error comes back at once, without asking vLLM."""
        with self._lock:
            if not self._freed.wait_for(lambda: key not in self._leaving, UNLOAD_WAIT_S):
                raise VllmUnavailable(", ".join(s.url for s in self.servers),
                                      f"{key} is still being unloaded from the vLLM servers: retry in a moment")
            r = self._refused.get(key)
            if r is not None and not r.due():
                raise AdapterRefused(f"{key} was refused by the serving engine: {r.reason} (tried {r.attempts} "
                                     f"time(s); next try in {max(0.0, r.retry_at - time.monotonic()):.0f} s)")
        path = self._served_path(folder)
        targets = [s for s in self.servers if s.healthy]
        if not targets:
            raise VllmUnavailable(", ".join(s.url for s in self.servers), "no vLLM server is reachable to load "
                                  f"{key}: retry when they are back")
        took, refused = [], []
        for s in targets:
            if key in s.loaded:
                continue
            try:
                s.client.load_lora_sync(key, path)
                took.append(s)
            except VllmUnavailable as e:
                refused.append((e, False))
            except VllmError as e:
                if already_loaded(e):   # loaded by an earlier call that this process did not see end
                    took.append(s)
                    continue
                refused.append((e, True))
        if refused:
            for s in took:
                try:
                    s.client.unload_lora_sync(key)
                except VllmError as e:
                    log.warning("could not drop %s from %s after another server refused it: %s", key, s.url, e)
            for e, by_vllm in refused:
                if by_vllm:
                    self._refuse(key, e)
            message = f"{key} did not go live: " + "; ".join(e.message for e, _ in refused)
            if all(not by_vllm for _, by_vllm in refused):
                raise VllmUnavailable(", ".join(e.url for e, _ in refused), message)
            raise AdapterRefused(message)
        self._accept(key)
        with self._lock:
            for s in took:
                s.loaded.add(key)
                s.added.add(key)
                s.removed.discard(key)
            self._recent.pop(key, None)
            self._recent[key] = None
            if pin:
                self._pins[key] = self._pins.get(key, 0) + 1
            return self._slot(key)

    def unpin(self, slot: int) -> None:
        if not slot:
            return
        with self._lock:
            key = self._keys.get(slot)
            if key is not None and self._pins.get(key, 0) > 0:
                self._pins[key] -= 1
            self._freed.notify_all()

    def wait_for_free_slot(self, timeout: float) -> None:
        """vLLM has no slot limit for loaded adapters (--max-loras caps one batch, not what is loaded)."""
        with self._lock:
            self._freed.wait(timeout)

    def unload_adapter(self, key: str) -> None:
        """Drop `key` from every server that has it, when no request pins it."""
        with self._lock:
            if self._pins.get(key):
                return
            self._recent.pop(key, None)
            servers = self._leave(key)
        self._drop(key, servers)

    def _evict(self) -> None:
        """Unload versions past `max_resident` that nothing pins and that are not live, oldest first."""
        live = set(self.live())
        with self._lock:
            extra = len(self._recent) - self.max_resident
            candidates = [k for k in self._recent if k not in live][:max(0, extra)]
        for key in candidates:
            with self._lock:
                if self._pins.get(key) or key not in self._recent:
                    continue
                self._recent.pop(key, None)
                servers = self._leave(key)
            self._drop(key, servers)
            log.info("unloaded %s from the vLLM servers (not live, not in use)", key)

    def _leave(self, key: str) -> list[Server]:
        """Under the lock, with the pins checked: mark `key` gone from every server that has it (a request can
        no longer pin it, nor be routed to it) and leaving (a load of it waits) -> the servers to unload it from.
        The unloads themselves run after, without the lock: nothing on an event loop waits behind them."""
        servers = [s for s in self.servers if key in s.loaded]
        for s in servers:
            s.loaded.discard(key)
            s.added.discard(key)
            s.removed.add(key)
        self._leaving.add(key)
        return servers

    def _drop(self, key: str, servers: list[Server]) -> None:
        """The HTTP unloads of `key` (see `_leave`), then it stops leaving."""
        try:
            for s in servers:
                try:
                    s.client.unload_lora_sync(key)
                except VllmError as e:
                    log.warning("could not unload %s from %s: %s", key, s.url, e.message)
        finally:
            with self._lock:   # gone now: a reconcile that listed the servers before this still drops it
                for s in servers:
                    s.loaded.discard(key)
                    s.removed.add(key)
                self._leaving.discard(key)
                self._freed.notify_all()

    # The engine protocol: generation -----------------------------------------------------------
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, tools)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def submit_group(self, reqs: list[Request], loop=None, on_finish=None) -> list[Handle]:
        """`n` answers: one request per answer (the servers' prefix cache reads the shared prompt once)."""
        handles = []
        for i, (req, done) in enumerate(zip(reqs, on_finish or [None] * len(reqs))):
            try:
                handles.append(self.submit(req, loop, done))
            except BaseException:
                for h in handles:
                    h.cancel()
                for r in reqs[i + 1:]:
                    self.unpin(r.slot)
                raise
        return handles

    def _route(self, key: str | None) -> Server:
        with self._lock:
            ok = [s for s in self.servers if s.ready and (key is None or key in s.loaded)]
            if not ok:
                why = "; ".join(f"{s.url}: {s.problem or 'not ready'}" for s in self.servers)
                raise VllmUnavailable(", ".join(s.url for s in self.servers),
                                      "no vLLM server can answer now: retry in a moment", why)
            least = min(ok, key=lambda s: s.inflight)
            preferred = self._affinity.get(key or BASE_KEY)
            chosen = preferred if preferred in ok and preferred.inflight <= least.inflight + ROUTE_SLACK else least
            self._affinity[key or BASE_KEY] = chosen
            chosen.inflight += 1
            chosen.served += 1
            return chosen

    def submit(self, req: Request, loop=None, on_finish=None) -> Handle:
        """Send a request to a server. `req.slot` comes pinned for an adapter; it is unpinned when the
        request ends, or here if it is refused."""
        try:
            check_admission(req, self.max_context)
            server = self._route(req.adapter)
        except BaseException:
            self.unpin(req.slot)
            req.slot = 0
            raise
        req.t_submit = time.perf_counter()
        h = Handle(req, loop)
        h.on_finish = on_finish
        asyncio.run_coroutine_threadsafe(self._run(h, server), loop or self._loop)
        return h

    async def _run(self, h: Handle, server: Server) -> None:
        req, error = h.req, None
        model = req.adapter or server.base_id
        stream = server.client.stream_completion(model, req.prompt_ids, max_tokens=req.max_new_tokens,
                                                 temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                                 stop=req.stop, ignore_eos=req.ignore_eos,
                                                 extra=vllm_options(req, len(self.tokenizer)))
        try:
            async for ev in stream:
                if h.cancelled.is_set():
                    req.finish_reason = "cancelled"
                    break
                if ev.kind == "token":
                    if req.t_first is None:
                        req.t_first = time.perf_counter()
                    req.generated.extend(ev.token_ids)
                    lps = vllm_logprobs(ev.logprobs, req.logprobs) if req.logprobs is not None else None
                    if lps:
                        req.token_logprobs += lps
                        req.lp_sent = len(req.token_logprobs)
                    if ev.text or lps:
                        req.text += ev.text
                        h.put(Event("token", ev.text, logprobs=lps, generated=len(req.generated)))
                else:
                    req.finish_reason = ev.finish_reason   # usage: the prompt is our ids, the answer's came back
                    req.cached_tokens = ev.usage.cached_tokens if ev.usage else 0
        except VllmError as e:
            error = e
            if e.http_status in (400, 422):   # vLLM refused this request: the caller's 400, with vLLM's reason
                error = AssistantError(f"the model server refused this request: {e.vllm_message or e.message}")
            elif isinstance(e, VllmUnavailable):
                with self._lock:
                    server.healthy = server.ready = False
                    server.problem = e.message
                log.error("vLLM server %s failed during an answer (%s): out of rotation until it answers again",
                          server.url, e.message)
                error = VllmUnavailable(server.url, "the answer stopped: the vLLM server serving it failed; retry")
        except Exception:  # noqa: BLE001 - a broken stream must still end the request and be logged
            log.exception("streaming from %s failed", server.url)
            error = GenerationFailed("the answer stopped because of a server error: retry")
        finally:
            await stream.aclose()
            with self._lock:
                server.inflight -= 1
        req.finish_reason = "error" if error is not None else (req.finish_reason or "cancelled")
        req.t_done = time.perf_counter()
        self.unpin(req.slot)
        req.slot = 0
        h.finish(error)

    def status(self) -> EngineStatus:
        """The engine's status; `servers`: each one's url, ready, in flight, answers served, adapters loaded
        and problem (the managed server also its supervisor's state)."""
        managed = self.managed
        with self._lock:
            servers = [{"url": s.url, "ready": s.ready, "inflight": s.inflight, "served": s.served,
                        "adapters": sorted(s.loaded), "problem": s.problem, "async_clients": s.client.async_clients}
                       for s in self.servers]
        for server in servers:   # the managed server's supervisor: restarting, or given up (and why)
            if managed is not None and server["url"] == managed.url:
                server["supervisor"] = managed.state
                if managed.failure:
                    server.update(ready=False, problem=managed.failure)
            loaded = set().union(*(s.loaded for s in self.servers if s.ready))
        return {"kind": "vllm", "ready": any(s["ready"] for s in servers), "queued": 0,
                "inflight": sum(s["inflight"] for s in servers), "adapters": sorted(loaded), "servers": servers}

    def close(self) -> None:
        self._stop.set()
        if self.managed is not None:
            self.managed.stop()
        for s in self.servers:   # each loop's client closed on its loop, while the loop still runs
            s.client.close()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
