/* Native kernels of leantrain.numerics.gathered_gemm (see that module for the exact semantics).
 *
 * out[b][r][n] = fp32 chain over chunks j of fp32(wrap(sum_{t in chunk j} S[b*s_batch + srow[r] + scol[t]]
 *                                                       * V[b*v_batch + vrow[t] + n]))
 * V is read up to the next multiple of the block width past n; those columns are neither stored nor counted
 * (they are zero or finite data of the caller's padded storage).
 * The result, times scale1 then times scale2 (float32 products: the power-of-two rescale of DFP), is stored to
 * out[b*o_batch + orow[r] + ocol[n]], or added to it (accumulate: a scatter-add in order of increasing r for each
 * element, so only one thread may own a batch element).
 *
 * Two register models, the same results:
 * - float64 ("counting"): operands are integers with |x| < 2^15, so every product (< 2^30) and every partial sum
 *   of a chunk (< T 2^30 < 2^53) is exact in float64 in any order (vectorised, fused multiply-adds). A chunk sum
 *   outside the register's range is wrapped modulo 2^acc_bits and counted.
 * - int32 ("wrapping", acc_bits <= 32, the pair kernel below): int16 operands, two's-complement int32 arithmetic
 *   is the register itself: each pair of products is exact in 32 bits and the additions wrap modulo 2^32, which
 *   is associative, so the lanes may add in any order; a narrower register is the sign extension of the low
 *   acc_bits bits. Nothing is counted.
 * The only order-sensitive arithmetic is the float32 chain across chunks, done one chunk at a time, in chunk
 * order, with plain float32 adds (int -> float conversion rounds to nearest even in both models). Compile without
 * -ffast-math: reassociating the chain would change results.
 *
 * Register blocking: a block of RB rows x (NV vectors) columns keeps its chunk registers and its float32 chain in
 * vector registers; per reduction step it loads NV vectors of V and RB scalars of S.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef int64_t v8di __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16f __attribute__((vector_size(64)));

/* The rescale and store of one output row. Contraction is off here: (x * scale1) * scale2 (+ dst) must be the same
 * float32 products and add as the torch path's, not a fused multiply-add. */
__attribute__((noinline, optimize("fp-contract=off"))) static void store_row(float *dst, const int64_t *ocol,
                                                                             const float *src, int64_t n,
                                                                             int accumulate, float scale1,
                                                                             float scale2) {
    int64_t i = 0;
    /* runs of 8 consecutive addresses (a convolution's output row): vector loads and stores, same arithmetic */
    for (; i + 8 <= n; i += 8) {
        int contiguous = 1;
        for (int l = 1; l < 8; ++l) contiguous &= ocol[i + l] - ocol[i] == l;
        if (contiguous) {
            v8f y, d;
            memcpy(&y, src + i, sizeof y);
            y = y * scale1;
            y = y * scale2;
            if (accumulate) {
                memcpy(&d, dst + ocol[i], sizeof d);
                y = d + y;
            }
            memcpy(dst + ocol[i], &y, sizeof y);
        } else {
            for (int l = 0; l < 8; ++l) {
                float y = src[i + l] * scale1;
                y = y * scale2;
                dst[ocol[i + l]] = accumulate ? dst[ocol[i + l]] + y : y;
            }
        }
    }
    for (; i < n; ++i) {
        float y = src[i] * scale1;
        y = y * scale2;
        dst[ocol[i]] = accumulate ? dst[ocol[i]] + y : y;
    }
}

