"""The engine interface: what `Serving` asks of whatever generates (engine/engine.py in this process, or
vllm/engine.py in front of vLLM servers), and the one shape of an engine's status.

Both engines subclass `EngineProtocol`, so one that lacks an operation cannot be built (abstract methods),
and `Serving` never asks which engine it holds. The engines are built in one place, server.py
(`build_engine`), which the CLI's one builder calls too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, TypedDict


class ServerStatus(TypedDict):
    """One generation server behind the engine (vLLM); the local engine has none."""
    url: str
    ready: bool
    inflight: int
    served: int
    adapters: list[str]
    problem: str | None
    async_clients: int         # open HTTP clients to it, one per event loop that streamed from it


class EngineStatus(TypedDict):
    """`EngineProtocol.status()`: the same keys for every engine (GET /api/health shows it as `engine`)."""
    kind: str                  # "local" | "vllm"
    ready: bool                # it can take a request now
    queued: int                # requests waiting to start
    inflight: int              # requests generating
    adapters: list[str]        # adapter versions loaded (`<domain>@vN`), sorted
    servers: list[ServerStatus]


class EngineProtocol(ABC):
    """The operations `Serving` uses. `base` is the base it serves (model.Base or its description);
    `max_context` the most tokens of one conversation (prompt and answer)."""

    base: object
    max_context: int
    schedules_adapters: bool = False   # True: requests may come with `adapter_folder` and wait in its queue

    # Prompts
    @abstractmethod
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A conversation as the prompt's token ids (the base's chat template, with the offered tools)."""

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """A plain text prompt (legacy completions) as token ids."""

    @abstractmethod
    def module_shapes(self) -> dict:
        """{module name: (in_features, out_features)} of the base's linear layers: what adapters must fit."""

    # Requests
    @abstractmethod
    def submit(self, req, loop=None, on_finish: Callable[[], None] | None = None):
        """Queue an `engine.Request` -> its `engine.Handle`. The request's adapter slot comes pinned; the
        engine unpins it when the request ends, or at once when it is refused. `on_finish` runs once when
        it ends, before its last event."""

    @abstractmethod
    def submit_group(self, reqs: list, loop=None, on_finish=None) -> list:
        """`n` answers to one prompt: one request per answer (`on_finish`: one callback per request)."""

    def cancel(self, handle) -> None:
        """Stop a request: it ends with finish_reason "cancelled" at its next token (and is logged)."""
        handle.cancel()

    # Adapters
    @abstractmethod
    def pin_adapter(self, key: str) -> int | None:
        """The slot of a loaded adapter version, pinned for one request; None when it is not loaded."""

    @abstractmethod
    def load_adapter(self, key: str, folder: Path, *, pin: bool = False) -> int:
        """Load a validated adapter folder under `key` (raises Busy when every slot is pinned)."""

    @abstractmethod
    def unload_adapter(self, key: str) -> None:
        """Drop a loaded version that no request pins (a later request loads it again)."""

    @abstractmethod
    def unpin(self, slot: int) -> None:
        """Release one pin taken by `pin_adapter` or `load_adapter(pin=True)`."""

    @abstractmethod
    def wait_for_free_slot(self, timeout: float) -> None:
        """Block until some pin is released, or `timeout` seconds."""

    def refused(self) -> dict[str, dict]:
        """{adapter key: {"reason", "attempts", "retry_in_s"}} of versions a generation server refused to load
        (remembered and retried with backoff); none for an engine that loads adapters itself."""
        return {}

    # The engine
    @abstractmethod
    def status(self) -> EngineStatus:
        """What it is doing now, in the one shape of `EngineStatus`."""

    @abstractmethod
    def close(self) -> None:
        """Stop generating and release what the engine holds (threads, servers it started)."""
