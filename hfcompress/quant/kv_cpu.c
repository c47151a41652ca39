/* CPU decode attention over a packed KIVI cache (hfcompress/quant/kv_cpu.py builds and loads it).
 *
 * One step (one query token, or several as more rows, see kv_decode_attention): for each
 * (batch, KV head), the R query heads that share the KV head read the
 * packed keys and values once, a few tokens at a time unpacked into a scratch that stays in L1
 * cache; nothing of size T x D is ever written. The math is that of hfcompress_triton.kv_ref.kv_decode_attention_ref:
 *
 *   score[r, t] = sm_scale * sum_d q[r, d] * (code_k[t, d] * ks[g(t), d] + kz[g(t), d]) + bias[t]
 *               = sum_d (sm_scale * q[r, d] * ks[g, d]) * code_k[t, d] + sm_scale * sum_d q[r, d] * kz[g, d]
 *   out[r, :]   = sum_t p[r, t] * (code_v[t, :] * vs[t, j(:)] + vz[t, j(:)]),  p = softmax(score)
 *
 * so the per-channel key scale folds into the query once per key group, and the per-token
 * value scale into the attention weight once per token. Packing layout: see kv_ref.py (byte j of a
 * token holds channel j + i * D / per at bits [i * bits, (i + 1) * bits)).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KV_FAST 1 /* AVX2 and FMA: the vector paths below */

/* exp(x) for x <= 0 in 8 lanes (Cephes' expf: 2^n e^r with |r| <= ln 2 / 2 and a degree-5
 * polynomial for e^r). Within 1 ulp of glibc's expf on every float in [-87.33, 0] (checked
 * exhaustively); 0 below that, where expf is subnormal, so exp(-inf) = 0; NaN stays NaN. */
static inline __m256 exp256(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.33654f);
    const __m256 under = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_max_ps(lowest, x); /* a NaN x passes */
    const __m256 n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

#ifdef __F16C__
#include <immintrin.h>
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

/* dtype codes: 0 float16, 1 bfloat16, 2 float32 */
static inline float load_scale(const void *p, int64_t i, int dtype) {
    if (dtype == 2) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dtype == 1 ? bf16_to_float(h) : half_to_float(h);
}

