/* C kernels for CPU decode, compiled once per machine by kernels.py (-O3 -march=native -fopenmp).
 *
 * lora_delta  one fused projection group's LoRA delta for a few rows (used by the torch path);
 * rms_norm    Llama's RMSNorm in one call (used by the torch path);
 * decode_step a whole decode step of a Llama-family decoder for B rows: every layer, the final norm
 *             and the LM head in one call and one OpenMP team, so a token costs one Python call
 *             instead of ~35 torch ops per layer. Each row has its own position in its own row of
 *             the KV cache (float32, or bfloat16 for a bfloat16 model) and its own LoRA slot.
 *
 * Numerics follow the torch path: math in float32, and in bfloat16 mode every value the torch path
 * stores as a bfloat16 tensor is rounded to bfloat16 at the same place (the projections' outputs, the
 * residual stream, norms, rotary, silu*mul). A row gets the same arithmetic whatever its batch holds.
 *
 * OpenMP: loaded after torch, this library binds to the libgomp torch already loaded (same soname), so
 * both share one thread team, sized by torch.set_num_threads in the calling thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_DPBF16 1
#endif

#define INLINE static inline __attribute__((always_inline))

INLINE float bf16_to_f32(uint16_t v) {
    uint32_t u = ((uint32_t)v) << 16; float f; memcpy(&f, &u, 4); return f;
}
INLINE uint16_t f32_to_bf16(float f) {            /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;                     /* a NaN stays a NaN */
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}
INLINE float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }
/* element i of a bfloat16 (bf != 0) or float32 array */
INLINE float ld(const void *p, int64_t i, int bf) {
    return bf ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
INLINE void st(void *p, int64_t i, float v, int bf) {
    if (bf) ((uint16_t *)p)[i] = f32_to_bf16(v); else ((float *)p)[i] = v;
}
/* the address of element i of a bfloat16 (bf != 0) or float32 array */
INLINE void *act(void *p, int64_t i, int bf) { return (char *)p + (size_t)i * (bf ? 2 : 4); }

/* e^x to about 2 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n from the
 * exponent bits). Plain arithmetic, so loops over it vectorize; libm's expf is one call per value. */
INLINE float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

int kernels_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Dot product of n elements, x and w each bfloat16 or float32, in 32 float lanes folded in halves: a
 * fixed order that the compiler vectorizes. */
INLINE float dot_lanes(int64_t n, const void *x, int xbf, const void *w, int wbf) {
    float lane[32] = {0};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 32; k++) lane[k] += ld(x, i + k, xbf) * ld(w, i + k, wbf);
    for (; i < n; i++) lane[i & 31] += ld(x, i, xbf) * ld(w, i, wbf);
    for (int h = 16; h >= 1; h >>= 1)
        for (int k = 0; k < h; k++) lane[k] += lane[k + h];
    return lane[0];
}

/* ------------------------------------------------------------------------------------------------
 * lora_delta: for each row n with slot s = slots[n] > 0,
 *   t = A[s] @ h[n]                      A[s]: [RT, in], RT = R * P
 *   out[n, off_p : off_p + out_p] += t[p*R : (p+1)*R] @ B[s][p*R : (p+1)*R, off_p : off_p + out_p]
 * B[s] is [RT, out_total] and block-diagonal: only its diagonal blocks are read.
 * ------------------------------------------------------------------------------------------------ */
