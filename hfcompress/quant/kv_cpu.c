/* CPU decode attention over a packed KIVI cache (hfcompress/quant/kv_cpu.py builds and loads it).
 *
 * One query step: for each (batch, KV head), the R query heads that share the KV head read the
 * packed keys and values once, unpacking and dequantizing in registers; nothing of size T x D
 * is ever written. The math is that of hfcompress_triton.kv_ref.kv_decode_attention_ref:
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

/* Attention of the R query heads of one (batch, KV head) over one split: packed tokens
 * [t0, t1) and, when dense, the Td dense tokens. Writes, per head r, the split's maximum score
 * m[r], its sum of exp(score - m[r]) l[r], and acc[r, :] = sum_t exp(score - m[r]) * v[t, :]
 * (unnormalized; m[r] = -inf, l[r] = 0 and acc = 0 when every score is -inf). */
static int attend_split(
    const float *qb, int64_t q_sh, const uint8_t *kpb, const void *ks, const void *kz, int64_t kso,
    const uint8_t *vpb, const void *vs, const void *vz, int64_t vso, const float *bb,
    const float *dkb, const float *dvb, const float *dbb, int Td, int t0, int t1,
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
        const float add = dbb ? dbb[t] : 0.f;
        for (int r = 0; r < R; r++) {
            float s = 0.f;
            const float *qr = qb + r * q_sh;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < D; d++) s += qr[d] * kt[d];
            scores[r * N + T + t] = s * sm_scale + add;
        }
    }
    /* exp(score - max) */
    for (int r = 0; r < R; r++) {
        float m = -INFINITY, l = 0.f;
        float *sr = scores + r * N;
        for (int64_t t = 0; t < N; t++) m = fmaxf(m, sr[t]);
        if (m != -INFINITY)
            for (int64_t t = 0; t < N; t++) {
                sr[t] = expf(sr[t] - m);
                l += sr[t];
            }
        m_out[r] = m;
        l_out[r] = l;
    }
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
    for (int r = 0; r < R; r++)
        for (int d = 0; d < D; d++) acc[r * D + d] += zacc[r * nvg + d / block];
    free(scores);
    return 0;
}

/* Packed tokens per split at the least: below that, a split's fixed costs (scratch, scales,
 * the merge) outweigh the balance it brings. */
#define MIN_SPLIT_TOKENS 256

/* Strides are in elements, for the [B, H] leading dims (each (b, h) block is contiguous). The
 * optional dense part (Td float32 tokens: the sinks, the recent window and this step's token)
 * joins the same softmax, so one call gives the whole step's attention.
 *
 * The work is split over (batch, KV head) and, when there are fewer of those than threads can
 * share evenly (3 KV heads on 2 threads left one thread idle a third of the time), over whole
 * key groups of the packed tokens too: each split gives its own maximum, sum and accumulator,
 * merged exactly at the end (flash-decoding's split-K). The dense part joins the last split.
 * The schedule is static: the tasks are of about one size, and a dynamic schedule made the
 * 2-thread call no faster than 1 thread on the 2-core VM (measured, stop 47). */
int kv_decode_attention(
    const float *q, int64_t q_sb, int64_t q_sh,                    /* [B, Hq, D] */
    const uint8_t *kp, int64_t kp_sb, int64_t kp_sh,               /* [B, Hkv, T, D*bits/8] */
    const void *ks, const void *kz, int64_t ks_sb, int64_t ks_sh,  /* [B, Hkv, T/G, D] */
    const uint8_t *vp, int64_t vp_sb, int64_t vp_sh,               /* [B, Hkv, T, D*bits/8] */
    const void *vs, const void *vz, int64_t vs_sb, int64_t vs_sh,  /* [B, Hkv, T, D/block] */
    const float *bias,                                             /* [B, T] or NULL */
    const float *dk, const float *dv, int64_t d_sb, int64_t d_sh,  /* [B, Hkv, Td, D] or NULL */
    const float *dbias,                                            /* [B, Td] or NULL */
    float *out, float *lse,                                        /* [B, Hq, D], [B, Hq] */
    int B, int Hq, int Hkv, int T, int Td, int D, int bits, int group, int scale_dtype, float sm_scale,
    int threads) {
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
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < tasks; task++) {
        const int bh = (int)(task / S), sp = (int)(task % S), b = bh / Hkv, h = bh % Hkv;
        const int t0 = sp * per * group, t1 = (sp + 1) * per * group < T ? (sp + 1) * per * group : T;
        const int last = sp == S - 1;
        float *m = parts + task * stride, *l = m + R, *acc = l + R;
        const int64_t dso = b * d_sb + h * d_sh;
        if (attend_split(
                q + b * q_sb + (int64_t)h * R * q_sh, q_sh, kp + b * kp_sb + h * kp_sh, ks, kz, b * ks_sb + h * ks_sh,
                vp + b * vp_sb + h * vp_sh, vs, vz, b * vs_sb + h * vs_sh, bias ? bias + (int64_t)b * T : NULL,
                dk ? dk + dso : NULL, dv ? dv + dso : NULL, dbias ? dbias + (int64_t)b * Td : NULL, last ? Td : 0,
                t0, t1, R, D, bits, group, scale_dtype, sm_scale, m, l, acc)) {
#pragma omp atomic write
            failed = 1;
        }
    }
    /* merge the splits of each (batch, KV head, query head) */
    for (int bh = 0; bh < heads && !failed; bh++) {
        const int b = bh / Hkv, h = bh % Hkv;
        for (int r = 0; r < R; r++) {
            float mx = -INFINITY, sum = 0.f;
            for (int sp = 0; sp < S; sp++) mx = fmaxf(mx, parts[((int64_t)bh * S + sp) * stride + r]);
            float *o = out + ((int64_t)b * Hq + (int64_t)h * R + r) * D;
            float *ls = lse + (int64_t)b * Hq + (int64_t)h * R + r;
            memset(o, 0, sizeof(float) * D);
            if (mx == -INFINITY) {
                *ls = -INFINITY;
                continue;
            }
            for (int sp = 0; sp < S; sp++) {
                const float *m = parts + ((int64_t)bh * S + sp) * stride, *l = m + R, *acc = l + R + (int64_t)r * D;
                if (m[r] == -INFINITY) continue;
                const float w = expf(m[r] - mx);
                sum += w * l[r];
                for (int d = 0; d < D; d++) o[d] += w * acc[d];
            }
            const float inv = 1.f / sum;
            for (int d = 0; d < D; d++) o[d] *= inv;
            *ls = mx + logf(sum);
        }
    }
    free(parts);
    return failed;
}