/* Slow path of a float64 chunk end, taken only when some register left the range: wrap modulo 2^acc_bits. */
__attribute__((noinline)) static int64_t wrap_block(v8d *s, int n, int valid_rows, int nv, int64_t valid_cols,
                                                    double lo, double hi, double mod) {
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

/* Arguments shared by the kernels (Python passes them in this order). */
#define KERNEL_ARGS(STYPE)                                                                                       \
    const STYPE *S, int64_t s_batch, const int64_t *srow, const int64_t *scol, const STYPE *V, int64_t v_batch,   \
        const int64_t *vrow, float *out, int64_t o_batch, const int64_t *orow, const int64_t *ocol,              \
        int accumulate, float scale1, float scale2
#define KERNEL_PASS S, s_batch, srow, scol, V, v_batch, vrow, out, o_batch, orow, ocol, accumulate, scale1, scale2

/* float64 register block: RB rows x NV vectors of 8 columns, counting wrapped registers. */
#define DEFINE_F64_BODY(NAME, RB, NV)                                                                            \
    static int64_t NAME(float *rowbuf, KERNEL_ARGS(double), int64_t b, int64_t r0, int64_t r1, int64_t T,        \
                        int64_t Vn, int64_t Nout, int64_t chunk, double lo, double hi, double mod) {             \
        int64_t wrapped = 0;                                                                                     \
        const double *Sb = S + b * s_batch;                                                                      \
        const double *Vb = V + b * v_batch;                                                                      \
        for (int64_t r = r0; r < r1; r += RB) {                                                                  \
            int nr = r1 - r < RB ? (int)(r1 - r) : RB;                                                           \
            const double *rows[RB];                                                                              \
            for (int q = 0; q < RB; ++q) rows[q] = Sb + srow[q < nr ? r + q : r + nr - 1];                       \
            for (int64_t v = 0; v < Vn; v += 8 * NV) {                                                           \
                v8f acc[RB * NV];                                                                                \
                for (int64_t t0 = 0; t0 < T; t0 += chunk) {                                                      \
                    int64_t t1 = t0 + chunk < T ? t0 + chunk : T;                                                \
                    v8d s[RB * NV];                                                                              \
                    for (int i = 0; i < RB * NV; ++i) s[i] = (v8d){0};                                           \
                    for (int64_t t = t0; t < t1; ++t) {                                                          \
                        const double *vr = Vb + vrow[t] + v;                                                     \
                        const int64_t c = scol[t];                                                               \
                        v8d w[NV];                                                                               \
                        for (int k = 0; k < NV; ++k) memcpy(&w[k], vr + 8 * k, sizeof w[k]);                     \
                        for (int q = 0; q < RB; ++q) {                                                           \
                            const double a = rows[q][c];                                                         \
                            for (int k = 0; k < NV; ++k) s[q * NV + k] += a * w[k];                              \
                        }                                                                                        \
                    }                                                                                            \
                    v8di bad = (s[0] < lo) | (s[0] > hi);                                                        \
                    for (int i = 1; i < RB * NV; ++i) bad |= (s[i] < lo) | (s[i] > hi);                          \
                    int64_t lanes[8];                                                                            \
                    memcpy(lanes, &bad, sizeof lanes);                                                           \
                    if (lanes[0] | lanes[1] | lanes[2] | lanes[3] | lanes[4] | lanes[5] | lanes[6] | lanes[7]) { \
                        v8d tmp[RB * NV]; /* a copy, so that s itself can stay in registers */                  \
                        memcpy(tmp, s, sizeof tmp);                                                              \
                        wrapped += wrap_block(tmp, RB * NV, nr, NV, Nout - v, lo, hi, mod);                      \
                        memcpy(s, tmp, sizeof tmp);                                                              \
                    }                                                                                            \
                    if (t0 == 0) {                                                                               \
                        for (int i = 0; i < RB * NV; ++i) acc[i] = __builtin_convertvector(s[i], v8f);           \
                    } else {                                                                                     \
                        for (int i = 0; i < RB * NV; ++i) acc[i] += __builtin_convertvector(s[i], v8f);          \
                    }                                                                                            \
                }                                                                                                \
                for (int i = 0; i < RB * NV; ++i)                                                                \
                    memcpy(rowbuf + (i / NV) * Vn + v + 8 * (i % NV), &acc[i], sizeof acc[i]);                   \
            }                                                                                                    \
            /* rows stored in increasing r, each element once per row: accumulate adds in row order */          \
            for (int q = 0; q < nr; ++q)                                                                         \
                store_row(out + b * o_batch + orow[r + q], ocol, rowbuf + q * Vn, Nout, accumulate, scale1,      \
                          scale2);                                                                               \
        }                                                                                                        \
        return wrapped;                                                                                          \
    }

/* The exported driver: work units are one batch element (accumulate: its rows must be added in order by one
 * thread), else one register block of rows of one batch element, shared by the OpenMP threads (the runtime torch
 * uses, see the Python module). Returns the wrapped-register count, or -1 if a row buffer could not be allocated. */
#define DEFINE_DRIVER(NAME, BODY, STYPE, RB, EXTRA_PARAMS, EXTRA_PASS)                                           \
    int64_t NAME(KERNEL_ARGS(STYPE), int64_t b0, int64_t b1, int64_t R, int64_t T, int64_t Vn, int64_t Nout,     \
                 int64_t chunk EXTRA_PARAMS) {                                                                   \
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
                wrapped += BODY(rowbuf, KERNEL_PASS, b, r0, r1, T, Vn, Nout, chunk EXTRA_PASS);                  \
            }                                                                                                    \
            if (!rowbuf) {                                                                                       \
                _Pragma("omp atomic write")                                                                      \
                failed = 1;                                                                                      \
            }                                                                                                    \
            free(rowbuf);                                                                                        \
        }                                                                                                        \
        return failed ? -1 : wrapped;                                                                            \
    }