/* p[off : off + n] = src[:n] (dtype code 1 or 2: bfloat16 rounded to nearest even, float32) */
static inline void store_row(void *p, int64_t off, const float *src, int n, int dtype) {
    if (dtype == 2) {
        memcpy((float *)p + off, src, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *h = (uint16_t *)p + off;
    for (int i = 0; i < n; i++) h[i] = float_to_bf16(src[i]);
}

/* codes[D] (as float) of one token from its packed bytes */
static inline void unpack_row(const uint8_t *row, int D, int bits, float *codes) {
    const int per = 8 / bits, width = D / per, mask = (1 << bits) - 1;
    for (int i = 0; i < per; i++) {
        float *dst = codes + i * width;
        const int shift = bits * i;
#pragma omp simd
        for (int j = 0; j < width; j++) dst[j] = (float)((row[j] >> shift) & mask);
    }
}

/* The key group at row offset grow folded into the query: qs[r, :] = sm_scale * q[r, :] * ks,
 * qz[r] = sm_scale * q[r, :] . kz (kss, kzs: scratch for the group's scales). */
static inline void fold_key_group(
    const float *qb, int64_t q_sh, const void *ks, const void *kz, int64_t grow, int R, int D, int scale_dtype,
    float sm_scale, float *kss, float *kzs, float *qs, float *qz) {
    for (int d = 0; d < D; d++) {
        kss[d] = load_scale(ks, grow + d, scale_dtype);
        kzs[d] = load_scale(kz, grow + d, scale_dtype);
    }
    for (int r = 0; r < R; r++) {
        float z = 0.f;
        for (int d = 0; d < D; d++) {
            const float qv = qb[r * q_sh + d] * sm_scale;
            qs[r * D + d] = qv * kss[d];
            z += qv * kzs[d];
        }
        qz[r] = z;
    }
}

/* The larger of m and x, NaN when either is (fmaxf drops a NaN: a row of NaN scores would
 * look fully masked and give 0, not NaN). */
static inline float nan_max(float m, float x) { return x > m || x != x ? x : m; }

/* Each row r of scores [R, N] becomes exp(score - m[r]) with m[r] its maximum and l[r] the
 * row's sum; a row whose scores are all -inf becomes 0 (m[r] = -inf, l[r] = 0). */
static inline void softmax_rows(float *scores, int64_t N, int R, float *m_out, float *l_out) {
    for (int r = 0; r < R; r++) {
        float m = -INFINITY, l = 0.f;
        float *sr = scores + r * N;
        int64_t t = 0;
#ifdef KV_FAST
        __m256 mv = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
        for (; t + 8 <= N; t += 8) {
            const __m256 x = _mm256_loadu_ps(sr + t);
            mv = _mm256_max_ps(x, mv);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        }
        m = _mm256_movemask_ps(nan) ? NAN : hmax256(mv);
#endif
        for (; t < N; t++) m = nan_max(m, sr[t]);
        m_out[r] = m;
        if (m == -INFINITY) {
            memset(sr, 0, sizeof(float) * (size_t)N);
            l_out[r] = 0.f;
            continue;
        }
        t = 0;
#ifdef KV_FAST
        const __m256 mb = _mm256_set1_ps(m);
        __m256 lv = _mm256_setzero_ps();
        for (; t + 8 <= N; t += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + t), mb));
            _mm256_storeu_ps(sr + t, e);
            lv = _mm256_add_ps(lv, e);
        }
        l = hsum256(lv);
#endif
        for (; t < N; t++) {
            sr[t] = expf(sr[t] - m);
            l += sr[t];
        }
        l_out[r] = l;
    }
}

/* acc[r, :] += the value zeros' share, zacc[r, j] = sum_t p[r, t] * vz[t, j], per value group j. */
static inline void add_value_zeros(float *acc, const float *zacc, int R, int D, int block) {
    const int nvg = D / block;
    for (int r = 0; r < R; r++)
        for (int d = 0; d < D; d++) acc[r * D + d] += zacc[r * nvg + d / block];
}

/* Attention of the R query heads of one (batch, KV head) over one split: packed tokens
 * [t0, t1) and, when dense, the Td dense tokens (row r's dense bias: dbb[(r % nq) * Td :], nq
 * queries per head). Writes, per head r, the split's maximum score
 * m[r], its sum of exp(score - m[r]) l[r], and acc[r, :] = sum_t exp(score - m[r]) * v[t, :]
 * (unnormalized; m[r] = -inf, l[r] = 0 and acc = 0 when every score is -inf). */
