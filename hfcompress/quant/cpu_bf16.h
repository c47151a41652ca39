/* bfloat16 <-> float32, scalar, and row loads (scalar, and sixteen lanes with AVX-512) for the
 * C kernels beside this header (native.py's cache key covers the headers a source includes with
 * quotes). */
#ifndef HFCOMPRESS_CPU_BF16_H
#define HFCOMPRESS_CPU_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Round to nearest even, as torch converts (finite values). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* dst[:n] = p[off : off + n] as float32, p float32 (dtype code 2) or bfloat16 (code 1): the
 * rows the kernels read in the model's dtype. */
static inline void load_floats(const void *p, int64_t off, int64_t n, int dtype, float *dst) {
    if (dtype == 2) {
        memcpy(dst, (const float *)p + off, sizeof(float) * (size_t)n);
        return;
    }
    const uint16_t *h = (const uint16_t *)p + off;
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(h[i]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

/* The lanes of k .. k + 15 that lie below K (none when k >= K). */
static inline __mmask16 lanes16(int64_t k, int64_t K) {
    return K - k >= 16 ? (__mmask16)0xFFFF : K <= k ? (__mmask16)0 : (__mmask16)((1u << (K - k)) - 1u);
}

/* Sixteen values of a row from k on (masked: lanes at or beyond K read as 0), as float32. */
static inline __m512 load16(const void *x, int x_dtype, int64_t k, int64_t K) {
    __mmask16 m = lanes16(k, K);
    if (x_dtype == 2) return _mm512_maskz_loadu_ps(m, (const float *)x + k);
    __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)x + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)); /* bfloat16 -> float32: exact */
}
#endif

#endif