#define F64_PARAMS , double lo, double hi, double mod
#define F64_PASS , lo, hi, mod

/* Narrow V (N <= 8): more rows per block; wide V: two vectors per row. */
DEFINE_F64_BODY(f64_n8_body, 12, 1)
DEFINE_F64_BODY(f64_n16_body, 6, 2)
DEFINE_DRIVER(lt_gathered_gemm_n8, f64_n8_body, double, 12, F64_PARAMS, F64_PASS)
DEFINE_DRIVER(lt_gathered_gemm_n16, f64_n16_body, double, 6, F64_PARAMS, F64_PASS)

/* ---------------------------------------------------------------------------------------------------------------
 * Pair kernel (the wrapping register model on int16 operands, used on every unrecorded step):
 *
 * out[b][r][n] = fp32 chain over chunks j of fp32(sext(sum_{p in chunk j} S[b*s_batch + srow[r] + sca[p]] * VP[p][n][0]
 *                                                                    + S[b*s_batch + srow[r] + scb[p]] * VP[p][n][1]))
 *
 * The caller (gathered_gemm.py) lays the reduction out in pairs: chunk j holds pairs j*cp .. j*cp + cp - 1 and pair p
 * covers the reduction indices (ta, tb) of one chunk, tb absent (VP[p][n][1] = 0, scb[p] = sca[p]) when a chunk has
 * an odd length. VP holds the second operand as int16 pairs (VP[b*v_batch + (p*Vn + n)*2 + {0, 1}]), S the gathered
 * operand as int16. Operands are integers with |x| < 2^15, so a pair's two products sum exactly in int32 (each is
 * at most (2^15 - 1)^2 = 2^30 - 2^16 + 1, the pair below 2^31); the chunk register then adds pairs modulo 2^32
 * (two's complement, associative: the order of the additions does not matter) and a narrower register is the sign
 * extension of its low acc_bits bits (shift = 32 - acc_bits). This is the same register value as the exact chunk
 * sum wrapped into [-2^(acc_bits-1), 2^(acc_bits-1) - 1]. The register is converted to float32 (round to nearest
 * even) and the chunks are chained with float32 adds in chunk order, exactly as in the float64 kernels above.
 *
 * One pair is one instruction where the CPU has it: VPMADDWD (AVX2, AVX-512BW: the two int16 products of each
 * 32-bit lane summed into int32) or VPDPWSSD (AVX-512 VNNI: the same plus the register add, without saturation).
 * Portable vector code computes the same integers elsewhere.
 */
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define PAIR_LANES 16
typedef __m512i ivec;
typedef __m512 fvec;
#define IV_ZERO() _mm512_setzero_si512()
#define IV_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define IV_SET1(x) _mm512_set1_epi32(x)
#if defined(__AVX512VNNI__)
#define IV_DOT(acc, w, a) _mm512_dpwssd_epi32((acc), (w), (a))
#else
#define IV_DOT(acc, w, a) _mm512_add_epi32((acc), _mm512_madd_epi16((w), (a)))
#endif
#define IV_MADD(w, a) _mm512_madd_epi16((w), (a))
#define IV_SEXT(x, sh) _mm512_sra_epi32(_mm512_sll_epi32((x), _mm_cvtsi32_si128(sh)), _mm_cvtsi32_si128(sh))
#define FV_CVT(x) _mm512_cvtepi32_ps(x)
#define FV_ADD(a, b) _mm512_add_ps((a), (b))
#define FV_STORE(p, x) _mm512_storeu_ps((p), (x))
#elif defined(__AVX2__)
#include <immintrin.h>
#define PAIR_LANES 8
typedef __m256i ivec;
typedef __m256 fvec;
#define IV_ZERO() _mm256_setzero_si256()
#define IV_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define IV_SET1(x) _mm256_set1_epi32(x)
#define IV_DOT(acc, w, a) _mm256_add_epi32((acc), _mm256_madd_epi16((w), (a)))
#define IV_MADD(w, a) _mm256_madd_epi16((w), (a))
#define IV_SEXT(x, sh) _mm256_sra_epi32(_mm256_sll_epi32((x), _mm_cvtsi32_si128(sh)), _mm_cvtsi32_si128(sh))
#define FV_CVT(x) _mm256_cvtepi32_ps(x)
#define FV_ADD(a, b) _mm256_add_ps((a), (b))
#define FV_STORE(p, x) _mm256_storeu_ps((p), (x))
#else
#define PAIR_LANES 8
typedef int16_t v16s __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef v8i ivec;
typedef v8f fvec;
static inline ivec pair_madd(ivec w, ivec a) {
    v16s ws = (v16s)w, as = (v16s)a;
    v8u even = (v8u)__builtin_convertvector(__builtin_shufflevector(ws, ws, 0, 2, 4, 6, 8, 10, 12, 14), v8i);
    v8u odd = (v8u)__builtin_convertvector(__builtin_shufflevector(ws, ws, 1, 3, 5, 7, 9, 11, 13, 15), v8i);
    v8u ae = (v8u)__builtin_convertvector(__builtin_shufflevector(as, as, 0, 2, 4, 6, 8, 10, 12, 14), v8i);
    v8u ao = (v8u)__builtin_convertvector(__builtin_shufflevector(as, as, 1, 3, 5, 7, 9, 11, 13, 15), v8i);
    return (ivec)(even * ae + odd * ao); /* unsigned: wraps modulo 2^32 like the instruction */
}
static inline ivec iv_load(const int16_t *p) {
    ivec x;
    memcpy(&x, p, sizeof x);
    return x;
}
#define IV_ZERO() ((ivec){0})
#define IV_LOAD(p) iv_load((const int16_t *)(p))
#define IV_SET1(x) ((ivec){0} + (int32_t)(x))
#define IV_DOT(acc, w, a) ((ivec)((v8u)(acc) + (v8u)pair_madd((w), (a))))
#define IV_MADD(w, a) pair_madd((w), (a))
#define IV_SEXT(x, sh) ((ivec)((v8u)(x) << (uint32_t)(sh)) >> (sh))
#define FV_CVT(x) __builtin_convertvector((x), fvec)
#define FV_ADD(a, b) ((a) + (b))
#define FV_STORE(p, x) memcpy((p), &(x), sizeof(x))
#endif

