/* The CPU decode kernel of weight-only layers, in C (hfcompress/quant/cpu_decode.py builds and
 * loads this through hfcompress/quant/native.py): decode_linear, a 2-, 3- or 4-bit layer for a
 * few rows (decoding) on AVX-512 bfloat16 dot products (and an 8-bit one in float32:
 * decode8_linear, below), reading the layer's own packed codes.
 *
 * y[t, n] = sum over g of (w_scale[g, n] * sum_{k in g} bf16(x[t, k]) (q[n, k] - o)
 *                          + offsets[g, n] * sum_{k in g} bf16(x[t, k]))
 *
 * with o = 2^(bits-1) and the conventions of the AMX kernels (w_scale and offsets [G, N],
 * offsets = (o - z) * s or NULL when symmetric), so for 4 bits the result is theirs up to float32
 * summation order: x rounded to bfloat16 (to nearest even) is the only rounding before the
 * float32 sums. The codes are read as the layer stores them (hfcompress/quant/packing.py): each
 * run of 8 codes in `bits` bytes, code i at bits [bits * i, bits * (i + 1)) of their little-endian
 * word, so for 4 bits byte i holds input 2i in its low nibble and 2i + 1 in its high one. No
 * second copy of the weight.
 *
 * 128 inputs (16 * bits bytes) a step. Each code fills the top bits of a byte's low 7 (bits
 * 7 - bits .. 6) under 0x80, which interleaved with the byte 0x3F (vpunpck{l,h}bw) makes bfloat16
 * 1 + q / 2^bits exactly; four vdpbf16ps multiply those by x, gathered once per call into the
 * order the unpacks produce (exact products, float32 sums). 2^bits sum (1 + q / 2^bits) x -
 * (2^bits + o) sum x is sum (q - o) x; a constant of 1 against q / 2^bits loses far less to
 * float32 cancellation than 128 + q would (on random 4-bit layers: under 1e-6 relative, against
 * 1-4e-6; with 3-bit codes at q / 16, 1-3e-6).
 *
 * - 4 bits: a step is 64 bytes; the low nibbles shifted up 3 and the high ones down 1.
 * - 2 and 3 bits (needs AVX-512 VBMI): each half step, 64 codes in 8 * bits bytes, has its runs
 *   of 8 codes spread one to a 64-bit word (vpermb), from which vpmultishiftqb takes code j's bits
 *   to the top of byte j (a rotation by bits * j - (7 - bits)).
 *
 * Four channels run side by side (independent sums, one load of x for all four), channels split
 * across threads; the codes a few kilobytes on are prefetched. The group size must be a multiple
 * of 128 or cover K (one scale per channel), so that a step lies inside one group, or be 32 or
 * 64, where each 128-bit lane of a step's products lies inside one group and takes its scale. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define LOWBIT_DECODE 1
#define DECODE_CHANNELS 4 /* the sums' reduction below is written for four */
#ifndef DECODE_PREFETCH
#define DECODE_PREFETCH 4096
#endif
#if defined(__AVX512VBMI__)
#define NARROW_DECODE 1
#endif

/* The sums of four channels' vectors: pairs, then quads within each 128-bit lane, then the four
 * lanes. */
