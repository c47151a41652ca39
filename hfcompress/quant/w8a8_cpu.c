/* W8A8 / W4A8 linear layers on CPU, in C (hfcompress/quant/cpu_w8a8.py builds and loads this
 * through hfcompress/quant/native.py):
 *
 * - w8a8_quantize_rows: x [T, K] (float32 or bfloat16) to int8 codes and one scale per row,
 *   rows in parallel, sixteen lanes at a time with AVX-512 (the prefill path's activation
 *   quantization; without AVX-512 torch's vectorized ops are faster, see
 *   w8a8_quantize_is_vectorized);
 * - w8a8_linear: a layer for a few rows (decoding) in one call: quantize, int8 dot products,
 *   epilogue.
 *
 * For each row t:
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
 * The dot products: with AVX-512 VNNI, vpdpbusd on (q + 128) as unsigned bytes against the
 * signed weights, 64 products an instruction, minus 128 * sum(w[n]) (w_sum, precomputed);
 * with AVX2, bytes widened to 16 bits and multiplied in pairs by vpmaddwd (exact: no 16-bit
 * saturation); else plain C. All three are exact, so all give the same int32.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Row t of x as float32 into row[K]; x_dtype: 1 bfloat16, 2 float32. */
static inline void load_row(const void *x, int x_dtype, int64_t t, int64_t K, int64_t x_stride, float *row) {
    if (x_dtype == 2) {
        memcpy(row, (const float *)x + t * x_stride, sizeof(float) * (size_t)K);
    } else {
        const uint16_t *xr = (const uint16_t *)x + t * x_stride;
        for (int64_t k = 0; k < K; k++) row[k] = bf16_to_float(xr[k]);
    }
}

/* Quantize row[K] into qt[K]; returns the scale, sets *sum to sum(qt). */
static inline float quantize_row(const float *row, int64_t K, int dynamic, float static_scale, int8_t *qt,
                                 int32_t *sum) {
    float st = static_scale;
    if (dynamic) {
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(row[k]));
        st = fmaxf(amax / 127.0f, FLT_MIN);
    }
    int32_t s = 0;
    for (int64_t k = 0; k < K; k++) {
        float v = nearbyintf(row[k] / st); /* default rounding mode: half to even, as torch.round */
        v = fminf(fmaxf(v, -128.0f), 127.0f);
        qt[k] = (int8_t)v;
        s += qt[k];
    }
    *sum = s;
    return st;
}

/* q . w over K, exact. qu = q + 128 as unsigned bytes (used with VNNI), w_sum = sum(w). */
static inline int32_t dot_s8(const int8_t *q, const uint8_t *qu, const int8_t *w, int64_t K, int32_t w_sum) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    (void)q;
    __m512i acc = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(qu + k), _mm512_loadu_si512(w + k));
    if (k < K) {
        __mmask64 m = (__mmask64)(~0ULL >> (64 - (K - k))); /* zeros beyond K add nothing */
        acc = _mm512_dpbusd_epi32(acc, _mm512_maskz_loadu_epi8(m, qu + k), _mm512_maskz_loadu_epi8(m, w + k));
    }
    return _mm512_reduce_add_epi32(acc) - 128 * w_sum;
#elif defined(__AVX2__)
    (void)qu;
    (void)w_sum;
    __m256i acc = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + k)));
        __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); /* |pair sum| <= 2 * 128 * 128: exact */
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    int32_t s = _mm_cvtsi128_si32(h);
    for (; k < K; k++) s += (int32_t)q[k] * (int32_t)w[k];
    return s;
#else
    (void)qu;
    (void)w_sum;
    int32_t s = 0;
    for (int64_t k = 0; k < K; k++) s += (int32_t)q[k] * (int32_t)w[k];
    return s;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The lanes of k .. k + 15 that lie below K. */
static inline __mmask16 lanes16(int64_t k, int64_t K) {
    return K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
}

