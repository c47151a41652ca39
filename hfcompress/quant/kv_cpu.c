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
    if (dtype == 1) {
        uint32_t bits = (uint32_t)h << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return half_to_float(h);
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

/* Strides are in elements, for the [B, H] leading dims (each (b, h) block is contiguous). */
int kv_decode_attention(
    const float *q, int64_t q_sb, int64_t q_sh,                    /* [B, Hq, D] */
    const uint8_t *kp, int64_t kp_sb, int64_t kp_sh,               /* [B, Hkv, T, D*bits/8] */
    const void *ks, const void *kz, int64_t ks_sb, int64_t ks_sh,  /* [B, Hkv, T/G, D] */
    const uint8_t *vp, int64_t vp_sb, int64_t vp_sh,               /* [B, Hkv, T, D*bits/8] */
    const void *vs, const void *vz, int64_t vs_sb, int64_t vs_sh,  /* [B, Hkv, T, D/block] */
    const float *bias,                                             /* [B, T] or NULL */
    float *out, float *lse,                                        /* [B, Hq, D], [B, Hq] */
    int B, int Hq, int Hkv, int T, int D, int bits, int group, int scale_dtype, float sm_scale, int threads) {
    const int R = Hq / Hkv, block = group < D ? group : D, nbytes = D * bits / 8, nvg = D / block;
    int failed = 0;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hkv; h++) {
            /* scores [R, T] | qs [R, D] | acc [R, D] | codes [D] | kss [D] | kzs [D] | qz [R] | zacc [R, nvg] */
            float *scores = malloc(sizeof(float) * ((size_t)R * T + 2 * (size_t)R * D + 3 * (size_t)D + R + (size_t)R * nvg));
            if (!scores) {
                failed = 1;
                continue;
            }
            float *qs = scores + (size_t)R * T, *acc = qs + (size_t)R * D, *codes = acc + (size_t)R * D;
            float *kss = codes + D, *kzs = kss + D, *qz = kzs + D, *zacc = qz + R;
            const float *qb = q + b * q_sb + (int64_t)h * R * q_sh;
            const uint8_t *kpb = kp + b * kp_sb + h * kp_sh, *vpb = vp + b * vp_sb + h * vp_sh;
            const int64_t kso = b * ks_sb + h * ks_sh, vso = b * vs_sb + h * vs_sh;
            const float *bb = bias ? bias + (int64_t)b * T : NULL;
            /* scores */
            for (int g0 = 0; g0 < T; g0 += group) {
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
                for (int t = g0; t < g0 + group && t < T; t++) {
                    unpack_row(kpb + (int64_t)t * nbytes, D, bits, codes);
                    const float add = bb ? bb[t] : 0.f;
                    for (int r = 0; r < R; r++) {
                        float s = 0.f;
                        const float *qr = qs + r * D;
#pragma omp simd reduction(+ : s)
                        for (int d = 0; d < D; d++) s += qr[d] * codes[d];
                        scores[(int64_t)r * T + t] = s + qz[r] + add;
                    }
                }
            }
            /* softmax weights, then values */
            float mx[64], sum[64];
            for (int r = 0; r < R; r++) {
                float m = -INFINITY;
                for (int t = 0; t < T; t++) m = fmaxf(m, scores[(int64_t)r * T + t]);
                float l = 0.f;
                if (m != -INFINITY)
                    for (int t = 0; t < T; t++) {
                        const float p = expf(scores[(int64_t)r * T + t] - m);
                        scores[(int64_t)r * T + t] = p;
                        l += p;
                    }
                mx[r] = m;
                sum[r] = l;
            }
            memset(acc, 0, sizeof(float) * R * D);
            memset(zacc, 0, sizeof(float) * R * nvg);
            for (int t = 0; t < T; t++) {
                unpack_row(vpb + (int64_t)t * nbytes, D, bits, codes);
                const int64_t srow = vso + (int64_t)t * nvg;
                for (int j = 0; j < nvg; j++) {
                    const float s = load_scale(vs, srow + j, scale_dtype), z = load_scale(vz, srow + j, scale_dtype);
                    for (int r = 0; r < R; r++) {
                        if (mx[r] == -INFINITY) continue;
                        const float p = scores[(int64_t)r * T + t];
                        const float w = p * s;
                        float *ar = acc + r * D + j * block;
                        const float *cj = codes + j * block;
#pragma omp simd
                        for (int d = 0; d < block; d++) ar[d] += w * cj[d];
                        zacc[r * nvg + j] += p * z;
                    }
                }
            }
            for (int r = 0; r < R; r++) {
                float *o = out + ((int64_t)b * Hq + (int64_t)h * R + r) * D;
                float *l = lse + (int64_t)b * Hq + (int64_t)h * R + r;
                if (mx[r] == -INFINITY) {
                    memset(o, 0, sizeof(float) * D);
                    *l = -INFINITY;
                    continue;
                }
                const float inv = 1.f / sum[r];
                for (int d = 0; d < D; d++) o[d] = (acc[r * D + d] + zacc[r * nvg + d / block]) * inv;
                *l = mx[r] + logf(sum[r]);
            }
            free(scores);
        }
    }
    return failed;
}