static int attend_split(
    const float *qb, int64_t q_sh, const uint8_t *kpb, const void *ks, const void *kz, int64_t kso,
    const uint8_t *vpb, const void *vs, const void *vz, int64_t vso, const float *bb,
    const float *dkb, const float *dvb, const float *dbb, int Td, int nq, int t0, int t1,
    int R, int D, int bits, int group, int scale_dtype, float sm_scale, float *m_out, float *l_out, float *acc) {
    const int block = group < D ? group : D, nbytes = D * bits / 8, nvg = D / block;
    const int64_t N = (int64_t)(t1 - t0) + Td;
    /* scores [R, N] | qs [R, D] | codes [D] | kss [D] | kzs [D] | qz [R] | zacc [R, nvg] */
    float *scores = malloc(sizeof(float) * ((size_t)R * N + (size_t)R * D + 3 * (size_t)D + R + (size_t)R * nvg));
    if (!scores) return 1;
    float *qs = scores + (size_t)R * N, *codes = qs + (size_t)R * D;
    float *kss = codes + D, *kzs = kss + D, *qz = kzs + D, *zacc = qz + R;
    /* packed scores: the key scale folds into the query once per group */
    for (int g0 = t0; g0 < t1; g0 += group) {
        const int64_t grow = kso + (int64_t)(g0 / group) * D;
        fold_key_group(qb, q_sh, ks, kz, grow, R, D, scale_dtype, sm_scale, kss, kzs, qs, qz);
        for (int t = g0; t < g0 + group && t < t1; t++) {
            unpack_row(kpb + (int64_t)t * nbytes, D, bits, codes);
            const float add = bb ? bb[t] : 0.f;
            for (int r = 0; r < R; r++) {
                float s = 0.f;
                const float *qr = qs + r * D;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < D; d++) s += qr[d] * codes[d];
                scores[r * N + (t - t0)] = s + qz[r] + add;
            }
        }
    }
    /* dense scores */
    const int64_t T = t1 - t0;
    for (int t = 0; t < Td; t++) {
        const float *kt = dkb + (int64_t)t * D;
        for (int r = 0; r < R; r++) {
            float s = 0.f;
            const float *qr = qb + r * q_sh;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < D; d++) s += qr[d] * kt[d];
            scores[r * N + T + t] = s * sm_scale + (dbb ? dbb[(int64_t)(r % nq) * Td + t] : 0.f);
        }
    }
    softmax_rows(scores, N, R, m_out, l_out);
    /* packed values: the value scale folds into the weight once per token */
    memset(acc, 0, sizeof(float) * R * D);
    memset(zacc, 0, sizeof(float) * R * nvg);
    for (int t = t0; t < t1; t++) {
        unpack_row(vpb + (int64_t)t * nbytes, D, bits, codes);
        const int64_t srow = vso + (int64_t)t * nvg;
        for (int j = 0; j < nvg; j++) {
            const float s = load_scale(vs, srow + j, scale_dtype), z = load_scale(vz, srow + j, scale_dtype);
            for (int r = 0; r < R; r++) {
                if (m_out[r] == -INFINITY) continue;
                const float p = scores[r * N + (t - t0)];
                const float w = p * s;
                float *ar = acc + r * D + j * block;
                const float *cj = codes + j * block;
#pragma omp simd
                for (int d = 0; d < block; d++) ar[d] += w * cj[d];
                zacc[r * nvg + j] += p * z;
            }
        }
    }
    /* dense values */
    for (int t = 0; t < Td; t++) {
        const float *vt = dvb + (int64_t)t * D;
        for (int r = 0; r < R; r++) {
            if (m_out[r] == -INFINITY) continue;
            const float p = scores[r * N + T + t];
            float *ar = acc + r * D;
#pragma omp simd
            for (int d = 0; d < D; d++) ar[d] += p * vt[d];
        }
    }
    add_value_zeros(acc, zacc, R, D, block);
    free(scores);
    return 0;
}

#ifdef KV_FAST
/* The path in AVX2 vectors (8 floats); the plain loops above serve CPUs without AVX2 and
 * shapes the vectors do not tile. Those reduce each token's dot product across lanes and keep
 * the value sums in memory. This path scores 8 tokens into one vector (one reduction for the
 * 8) and keeps up to 4 query heads' value sums in registers while it walks the tokens: 2.0x to
 * 2.6x faster at 2k-8k tokens (RESULTS.md, stop 48). */
#define VB 32 /* value tokens unpacked per block: their float rows stay in L1 */

/* n rows of BITS-bit codes (D * BITS / 8 bytes each) as float rows [n, D], in the packing
 * layout of unpack_row; the bytes of a row are a multiple of 8. */
static inline __attribute__((always_inline)) void unpack_rows_bits(
    const uint8_t *src, int n, int D, const int BITS, float *dst) {
    const int per = 8 / BITS, width = D / per;
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    for (int t = 0; t < n; t++) {
        const uint8_t *row = src + (int64_t)t * width;
        float *o = dst + (int64_t)t * D;
        for (int j = 0; j < width; j += 8) {
            const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + j)));
            for (int i = 0; i < per; i++)
                _mm256_storeu_ps(o + i * width + j, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, BITS * i), mask)));
        }
    }
}