static inline __m128 sum_channels(const __m512 total[4]) {
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(total[0], total[1]), _mm512_unpackhi_ps(total[0], total[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(total[2], total[3]), _mm512_unpackhi_ps(total[2], total[3]));
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm_add_ps(_mm_add_ps(_mm512_extractf32x4_ps(s, 0), _mm512_extractf32x4_ps(s, 1)),
                      _mm_add_ps(_mm512_extractf32x4_ps(s, 2), _mm512_extractf32x4_ps(s, 3)));
}

/* The first `rows` (<= 4) values of v to out (out_dtype 2: float32, 1: bfloat16). */
static inline void store_channels(__m128 v, int64_t rows, void *out, int out_dtype) {
    const __mmask8 keep = (__mmask8)((1u << rows) - 1u);
    if (out_dtype == 2) {
        _mm_mask_storeu_ps((float *)out, keep, v);
    } else {
        float f[4];
        _mm_storeu_ps(f, v);
        for (int r = 0; r < rows; r++) ((uint16_t *)out)[r] = float_to_bf16(f[r]);
    }
}

/* Position, in a step's gathered x (4 vectors of 32), of input `off` (0 .. 127) of the step:
 * the vector, then the word within it (8 words from each 16-byte lane of the unpacks). */
static inline int64_t decode_slot(int64_t off, int bits) {
    int64_t v, j;
    if (bits == 4) { /* byte j = off / 2; vector 2 * (high nibble) + unpackhi */
        j = off >> 1;
        v = ((off & 1) << 1) | ((j >> 3) & 1);
    } else { /* half off / 64, byte j within it; vector 2 * half + unpackhi */
        j = off & 63;
        v = ((off >> 6) << 1) | ((j >> 3) & 1);
    }
    return v * 32 + ((j >> 4) << 3) + (j & 7);
}

/* One step's four bfloat16 operands (1 + q / 2^bits, in decode_slot's order) from its codes. */
static inline void step_codes(const uint8_t *p, __mmask64 m, int bits, __m512i w[4]) {
    const __m512i one = _mm512_set1_epi8(0x3F), top = _mm512_set1_epi8((char)0x80);
    const __m512i codes = _mm512_maskz_loadu_epi8(m, p);
    __m512i a, b;
    if (bits == 4) { /* (x & 0x78) | 0x80 */
        const __m512i mid = _mm512_set1_epi8(0x78);
        a = _mm512_ternarylogic_epi32(_mm512_slli_epi16(codes, 3), mid, top, 0xEA);
        b = _mm512_ternarylogic_epi32(_mm512_srli_epi16(codes, 1), mid, top, 0xEA);
    } else {
#ifdef NARROW_DECODE
        /* half h's run r of 8 codes (bytes (8h + r) * bits ...) to bytes 8r ... of a word */
        const __m512i first = bits == 3 ? _mm512_set_epi64(0x1717171717171615ULL, 0x1414141414141312ULL,
                                                           0x111111111111100FULL, 0x0E0E0E0E0E0E0D0CULL,
                                                           0x0B0B0B0B0B0B0A09ULL, 0x0808080808080706ULL,
                                                           0x0505050505050403ULL, 0x0202020202020100ULL)
                                        : _mm512_set_epi64(0x0F0F0F0F0F0F0F0EULL, 0x0D0D0D0D0D0D0D0CULL,
                                                           0x0B0B0B0B0B0B0B0AULL, 0x0909090909090908ULL,
                                                           0x0707070707070706ULL, 0x0505050505050504ULL,
                                                           0x0303030303030302ULL, 0x0101010101010100ULL);
        const __m512i second = _mm512_add_epi8(first, _mm512_set1_epi8((char)(8 * bits)));
        /* byte j of a word: its bits from bits * j - (7 - bits) on (mod 64), so that code j fills
         * bits 7 - bits .. 6 */
        const __m512i shifts = _mm512_set1_epi64(bits == 3 ? 0x110E0B0805023F3CLL : 0x09070503013F3D3BLL);
        const __m512i mask = _mm512_set1_epi8((char)(((1 << bits) - 1) << (7 - bits)));
        a = _mm512_ternarylogic_epi32(
            _mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(first, codes)), mask, top, 0xEA);
        b = _mm512_ternarylogic_epi32(
            _mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(second, codes)), mask, top, 0xEA);
#else
        a = b = _mm512_setzero_si512();
#endif
    }
    w[0] = _mm512_unpacklo_epi8(a, one);
    w[1] = _mm512_unpackhi_epi8(a, one);
    w[2] = _mm512_unpacklo_epi8(b, one);
    w[3] = _mm512_unpackhi_epi8(b, one);
}

/* Channels [n0, n0 + rows) (rows <= DECODE_CHANNELS) of y, every row t, before the zero-point
 * correction corr [T, N]. decode_linear calls it with `bits` and `fine` as literals, so that each
 * width gets its own loop without tests of them per step: at one row that took a tenth of a 4-bit
 * layer's time. */
