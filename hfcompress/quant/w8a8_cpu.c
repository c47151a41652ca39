/* A W8A8 / W4A8 linear layer for a few rows (decoding), in one call
 * (hfcompress/quant/cpu_w8a8.py builds and loads it through hfcompress/quant/native.py).
 *
 * For each row t of x [T, K] (float32 or bfloat16):
 *
 *   s_t   = max(absmax(x[t]) / 127, FLT_MIN) if dynamic, else static_scale
 *   q[t]  = clamp(round_half_even(x[t] / s_t), -128, 127)             (int8)
 *   y[t,n] = ((float)(q[t] . w[n]) - (float)sum(q[t]) * corr[n]) * s_t * w_scale[n] (+ bias[n])
 *
 * with w [N, K] the signed int8 weight codes and corr the zero-point correction of
 * asymmetric weights (NULL when symmetric). Every float operation is the one, in the same
 * order and precision, that the torch path of cpu_w8a8.py performs, and the dot product is
 * exact in int32, so the two agree bit for bit (float32 output; the bias only for float32
 * inputs, whose torch path adds it in float32).
 *
 * torch's path spends about a dozen small operator calls per layer on quantizing and
 * rescaling; at one row they cost more than the matmul. Here they are one pass over K.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* x_dtype: 1 bfloat16, 2 float32. Returns 0, or 1 when scratch memory cannot be allocated. */
int w8a8_linear(const void *x, int x_dtype, int64_t T, int64_t K, int64_t x_stride, const int8_t *w, int64_t N,
                const float *w_scale, const float *corr, const float *bias, int dynamic, float static_scale, float *out,
                int threads) {
    int8_t *q = malloc((size_t)(T * K));
    float *s = malloc(sizeof(float) * (size_t)T);
    int32_t *qsum = malloc(sizeof(int32_t) * (size_t)T);
    float *row = malloc(sizeof(float) * (size_t)K);
    if (!q || !s || !qsum || !row) {
        free(q); free(s); free(qsum); free(row);
        return 1;
    }
    for (int64_t t = 0; t < T; t++) {
        if (x_dtype == 2) {
            memcpy(row, (const float *)x + t * x_stride, sizeof(float) * (size_t)K);
        } else {
            const uint16_t *xr = (const uint16_t *)x + t * x_stride;
            for (int64_t k = 0; k < K; k++) row[k] = bf16_to_float(xr[k]);
        }
        float st = static_scale;
        if (dynamic) {
            float amax = 0.0f;
            for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(row[k]));
            st = fmaxf(amax / 127.0f, FLT_MIN);
        }
        int32_t sum = 0;
        int8_t *qt = q + t * K;
        for (int64_t k = 0; k < K; k++) {
            float v = nearbyintf(row[k] / st); /* default rounding mode: half to even, as torch.round */
            v = fminf(fmaxf(v, -128.0f), 127.0f);
            qt[k] = (int8_t)v;
            sum += qt[k];
        }
        s[t] = st;
        qsum[t] = sum;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wn = w + n * K;
        for (int64_t t = 0; t < T; t++) {
            const int8_t *qt = q + t * K;
            int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < K; k++) acc += (int32_t)qt[k] * (int32_t)wn[k];
            float y = (float)acc;
            if (corr) y = y - (float)qsum[t] * corr[n];
            y = y * s[t];
            y = y * w_scale[n];
            if (bias) y = y + bias[n];
            out[t * N + n] = y;
        }
    }
    free(q); free(s); free(qsum); free(row);
    return 0;
}