/* unpack_rows_bits with the bit width a constant inside (2, 4 or 8) */
static inline void unpack_rows(const uint8_t *src, int n, int D, int bits, float *dst) {
    switch (bits) {
    case 2: unpack_rows_bits(src, n, D, 2, dst); break;
    case 4: unpack_rows_bits(src, n, D, 4, dst); break;
    default: unpack_rows_bits(src, n, D, 8, dst); break;
    }
}

/* p[off], p[off + step], ..., p[off + 7 * step] (dtype code 0, 1, 2) as floats */
static inline __m256 load8(const void *p, int64_t off, int step, int dtype) {
    if (step == 1) {
        if (dtype == 2) return _mm256_loadu_ps((const float *)p + off);
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + off));
        if (dtype == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#ifdef __F16C__
        return _mm256_cvtph_ps(h);
#endif
    }
    float f[8];
    for (int u = 0; u < 8; u++) f[u] = load_scale(p, off + (int64_t)u * step, dtype);
    return _mm256_loadu_ps(f);
}

/* The sums of a[0], ..., a[7]'s lanes, as one vector. */
static inline __m256 sum8(const __m256 a[8]) {
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* scores[r * N + i] = q[r, :] . rows[i, :] + add[r] + bias[(r % nq) * ldb + i] for i < n <= 8
 * (add, bias: NULL for none; ldb = 0: one bias for every row). rows holds 8 rows of D floats;
 * those past n are read but not stored. */
static inline void scores8(
    const float *q, int R, int D, const float *rows, int n, const float *add, const float *bias, int nq,
    int64_t ldb, float *scores, int64_t N) {
    for (int r = 0; r < R; r++) {
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        const float *qr = q + (int64_t)r * D;
        for (int d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(qr + d);
            for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows + i * D + d), acc[i]);
        }
        float s[8];
        _mm256_storeu_ps(s, _mm256_add_ps(sum8(acc), _mm256_set1_ps(add ? add[r] : 0.f)));
        const float *br = bias ? bias + (int64_t)(r % nq) * ldb : NULL;
        for (int i = 0; i < n; i++) scores[r * N + i] = s[i] + (br ? br[i] : 0.f);
    }
}

