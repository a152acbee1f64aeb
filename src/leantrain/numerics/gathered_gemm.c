/* Native kernel of leantrain.numerics.gathered_gemm (see that module for the exact semantics).
 *
 * out[b][r][n] = fp32 chain over chunks j of fp32(wrap(sum_{t in chunk j} S[b*s_batch + srow[r] + scol[t]]
 *                                                       * V[b*v_batch + vrow[t] + n]))
 * V is read up to the next multiple of the block width past n; those columns are neither stored nor counted
 * (they are zero or finite data of the caller's padded storage).
 * The result, times scale1 then times scale2 (float32 products: the power-of-two rescale of DFP), is stored to
 * out[b*o_batch + orow[r] + ocol[n]], or added to it (accumulate: a scatter-add in order of increasing r for each
 * element, so only one thread may own a batch element).
 *
 * Operands hold integers in float64 with |x| < 2^15, so every product (< 2^30) and every partial sum of a
 * chunk (< T 2^30 < 2^53) is exact in float64 whatever the order of the additions: the chunk sum may be
 * accumulated in any order, vectorised, or with fused multiply-adds. The only order-sensitive arithmetic is
 * the float32 chain across chunks, done one chunk at a time, in chunk order, with plain float32 adds.
 * Compile without -ffast-math (reassociation of the float32 chain would change results).
 *
 * Register blocking: a block of RB rows x (NV x 8) columns keeps its chunk registers (float64) and its float32
 * chain in vector registers; per reduction step it loads NV vectors of V and RB scalars of S.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef int64_t v8di __attribute__((vector_size(64)));

static inline v8d load8(const double *p) {
    v8d r;
    memcpy(&r, p, sizeof r); /* unaligned load */
    return r;
}

/* Slow path of a chunk end, taken only when some register left the range: wrap it modulo 2^acc_bits. */
static int64_t wrap_block(v8d *s, int n, int valid_rows, int nv, int64_t valid_cols, double lo, double hi,
                          double mod) {
    int64_t wrapped = 0;
    for (int i = 0; i < n; ++i) {
        for (int l = 0; l < 8; ++l) {
            double x = s[i][l];
            if (x < lo || x > hi) {
                wrapped += (i / nv) < valid_rows && (i % nv) * 8 + l < valid_cols;
                s[i][l] = x - mod * floor((x - lo) / mod);
            }
        }
    }
    return wrapped;
}

/* The rescale and store of one output row. Contraction is off here: (x * scale1) * scale2 (+ dst) must be the same
 * float32 products and add as the torch path's, not a fused multiply-add. */
__attribute__((noinline, optimize("fp-contract=off"))) static void store_row(float *dst, const int64_t *ocol,
                                                                             const float *src, int64_t n,
                                                                             int accumulate, float scale1,
                                                                             float scale2) {
    if (accumulate) {
        for (int64_t i = 0; i < n; ++i) {
            float y = src[i] * scale1;
            y = y * scale2;
            dst[ocol[i]] = dst[ocol[i]] + y;
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            float y = src[i] * scale1;
            dst[ocol[i]] = y * scale2;
        }
    }
}

