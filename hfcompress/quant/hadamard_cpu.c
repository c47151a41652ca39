/* The online Hadamard transform of the rotate stage on CPU, in C
 * (hfcompress/techniques/rotation/hadamard.py builds and loads this through native.py): y = x @ blockdiag(H_b, ..., H_b) over each row's
 * K values, H_b the Sylvester Hadamard matrix of a power-of-two order b (16 or more) divided
 * by sqrt(b). The fast Walsh-Hadamard transform: log2(b) butterfly stages on a float32 copy of
 * the row, then the scale; the output rounded once (to nearest even for bfloat16). torch's
 * path, two small matmuls, rounds after each in bfloat16 and takes 2-3x the time of the rest
 * of a W8A8 down projection's input handling.
 *
 * With AVX-512 the first four stages (pairs inside a 16-lane vector) are lane permutes and
 * the others whole-vector butterflies; without it, plain C. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* In place on v[0..b), b a power of two >= 16. */
static void fwht_block(float *v, int64_t b) {
    int64_t h = 1;
#if defined(__AVX512F__)
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t i = 0; i < b; i += 16) {
        __m512 x = _mm512_loadu_ps(v + i);
        for (int s = 1; s < 16; s <<= 1) { /* lane l pairs with lane l ^ s */
            __m512 p = _mm512_permutexvar_ps(_mm512_xor_si512(lanes, _mm512_set1_epi32(s)), x);
            __mmask16 high = _mm512_test_epi32_mask(lanes, _mm512_set1_epi32(s));
            x = _mm512_mask_blend_ps(high, _mm512_add_ps(x, p), _mm512_sub_ps(p, x));
        }
        _mm512_storeu_ps(v + i, x);
    }
    h = 16;
    for (; h < b; h <<= 1)
        for (int64_t i = 0; i < b; i += 2 * h)
            for (int64_t j = i; j < i + h; j += 16) {
                __m512 a = _mm512_loadu_ps(v + j), c = _mm512_loadu_ps(v + j + h);
                _mm512_storeu_ps(v + j, _mm512_add_ps(a, c));
                _mm512_storeu_ps(v + j + h, _mm512_sub_ps(a, c));
            }
#endif
    for (; h < b; h <<= 1)
        for (int64_t i = 0; i < b; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                float a = v[j], c = v[j + h];
                v[j] = a + c;
                v[j + h] = a - c;
            }
}

/* y [T, K] = x [T, K] (row strides x_stride, K) transformed; dtype 1: bfloat16, 2: float32 (x
 * and y alike). Returns 0, or 1 when scratch memory cannot be allocated. */
int hadamard_rows(const void *x, int dtype, int64_t T, int64_t K, int64_t x_stride, int64_t block, void *y,
                  int threads) {
    int failed = 0;
    float scale = 1.0f / sqrtf((float)block);
#pragma omp parallel num_threads(threads)
    {
        float *row = malloc(sizeof(float) * (size_t)K);
        if (!row) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (!row) continue;
            load_floats(x, t * x_stride, K, dtype, row);
            for (int64_t k = 0; k < K; k += block) fwht_block(row + k, block);
            if (dtype == 2) {
                float *yr = (float *)y + t * K;
                for (int64_t k = 0; k < K; k++) yr[k] = row[k] * scale;
            } else {
                uint16_t *yr = (uint16_t *)y + t * K;
                for (int64_t k = 0; k < K; k++) yr[k] = float_to_bf16(row[k] * scale);
            }
        }
        free(row);
    }
    return failed;
}
