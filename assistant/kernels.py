"""Small C kernels for CPU decode (the LoRA delta, RMSNorm), built once per machine with the system C compiler.

Why: in decode, a LoRA group's delta `out += (h @ A) @ B` is four torch calls (cast, two tiny matmuls,
add) that each cost a few microseconds of dispatch, 120 times per token on the embedded model, and the
block-diagonal B of a fused group (q|k|v, gate|up) makes them read zeros. The kernel does one group in one
call, reads only B's diagonal blocks, and gives every row the same arithmetic whatever the batch holds
(a row's answer does not depend on which adapters its neighbours use).

If there is no compiler, or ASSISTANT_KERNELS=0, `lora_kernel()` and `rms_kernel()` return None and the
torch path runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_HEADER = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = ((uint32_t)v) << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t f32_to_bf16(float f) {           /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;                    /* a NaN stays a NaN */
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}
"""

# One function per weight type (float32, bfloat16), written out rather than macro-generated so that each
# loop is simple enough for the compiler to vectorize. For each row n with slot s = slots[n] > 0:
#   t = A[s] @ h[n]                      A[s]: [RT, in], RT = R * P
#   out[n, off_p : off_p + out_p] += t[p*R : (p+1)*R] @ B[s][p*R : (p+1)*R, off_p : off_p + out_p]
# B[s] is [RT, out_total] and block-diagonal: only its diagonal blocks are read. Math in float32;
# h and out are bfloat16 or float32, rows h_stride / out_stride elements apart.
_BODY = r"""
static int delta_WNAME(int64_t N, int64_t in, int64_t R, int64_t P, const int64_t *part_out, int64_t out_total,
                       const void *h, int64_t h_stride, int h_bf16, void *out, int64_t out_stride, int out_bf16,
                       const WTYPE *A, const WTYPE *B, const int64_t *slots, float *scratch) {
    const int64_t RT = R * P;
    float *restrict x = scratch, *restrict t = scratch + in, *restrict acc = scratch + in + RT;
    for (int64_t n = 0; n < N; n++) {
        const int64_t s = slots[n];
        if (s <= 0) continue;
        const WTYPE *As = A + s * in * RT;
        const WTYPE *Bs = B + s * RT * out_total;
        if (h_bf16) {
            const uint16_t *hn = (const uint16_t *)h + n * h_stride;
            for (int64_t i = 0; i < in; i++) x[i] = bf16_to_f32(hn[i]);
        } else {
            memcpy(x, (const float *)h + n * h_stride, (size_t)in * sizeof(float));
        }
        for (int64_t j = 0; j < RT; j++) {
            /* t[j] = x . A[j]: 64 independent lanes (four vector accumulators, so the adds overlap),
             * folded in halves: a fixed order, the same for every row and batch. */
            const WTYPE *restrict Aj = As + j * in;
            float lane[64] = {0};
            int64_t i = 0;
            for (; i + 64 <= in; i += 64)
                for (int k = 0; k < 64; k++) lane[k] += x[i + k] * WLOAD(Aj[i + k]);
            for (; i < in; i++) lane[i & 63] += x[i] * WLOAD(Aj[i]);
            for (int w = 32; w >= 1; w >>= 1)
                for (int k = 0; k < w; k++) lane[k] += lane[k + w];
            t[j] = lane[0];
        }
        memset(acc, 0, (size_t)out_total * sizeof(float));
        int64_t off = 0;
        for (int64_t p = 0; p < P; p++) {
            const int64_t op = part_out[p];
            float *restrict a = acc + off;
            int64_t r = 0;
            for (; r + 4 <= R; r += 4) {             /* four rows of B per pass over acc */
                const float t0 = t[p * R + r], t1 = t[p * R + r + 1], t2 = t[p * R + r + 2], t3 = t[p * R + r + 3];
                const WTYPE *restrict B0 = Bs + (p * R + r) * out_total + off;
                const WTYPE *restrict B1 = B0 + out_total, *restrict B2 = B1 + out_total, *restrict B3 = B2 + out_total;
                for (int64_t o = 0; o < op; o++)
                    a[o] += t0 * WLOAD(B0[o]) + t1 * WLOAD(B1[o]) + t2 * WLOAD(B2[o]) + t3 * WLOAD(B3[o]);
            }
            for (; r < R; r++) {
                const float tr = t[p * R + r];
                const WTYPE *restrict Br = Bs + (p * R + r) * out_total + off;
                for (int64_t o = 0; o < op; o++) a[o] += tr * WLOAD(Br[o]);
            }
            off += op;
        }
        if (out_bf16) {
            uint16_t *restrict y = (uint16_t *)out + n * out_stride;
            for (int64_t o = 0; o < out_total; o++) y[o] = f32_to_bf16(bf16_to_f32(y[o]) + acc[o]);
        } else {
            float *restrict y = (float *)out + n * out_stride;
            for (int64_t o = 0; o < out_total; o++) y[o] += acc[o];
        }
    }
    return 0;
}
"""