static inline __attribute__((always_inline)) void decode_block(const uint16_t *xg, int64_t T, int64_t steps,
                                                               const uint8_t *qw, int64_t qw_stride, int64_t N,
                                                               int64_t n0, int64_t rows, const float *w_scale,
                                                               int64_t group, int64_t G, int64_t steps_per_group,
                                                               const float *scale_rows, __m512i lanes_a,
                                                               __m512i lanes_b, const float *corr,
                                                               __mmask64 full_mask, __mmask64 tail_mask, void *y,
                                                               int out_dtype, const int bits, const int fine) {
    const int64_t step_bytes = 16 * bits;
    const float unit = (float)(1 << bits);
    const uint8_t *p[DECODE_CHANNELS];
    int64_t n[DECODE_CHANNELS];
    for (int r = 0; r < DECODE_CHANNELS; r++) {
        n[r] = r < rows ? n0 + r : N - 1; /* past N: not stored */
        p[r] = qw + n[r] * qw_stride;
    }
    /* the codes DECODE_PREFETCH bytes on, into the caches while these run (decoding reads each
     * weight once, from memory or the last-level cache). decode8_linear has the same loop: one
     * shared inline helper for both measured about 4% slower SmolLM2 W4 decoding (end to end,
     * alternating processes), so each keeps its own. */
    const char *block = (const char *)qw + n0 * qw_stride, *end = (const char *)qw + N * qw_stride;
    for (const char *q = block + DECODE_PREFETCH; q < block + DECODE_PREFETCH + rows * qw_stride && q < end; q += 64)
        _mm_prefetch(q, _MM_HINT_T0);
    for (int64_t t = 0; t < T; t++) {
        const __m512i *xt = (const __m512i *)(xg + t * steps * 128);
        __m512 total[DECODE_CHANNELS];
        for (int r = 0; r < DECODE_CHANNELS; r++) total[r] = _mm512_setzero_ps();
        const float *ws = w_scale; /* row g of w_scale: the current group's */
        for (int64_t c = 0, in_group = 0; c < steps; c++) {
            const __mmask64 m = c == steps - 1 ? tail_mask : full_mask;
            const __m512bh x0 = (__m512bh)xt[4 * c], x1 = (__m512bh)xt[4 * c + 1], x2 = (__m512bh)xt[4 * c + 2],
                           x3 = (__m512bh)xt[4 * c + 3];
            for (int r = 0; r < DECODE_CHANNELS; r++) {
                __m512i w[4];
                step_codes(p[r] + c * step_bytes, m, bits, w);
                if (fine) { /* the step's (up to) 4 groups' scales, spread to their lanes */
                    const int64_t g0 = c * (128 / group);
                    const __mmask8 in = (__mmask8)(G - g0 >= 4 ? 0xF : (1u << (G - g0)) - 1u);
                    const __m512 s4 = _mm512_castps128_ps512(
                        _mm_mul_ps(_mm_maskz_loadu_ps(in, scale_rows + n[r] * G + g0), _mm_set1_ps(unit)));
                    __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[0], x0);
                    a = _mm512_dpbf16_ps(a, (__m512bh)w[1], x1);
                    __m512 b = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[2], x2);
                    b = _mm512_dpbf16_ps(b, (__m512bh)w[3], x3);
                    total[r] = _mm512_fmadd_ps(a, _mm512_permutexvar_ps(lanes_a, s4), total[r]);
                    total[r] = _mm512_fmadd_ps(b, _mm512_permutexvar_ps(lanes_b, s4), total[r]);
                } else {
                    __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[0], x0);
                    acc = _mm512_dpbf16_ps(acc, (__m512bh)w[1], x1);
                    acc = _mm512_dpbf16_ps(acc, (__m512bh)w[2], x2);
                    acc = _mm512_dpbf16_ps(acc, (__m512bh)w[3], x3);
                    total[r] = _mm512_fmadd_ps(acc, _mm512_set1_ps(unit * ws[n[r]]), total[r]);
                }
            }
            if (!fine && ++in_group == steps_per_group) {
                in_group = 0;
                ws += N;
            }
        }
        const __mmask8 keep = (__mmask8)((1u << rows) - 1u);
        store_channels(_mm_add_ps(sum_channels(total), _mm_maskz_loadu_ps(keep, corr + t * N + n0)), rows,
                       (char *)y + (t * N + n0) * (out_dtype == 2 ? 4 : 2), out_dtype);
    }
}

/* decode8_linear's channels [n0, n0 + rows) for x rows t .. t + R - 1 (R, 1 or 2, a literal at
 * each call): four channels side by side, two sums each (alternate runs of 16 inputs). */