INLINE int delta_impl(int64_t N, int64_t in, int64_t R, int64_t P, const int64_t *part_out, int64_t out_total,
                      const void *h, int64_t h_stride, int h_bf16, void *out, int64_t out_stride, int out_bf16,
                      const void *A, const void *B, const int wbf, const int64_t *slots, float *scratch) {
    const int64_t RT = R * P;
    float *restrict x = scratch, *restrict t = scratch + in, *restrict acc = scratch + in + RT;
    for (int64_t n = 0; n < N; n++) {
        const int64_t s = slots[n];
        if (s <= 0) continue;
        const int64_t a0 = s * in * RT, b0 = s * RT * out_total;
        for (int64_t i = 0; i < in; i++) x[i] = ld(h, n * h_stride + i, h_bf16);
        for (int64_t j = 0; j < RT; j++)
            t[j] = dot_lanes(in, x, 0, (const char *)A + (size_t)(a0 + j * in) * (wbf ? 2 : 4), wbf);
        memset(acc, 0, (size_t)out_total * sizeof(float));
        int64_t off = 0;
        for (int64_t p = 0; p < P; p++) {
            const int64_t op = part_out[p];
            float *restrict a = acc + off;
            int64_t r = 0;
            for (; r + 4 <= R; r += 4) {               /* four rows of B per pass over acc */
                const float t0 = t[p * R + r], t1 = t[p * R + r + 1], t2 = t[p * R + r + 2], t3 = t[p * R + r + 3];
                const int64_t r0 = b0 + (p * R + r) * out_total + off;
                for (int64_t o = 0; o < op; o++)
                    a[o] += t0 * ld(B, r0 + o, wbf) + t1 * ld(B, r0 + out_total + o, wbf)
                          + t2 * ld(B, r0 + 2 * out_total + o, wbf) + t3 * ld(B, r0 + 3 * out_total + o, wbf);
            }
            for (; r < R; r++) {
                const float tr = t[p * R + r];
                const int64_t r0 = b0 + (p * R + r) * out_total + off;
                for (int64_t o = 0; o < op; o++) a[o] += tr * ld(B, r0 + o, wbf);
            }
            off += op;
        }
        for (int64_t o = 0; o < out_total; o++)
            st(out, n * out_stride + o, ld(out, n * out_stride + o, out_bf16) + acc[o], out_bf16);
    }
    return 0;
}

int lora_delta(int64_t N, int64_t in, int64_t R, int64_t P, const int64_t *part_out, int64_t out_total,
               const void *h, int64_t h_stride, int h_bf16, void *out, int64_t out_stride, int out_bf16,
               const void *A, const void *B, int w_bf16, const int64_t *slots, float *scratch) {
    /* scratch: in + R * P + out_total floats, owned by the caller (one buffer per calling thread).
     * Constant flags let the compiler specialize the usual case: activations of the weights' type. */
    if (w_bf16 && h_bf16 && out_bf16)
        return delta_impl(N, in, R, P, part_out, out_total, h, h_stride, 1, out, out_stride, 1, A, B, 1, slots, scratch);
    if (!w_bf16 && !h_bf16 && !out_bf16)
        return delta_impl(N, in, R, P, part_out, out_total, h, h_stride, 0, out, out_stride, 0, A, B, 0, slots, scratch);
    return delta_impl(N, in, R, P, part_out, out_total, h, h_stride, h_bf16, out, out_stride, out_bf16, A, B, w_bf16,
                      slots, scratch);
}

/* ------------------------------------------------------------------------------------------------
 * RMSNorm as transformers computes it: normalised in float32, rounded to the input's type, then
 * multiplied by the weight (a bfloat16 product is rounded again).
 * ------------------------------------------------------------------------------------------------ */
INLINE float sum_squares(int64_t D, const void *x, int xbf) {
    float lane[64] = {0};
    int64_t i = 0;
    for (; i + 64 <= D; i += 64)
        for (int k = 0; k < 64; k++) { float v = ld(x, i + k, xbf); lane[k] += v * v; }
    for (; i < D; i++) { float v = ld(x, i, xbf); lane[i & 63] += v * v; }
    for (int w = 32; w >= 1; w >>= 1)
        for (int k = 0; k < w; k++) lane[k] += lane[k + w];
    return lane[0];
}

/* out[0:D] = norm(x[0:D]) * w; x and out of type xbf/obf, w and the rounding of type bf */
INLINE void rms_row(int64_t D, const void *x, int xbf, const void *w, void *out, int bf, float eps) {
    const float r = 1.0f / sqrtf(sum_squares(D, x, xbf) / (float)D + eps);
    if (bf) {
        for (int64_t j = 0; j < D; j++)
            ((uint16_t *)out)[j] = f32_to_bf16(ld(w, j, 1) * round_bf16(ld(x, j, xbf) * r));
    } else {
        for (int64_t j = 0; j < D; j++) ((float *)out)[j] = ld(w, j, 0) * (ld(x, j, xbf) * r);
    }
}