_ENTRY = r"""
int lora_delta(int64_t N, int64_t in, int64_t R, int64_t P, const int64_t *part_out, int64_t out_total,
               const void *h, int64_t h_stride, int h_bf16, void *out, int64_t out_stride, int out_bf16,
               const void *A, const void *B, int w_bf16, const int64_t *slots, float *scratch) {
    /* scratch: in + R * P + out_total floats, owned by the caller (one buffer per calling thread) */
    if (w_bf16)
        return delta_bf16(N, in, R, P, part_out, out_total, h, h_stride, h_bf16, out, out_stride, out_bf16,
                          (const uint16_t *)A, (const uint16_t *)B, slots, scratch);
    return delta_f32(N, in, R, P, part_out, out_total, h, h_stride, h_bf16, out, out_stride, out_bf16,
                     (const float *)A, (const float *)B, slots, scratch);
}
"""

# Llama's RMSNorm, as transformers computes it: normalised in float32, rounded to the input's type, then
# multiplied by the weight (a bfloat16 product is rounded again). One call instead of seven torch ops.
_RMS = r"""
int rms_norm(int64_t N, int64_t D, const void *x, const void *w, void *out, int bf16, float eps) {
    for (int64_t n = 0; n < N; n++) {
        float lane[64] = {0};
        int64_t i = 0;
        if (bf16) {
            const uint16_t *xn = (const uint16_t *)x + n * D;
            for (; i + 64 <= D; i += 64)
                for (int k = 0; k < 64; k++) { float v = bf16_to_f32(xn[i + k]); lane[k] += v * v; }
            for (; i < D; i++) { float v = bf16_to_f32(xn[i]); lane[i & 63] += v * v; }
        } else {
            const float *xn = (const float *)x + n * D;
            for (; i + 64 <= D; i += 64)
                for (int k = 0; k < 64; k++) lane[k] += xn[i + k] * xn[i + k];
            for (; i < D; i++) lane[i & 63] += xn[i] * xn[i];
        }
        for (int w2 = 32; w2 >= 1; w2 >>= 1)
            for (int k = 0; k < w2; k++) lane[k] += lane[k + w2];
        const float r = 1.0f / sqrtf(lane[0] / (float)D + eps);
        if (bf16) {
            const uint16_t *xn = (const uint16_t *)x + n * D, *wn = (const uint16_t *)w;
            uint16_t *restrict y = (uint16_t *)out + n * D;
            for (int64_t j = 0; j < D; j++)
                y[j] = f32_to_bf16(bf16_to_f32(wn[j]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(xn[j]) * r)));
        } else {
            const float *xn = (const float *)x + n * D, *wn = (const float *)w;
            float *restrict y = (float *)out + n * D;
            for (int64_t j = 0; j < D; j++) y[j] = wn[j] * (xn[j] * r);
        }
    }
    return 0;
}
"""

SOURCE = (_HEADER
          + _BODY.replace("WNAME", "f32").replace("WTYPE", "float").replace("WLOAD(", "(")
          + _BODY.replace("WNAME", "bf16").replace("WTYPE", "uint16_t").replace("WLOAD(", "bf16_to_f32(")
          + _ENTRY + _RMS)

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno"]
KERNEL_DTYPES = (torch.bfloat16, torch.float32)   # what the kernels take for activations


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
        return None
    lib = folder / f"kernels_{_machine_key()}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, tmp_lib = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
        src.write_text(SOURCE)
        try:
            subprocess.run([compiler, *FLAGS, str(src), "-o", str(tmp_lib), "-lm"], check=True, timeout=120,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except (OSError, subprocess.SubprocessError):
            return None
        os.replace(tmp_lib, lib)   # atomic: a concurrent builder finds a whole library or none
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
    from .settings import default_cache_dir
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
        return lib
    except (OSError, AttributeError):
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