/* The (uint16 a, uint16 b) pair as one 32-bit lane: a in the low half (paired with VP[..][0]), b in the high half. */
static inline int32_t pair_of(int16_t a, int16_t b) {
    return (int32_t)((uint32_t)(uint16_t)a | ((uint32_t)(uint16_t)b << 16));
}

#define PAIR_RB 12
/* One batch element, rows r0..r1: register blocks of PAIR_RB rows x PAIR_LANES columns. */
static void pair_body(float *rowbuf, const int16_t *S, int64_t s_batch, const int64_t *srow, const int64_t *sca,
                      const int64_t *scb, const int16_t *VP, int64_t v_batch, float *out, int64_t o_batch,
                      const int64_t *orow, const int64_t *ocol, int accumulate, float scale1, float scale2, int64_t b,
                      int64_t r0, int64_t r1, int64_t TP, int64_t Vn, int64_t Nout, int64_t cp, int shift) {
    const int16_t *Sb = S + b * s_batch;
    const int16_t *Vb = VP + b * v_batch;
    for (int64_t r = r0; r < r1; r += PAIR_RB) {
        int nr = r1 - r < PAIR_RB ? (int)(r1 - r) : PAIR_RB;
        const int16_t *rows[PAIR_RB];
        for (int q = 0; q < PAIR_RB; ++q) rows[q] = Sb + srow[q < nr ? r + q : r + nr - 1];
        for (int64_t v = 0; v < Vn; v += PAIR_LANES) {
            fvec acc[PAIR_RB];
            if (cp == 1) { /* chunks of one pair (<= 2 products): no register loop */
                for (int64_t p = 0; p < TP; ++p) {
                    const ivec w = IV_LOAD(Vb + (p * Vn + v) * 2);
                    const int64_t ca = sca[p], cb = scb[p];
                    for (int q = 0; q < PAIR_RB; ++q) {
                        ivec reg = IV_MADD(w, IV_SET1(pair_of(rows[q][ca], rows[q][cb])));
                        if (shift) reg = IV_SEXT(reg, shift);
                        fvec f = FV_CVT(reg);
                        acc[q] = p == 0 ? f : FV_ADD(acc[q], f);
                    }
                }
            } else {
                for (int64_t p0 = 0; p0 < TP; p0 += cp) {
                    const int64_t p1 = p0 + cp < TP ? p0 + cp : TP;
                    ivec s[PAIR_RB];
                    for (int q = 0; q < PAIR_RB; ++q) s[q] = IV_ZERO();
                    for (int64_t p = p0; p < p1; ++p) {
                        const ivec w = IV_LOAD(Vb + (p * Vn + v) * 2);
                        const int64_t ca = sca[p], cb = scb[p];
                        for (int q = 0; q < PAIR_RB; ++q)
                            s[q] = IV_DOT(s[q], w, IV_SET1(pair_of(rows[q][ca], rows[q][cb])));
                    }
                    for (int q = 0; q < PAIR_RB; ++q) {
                        ivec reg = s[q];
                        if (shift) reg = IV_SEXT(reg, shift);
                        fvec f = FV_CVT(reg);
                        acc[q] = p0 == 0 ? f : FV_ADD(acc[q], f);
                    }
                }
            }
            for (int q = 0; q < PAIR_RB; ++q) FV_STORE(rowbuf + q * Vn + v, acc[q]);
        }
        for (int q = 0; q < nr; ++q)
            store_row(out + b * o_batch + orow[r + q], ocol, rowbuf + q * Vn, Nout, accumulate, scale1, scale2);
    }
}