/* The residual stream x += add (rounded like the model's dtype; no add when add is NULL), then
 * out = norm(x) * w: the step's seam between sublayers. */
INLINE void add_norm(int64_t D, float *x, const float *add, const void *w, void *out, int bf, float eps) {
    if (add)
        for (int64_t i = 0; i < D; i++) x[i] = bf ? round_bf16(x[i] + add[i]) : x[i] + add[i];
    rms_row(D, x, 0, w, out, bf, eps);
}

int rms_norm(int64_t N, int64_t D, const void *x, const void *w, void *out, int bf16, float eps) {
    for (int64_t n = 0; n < N; n++) {
        if (bf16) rms_row(D, (const uint16_t *)x + n * D, 1, w, (uint16_t *)out + n * D, 1, eps);
        else rms_row(D, (const float *)x + n * D, 0, w, (float *)out + n * D, 0, eps);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * decode_step
 * ------------------------------------------------------------------------------------------------ */

/* params[]: the model's dimensions and modes */
enum { P_HIDDEN, P_HEADS, P_KV_HEADS, P_HEAD_DIM, P_INTER, P_LAYERS, P_VOCAB, P_CAP, P_RANK, P_MAX_ROWS,
       P_BF16, P_LORA_BF16, P_KV_BF16, P_COUNT };
/* table[]: per layer, these addresses (0 where absent). Projection groups: 0 qkv, 1 o, 2 gate|up, 3 down. */
enum { T_NORM1, T_NORM2, T_QNORM, T_KNORM, T_W, T_BIAS = T_W + 4, T_LORA_A = T_BIAS + 4, T_LORA_B = T_LORA_A + 4,
       T_KCACHE = T_LORA_B + 4, T_VCACHE, T_COUNT };

int decode_params_count(void) { return P_COUNT; }
int decode_table_count(void) { return T_COUNT; }

INLINE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Scratch floats the step needs for max_rows rows, laid out as in decode_step. */
int64_t decode_scratch_floats(const int64_t *p) {
    const int64_t M = p[P_MAX_ROWS], hid = p[P_HIDDEN], HD = p[P_HEAD_DIM], I = p[P_INTER];
    const int64_t nqkv = (p[P_HEADS] + 2 * p[P_KV_HEADS]) * HD;
    const int64_t max_in = max64(max64(hid, p[P_HEADS] * HD), I);
    return M * (hid + max_in + nqkv + 2 * I + hid + 3 * p[P_RANK]);
}

/* s[k] = x[k] . w for nb rows of x (n elements each, rows n apart), of bf16 or float32 type bf. */
INLINE void dot_rows(const int nb, int64_t n, const void *x, const void *w, const int bf, float *s,
                     const uint16_t *pf) {
#ifdef HAVE_DPBF16
    if (bf) {
        const uint16_t *xw = (const uint16_t *)x, *ww = (const uint16_t *)w;
        __m512 acc0[4], acc1[4];
        for (int k = 0; k < nb; k++) { acc0[k] = _mm512_setzero_ps(); acc1[k] = _mm512_setzero_ps(); }
        int64_t i = 0;
        for (; i + 64 <= n; i += 64) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(ww + i), w1 = (__m512bh)_mm512_loadu_si512(ww + i + 32);
            if (pf) {
                _mm_prefetch((const char *)(pf + i), _MM_HINT_T0);
                _mm_prefetch((const char *)(pf + i + 32), _MM_HINT_T0);
            }
            for (int k = 0; k < nb; k++) {
                acc0[k] = _mm512_dpbf16_ps(acc0[k], (__m512bh)_mm512_loadu_si512(xw + k * n + i), w0);
                acc1[k] = _mm512_dpbf16_ps(acc1[k], (__m512bh)_mm512_loadu_si512(xw + k * n + i + 32), w1);
            }
        }
        for (; i < n; i += 32) {
            const __mmask32 m = (n - i >= 32) ? (__mmask32)0xffffffffu : (__mmask32)((1u << (n - i)) - 1u);
            const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, ww + i);
            for (int k = 0; k < nb; k++)
                acc0[k] = _mm512_dpbf16_ps(acc0[k], (__m512bh)_mm512_maskz_loadu_epi16(m, xw + k * n + i), w0);
        }
        for (int k = 0; k < nb; k++) s[k] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[k], acc1[k]));
        return;
    }