/* HEADS (1 to 4) heads' sums over 16 channels: acc[r * D + :16] += sum_t w[r * ldw + t] * rows[t * D + :16]. */
static inline __attribute__((always_inline)) void values16(
    const float *w, int64_t ldw, const int HEADS, const float *rows, int D, int n, float *acc) {
    __m256 a[4][2];
    for (int r = 0; r < HEADS; r++) {
        a[r][0] = _mm256_loadu_ps(acc + r * D);
        a[r][1] = _mm256_loadu_ps(acc + r * D + 8);
    }
    for (int t = 0; t < n; t++) {
        const __m256 c0 = _mm256_loadu_ps(rows + (int64_t)t * D), c1 = _mm256_loadu_ps(rows + (int64_t)t * D + 8);
        for (int r = 0; r < HEADS; r++) {
            const __m256 wv = _mm256_broadcast_ss(w + r * ldw + t);
            a[r][0] = _mm256_fmadd_ps(wv, c0, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(wv, c1, a[r][1]);
        }
    }
    for (int r = 0; r < HEADS; r++) {
        _mm256_storeu_ps(acc + r * D, a[r][0]);
        _mm256_storeu_ps(acc + r * D + 8, a[r][1]);
    }
}

/* acc[r, d] += sum_{t < n} w[r * ldw + (d / block) * ldj + t] * rows[t, d] for R heads over n
 * float rows [n, D] (ldj = 0: one weight for every channel). D and block are multiples of 16. */
static inline void values_rows(
    const float *w, int64_t ldw, int64_t ldj, int block, int R, int D, const float *rows, int n, float *acc) {
    for (int r0 = 0; r0 < R; r0 += 4)
        for (int d0 = 0; d0 < D; d0 += 16) {
            const float *wj = w + r0 * ldw + (int64_t)(d0 / block) * ldj;
            float *aj = acc + (int64_t)r0 * D + d0;
            switch (R - r0 < 4 ? R - r0 : 4) {
            case 1: values16(wj, ldw, 1, rows + d0, D, n, aj); break;
            case 2: values16(wj, ldw, 2, rows + d0, D, n, aj); break;
            case 3: values16(wj, ldw, 3, rows + d0, D, n, aj); break;
            default: values16(wj, ldw, 4, rows + d0, D, n, aj); break;
            }
        }
}

/* attend_split in vectors, for D and the value groups multiples of 16 channels, key groups of a
 * multiple of 8 tokens and rows of a multiple of 8 bytes: the same results, the sums in
 * another order. */
static int attend_split_vec(
    const float *qb, int64_t q_sh, const uint8_t *kpb, const void *ks, const void *kz, int64_t kso,
    const uint8_t *vpb, const void *vs, const void *vz, int64_t vso, const float *bb,
    const float *dkb, const float *dvb, const float *dbb, int Td, int nq, int t0, int t1,
    int R, int D, int bits, int group, int scale_dtype, float sm_scale, float *m_out, float *l_out, float *acc) {
    const int block = group < D ? group : D, nvg = D / block, nbytes = D * bits / 8;
    const int64_t T = t1 - t0, N = T + Td;
    /* scores [R, N] | qs [R, D] | qd [R, D] | rows [VB, D] | kss [D] | kzs [D] | qz [R] | zacc [R, nvg] | w [R, nvg, VB] */
    float *scores = malloc(
        sizeof(float) * ((size_t)R * N + 2 * (size_t)R * D + (size_t)VB * D + 2 * (size_t)D + R + (size_t)R * nvg
                         + (size_t)R * nvg * VB));
    if (!scores) return 1;
    float *qs = scores + (size_t)R * N, *qd = qs + (size_t)R * D, *rows = qd + (size_t)R * D;
    float *kss = rows + (size_t)VB * D, *kzs = kss + D, *qz = kzs + D, *zacc = qz + R, *w = zacc + (size_t)R * nvg;
    /* packed scores, 8 tokens at a time inside each key group (T is whole groups: the Python
     * wrapper checks; so the packed tokens come in 8s, here and for the value weights below) */
    for (int g0 = t0; g0 < t1; g0 += group) {
        const int g1 = g0 + group;
        fold_key_group(qb, q_sh, ks, kz, kso + (int64_t)(g0 / group) * D, R, D, scale_dtype, sm_scale, kss, kzs, qs, qz);
        for (int t = g0; t < g1; t += 8) {
            unpack_rows(kpb + (int64_t)t * nbytes, 8, D, bits, rows);
            scores8(qs, R, D, rows, 8, qz, bb ? bb + t : NULL, 1, 0, scores + (t - t0), N);
        }
    }
    /* dense scores */
    for (int r = 0; r < R; r++)
        for (int d = 0; d < D; d++) qd[r * D + d] = qb[r * q_sh + d] * sm_scale;
    for (int t = 0; t < Td; t += 8) {
        const int n = Td - t < 8 ? Td - t : 8;
        const float *src = dkb + (int64_t)t * D;
        if (n < 8) { /* pad the last rows: the reads past n stay in the scratch */
            memset(rows, 0, sizeof(float) * 8 * (size_t)D);
            memcpy(rows, src, sizeof(float) * (size_t)n * D);
            src = rows;
        }
        scores8(qd, R, D, src, n, NULL, dbb ? dbb + t : NULL, nq, Td, scores + T + t, N);
    }
    softmax_rows(scores, N, R, m_out, l_out);
    /* packed values, VB tokens at a time: each weight is p times the token's value scale */
    memset(acc, 0, sizeof(float) * R * D);
    memset(zacc, 0, sizeof(float) * R * nvg);
    for (int t = t0; t < t1; t += VB) {
        const int n = t1 - t < VB ? t1 - t : VB;
        unpack_rows(vpb + (int64_t)t * nbytes, n, D, bits, rows);
        for (int j = 0; j < nvg; j++)
            for (int i = 0; i < n; i += 8) { /* 8 tokens' weights in one vector */
                const int64_t srow = vso + (int64_t)(t + i) * nvg + j;
                const __m256 sv = load8(vs, srow, nvg, scale_dtype), zv = load8(vz, srow, nvg, scale_dtype);
                for (int r = 0; r < R; r++) {
                    const __m256 p = _mm256_loadu_ps(scores + r * N + (t - t0) + i);
                    _mm256_storeu_ps(w + ((int64_t)r * nvg + j) * VB + i, _mm256_mul_ps(p, sv));
                    zacc[r * nvg + j] += hsum256(_mm256_mul_ps(p, zv));
                }
            }
        values_rows(w, (int64_t)nvg * VB, VB, block, R, D, rows, n, acc);
    }
    /* dense values: the weights are the probabilities */
    values_rows(scores + T, N, 0, D, R, D, dvb, Td, acc);
    add_value_zeros(acc, zacc, R, D, block);
    free(scores);
    return 0;
}
#endif

/* 1 when kv_decode_attention runs attend_split_vec for these codes (AVX2 and FMA, and shapes
 * its vectors tile), 0 when it runs the generic attend_split. */
int kv_vector_path(int bits, int D, int group) {
#ifdef KV_FAST
    const int block = group < D ? group : D;
    return D % 16 == 0 && block % 16 == 0 && group % 8 == 0 && (D * bits / 8) % 8 == 0;
#else
    (void)bits, (void)D, (void)group;
    return 0;
#endif
}

/* Packed tokens per split at the least: below that, a split's fixed costs (scratch, scales,
 * the merge) outweigh the balance it brings. */
#define MIN_SPLIT_TOKENS 256

/* Strides are in elements, for the [B, H] leading dims (each (b, h) block is contiguous). The
 * optional dense part (Td tokens: the sinks, the recent window and this step's tokens) joins the
 * same softmax, so one call gives the whole step's attention. The query, the dense part and the
 * output are of dtype io_dtype (1 bfloat16, 2 float32; the sums are float32 either way).
 *
 * A step of nq query tokens passes them as more query heads: Hq is the number of rows, each
 * head's nq queries one after the other, so the R = Hq / Hkv rows of a KV head are its query
 * heads' queries and read its packed part once. The packed bias is the same for every query
 * (padding); the dense bias [B, nq, Td] differs per query (causal among this step's tokens).
 *
 * The work is split over (batch, KV head) and, when there are fewer of those than threads can
 * share evenly (3 KV heads on 2 threads left one thread idle a third of the time), over whole
 * key groups of the packed tokens too: each split gives its own maximum, sum and accumulator,
 * merged exactly at the end (flash-decoding's split-K). The dense part joins the last split.
 * The schedule is static: the tasks are of about one size, and a dynamic schedule made the
 * 2-thread call no faster than 1 thread on the 2-core VM (measured, stop 47). */
int kv_decode_attention(
    const void *q, int64_t q_sb, int64_t q_sh,                     /* [B, Hq, D] */
    const uint8_t *kp, int64_t kp_sb, int64_t kp_sh,               /* [B, Hkv, T, D*bits/8] */
    const void *ks, const void *kz, int64_t ks_sb, int64_t ks_sh,  /* [B, Hkv, T/G, D] */
    const uint8_t *vp, int64_t vp_sb, int64_t vp_sh,               /* [B, Hkv, T, D*bits/8] */
    const void *vs, const void *vz, int64_t vs_sb, int64_t vs_sh,  /* [B, Hkv, T, D/block] */
    const float *bias,                                             /* [B, T] or NULL */
    const void *dk, const void *dv, int64_t d_sb, int64_t d_sh,    /* [B, Hkv, Td, D] or NULL */
    const float *dbias,                                            /* [B, nq, Td] or NULL */
    void *out, float *lse,                                         /* [B, Hq, D], [B, Hq] */
    int B, int Hq, int Hkv, int T, int Td, int nq, int D, int bits, int group, int scale_dtype, float sm_scale,
    int io_dtype, int threads) {
    const int R = Hq / Hkv, heads = B * Hkv, groups = (T + group - 1) / group;
    /* splits per (batch, KV head): about 8 tasks per thread, whole groups, MIN_SPLIT_TOKENS each */
    int S = (8 * threads + heads - 1) / heads;
    if (S > T / MIN_SPLIT_TOKENS) S = T / MIN_SPLIT_TOKENS;
    if (S > groups) S = groups;
    if (S < 1) S = 1;
    const int per = (groups + S - 1) / S; /* groups per split */
    S = per ? (groups + per - 1) / per : 1; /* so that every split starts before T (or T = 0) */
    /* per task: m [R] | l [R] | acc [R, D] */
    const int64_t tasks = (int64_t)heads * S, stride = 2 * (int64_t)R + (int64_t)R * D;
    float *parts = malloc(sizeof(float) * (size_t)(tasks * stride));
    if (!parts) return 1;
    int failed = 0;
    int (*split)(const float *, int64_t, const uint8_t *, const void *, const void *, int64_t, const uint8_t *,
                 const void *, const void *, int64_t, const float *, const float *, const float *, const float *, int,
                 int, int, int, int, int, int, int, int, float, float *, float *, float *) = attend_split;
#ifdef KV_FAST
    if (kv_vector_path(bits, D, group)) split = attend_split_vec;
#endif
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < tasks; task++) {
        const int bh = (int)(task / S), sp = (int)(task % S), b = bh / Hkv, h = bh % Hkv;
        const int t0 = sp * per * group, t1 = (sp + 1) * per * group < T ? (sp + 1) * per * group : T;
        const int last = sp == S - 1;
        float *m = parts + task * stride, *l = m + R, *acc = l + R;
        const int64_t dso = b * d_sb + h * d_sh, dn = last && dk && io_dtype != 2 ? (int64_t)Td * D : 0;
        /* the task's query rows in float32 | the dense part in float32 when it is not */
        float *rows = malloc(sizeof(float) * (size_t)((int64_t)R * D + 2 * dn));
        if (!rows) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        for (int r = 0; r < R; r++) load_floats(q, b * q_sb + ((int64_t)h * R + r) * q_sh, D, io_dtype, rows + r * D);
        const float *dkf = dk ? (const float *)dk + dso : NULL, *dvf = dv ? (const float *)dv + dso : NULL;
        if (dn) {
            load_floats(dk, dso, dn, io_dtype, rows + R * D);
            load_floats(dv, dso, dn, io_dtype, rows + R * D + dn);
            dkf = rows + R * D;
            dvf = rows + R * D + dn;
        }
        if (split(
                rows, D, kp + b * kp_sb + h * kp_sh, ks, kz, b * ks_sb + h * ks_sh, vp + b * vp_sb + h * vp_sh, vs, vz,
                b * vs_sb + h * vs_sh, bias ? bias + (int64_t)b * T : NULL, dkf, dvf,
                dbias ? dbias + (int64_t)b * nq * Td : NULL, last ? Td : 0, nq, t0, t1, R, D, bits, group, scale_dtype, sm_scale,
                m, l, acc)) {
#pragma omp atomic write
            failed = 1;
        }
        free(rows);
    }
    /* merge the splits of each (batch, KV head, query head) */
    float *o = failed ? NULL : malloc(sizeof(float) * D);
    if (!o) failed = 1;
    for (int bh = 0; bh < heads && !failed; bh++) {
        const int b = bh / Hkv, h = bh % Hkv;
        for (int r = 0; r < R; r++) {
            float mx = -INFINITY, sum = 0.f;
            for (int sp = 0; sp < S; sp++) mx = nan_max(mx, parts[((int64_t)bh * S + sp) * stride + r]);
            const int64_t row = (int64_t)b * Hq + (int64_t)h * R + r;
            memset(o, 0, sizeof(float) * D);
            lse[row] = -INFINITY;
            for (int sp = 0; sp < S && mx != -INFINITY; sp++) {
                const float *m = parts + ((int64_t)bh * S + sp) * stride, *l = m + R, *acc = l + R + (int64_t)r * D;
                if (m[r] == -INFINITY) continue;
                const float w = expf(m[r] - mx);
                sum += w * l[r];
                for (int d = 0; d < D; d++) o[d] += w * acc[d];
            }
            if (mx != -INFINITY) {
                const float inv = 1.f / sum;
                for (int d = 0; d < D; d++) o[d] *= inv;
                lse[row] = mx + logf(sum);
            }
            store_row(out, row * D, o, D, io_dtype);
        }
    }
    free(o);
    free(parts);
    return failed;
}