#define DEFINE_KERNEL(NAME, RB, NV)                                                                              \
    static int64_t NAME##_body(float *rowbuf, const double *S, int64_t s_batch, const int64_t *srow, const int64_t *scol, const double *V,     \
                 int64_t v_batch, const int64_t *vrow, float *out, int64_t o_batch, const int64_t *orow,          \
                 const int64_t *ocol, int accumulate, float scale1, float scale2, int64_t b0, int64_t b1,          \
                 int64_t r0, int64_t r1, int64_t T, int64_t Vn, int64_t Nout, int64_t chunk, double lo, double hi, \
                 double mod) {                                                                                    \
        int64_t wrapped = 0;                                                                                     \
        for (int64_t b = b0; b < b1; ++b) {                                                                      \
            const double *Sb = S + b * s_batch;                                                                  \
            const double *Vb = V + b * v_batch;                                                                  \
            float *ob = out + b * o_batch;                                                                       \
            for (int64_t r = r0; r < r1; r += RB) {                                                              \
                int nr = r1 - r < RB ? (int)(r1 - r) : RB;                                                       \
                const double *rows[RB];                                                                          \
                for (int q = 0; q < RB; ++q) rows[q] = Sb + srow[q < nr ? r + q : r + nr - 1];                   \
                for (int64_t v = 0; v < Vn; v += 8 * NV) {                                                       \
                    v8f acc[RB * NV];                                                                            \
                    for (int64_t t0 = 0; t0 < T; t0 += chunk) {                                                  \
                        int64_t t1 = t0 + chunk < T ? t0 + chunk : T;                                            \
                        v8d s[RB * NV];                                                                          \
                        for (int i = 0; i < RB * NV; ++i) s[i] = (v8d){0};                                       \
                        for (int64_t t = t0; t < t1; ++t) {                                                      \
                            const double *vr = Vb + vrow[t] + v;                                                 \
                            const int64_t c = scol[t];                                                           \
                            v8d w[NV];                                                                           \
                            for (int k = 0; k < NV; ++k) w[k] = load8(vr + 8 * k);                               \
                            for (int q = 0; q < RB; ++q) {                                                       \
                                const double a = rows[q][c];                                                     \
                                for (int k = 0; k < NV; ++k) s[q * NV + k] += a * w[k];                          \
                            }                                                                                    \
                        }                                                                                        \
                        v8di bad = (s[0] < lo) | (s[0] > hi);                                                    \
                        for (int i = 1; i < RB * NV; ++i) bad |= (s[i] < lo) | (s[i] > hi);                      \
                        int64_t any = 0;                                                                         \
                        for (int l = 0; l < 8; ++l) any |= bad[l];                                               \
                        if (any) wrapped += wrap_block(s, RB * NV, nr, NV, Nout - v, lo, hi, mod);        \
                        if (t0 == 0) {                                                                           \
                            for (int i = 0; i < RB * NV; ++i) acc[i] = __builtin_convertvector(s[i], v8f);       \
                        } else {                                                                                 \
                            for (int i = 0; i < RB * NV; ++i) acc[i] += __builtin_convertvector(s[i], v8f);      \
                        }                                                                                        \
                    }                                                                                            \
                    for (int q = 0; q < RB; ++q)                                                                 \
                        for (int k = 0; k < NV; ++k)                                                             \
                            for (int l = 0; l < 8; ++l) rowbuf[q * Vn + v + 8 * k + l] = acc[q * NV + k][l];     \
                }                                                                                                \
                /* rows stored in increasing r, each element once per row: accumulate adds in row order */      \
                for (int q = 0; q < nr; ++q)                                                                     \
                    store_row(ob + orow[r + q], ocol, rowbuf + q * Vn, Nout, accumulate, scale1, scale2);        \
            }                                                                                                    \
        }                                                                                                        \
        return wrapped;                                                                                          \
    }                                                                                                            \
    /* Work units: one batch element (accumulate: its rows must be added in order by one thread), else one      \
     * register block of rows of one batch element; shared by the OpenMP threads (the runtime torch uses). */    \
    int64_t NAME(const double *S, int64_t s_batch, const int64_t *srow, const int64_t *scol, const double *V,     \
                 int64_t v_batch, const int64_t *vrow, float *out, int64_t o_batch, const int64_t *orow,          \
                 const int64_t *ocol, int accumulate, float scale1, float scale2, int64_t b0, int64_t b1,          \
                 int64_t R, int64_t T, int64_t Vn, int64_t Nout, int64_t chunk, double lo, double hi,              \
                 double mod) {                                                                                    \
        const int64_t nrb = (R + RB - 1) / RB;                                                                   \
        const int64_t per_b = accumulate ? 1 : nrb;                                                             \
        const int64_t units = (b1 - b0) * per_b;                                                                 \
        int64_t wrapped = 0;                                                                                     \
        int failed = 0;                                                                                          \
        _Pragma("omp parallel reduction(+ : wrapped)")                                                           \
        {                                                                                                        \
            float *rowbuf = malloc(sizeof(float) * RB * Vn);                                                     \
            _Pragma("omp for schedule(static)")                                                                  \
            for (int64_t u = 0; u < units; ++u) {                                                                \
                if (!rowbuf) continue;                                                                           \
                int64_t b = b0 + u / per_b;                                                                      \
                int64_t r0 = accumulate ? 0 : (u % per_b) * RB;                                                  \
                int64_t r1 = accumulate ? R : (r0 + RB < R ? r0 + RB : R);                                       \
                wrapped += NAME##_body(rowbuf, S, s_batch, srow, scol, V, v_batch, vrow, out, o_batch, orow,     \
                                       ocol, accumulate, scale1, scale2, b, b + 1, r0, r1, T, Vn, Nout, chunk,   \
                                       lo, hi, mod);                                                             \
            }                                                                                                    \
            if (!rowbuf) {                                                                                       \
                _Pragma("omp atomic write")                                                                      \
                failed = 1;                                                                                      \
            }                                                                                                    \
            free(rowbuf);                                                                                        \
        }                                                                                                        \
        return failed ? -1 : wrapped;                                                                            \
    }

/* Whether this build runs its work units on OpenMP threads (else the caller splits the batch itself). */
int lt_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Narrow V (N <= 8): more rows per block; wide V: two vectors per row. */
DEFINE_KERNEL(lt_gathered_gemm_n8, 12, 1)
DEFINE_KERNEL(lt_gathered_gemm_n16, 6, 2)