/* Driver of the pair kernel: work units as in DEFINE_DRIVER. Returns 0, or -1 if a row buffer could not be
 * allocated. */
int64_t lt_pair_gemm(const int16_t *S, int64_t s_batch, const int64_t *srow, const int64_t *sca, const int64_t *scb,
                     const int16_t *VP, int64_t v_batch, float *out, int64_t o_batch, const int64_t *orow,
                     const int64_t *ocol, int accumulate, float scale1, float scale2, int64_t b0, int64_t b1, int64_t R,
                     int64_t TP, int64_t Vn, int64_t Nout, int64_t cp, int shift) {
    const int64_t nrb = (R + PAIR_RB - 1) / PAIR_RB;
    const int64_t per_b = accumulate ? 1 : nrb;
    const int64_t units = (b1 - b0) * per_b;
    int failed = 0;
#pragma omp parallel
    {
        float *rowbuf = malloc(sizeof(float) * PAIR_RB * Vn);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) {
            if (!rowbuf) continue;
            int64_t b = b0 + u / per_b;
            int64_t r0 = accumulate ? 0 : (u % per_b) * PAIR_RB;
            int64_t r1 = accumulate ? R : (r0 + PAIR_RB < R ? r0 + PAIR_RB : R);
            pair_body(rowbuf, S, s_batch, srow, sca, scb, VP, v_batch, out, o_batch, orow, ocol, accumulate, scale1,
                      scale2, b, r0, r1, TP, Vn, Nout, cp, shift);
        }
        if (!rowbuf) {
#pragma omp atomic write
            failed = 1;
        }
        free(rowbuf);
    }
    return failed ? -1 : 0;
}