/* Tokens [0, T) of a packed part dequantized into out [B, H, T, D] (rows of D contiguous; o_sb,
 * o_sh its batch and head strides), of dtype out_dtype (1 bfloat16, 2 float32): for a step of
 * many query tokens, which then attends over whole keys and values through SDPA. axis 0 (keys,
 * per channel): x[t, d] = code * s[t / group, d] + z[t / group, d]; axis 1 (values, per token):
 * x[t, d] = code * s[t, d / block] + z[t, d / block], block = min(group, D). The product and the
 * sum are rounded separately in float32 (ISO C: no contraction into an FMA) and the result
 * once to out_dtype: bit for bit hfcompress_triton.kv_ref.kv_dequantize_ref. */
void kv_dequantize(
    const uint8_t *p, int64_t p_sb, int64_t p_sh,                /* [B, H, T, D*bits/8] */
    const void *s, const void *z, int64_t s_sb, int64_t s_sh,    /* [B, H, T/G, D] or [B, H, T, D/block] */
    void *out, int64_t o_sb, int64_t o_sh,                       /* [B, H, T, D] */
    int B, int H, int T, int D, int bits, int group, int axis, int scale_dtype, int out_dtype, int threads) {
    const int bytes = D * bits / 8, block = group < D ? group : D, sw = axis ? D / block : D;
    /* tasks: (batch, head, run of tokens), so that 2 or 3 heads still share the threads */
    const int run = 64, runs = (T + run - 1) / run;
    const int64_t tasks = (int64_t)B * H * runs;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < tasks; task++) {
        const int bh = (int)(task / runs), b = bh / H, h = bh % H, t0 = (int)(task % runs) * run;
        const int t1 = t0 + run < T ? t0 + run : T;
        float codes[512], sc[512], zc[512], x[512]; /* D <= 512: kv_cpu.py checks */
        int64_t loaded = -1; /* the scale row in sc, zc (a key group's serves its group's tokens) */
        for (int t = t0; t < t1; t++) {
            unpack_row(p + b * p_sb + h * p_sh + (int64_t)t * bytes, D, bits, codes);
            const int64_t srow = b * s_sb + h * s_sh + (int64_t)(axis ? t : t / group) * sw;
            if (srow != loaded) {
                for (int j = 0; j < sw; j++) {
                    sc[j] = load_scale(s, srow + j, scale_dtype);
                    zc[j] = load_scale(z, srow + j, scale_dtype);
                }
                loaded = srow;
            }
            if (axis) {
                for (int j = 0; j < sw; j++) {
                    const float sj = sc[j], zj = zc[j];
#pragma omp simd
                    for (int d = j * block; d < (j + 1) * block; d++) {
                        const float prod = codes[d] * sj;
                        x[d] = prod + zj;
                    }
                }
            } else {
#pragma omp simd
                for (int d = 0; d < D; d++) {
                    const float prod = codes[d] * sc[d];
                    x[d] = prod + zc[d];
                }
            }
            store_row(out, b * o_sb + h * o_sh + (int64_t)t * D, x, D, out_dtype);
        }
    }
}
