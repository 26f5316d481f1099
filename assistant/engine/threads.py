"""CPU threads: one OpenMP team, owned by the thread that decodes.

With libgomp, every thread that runs parallel torch code keeps its own pool of worker threads for the
life of the thread. Once the pools together hold more threads than there are cores, libgomp stops
spinning between parallel regions and puts its workers to sleep, and the decode loop (hundreds of small
parallel regions per token) slows down by a third: 47 against 32 tokens/s on the embedded model here,
only because the main thread had loaded the model with two threads.

So the process default is one thread per torch call (set before torch is imported, see `defaults`), and
only the threads whose work needs the cores take them: the engine's loop (`claim_cores`), a training
job's process, and batch work run through `on_all_cores` in a short-lived thread (its pool dies with it).

numpy's BLAS (OpenBLAS, its own pthreads pool) reads the same OMP_NUM_THREADS when numpy is loaded, so
it too defaults to one thread.
"""

from __future__ import annotations

import os
import sys
import threading

_CORES_VAR = "ASSISTANT_CPU_THREADS"   # carries the real core count to child processes


def defaults() -> None:
    """Make one thread the default for torch calls, unless torch is loaded already or the user chose."""
    if os.environ.get(_CORES_VAR) or "torch" in sys.modules:
        return
    os.environ[_CORES_VAR] = os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def cores() -> int:
    """Threads for work that should use the whole machine."""
    try:
        return max(1, int(os.environ.get(_CORES_VAR) or len(os.sched_getaffinity(0))))
    except ValueError:
        return max(1, len(os.sched_getaffinity(0)))


def _default() -> int:
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def use_all_cores() -> int:
    """For a process (or command) that only does batch work, like a training job: all cores, every thread."""
    import torch
    n = cores()
    torch.set_num_threads(n)
    return n


def claim_cores() -> int:
    """Give the calling (long-lived) thread all cores, leaving the default for threads that start later.

    torch keeps one process-wide count that each thread applies to itself at its first parallel call, and
    `torch.set_num_threads` sets it as well as the caller's own count; so the caller first applies the old
    count to itself, then sets its own, and a helper thread puts the process-wide count back."""
    import torch
    torch.get_num_threads()            # apply the process-wide count to this thread now, not later
    n = cores()
    torch.set_num_threads(n)
    helper = threading.Thread(target=torch.set_num_threads, args=(_default(),), name="threads-default")
    helper.start()
    helper.join()
    return n


def on_all_cores(fn, *args, **kwargs):
    """Run fn on all cores in a short-lived thread (its thread pool goes away with it); -> fn's result."""
    box: dict = {}

    def run():
        import torch
        try:
            torch.set_num_threads(cores())
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e
        finally:
            torch.set_num_threads(_default())

    t = threading.Thread(target=run, name="all-cores")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