#endif
    (void)pf;
    for (int k = 0; k < nb; k++)
        s[k] = bf ? dot_lanes(n, (const uint16_t *)x + k * n, 1, w, 1) : dot_lanes(n, (const float *)x + k * n, 0, w, 0);
}

/* y[b, j] = x[b] . W[j] + bias[j] for b < B, j < n_out, stored as float32 (rounded to bf16 in bf16 mode).
 * x: B dense rows of n_in activations (bf16 or float32, like the weights). Output rows are split
 * between the team's threads; each weight row is read once for up to 4 rows of x. */
enum { PREFETCH_ROWS = 8 };

static void gemv(int64_t B, int64_t n_in, int64_t n_out, const void *x, const void *W, const void *bias, int bf,
                 float *y, int64_t y_stride) {
    const size_t es = bf ? 2 : 4;
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n_out; j++) {
        const char *wj = (const char *)W + (size_t)j * n_in * es;
        const float bj = bias ? ld(bias, j, bf) : 0.0f;
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
            const int nb = (int)(B - b0 < 4 ? B - b0 : 4);
            const char *xb = (const char *)x + (size_t)b0 * n_in * es;
            float s[4];
            /* One row of x streams weights as fast as the hardware prefetcher does; several make each
             * weight row take longer than it detects, so they fetch the row PREFETCH_ROWS ahead. */
            const uint16_t *pf = (B > 1 && b0 == 0) ? (const uint16_t *)wj + PREFETCH_ROWS * n_in : NULL;
            if (bf) {
                switch (nb) {
                case 1: dot_rows(1, n_in, xb, wj, 1, s, pf); break;
                case 2: dot_rows(2, n_in, xb, wj, 1, s, pf); break;
                case 3: dot_rows(3, n_in, xb, wj, 1, s, pf); break;
                default: dot_rows(4, n_in, xb, wj, 1, s, pf);
                }
            } else {
                for (int k = 0; k < nb; k++) dot_rows(1, n_in, xb + (size_t)k * n_in * es, wj, 0, s + k, NULL);
            }
            for (int k = 0; k < nb; k++) {
                const float v = s[k] + bj;
                y[(b0 + k) * y_stride + j] = bf ? round_bf16(v) : v;
            }
        }
    }
}

/* A row b's LoRA delta for one projection group, with its adapter (slots[b] > 0), in two halves:
 * lora_down  t[b] = A[s] x[b]                    A: [S, R*P, n_in]
 * lora_up    y[b] += t[b] Bt[s]                  Bt: [S, R*P, n_out], block-diagonal: part p's rows of
 *                                                 t only feed part p's columns, so only those are read.
 * lora_down needs only the projection's input: it runs before the projection, without a barrier of
 * its own (the projection's covers it). */
static void lora_down(int64_t B, int64_t n_in, int64_t RT, const void *x, int bf, const void *A, int lbf,
                      const int64_t *slots, float *t) {
    const size_t xes = bf ? 2 : 4;
#pragma omp for schedule(static) nowait
    for (int64_t idx = 0; idx < B * RT; idx++) {
        const int64_t b = idx / RT, j = idx % RT, s = slots[b];
        if (s <= 0) continue;
        const void *a = (const char *)A + (size_t)((s * RT + j) * n_in) * (lbf ? 2 : 4);
        const void *xb = (const char *)x + (size_t)b * n_in * xes;
        if (bf && lbf) dot_rows(1, n_in, xb, a, 1, t + idx, NULL);
        else t[idx] = dot_lanes(n_in, xb, bf, a, lbf);
    }
}

enum { LORA_COLS = 256 };