static inline __attribute__((always_inline)) void decode8_rows(const float *xf, int64_t kp, int64_t K,
                                                               const uint8_t *qw, int64_t qw_stride, int64_t N,
                                                               int64_t n0, int64_t rows, const float *w_scale,
                                                               const float *offsets, const float *xsum, int64_t t,
                                                               void *y, int out_dtype, const int R) {
    const __m512i half = _mm512_set1_epi32(128);
    const uint8_t *p[DECODE_CHANNELS];
    for (int r = 0; r < DECODE_CHANNELS; r++) p[r] = qw + (r < rows ? n0 + r : N - 1) * qw_stride;
    __m512 a[2][DECODE_CHANNELS], c[2][DECODE_CHANNELS];
    for (int i = 0; i < R; i++)
        for (int r = 0; r < DECODE_CHANNELS; r++) a[i][r] = c[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kp; k += 32) {
        const __mmask16 m0 = lanes16(k, K), m1 = lanes16(k + 16, K); /* codes past K: x is 0 there */
        for (int r = 0; r < DECODE_CHANNELS; r++) {
            const __m512 q0 = _mm512_cvtepi32_ps(
                _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m0, p[r] + k)), half));
            const __m512 q1 = _mm512_cvtepi32_ps(
                _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m1, p[r] + k + 16)), half));
            for (int i = 0; i < R; i++) {
                a[i][r] = _mm512_fmadd_ps(q0, _mm512_load_ps(xf + (t + i) * kp + k), a[i][r]);
                c[i][r] = _mm512_fmadd_ps(q1, _mm512_load_ps(xf + (t + i) * kp + k + 16), c[i][r]);
            }
        }
    }
    const __mmask8 keep = (__mmask8)((1u << rows) - 1u);
    const __m128 s = _mm_maskz_loadu_ps(keep, w_scale + n0);
    for (int i = 0; i < R; i++) {
        for (int r = 0; r < DECODE_CHANNELS; r++) a[i][r] = _mm512_add_ps(a[i][r], c[i][r]);
        __m128 v = _mm_mul_ps(sum_channels(a[i]), s);
        if (offsets) v = _mm_fmadd_ps(_mm_maskz_loadu_ps(keep, offsets + n0), _mm_set1_ps(xsum[t + i]), v);
        store_channels(v, rows, (char *)y + ((t + i) * N + n0) * (out_dtype == 2 ? 4 : 2), out_dtype);
    }
}

/* 8-bit codes, one scale per channel, in float32: y[t, n] = w_scale[n] sum_k (q[n, k] - 128)
 * x[t, k] + offsets[n] sum_k x[t, k] (offsets = (128 - z) * s, or NULL when symmetric). Each
 * code minus 128 is an exact float32; x stays float32 (bfloat16 inputs widened, exactly), so the
 * float32 sums are the only rounding. Widening 16 codes a vector costs what vdpbf16ps would save
 * (its codes would need two bfloat16 halves), and float32 products lose nothing to rounding x.
 * Blocks of four channels split across threads (decode8_rows). */
static int decode8_linear(const void *x, int x_dtype, int64_t T, int64_t K, int64_t x_stride, const uint8_t *qw,
                          int64_t qw_stride, int64_t N, const float *w_scale, const float *offsets, void *y,
                          int out_dtype, int threads) {
    const int64_t kp = (K + 31) / 32 * 32; /* x zero-padded to whole pairs of runs */
    float *xf = aligned_alloc(64, sizeof(float) * (size_t)(T * kp)), *xsum = malloc(sizeof(float) * (size_t)T);
    if (!xf || !xsum) {
        free(xf); free(xsum);
        return 1;
    }
    for (int64_t t = 0; t < T; t++) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t k = 0; k < kp; k += 16) {
            const __m512 v = load16(x_dtype == 2 ? (const void *)((const float *)x + t * x_stride)
                                                 : (const void *)((const uint16_t *)x + t * x_stride),
                                    x_dtype, k, K);
            _mm512_store_ps(xf + t * kp + k, v);
            sum = _mm512_add_ps(sum, v);
        }
        xsum[t] = _mm512_reduce_add_ps(sum);
    }
    const int64_t blocks = (N + DECODE_CHANNELS - 1) / DECODE_CHANNELS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * DECODE_CHANNELS, rows = N - n0 < DECODE_CHANNELS ? N - n0 : DECODE_CHANNELS;
        const char *block = (const char *)qw + n0 * qw_stride, *end = (const char *)qw + N * qw_stride;
        for (const char *q = block + DECODE_PREFETCH; q < block + DECODE_PREFETCH + rows * qw_stride && q < end;
             q += 64)
            _mm_prefetch(q, _MM_HINT_T0);
        int64_t t = 0;
        for (; t + 1 < T; t += 2) /* two rows a pass: each code widened once for both */
            decode8_rows(xf, kp, K, qw, qw_stride, N, n0, rows, w_scale, offsets, xsum, t, y, out_dtype, 2);
        if (t < T) decode8_rows(xf, kp, K, qw, qw_stride, N, n0, rows, w_scale, offsets, xsum, t, y, out_dtype, 1);
    }
    free(xf); free(xsum);
    return 0;
}
#endif

