/* bfloat16 <-> float32, scalar, for the C kernels beside this header (native.py's cache key
 * covers the headers a source includes with quotes). */
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

#endif