static void lora_up(int64_t B, int64_t R, int P, const int64_t *part_out, int64_t n_out, int bf, float *y,
                    const void *Bt, int lbf, const int64_t *slots, const float *t) {
    const int64_t RT = R * P;
    /* blocks of up to LORA_COLS columns, each inside one part: R row segments of Bt each, long enough
     * to be read as streams rather than R scattered cache lines */
    int64_t blocks = 0;
    for (int p = 0; p < P; p++) blocks += (part_out[p] + LORA_COLS - 1) / LORA_COLS;
#pragma omp for schedule(static)
    for (int64_t idx = 0; idx < B * blocks; idx++) {
        const int64_t b = idx / blocks, s = slots[b];
        if (s <= 0) continue;
        int64_t blk = idx % blocks, off = 0;
        int p = 0;
        while (blk >= (part_out[p] + LORA_COLS - 1) / LORA_COLS) {
            blk -= (part_out[p] + LORA_COLS - 1) / LORA_COLS;
            off += part_out[p];
            p++;
        }
        const int64_t o0 = off + blk * LORA_COLS;
        const int64_t len = (off + part_out[p] - o0) < LORA_COLS ? (off + part_out[p] - o0) : LORA_COLS;
        float acc[LORA_COLS] = {0};
        for (int64_t r = 0; r < R; r++) {
            const float tr = t[b * RT + p * R + r];
            const int64_t row = (s * RT + p * R + r) * n_out + o0;
            for (int64_t o = 0; o < len; o++) acc[o] += tr * ld(Bt, row + o, lbf);
        }
        float *yb = y + b * n_out + o0;
        for (int64_t o = 0; o < len; o++) yb[o] = bf ? round_bf16(yb[o] + acc[o]) : yb[o] + acc[o];
    }
}

/* What a step's projections need to add each row's LoRA delta (lora == 0: no row has an adapter). */
typedef struct { int lora, lbf; int64_t R; const int64_t *slots; float *t; } Lora;

/* y = x W^T + bias, plus each row's LoRA delta (A, Bt: this group's adapter weights, P parts). */
static void project(int64_t B, int64_t n_in, int P, const int64_t *part_out, int64_t n_out, const void *x, int bf,
                    const void *W, const void *bias, const void *A, const void *Bt, const Lora *lo, float *y) {
    if (lo->lora) lora_down(B, n_in, P * lo->R, x, bf, A, lo->lbf, lo->slots, lo->t);
    gemv(B, n_in, n_out, x, W, bias, bf, y, n_out);
    if (lo->lora) lora_up(B, lo->R, P, part_out, n_out, bf, y, Bt, lo->lbf, lo->slots, lo->t);
}

/* Rotary embedding of one head in place: v*cos + rotate_half(v)*sin, rotate_half(v) = (-v2, v1). */
INLINE void rotate(int64_t HD, float *v, const float *cs, const float *sn, int bf, float *tmp) {
    const int64_t half = HD / 2;
    memcpy(tmp, v, (size_t)HD * sizeof(float));
    for (int64_t d = 0; d < HD; d++) {
        const float other = d < half ? -tmp[d + half] : tmp[d - half];
        v[d] = bf ? round_bf16(round_bf16(tmp[d] * cs[d]) + other * sn[d]) : tmp[d] * cs[d] + other * sn[d];
    }
}

/* In place RMSNorm of one head (Qwen3's q_norm / k_norm), rounded like rms_row. */
INLINE void head_norm(int64_t HD, float *v, const void *w, int bf, float eps) {
    const float r = 1.0f / sqrtf(sum_squares(HD, v, 0) / (float)HD + eps);
    for (int64_t d = 0; d < HD; d++)
        v[d] = bf ? round_bf16(ld(w, d, 1) * round_bf16(v[d] * r)) : ld(w, d, 0) * (v[d] * r);
}

#if defined(__AVX512F__)
/* 16 floats from element i of a bfloat16 (bf != 0) or float32 array */
INLINE __m512 load16(const void *p, int64_t i, int bf) {
    if (bf)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}
#endif