/* The weight widths decode_linear takes in this build, as a mask of 1 << bits: 4 and 8 bits with
 * AVX-512 F, BW and BF16; 2 and 3 bits also need VBMI. */
int decode_bits_built(void) {
#if defined(NARROW_DECODE)
    return (1 << 2) | (1 << 3) | (1 << 4) | (1 << 8);
#elif defined(LOWBIT_DECODE)
    return (1 << 4) | (1 << 8);
#else
    return 0;
#endif
}

/* y [T, N] (out_dtype 2: float32, 1: bfloat16) from x [T, K] (x_dtype 2: float32, 1: bfloat16;
 * row stride x_stride), `bits`-bit codes qw [N, qw_stride] (at least ceil(K / 8) * bits bytes a
 * row), w_scale [G, N] and offsets [G, N] or NULL (G = ceil(K / group)); for group sizes 32 and
 * 64 also the scales by channel, scale_rows [N, G]. 8-bit codes take one scale per channel
 * (decode8_linear). Returns 0; 1 when scratch memory cannot be allocated; 2 for a width this
 * build does not take or a group size the kernel does not. */
int decode_linear(const void *x, int x_dtype, int64_t T, int64_t K, int64_t x_stride, const uint8_t *qw, int bits,
                  int64_t qw_stride, int64_t N, const float *w_scale, int64_t group, const float *offsets,
                  const float *scale_rows, void *y, int out_dtype, int threads) {
#ifdef LOWBIT_DECODE
    /* fine: groups of 32 or 64, several a step; each 128-bit lane of the products then lies
     * inside one group (4 bits: lane L holds inputs 32L .. 32L + 31 of the step; 2 and 3 bits:
     * 16L .. 16L + 15 of each half), so a step's sums are scaled lane by lane */
    const int fine = group < K && (group == 32 || group == 64);
    if (!(decode_bits_built() & (1 << bits)) || (group < K && group % 128 && !fine) || (fine && !scale_rows))
        return 2;
    if (T <= 0) return 0;
    if (bits == 8) /* one scale per channel only */
        return group < K ? 2
                         : decode8_linear(x, x_dtype, T, K, x_stride, qw, qw_stride, N, w_scale, offsets, y, out_dtype,
                                          threads);
    const int64_t G = (K + group - 1) / group, row_bytes = (K + 7) / 8 * bits, steps = (K + 127) / 128;
    const int64_t steps_per_group = group >= K ? steps : fine ? 1 : group / 128, step_bytes = 16 * bits;
    __m512i lanes_a = _mm512_setzero_si512(), lanes_b = _mm512_setzero_si512(); /* group of each lane */
    if (fine) {
        int32_t a[16], b[16];
        for (int f = 0; f < 16; f++) {
            int64_t lane = f / 4;
            a[f] = (int32_t)((bits == 4 ? 32 * lane : 16 * lane) / group);
            b[f] = (int32_t)((bits == 4 ? 32 * lane : 64 + 16 * lane) / group);
        }
        lanes_a = _mm512_loadu_si512(a);
        lanes_b = _mm512_loadu_si512(b);
    }
    /* sum (q - o) x = unit sum (1 + q / unit) x - (unit + o) sum x, unit = 2^bits, o = 2^(bits-1) */
    const float offset = (float)((1 << bits) + (1 << (bits - 1)));
    uint16_t *xg = aligned_alloc(64, (size_t)(T * steps * 256));
    float *xsum = malloc(sizeof(float) * (size_t)(T * G)), *corr = malloc(sizeof(float) * (size_t)(T * N));
    if (!xg || !xsum || !corr) {
        free(xg); free(xsum); free(corr);
        return 1;
    }
    memset(xg, 0, (size_t)(T * steps * 256)); /* inputs past K: 0 */
    int16_t slot[128];
    for (int i = 0; i < 128; i++) slot[i] = (int16_t)decode_slot(i, bits);
    /* x rounded to bfloat16 sixteen at a time (round to nearest even, as torch), each group's
     * sum of the rounded values in float32 (a run of 16 lies inside one group: groups are
     * multiples of 32, or K), then each value to its slot */
    for (int64_t t = 0; t < T; t++) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 m = lanes16(k, K);
            const __m256i h = x_dtype == 2 ? (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(
                                                 m, (const float *)x + t * x_stride + k))
                                           : _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + t * x_stride + k);
            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
            if (k + 16 >= K || (k + 16) % group == 0) {
                xsum[t * G + k / group] = _mm512_reduce_add_ps(sum);
                sum = _mm512_setzero_ps();
            }
            uint16_t v[16];
            _mm256_storeu_si256((__m256i *)v, h);
            uint16_t *xs = xg + (t * steps + (k >> 7)) * 128;
            for (int i = 0; i < 16 && k + i < K; i++) xs[slot[(k + i) & 127]] = v[i];
        }
    }
    const int64_t tail = row_bytes - (steps - 1) * step_bytes;
    const __mmask64 tail_mask = tail >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << tail) - 1);
    const __mmask64 full_mask = step_bytes >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << step_bytes) - 1);
    const int64_t blocks = (N + DECODE_CHANNELS - 1) / DECODE_CHANNELS;
