"""Data-parallel training (--train-gpus N): one adapter trained by N processes through accelerate.

The caller (training.train_adapter, in a job's process or the CLI's) has loaded the base and prepared the
examples and the batch schedule, replay answers included, so every rank trains on the same data.
`train_ranks` hands them to N rank processes (training/ddp_rank.py) and follows them:

    plan.json (examples, schedule, settings, the base to load) in a work folder inside out_dir (a job's
    staging folder, removed with it if the job is killed) -> a TCP store here for the rendezvous
    (no port to guess) -> N ranks `python -m assistant.training.ddp_rank WORKDIR` in this process's group, so
    cancelling a job (SIGKILL to its group) ends them too, and each rank dies with this process ->
    rank 0's progress lines on a pipe -> progress() and should_stop() here -> rank 0's adapter, moved
    into out_dir once every rank ended well

The ranks run the SFT loop on the prepared batches, then the DPO / KTO phases of a preference plan, if any.

A rank that fails ends the run: the others are killed and the error names the rank and its last log line.
On CUDA the ranks use NCCL and one GPU each, cuda:K..cuda:K+N-1 from the base's device cuda:K; on CPU
gloo, with the cores shared between them.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from assistant.errors import AssistantError, RankFailed

log = logging.getLogger(__name__)

WORK_PREFIX = ".ddp-"            # the run's work folder, in out_dir (a job's staging folder) until it ends
PLAN_FILE = "plan.json"          # in the work folder: what every rank trains on
ADAPTER_DIR = "adapter"          # rank 0 saves here, in the work folder
FD_VAR = "ASSISTANT_DDP_FD"      # rank 0's end of the progress pipe
PARENT_VAR = "ASSISTANT_DDP_PARENT"   # the pid the ranks die with
LOCALHOST = "127.0.0.1"
RENDEZVOUS_TIMEOUT_S = 600       # ranks that have not all joined by then fail (a base can take minutes to load)
POLL_SECONDS = 0.2               # how often should_stop() and the ranks' exits are checked
PIPE_READ_BYTES = 65536
LOG_TAIL_LINES = 20              # of a failed rank's log, logged here


def rank_env(device: str, processes: int) -> dict:
    """What every rank's environment adds: its CPU threads (the cores shared out) and, on CUDA, the GPUs
    the ranks use (rank r trains on cuda:r of CUDA_VISIBLE_DEVICES, accelerate's placement)."""
    from assistant.engine.threads import cores
    threads = str(max(1, cores() // processes))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "ASSISTANT_CPU_THREADS": threads}
    if not device.startswith("cuda"):
        return env
    import torch
    first, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if first + processes > count:
        raise AssistantError(f"--train-gpus {processes} from cuda:{first} needs cuda:{first}..cuda:"
                             f"{first + processes - 1}, and {count} GPU(s) are visible: lower --train-gpus or "
                             "start from another --train-device", param="train_gpus")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in visible.split(",") if x.strip()] if visible else [str(i) for i in range(count)]
    return {**env, "CUDA_VISIBLE_DEVICES": ",".join(ids[first:first + processes])}


def train_ranks(base, examples: list, schedule: list[list[int]], settings: dict, out_dir: Path, processes: int, *,
                checkpointing: bool, progress=None, should_stop=None, preference: dict | None = None,
                total_steps: int | None = None) -> dict:
    """Train in `processes` ranks: {losses, tokens, label_tokens, seconds, world_size, ranks, phases, steps}
    with the adapter saved in `out_dir`, or {"stopped_at": step} when should_stop() said so (nothing saved).
    `preference` (PreferencePlan.to_dict()): DPO / KTO phases the ranks run after the SFT `schedule` (which
    may be empty); `total_steps`: the steps of both, as progress() hears them."""
    import torch.distributed as dist
    env = {**os.environ, **rank_env(base.device, processes)}
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=out_dir))   # goes with a job's staging folder
    procs: list[subprocess.Popen] = []
    read_fd = write_fd = None
    saved = False
    try:
        plan = {"base_model": base.extra.get("load_from", base.path), "dtype": base.dtype,
                "quantization": base.quantization, "cpu": not base.device.startswith("cuda"),
                "pad_id": base.tokenizer.pad_token_id, "settings": settings, "checkpointing": checkpointing,
                "preference": preference, "total_steps": total_steps or len(schedule),
                "examples": [[list(ids), list(labels)] for ids, labels in examples], "schedule": schedule}
        (work / PLAN_FILE).write_text(json.dumps(plan))
        # the ranks' rendezvous, hosted here (port 0: the system picks a free one) until they end
        store = dist.TCPStore(LOCALHOST, 0, processes, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
        root = str(Path(__file__).resolve().parents[2])   # the folder that holds the assistant package
        env.update({"MASTER_ADDR": LOCALHOST, "MASTER_PORT": str(store.port), "WORLD_SIZE": str(processes),
                    "LOCAL_WORLD_SIZE": str(processes), "TORCHELASTIC_USE_AGENT_STORE": "True",
                    PARENT_VAR: str(os.getpid()), "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")})
        read_fd, write_fd = os.pipe()
        for rank in range(processes):
            with open(work / f"rank{rank}.log", "wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "assistant.training.ddp_rank", str(work)], stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, pass_fds=(write_fd,) if rank == 0 else (),
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), FD_VAR: str(write_fd)}))
        os.close(write_fd)
        write_fd = None
        result = _follow(procs, read_fd, work, progress, should_stop)
        if "stopped_at" not in result:
            for f in sorted((work / ADAPTER_DIR).iterdir()):
                os.replace(f, out_dir / f.name)
            saved = True
            for r in result["ranks"]:
                log.info("rank %d of %d (pid %d, %s) trained on %d tokens; its LoRA weights: %s", r["rank"],
                         result["world_size"], r["pid"], r["device"], r["tokens"], r["digest"])
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(work if saved or not created else out_dir, ignore_errors=True)


def _follow(procs: list, fd: int, work: Path, progress, should_stop) -> dict:
    """Relay rank 0's progress, poll should_stop(), watch every rank's exit: rank 0's result."""
    buffer, done, step, reading = b"", None, 0, True
    while True:
        if should_stop is not None and should_stop():
            return {"stopped_at": step}
        if reading:
            if select.select([fd], [], [], POLL_SECONDS)[0]:
                chunk = os.read(fd, PIPE_READ_BYTES)
                reading = bool(chunk)          # rank 0 closed it: it ended
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if msg["event"] == "step":
                        step = msg["step"]
                        if progress is not None:
                            progress(msg["step"], msg["total"], msg["loss"])
                    elif msg["event"] == "done":
                        done = msg
        else:
            time.sleep(POLL_SECONDS)
        codes = [p.poll() for p in procs]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            raise _failure(work, failed, len(procs))
        if not reading and all(code == 0 for code in codes):
            if done is None:
                raise RankFailed(f"training process 0 of {len(procs)} ended without its result")
            return done


def _failure(work: Path, failed: list[tuple[int, int]], world: int) -> RankFailed:
    """The error for ranks that ended badly, with each one's last log line; their log tails go to the log."""
    said = []
    for rank, code in failed:
        try:
            lines = (work / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        log.error("training process %d of %d ended with exit code %d; its log ends:\n%s", rank, world, code,
                  "\n".join(lines[-LOG_TAIL_LINES:]))
        said.append(f"process {rank} of {world} ended with exit code {code}"
                    + (f": {lines[-1].strip()[:200]}" if lines else ""))
    return RankFailed("training " + "; ".join(said))