/* Attention of GH query heads that share one KV head, over n cached positions (K, V: [n, HD] float32):
 * o[h] = softmax(q[h].K^T * scale) V, left unnormalised; sums[h] gets the softmax's denominator. K and V
 * are read once for the GH heads; each head's arithmetic is the same whatever GH is. */
INLINE void attend_heads(const int GH, const int kvbf, int64_t HD, int64_t n, const float *q, const void *K,
                         const void *V, float scale, float *scores, float *o, float *sums) {
#if defined(__AVX512F__)
    if (HD % 16 == 0 && HD <= 256) {
        const int64_t nc = HD / 16;
        for (int64_t t = 0; t < n; t++) {
            __m512 acc[4];
            const __m512 k0 = load16(K, t * HD, kvbf);
            for (int h = 0; h < GH; h++) acc[h] = _mm512_mul_ps(_mm512_loadu_ps(q + h * HD), k0);
            for (int64_t c = 1; c < nc; c++) {
                const __m512 kc = load16(K, t * HD + 16 * c, kvbf);
                for (int h = 0; h < GH; h++) acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * HD + 16 * c), kc, acc[h]);
            }
            for (int h = 0; h < GH; h++) scores[h * n + t] = _mm512_reduce_add_ps(acc[h]) * scale;
        }
    } else
#endif
    {
        for (int h = 0; h < GH; h++)
            for (int64_t t = 0; t < n; t++) {
                float lane[16] = {0};
                int64_t d = 0;
                for (; d + 16 <= HD; d += 16)
                    for (int k = 0; k < 16; k++) lane[k] += q[h * HD + d + k] * ld(K, t * HD + d + k, kvbf);
                for (; d < HD; d++) lane[d & 15] += q[h * HD + d] * ld(K, t * HD + d, kvbf);
                for (int w = 8; w >= 1; w >>= 1)
                    for (int k = 0; k < w; k++) lane[k] += lane[k + w];
                scores[h * n + t] = lane[0] * scale;
            }
    }
    for (int h = 0; h < GH; h++) {
        float *sc = scores + h * n;
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
        for (int64_t t = 0; t < n; t++) sc[t] = exp_approx(sc[t] - mx);
        float lane[16] = {0};             /* the denominator, in 16 lanes (vectorized, fixed order) */
        int64_t t = 0;
        for (; t + 16 <= n; t += 16)
            for (int k = 0; k < 16; k++) lane[k] += sc[t + k];
        for (; t < n; t++) lane[t & 15] += sc[t];
        for (int w = 8; w >= 1; w >>= 1)
            for (int k = 0; k < w; k++) lane[k] += lane[k + w];
        sums[h] = lane[0];
    }
    memset(o, 0, (size_t)(GH * HD) * sizeof(float));
    int64_t d0 = 0;
#if defined(__AVX512F__)
    for (; d0 + 64 <= HD; d0 += 64) {     /* 64 columns of V, widened once per position for all GH heads */
        __m512 acc[4][4];
        for (int h = 0; h < GH; h++)
            for (int c = 0; c < 4; c++) acc[h][c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            __m512 vv[4];
            for (int c = 0; c < 4; c++) vv[c] = load16(V, t * HD + d0 + 16 * c, kvbf);
            for (int h = 0; h < GH; h++) {
                const __m512 w = _mm512_set1_ps(scores[h * n + t]);
                for (int c = 0; c < 4; c++) acc[h][c] = _mm512_fmadd_ps(w, vv[c], acc[h][c]);
            }
        }
        for (int h = 0; h < GH; h++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + h * HD + d0 + 16 * c, acc[h][c]);
    }
#endif
    for (; d0 < HD; d0 += 64) {
        const int64_t dn = HD - d0 < 64 ? HD - d0 : 64;
        for (int64_t t = 0; t < n; t++)
            for (int h = 0; h < GH; h++) {
                const float w = scores[h * n + t];
                float *oh = o + h * HD + d0;
                for (int64_t d = 0; d < dn; d++) oh[d] += w * ld(V, t * HD + d0 + d, kvbf);
            }
    }
}