#pragma omp parallel num_threads(threads)
    {
        /* corr[t, n] = sum over g of (offsets[g, n] - offset w_scale[g, n]) * xsum[t, g], sixteen
         * channels at a time */
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 16) {
            const __mmask16 m = lanes16(n0, N);
            for (int64_t t = 0; t < T; t++) {
                __m512 c = _mm512_setzero_ps();
                for (int64_t g = 0; g < G; g++) {
                    __m512 o = _mm512_mul_ps(_mm512_set1_ps(-offset), _mm512_maskz_loadu_ps(m, w_scale + g * N + n0));
                    if (offsets) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(m, offsets + g * N + n0));
                    c = _mm512_fmadd_ps(o, _mm512_set1_ps(xsum[t * G + g]), c);
                }
                _mm512_mask_storeu_ps(corr + t * N + n0, m, c);
            }
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = b * DECODE_CHANNELS, rows = N - n0 < DECODE_CHANNELS ? N - n0 : DECODE_CHANNELS;
#define DECODE_BLOCK(BITS, FINE)                                                                                \
    decode_block(xg, T, steps, qw, qw_stride, N, n0, rows, w_scale, group, G, steps_per_group, scale_rows, lanes_a, \
                 lanes_b, corr, full_mask, tail_mask, y, out_dtype, BITS, FINE)
            if (bits == 4)
                fine ? DECODE_BLOCK(4, 1) : DECODE_BLOCK(4, 0);
#ifdef NARROW_DECODE
            else if (bits == 3)
                fine ? DECODE_BLOCK(3, 1) : DECODE_BLOCK(3, 0);
            else
                fine ? DECODE_BLOCK(2, 1) : DECODE_BLOCK(2, 0);
#endif
#undef DECODE_BLOCK
        }
    }
    free(xg); free(xsum); free(corr);
    return 0;
#else
    (void)x; (void)x_dtype; (void)T; (void)K; (void)x_stride; (void)qw; (void)bits; (void)qw_stride; (void)N;
    (void)w_scale; (void)group; (void)offsets; (void)scale_rows; (void)y; (void)out_dtype; (void)threads;
    return 2;
#endif
}

/* decode_linear with a layer's fixed arguments in one array, plan = {qw, bits, qw_stride, N,
 * w_scale, group, offsets, scale_rows, K} (pointers as integers, 0 for NULL), and x and y of one
 * dtype: at one row, ctypes took as long to convert decode_linear's sixteen arguments as the
 * kernel took on SmolLM2's smaller layers. */
