"""C kernels for CPU decode (kernels.c), built once per machine with the system C compiler into the cache
folder and loaded with ctypes.

- `step_kernel()`: a whole decode step of a Llama-family decoder in one call (engine/runner.py `KernelStep`).
  Op by op, a step is ~35 torch calls per layer whose dispatch cost about a third of the step; in C
  the step is the weights' read plus a few barriers. Its matrix-vector products use AVX512-BF16 dot
  products where the CPU has them, and one OpenMP team shared with torch (the library binds to the
  libgomp torch loaded; with another OpenMP runtime in the process the step stays off).
- `lora_kernel()`: one fused projection group's LoRA delta for a few rows (prefill of short prompts,
  and decode where the step does not apply): one call instead of four torch ops, reading only the
  diagonal blocks of the block-diagonal B of q|k|v and gate|up.
- `rms_kernel()`: Llama's RMSNorm in one call instead of seven ops.

All of them give a row the same arithmetic whatever its batch holds (a row's answer does not depend
on its neighbours). Without a compiler, or with ASSISTANT_KERNELS=0, they are None and torch ops run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = (Path(__file__).with_name("kernels.c")).read_text()

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno"]
OPENMP = ["-fopenmp"]   # dropped when the compiler has no OpenMP: then only the single-thread kernels serve
KERNEL_DTYPES = (torch.bfloat16, torch.float32)   # what the kernels take for activations
COMPILE_TIMEOUT_S = 120
COMPILER_ERROR_CHARS = 2000                       # of the compiler's message, in the log

log = logging.getLogger(__name__)


def _machine_key() -> str:
    """Compiled with -march=native: the library is only valid on this kind of CPU."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256("\n".join([SOURCE, " ".join(FLAGS), platform.machine(), flags]).encode()).hexdigest()[:16]


def _build(folder: Path) -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        log.warning("no C compiler found (set CC or install gcc): the decode step runs on slower torch ops")
        return None
    lib = folder / f"kernels_{_machine_key()}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, tmp_lib = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
        src.write_text(SOURCE)
        errors = []
        for extra in (OPENMP, []):
            try:
                subprocess.run([compiler, *FLAGS, *extra, str(src), "-o", str(tmp_lib), "-lm"], check=True,
                               timeout=COMPILE_TIMEOUT_S, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                if errors:
                    log.warning("the C kernels built without OpenMP (%s): decode steps run on one thread",
                                errors[-1][:COMPILER_ERROR_CHARS])
                break
            except subprocess.CalledProcessError as e:
                errors.append(e.stderr.decode(errors="replace").strip())
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(str(e))
        else:
            log.error("building the C kernels with %s failed; the slower torch path serves instead:\n%s",
                      compiler, errors[-1][:COMPILER_ERROR_CHARS])
            return None
        # Atomic: a concurrent builder finds a whole library or none. Deliberately not files.atomic_write_bytes
        # (no fsync): a compiler output in the cache, not data; were a power cut to leave it cut short, loading
        # it fails, the torch path serves, and deleting the kernels cache folder rebuilds it.
        os.replace(tmp_lib, lib)
    for old in folder.glob("kernels_*.so"):   # builds of other versions of the source
        if old != lib:
            old.unlink(missing_ok=True)
    return lib


@functools.cache
def _library():
    """The compiled library with argument types set, or None (no compiler, or ASSISTANT_KERNELS=0).
    Once per process; concurrent first calls may both build, and the atomic rename keeps that safe."""
    if os.environ.get("ASSISTANT_KERNELS", "1") == "0":
        return None
    from assistant.settings import default_cache_dir
    try:
        path = _build(default_cache_dir() / "kernels")
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
        i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.lora_delta.argtypes = [i64, i64, i64, i64, vp, i64, vp, i64, ci, vp, i64, ci, vp, vp, ci, vp, vp]
        lib.lora_delta.restype = ci
        lib.rms_norm.argtypes = [i64, i64, vp, vp, vp, ci, ctypes.c_float]
        lib.rms_norm.restype = ci
        lib.decode_step.argtypes = [vp, ctypes.c_float, ctypes.c_float, vp, vp, vp, i64, vp, vp, vp, ci, vp, vp, vp, vp]
        lib.decode_step.restype = ci
        lib.decode_scratch_floats.argtypes = [vp]
        lib.decode_scratch_floats.restype = i64
        return lib
    except (OSError, AttributeError) as e:
        log.error("loading the C kernels failed (%s); the slower torch path serves instead", e)
        return None


@functools.cache
def lora_kernel():
    """The compiled `lora_delta` function, or None: the caller then uses torch matmuls."""
    lib = _library()
    return None if lib is None else lib.lora_delta


@functools.cache
def rms_kernel():
    """The compiled `rms_norm` function, or None: the caller then uses torch ops."""
    lib = _library()
    return None if lib is None else lib.rms_norm


def _one_openmp_runtime() -> bool:
    """True when the process has one OpenMP runtime mapped (torch's libgomp, which the library binds to).
    With two, the step's threads would compete with torch's instead of being the same threads."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    libs = {ln.split()[-1] for ln in maps.splitlines() if "libgomp" in ln or "libiomp" in ln or "libomp" in ln}
    return len(libs) == 1


@functools.cache
def step_kernel():
    """The compiled library for whole decode steps (`decode_step`), or None: the caller then runs the
    step op by op in torch. Needs OpenMP shared with torch, or one thread."""
    lib = _library()
    if lib is None:
        return None
    if not lib.kernels_openmp() and torch.get_num_threads() > 1:
        return None
    if lib.kernels_openmp() and not _one_openmp_runtime():
        return None
    return lib