static void attend_group(int gh, int kvbf, int64_t HD, int64_t n, const float *q, const void *K, const void *V,
                         float scale, float *scores, float *o, float *sums) {
    if (kvbf) {
        switch (gh) {
        case 1: attend_heads(1, 1, HD, n, q, K, V, scale, scores, o, sums); break;
        case 2: attend_heads(2, 1, HD, n, q, K, V, scale, scores, o, sums); break;
        case 3: attend_heads(3, 1, HD, n, q, K, V, scale, scores, o, sums); break;
        default: attend_heads(4, 1, HD, n, q, K, V, scale, scores, o, sums);
        }
    } else {
        switch (gh) {
        case 1: attend_heads(1, 0, HD, n, q, K, V, scale, scores, o, sums); break;
        case 2: attend_heads(2, 0, HD, n, q, K, V, scale, scores, o, sums); break;
        case 3: attend_heads(3, 0, HD, n, q, K, V, scale, scores, o, sums); break;
        default: attend_heads(4, 0, HD, n, q, K, V, scale, scores, o, sums);
        }
    }
}

/* One decode step for rows 0..B-1 of the KV cache: token embeddings emb [B, hidden] (model dtype) at
 * positions pos [B], rotary cos/sin [B, head_dim] (float32), LoRA slots [B] (used when lora != 0).
 * Writes each row's K/V at its position and logits [B, vocab] (float32). Returns 0. */