/* Sixteen values of a row from k on (masked: lanes at or beyond K read as 0), as float32. */
static inline __m512 load16(const void *x, int x_dtype, int64_t k, int64_t K) {
    __mmask16 m = lanes16(k, K);
    if (x_dtype == 2) return _mm512_maskz_loadu_ps(m, (const float *)x + k);
    __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)x + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)); /* bfloat16 -> float32: exact */
}

/* quantize_row for one row of x, sixteen lanes at a time: IEEE division, rounding half to
 * even and the clamp, as the scalar code and torch do, so the codes are the same. */
static float quantize_row16(const void *x, int x_dtype, int64_t K, int dynamic, float static_scale, int8_t *qt) {
    float st = static_scale;
    if (dynamic) {
        __m512 amax = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x, x_dtype, k, K)));
        st = fmaxf(_mm512_reduce_max_ps(amax) / 127.0f, FLT_MIN);
    }
    const __m512 vs = _mm512_set1_ps(st), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    for (int64_t k = 0; k < K; k += 16) {
        __m512 v = _mm512_div_ps(load16(x, x_dtype, k, K), vs);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_mask_storeu_epi8(qt + k, lanes16(k, K), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
    return st;
}
#endif

/* 1 when w8a8_quantize_rows runs vectorized (AVX-512), which is when it beats torch's ops. */
int w8a8_quantize_is_vectorized(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

/* Rows in parallel: q [T, K] int8 (row stride K), scales [T]. Returns 0, or 2 in a build
 * without AVX-512, where callers use torch's ops instead (w8a8_quantize_is_vectorized). */
int w8a8_quantize_rows(const void *x, int x_dtype, int64_t T, int64_t K, int64_t x_stride, int dynamic,
                       float static_scale, int8_t *q, float *scales, int threads) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    size_t elem = x_dtype == 2 ? sizeof(float) : sizeof(uint16_t);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < T; t++)
        scales[t] = quantize_row16((const char *)x + (size_t)(t * x_stride) * elem, x_dtype, K, dynamic, static_scale,
                                   q + t * K);
    return 0;
#else
    (void)x; (void)x_dtype; (void)T; (void)K; (void)x_stride; (void)dynamic; (void)static_scale; (void)q;
    (void)scales; (void)threads;
    return 2;
#endif
}

/* Returns 0, or 1 when scratch memory cannot be allocated. */
int w8a8_linear(const void *x, int x_dtype, int64_t T, int64_t K, int64_t x_stride, const int8_t *w,
                const int32_t *w_sum, int64_t N, const float *w_scale, const float *corr, const float *bias,
                int dynamic, float static_scale, float *out, int threads) {
    int8_t *q = malloc((size_t)(T * K));
    uint8_t *qu = malloc((size_t)(T * K));
    float *s = malloc(sizeof(float) * (size_t)T);
    int32_t *qsum = malloc(sizeof(int32_t) * (size_t)T);
    float *row = malloc(sizeof(float) * (size_t)K);
    if (!q || !qu || !s || !qsum || !row) {
        free(q); free(qu); free(s); free(qsum); free(row);
        return 1;
    }
    for (int64_t t = 0; t < T; t++) {
        load_row(x, x_dtype, t, K, x_stride, row);
        s[t] = quantize_row(row, K, dynamic, static_scale, q + t * K, &qsum[t]);
        for (int64_t k = 0; k < K; k++) qu[t * K + k] = (uint8_t)((int32_t)q[t * K + k] + 128);
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wn = w + n * K;
        for (int64_t t = 0; t < T; t++) {
            int32_t acc = dot_s8(q + t * K, qu + t * K, wn, K, w_sum[n]);
            float y = (float)acc;
            if (corr) y = y - (float)qsum[t] * corr[n];
            y = y * s[t];
            y = y * w_scale[n];
            if (bias) y = y + bias[n];
            out[t * N + n] = y;
        }
    }
    free(q); free(qu); free(s); free(qsum); free(row);
    return 0;
}
