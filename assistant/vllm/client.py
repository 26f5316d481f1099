"""An HTTP client for one vLLM OpenAI-compatible server: health, served models, runtime LoRA
loading/unloading, streamed chat completions, and a check that the server serves the expected base.

Async first (the app's API is async); the control calls have `_sync` twins for startup checks.
Every failure becomes a `VllmError` (or `VllmUnavailable` when the server cannot be reached, refuses
the connection or dies mid-stream) whose message names the server URL and carries vLLM's own message.

What vLLM 0.32 answers, as measured (see tests/test_vllm.py):
  - /v1/models lists the base first (`parent` null, `root` = the --model argument, `max_model_len` set)
    and then one entry per loaded LoRA (`id` = lora_name, `parent` = the served base name,
    `root` = lora_path, `max_model_len` null).
  - load_lora_adapter answers 200 with plain text; errors are JSON {"error": {"message", "type", "code"}}:
    a missing or empty folder -> 404 NotFoundError "Loading lora X failed: No adapter found for <path>";
    a name already loaded -> 400 InvalidUserInput "... has already been loaded ...";
    the base's own name -> 400 "conflicts with a served base model"; rank above --max-lora-rank -> 500
    "... LoRA rank 32 is greater than max_lora_rank 16 ...". An adapter trained on ANOTHER base with
    different shapes is accepted (200) and silently misapplied: validate adapters before loading.
  - Chat prompts are rendered with the model's chat template with add_generation_prompt and
    add_special_tokens=False (vLLM's default for chat), which is token for token what transformers'
    `apply_chat_template(..., add_generation_prompt=True, tokenize=True)` gives: greedy answers match
    the local engine's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from assistant.errors import VllmError, VllmUnavailable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0        # s: a server that is not there must fail fast
HEALTH_TIMEOUT = 2.0         # s: the whole /health call
CONTROL_TIMEOUT = 60.0       # s: /v1/models, loading and unloading adapters (a large adapter on a busy server)
STREAM_READ_TIMEOUT = 120.0  # s: the longest silence between two chunks of a stream (a long prefill on CPU)
SAMPLE_BYTES = 1 << 20       # bytes hashed at each of 3 offsets per weights file to tell two bases apart


@dataclass(frozen=True)
class ServedModel:
    """One entry of /v1/models: the base (`parent` None) or a LoRA (`parent` = the base's name)."""
    id: str
    root: str
    parent: str | None = None
    max_model_len: int | None = None


@dataclass(frozen=True)
class Models:
    base: ServedModel
    loras: dict[str, ServedModel] = field(default_factory=dict)   # lora_name -> entry (root = its path)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0         # prompt tokens its prefix cache served (when the server reports them)


@dataclass
class StreamEvent:
    """Like engine.Event: "token" events carry text; the last one, "done", the finish_reason and usage."""
    kind: str                      # "token" | "done"
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    token_ids: list[int] = field(default_factory=list)   # the delta's tokens (completions with return_token_ids)
    logprobs: dict | None = None   # the delta's legacy-completions logprobs, when asked for


@dataclass(frozen=True)
class BaseCheck:
    ok: bool
    served: str         # what the server serves, for messages: its name and model folder's name
    expected: str
    method: str         # "path" | "fingerprint" | "name": how the two were compared

    def message(self, url: str) -> str:
        return f"vLLM server {url} serves {self.served}, not the expected base {self.expected}"


# ---------------------------------------------------------------------------------------------
# Parsing, shared by the sync and async calls
# ---------------------------------------------------------------------------------------------

def _vllm_message(resp: httpx.Response) -> tuple[str, str | None]:
    try:
        err = resp.json().get("error", {})
        if isinstance(err, dict):
            return str(err.get("message", "")), err.get("type")
        return str(err), None
    except (ValueError, AttributeError):
        return resp.text.strip()[:500], None


def _raise_for(url: str, what: str, resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    message, kind = _vllm_message(resp)
    if resp.status_code == 401:
        message = (message or "Unauthorized") + " (the server wants an API key: --vllm-api-key or ASSISTANT_VLLM_API_KEY)"
    raise VllmError(url, f"{what} failed (HTTP {resp.status_code})", message, http_status=resp.status_code,
                    vllm_type=kind)


def _transport_error(url: str, what: str, e: Exception) -> VllmUnavailable:
    if isinstance(e, httpx.ConnectError):
        why = "connection refused or unreachable"
    elif isinstance(e, httpx.TimeoutException):
        why = f"timed out ({type(e).__name__})"
    else:
        why = f"connection lost ({type(e).__name__})"
    return VllmUnavailable(url, f"{what}: {why}", str(e))


def _parse_models(url: str, payload: dict) -> Models:
    entries = [ServedModel(id=m["id"], root=str(m.get("root") or m["id"]), parent=m.get("parent"),
                           max_model_len=m.get("max_model_len")) for m in payload.get("data", [])]
    bases = [m for m in entries if m.parent is None]
    if not bases:
        raise VllmError(url, "/v1/models lists no base model", json.dumps(payload)[:300])
    return Models(base=bases[0], loras={m.id: m for m in entries if m.parent is not None})


def _chat_body(model: str, messages: list[dict], max_tokens: int, temperature: float, top_p: float,
               seed: int | None, stop, ignore_eos: bool, extra: dict | None) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "stream": True, "stream_options": {"include_usage": True}}
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    return body


# ---------------------------------------------------------------------------------------------
# Base identity
# ---------------------------------------------------------------------------------------------

def folder_fingerprint(folder: Path) -> dict:
    """What identifies a local base folder without loading it: its architecture and shape config, and a
    hash of each weights file's safetensors header and of 3 samples of its bytes (a fine-tune of the same
    shapes differs there). Reads ~3 MiB per file: cheap for any size."""
    from assistant.engine.model import config_shapes
    config = json.loads((folder / "config.json").read_text())
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + size.to_bytes(8, "little") + fh.read(n))
            for off in (8 + n, (size + n) // 2, max(8 + n, size - SAMPLE_BYTES)):
                fh.seek(off)
                h.update(fh.read(SAMPLE_BYTES))
    return {"architectures": config.get("architectures"), "shapes": config_shapes(config),
            "weights": h.hexdigest()[:16]}


def _norm_name(s: str) -> str:
    return s.rstrip("/").rsplit("/", 1)[-1].lower()


def check_base(models: Models, *, expected_path: str | Path | None = None,
               expected_name: str | None = None) -> BaseCheck:
    """Does the server serve the expected base? `root` in /v1/models is the server's --model argument:
      1. it is the expected folder (same resolved path) -> yes;
      2. it is another folder readable here (a server on this machine or a shared disk) -> compare
         `folder_fingerprint`s: the same config and weights under another path is the same base;
      3. not readable here (a remote server): compare names: the served name or root's last path
         component against the expected name or folder name, case-insensitively (a weak check, the only
         one possible; 'method' says so).
    """
    base = models.base
    served = base.id if _norm_name(base.root) == base.id.lower() else f"{base.id} ({_norm_name(base.root)})"
    exp_path = Path(expected_path).expanduser() if expected_path else None
    expected = expected_name or (exp_path.name if exp_path else "?")
    root = Path(base.root).expanduser()
    if exp_path is not None and root.is_absolute() and (root / "config.json").is_file():
        if root.resolve() == exp_path.resolve():
            return BaseCheck(True, served, expected, "path")
        try:
            same = folder_fingerprint(root) == folder_fingerprint(exp_path)
        except (OSError, ValueError) as e:
            log.warning("cannot fingerprint %s or %s: %s", root, exp_path, e)
            same = False
        return BaseCheck(same, served, expected, "fingerprint")
    wanted = {_norm_name(n) for n in (expected_name, str(exp_path) if exp_path else None) if n}
    ok = bool(wanted & {_norm_name(base.id), _norm_name(base.root)})
    return BaseCheck(ok, served, expected, "name")


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------

class VllmClient:
    """One vLLM server. Async methods share one httpx.AsyncClient per event loop (an httpx client is bound
    to the loop it first ran on; a caller without a loop of its own and the API's loop each get theirs,
    created once, under a lock); `_sync` twins share one httpx.Client. `aclose()` closes the current loop's
    client, `close()` every client (those of other running loops on their own loop).
    `api_key`: sent as `Authorization: Bearer` (vLLM's --api-key)."""

    def __init__(self, url: str, *, stream_read_timeout: float = STREAM_READ_TIMEOUT, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.stream_read_timeout = stream_read_timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._aclients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None

    def __repr__(self) -> str:
        return f"VllmClient({self.url!r})"

    # Connections -------------------------------------------------------------------------------
    def _async(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._aclients.get(loop)
            if client is None:
                for gone in [lp for lp in self._aclients if lp.is_closed()]:   # their sockets went with the loop
                    del self._aclients[gone]
                client = self._aclients[loop] = httpx.AsyncClient(
                    base_url=self.url, headers=self._headers, limits=httpx.Limits(max_connections=None),
                    timeout=httpx.Timeout(CONTROL_TIMEOUT, connect=CONNECT_TIMEOUT))
            return client

    @property
    def async_clients(self) -> int:
        """How many async clients (one per event loop that used this server) are open."""
        with self._lock:
            return len(self._aclients)

    def _sync(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(base_url=self.url, headers=self._headers,
                                            timeout=httpx.Timeout(CONTROL_TIMEOUT, connect=CONNECT_TIMEOUT))
            return self._client

    async def aclose(self) -> None:
        """Close the client of the running loop."""
        with self._lock:
            client = self._aclients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def close(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Close every client: the sync one, and each loop's on that loop while it runs."""
        with self._lock:
            client, self._client = self._client, None
            clients, self._aclients = list(self._aclients.items()), {}
        if client is not None:
            client.close()
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, aclient in clients:
            if loop is current:
                loop.create_task(aclient.aclose())
            elif loop.is_running() and not loop.is_closed():
                try:
                    asyncio.run_coroutine_threadsafe(aclient.aclose(), loop).result(timeout)
                except Exception as e:  # noqa: BLE001 - closing at shutdown: the sockets go with the process
                    log.warning("could not close a client of %s: %s", self.url, e)

    def _request(self, what: str, method: str, path: str, *, timeout: float | None = None,
                 body: dict | None = None) -> httpx.Response:
        kw = {"timeout": httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT))} if timeout else {}
        try:
            resp = self._sync().request(method, path, json=body, **kw)
        except httpx.TransportError as e:
            raise _transport_error(self.url, what, e) from None
        _raise_for(self.url, what, resp)
        return resp

    # Control calls -----------------------------------------------------------------------------
    def health_sync(self) -> bool:
        """True when /health answers 200 within HEALTH_TIMEOUT; False otherwise (never raises)."""
        try:
            self._request("health", "GET", "/health", timeout=HEALTH_TIMEOUT)
            return True
        except VllmError:
            return False

    def models_sync(self) -> Models:
        return _parse_models(self.url, self._request("listing models", "GET", "/v1/models").json())

    def load_lora_sync(self, name: str, path: str | Path) -> None:
        """Load the PEFT folder `path` under `name` (the server reads the path: it must see the same disk).
        A name already loaded is refused (400): every adapter version is loaded under a name of its own."""
        self._request(f"loading adapter {name!r}", "POST", "/v1/load_lora_adapter",
                      body={"lora_name": name, "lora_path": str(Path(path).expanduser().resolve())})

    def unload_lora_sync(self, name: str) -> None:
        self._request(f"unloading adapter {name!r}", "POST", "/v1/unload_lora_adapter", body={"lora_name": name})

    def check_base_sync(self, *, expected_path=None, expected_name=None) -> BaseCheck:
        return check_base(self.models_sync(), expected_path=expected_path, expected_name=expected_name)

    # Generation --------------------------------------------------------------------------------
    async def stream_chat(self, model: str, messages: list[dict], *, max_tokens: int = 256,
                          temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                          stop: list[str] | tuple[str, ...] = (), ignore_eos: bool = False,
                          extra: dict | None = None) -> AsyncIterator[StreamEvent]:
        """Stream a chat completion from `model` (the base's served name or a loaded LoRA's name):
        StreamEvent("token", text) per delta, then one StreamEvent("done", finish_reason, usage).
        Raises VllmError for a refused request (HTTP 4xx/5xx, an error inside the stream) and
        VllmUnavailable when the server is unreachable, silent for STREAM_READ_TIMEOUT, or gone mid-stream.
        Closing the iterator early (client gone) closes the connection, which aborts the request in vLLM."""
        body = _chat_body(model, messages, max_tokens, temperature, top_p, seed, stop, ignore_eos, extra)
        async for ev in self._stream(f"chat with {model!r}", "/v1/chat/completions", body):
            yield ev

    async def stream_completion(self, model: str, prompt_ids: list[int], *, max_tokens: int = 256,
                                temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                                stop: list[str] | tuple[str, ...] = (), ignore_eos: bool = False,
                                extra: dict | None = None) -> AsyncIterator[StreamEvent]:
        """Like `stream_chat`, for a prompt that is already token ids (the app applied the chat template):
        vLLM reads the ids as they are and returns each delta's token ids with its text."""
        body = _chat_body(model, [], max_tokens, temperature, top_p, seed, stop, ignore_eos,
                          {"prompt": list(prompt_ids), "return_token_ids": True, **(extra or {})})
        del body["messages"]
        async for ev in self._stream(f"completion with {model!r}", "/v1/completions", body):
            yield ev

    async def _stream(self, what: str, path: str, body: dict) -> AsyncIterator[StreamEvent]:
        timeout = httpx.Timeout(self.stream_read_timeout, connect=CONNECT_TIMEOUT)
        finish, usage = None, None
        try:
            async with self._async().stream("POST", path, json=body, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    _raise_for(self.url, what, resp)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise VllmError(self.url, f"{what}: unreadable stream chunk", data[:200]) from None
                    if "error" in chunk:
                        err = chunk["error"]
                        raise VllmError(self.url, f"{what} failed mid-answer", str(err.get("message", err))
                                        if isinstance(err, dict) else str(err))
                    for choice in chunk.get("choices") or ():
                        text = choice["text"] if "text" in choice else (choice.get("delta") or {}).get("content")
                        ids = choice.get("token_ids") or ()
                        if text or ids:
                            yield StreamEvent("token", text or "", token_ids=list(ids), logprobs=choice.get("logprobs"))
                        finish = choice.get("finish_reason") or finish
                    if chunk.get("usage"):
                        u = chunk["usage"]
                        usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)),
                                      int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0))
                else:
                    raise VllmUnavailable(self.url, f"{what}: the stream ended without [DONE]")
        except httpx.TransportError as e:
            raise _transport_error(self.url, what, e) from None
        if finish is None:
            raise VllmUnavailable(self.url, f"{what}: the stream ended without a finish_reason")
        yield StreamEvent("done", finish_reason=finish, usage=usage)