int decode_step(const int64_t *p, float eps, float scale, const int64_t *table, const void *final_norm,
                const void *lm_head, int64_t B, const void *emb, const int64_t *pos, const int64_t *slots,
                int lora, const float *cosv, const float *sinv, float *scratch, float *logits) {
    const int64_t hid = p[P_HIDDEN], H = p[P_HEADS], KH = p[P_KV_HEADS], HD = p[P_HEAD_DIM], I = p[P_INTER];
    const int64_t L = p[P_LAYERS], V = p[P_VOCAB], cap = p[P_CAP], R = p[P_RANK], M = p[P_MAX_ROWS];
    const int bf = (int)p[P_BF16], lbf = (int)p[P_LORA_BF16], kvbf = (int)p[P_KV_BF16];
    const int64_t nqkv = (H + 2 * KH) * HD, group = H / KH;
    const int64_t max_in = max64(max64(hid, H * HD), I);
    const int64_t parts_qkv[3] = {H * HD, KH * HD, KH * HD}, parts_o[1] = {hid}, parts_gu[2] = {I, I},
                  parts_d[1] = {hid};
    float *X = scratch;                        /* residual stream [B, hid] */
    void *IN = X + M * hid;                    /* the next projection's input [B, n_in], model dtype */
    float *QKV = (float *)IN + M * max_in;     /* [B, nqkv] */
    float *GU = QKV + M * nqkv;                /* [B, 2I] */
    float *OUT = GU + M * 2 * I;               /* o_proj / down_proj output [B, hid] */
    const Lora lo = {lora, lbf, R, slots, OUT + M * hid};   /* LoRA intermediates t: [B, 3R] */
    enum { GQ = 4 };                                 /* query heads per attention item, at most */
    const int64_t chunks = (group + GQ - 1) / GQ;      /* items per KV head */
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = max64(longest, pos[b] + 1);
    if (B > M || longest > cap) return 1;

#pragma omp parallel
    {
        float *scores = malloc((size_t)(longest * GQ) * sizeof(float));
        float *attn_out = malloc((size_t)(HD * GQ) * sizeof(float));
        float *tmp = malloc((size_t)HD * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * hid; i++) X[i] = ld(emb, i, bf);

        for (int64_t l = 0; l < L; l++) {
            const int64_t *tb = table + l * T_COUNT;
            const void *Wt[4], *Bs[4], *LA[4], *LB[4];
            for (int g = 0; g < 4; g++) {
                Wt[g] = (const void *)tb[T_W + g]; Bs[g] = (const void *)tb[T_BIAS + g];
                LA[g] = (const void *)tb[T_LORA_A + g]; LB[g] = (const void *)tb[T_LORA_B + g];
            }
            void *Kc = (void *)tb[T_KCACHE], *Vc = (void *)tb[T_VCACHE];   /* [rows, KH, cap, HD] */
            const void *qn = (const void *)tb[T_QNORM], *kn = (const void *)tb[T_KNORM];

            /* residual add of the previous layer's down_proj, then input norm */
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++)
                add_norm(hid, X + b * hid, l > 0 ? OUT + b * hid : NULL, (const void *)tb[T_NORM1], act(IN, b * hid, bf),
                         bf, eps);
            project(B, hid, 3, parts_qkv, nqkv, IN, bf, Wt[0], Bs[0], LA[0], LB[0], &lo, QKV);

            /* q/k norms (if any) and rotary; k and v into the cache at each row's position */
#pragma omp for schedule(static)
            for (int64_t idx = 0; idx < B * (H + 2 * KH); idx++) {
                const int64_t b = idx / (H + 2 * KH), hh = idx % (H + 2 * KH);
                float *v = QKV + b * nqkv + hh * HD;
                const float *cs = cosv + b * HD, *sn = sinv + b * HD;
                if (hh < H + KH) {
                    const void *nw = hh < H ? qn : kn;
                    if (nw) head_norm(HD, v, nw, bf, eps);
                    rotate(HD, v, cs, sn, bf, tmp);
                }
                if (hh >= H) {
                    const int64_t g = hh < H + KH ? hh - H : hh - H - KH;
                    void *dst = hh < H + KH ? Kc : Vc;
                    const int64_t at = ((b * KH + g) * cap + pos[b]) * HD;
                    for (int64_t d = 0; d < HD; d++) st(dst, at + d, v[d], kvbf);
                }
            }
            /* attention over each row's positions 0..pos[b], for chunks of up to GQ heads sharing a KV head */
#pragma omp for schedule(static)
            for (int64_t idx = 0; idx < B * KH * chunks; idx++) {
                const int64_t b = idx / (KH * chunks), g = (idx / chunks) % KH, h0 = g * group + (idx % chunks) * GQ;
                const int gh = (int)(group - (h0 - g * group) < GQ ? group - (h0 - g * group) : GQ);
                const size_t head = (size_t)((b * KH + g) * cap * HD) * (kvbf ? 2 : 4);
                float sums[GQ];
                attend_group(gh, kvbf, HD, pos[b] + 1, QKV + b * nqkv + h0 * HD, (const char *)Kc + head,
                             (const char *)Vc + head, scale, scores, attn_out, sums);
                for (int h = 0; h < gh; h++)
                    for (int64_t d = 0; d < HD; d++)
                        st(IN, b * H * HD + (h0 + h) * HD + d, attn_out[h * HD + d] * (1.0f / sums[h]), bf);
            }
            project(B, H * HD, 1, parts_o, hid, IN, bf, Wt[1], Bs[1], LA[1], LB[1], &lo, OUT);

            /* residual add of o_proj, then post-attention norm */
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++)
                add_norm(hid, X + b * hid, OUT + b * hid, (const void *)tb[T_NORM2], act(IN, b * hid, bf), bf, eps);
            project(B, hid, 2, parts_gu, 2 * I, IN, bf, Wt[2], Bs[2], LA[2], LB[2], &lo, GU);

            /* silu(gate) * up, one row per iteration (a loop the compiler vectorizes) */
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                const float *g = GU + b * 2 * I, *u = g + I;
                if (bf) {
                    uint16_t *m = (uint16_t *)IN + b * I;
                    for (int64_t i = 0; i < I; i++) m[i] = f32_to_bf16(round_bf16(g[i] / (1.0f + exp_approx(-g[i]))) * u[i]);
                } else {
                    float *m = (float *)IN + b * I;
                    for (int64_t i = 0; i < I; i++) m[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
                }
            }
            project(B, I, 1, parts_d, hid, IN, bf, Wt[3], Bs[3], LA[3], LB[3], &lo, OUT);
        }

#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++)
            add_norm(hid, X + b * hid, OUT + b * hid, final_norm, act(IN, b * hid, bf), bf, eps);
        gemv(B, hid, V, IN, lm_head, NULL, bf, logits, V);
        free(scores);
        free(attn_out);
        free(tmp);
    }
    return 0;
}