int decode_planned(const int64_t *plan, const void *x, int dtype, int64_t T, int64_t x_stride, void *y, int threads) {
    return decode_linear(x, dtype, T, plan[8], x_stride, (const uint8_t *)(intptr_t)plan[0], (int)plan[1], plan[2],
                         plan[3], (const float *)(intptr_t)plan[4], plan[5], (const float *)(intptr_t)plan[6],
                         (const float *)(intptr_t)plan[7], y, dtype, threads);
}

/* One row's `bits`-bit codes (the layer's packing: each run of 8 codes in `bits` bytes, code i
 * at bits [bits * i, bits * (i + 1)) of their little-endian word) as float32, K of them (the
 * packed row holds ceil(K / 8) runs; codes past K are written too, up to the run's end). */
static inline void unpack_weight_row(const uint8_t *p, int bits, int64_t K, float *codes) {
    const int64_t runs = (K + 7) / 8;
    if (bits == 8) {
#pragma omp simd
        for (int64_t k = 0; k < K; k++) codes[k] = (float)p[k];
    } else if (bits == 4) {
#pragma omp simd
        for (int64_t j = 0; j < runs * 4; j++) {
            codes[2 * j] = (float)(p[j] & 15);
            codes[2 * j + 1] = (float)(p[j] >> 4);
        }
    } else if (bits == 2) {
#pragma omp simd
        for (int64_t j = 0; j < runs * 2; j++) {
            codes[4 * j] = (float)(p[j] & 3);
            codes[4 * j + 1] = (float)((p[j] >> 2) & 3);
            codes[4 * j + 2] = (float)((p[j] >> 4) & 3);
            codes[4 * j + 3] = (float)(p[j] >> 6);
        }
    } else { /* 3 bits: a run's 24-bit word */
        for (int64_t r = 0; r < runs; r++) {
            const uint32_t w = (uint32_t)p[3 * r] | (uint32_t)p[3 * r + 1] << 8 | (uint32_t)p[3 * r + 2] << 16;
            for (int i = 0; i < 8; i++) codes[8 * r + i] = (float)((w >> (3 * i)) & 7);
        }
    }
}

/* The dequantized weight w [N, K] (row stride K) of a layer's packed codes qw [N, qw_stride]
 * (2, 3, 4 or 8 bits): w[n, k] = (q[n, k] - z[n, g]) * s[n, g], g = k / group, with scales
 * [N, G] and zeros [N, G] float32 (NULL: 2^(bits-1), symmetric), the difference and the
 * product rounded separately in float32 (ISO C: no contraction into an FMA); in float32 when
 * out_f32, else rounded to bfloat16 to nearest even: bit for bit the reference dequantize
 * (hfcompress/quant/affine.py), or it cast to bfloat16. For CPUs without AMX: the weight-only
 * layers' calls of many rows dequantize, then multiply in whichever of bfloat16 and float32 is
 * faster here (cpu_decode.py). Returns 0; 1 when scratch memory cannot be allocated; 2 for a
 * width other than 2, 3, 4 or 8. */
int dequantize_weight(const uint8_t *qw, int bits, int64_t qw_stride, int64_t N, int64_t K, const float *scales,
                      const float *zeros, int64_t group, void *w, int out_f32, int threads) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return 2;
    const int64_t G = (K + group - 1) / group, room = (K + 7) / 8 * 8;
    const float symmetric_zero = (float)(1 << (bits - 1));
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *codes = malloc(sizeof(float) * (size_t)room), *scratch = out_f32 ? NULL : malloc(sizeof(float) * (size_t)room);
        /* every thread meets the loop (a worksharing loop's barrier waits for all of them) */
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!codes || (!out_f32 && !scratch)) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            float *row = out_f32 ? (float *)w + n * K : scratch;
            unpack_weight_row(qw + n * qw_stride, bits, K, codes);
            for (int64_t g = 0; g < G; g++) {
                const float s = scales[n * G + g], z = zeros ? zeros[n * G + g] : symmetric_zero;
                const int64_t k1 = (g + 1) * group < K ? (g + 1) * group : K;
#pragma omp simd
                for (int64_t k = g * group; k < k1; k++) {
                    const float d = codes[k] - z;
                    row[k] = d * s;
                }
            }
            if (out_f32) continue;
            uint16_t *out = (uint16_t *)w + n * K;
#pragma omp simd
            for (int64_t k = 0; k < K; k++) out[k] = float_to_bf16(row[k]);
        }
        free(codes);
        free(scratch);
    }
    return failed;
}