/* The pair kernel's column block (the caller pads VP's columns to a multiple of it). */
int lt_pair_lanes(void) { return PAIR_LANES; }

/* Which instructions the pair kernel was built with (reported by the benchmarks). */
const char *lt_pair_isa(void) {
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
    return "AVX-512 VNNI (VPDPWSSD)";
#elif defined(__AVX512BW__) && defined(__AVX512VL__)
    return "AVX-512BW (VPMADDWD)";
#elif defined(__AVX2__)
    return "AVX2 (VPMADDWD)";
#else
    return "portable vector code";
#endif
}

/* Whether this build runs its work units on OpenMP threads (else the caller splits the batch itself). */
int lt_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------------------------------
 * Stochastic rounding of float32 to integers: the native pass of leantrain.numerics.round_to_integer (see there).
 * With a = |x|'s bit pattern and e its exponent field:
 *   e >= 150 (|x| >= 2^23, inf, NaN): unchanged;
 *   e < 127 (|x| < 1): 1 if u_small[j] < |x| (float64) else 0, j counting these elements in order;
 *   else: the low s = 150 - e bits of a are dropped after adding the low s bits of rbits[i] (P(up) = fraction);
 * and the sign of x is put back. rbits and u_small are the caller's draws from its torch.Generator, in the torch
 * path's order, so both paths give the same bits. */
int64_t lt_count_below_one_f32(const float *x, int64_t n) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        count += ((bits & 0x7FFFFFFFu) >> 23) < 127;
    }
    return count;
}

void lt_round_stochastic_f32(const float *x, int64_t n, const int32_t *rbits, const double *u_small, float *out) {
    int64_t j = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        const uint32_t sign = bits & 0x80000000u, a = bits & 0x7FFFFFFFu, e = a >> 23;
        uint32_t r;
        if (e >= 150) {
            r = a;
        } else if (e < 127) {
            float mag;
            memcpy(&mag, &a, sizeof mag);
            r = u_small[j++] < (double)mag ? 0x3F800000u : 0u;
        } else {
            const uint32_t mask = (1u << (150 - e)) - 1u;
            r = (a + ((uint32_t)rbits[i] & mask)) & ~mask;
        }
        r |= sign;
        memcpy(out + i, &r, sizeof r);
    }
}
