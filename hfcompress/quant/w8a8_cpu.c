/* W8A8 / W4A8 linear layers on CPU, in C (hfcompress/quant/cpu_w8a8.py builds and loads this
 * through hfcompress/quant/native.py):
 *
 * - w8a8_quantize_rows: x [T, K] (float32 or bfloat16) to int8 codes and one scale per row,
 *   rows in parallel, sixteen lanes at a time with AVX-512 (the prefill path's activation
 *   quantization; without AVX-512 torch's vectorized ops are faster, see
 *   w8a8_quantize_is_vectorized);
 * - w8a8_linear: a layer for a few rows (decoding) in one call: quantize, int8 dot products,
 *   epilogue;
 * - w8a8_amx_linear, w8a8_amx_bf16_linear: the prefill's matmuls on AMX tiles (int8 x int8,
 *   and bfloat16 activations x widened weight codes for weight-only layers, which it also runs
 *   from 3 rows: batched decoding), per-group scales, zero points and the epilogue fused (the
 *   section "AMX");
   (The weight-only decode kernel is decode_cpu.c, for hfcompress/quant/cpu_decode.py.)
 *
 * For each row t:
 *
 *   s_t   = max(absmax(x[t]) / 127, FLT_MIN) if dynamic, else static_scale; NaN if x[t] holds
 *           a NaN or an infinity (so that y[t] is NaN: the codes cannot carry it)
 *   q[t]  = clamp(round_half_even(x[t] / s_t), -128, 127)             (int8)
 *   y[t,n] = ((float)(q[t] . w[n]) - (float)sum(q[t]) * corr[n]) * s_t * w_scale[n] (+ bias[n])
 *
 * with w [N, K] the signed int8 weight codes and corr the zero-point correction of
 * asymmetric weights (NULL when symmetric). Every float operation is the one, in the same
 * order and precision, that the torch path of cpu_w8a8.py performs, and the dot product is
 * exact in int32, so the two agree bit for bit (float32 output; the bias only for float32
 * inputs, whose torch path adds it in float32). w8a8_linear writes y as float32 or rounded to
 * bfloat16 (to nearest even, NaN as NaN: torch's .to(torch.bfloat16) of the float32 result).
 *
 * The dot products: with AVX-512 VNNI, vpdpbusd on (q + 128) as unsigned bytes against the
 * signed weights, 64 products an instruction, minus 128 * sum(w[n]) (w_sum, precomputed);
 * with AVX2, bytes widened to 16 bits and multiplied in pairs by vpmaddwd (exact: no 16-bit
 * saturation); else plain C. All three are exact, so all give the same int32.
 */
#define _GNU_SOURCE /* syscall() */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512F__) && \
    defined(__AVX512BW__)
#define W8A8_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* Quantize row[K] into qt[K]; returns the scale, sets *sum to sum(qt). A row holding a NaN or
 * an infinity gets the scale NaN (its codes are numbers, so the scale carries it): the layer's
 * output row is NaN, as the float layer's would not be finite, instead of a finite guess. */
static inline float quantize_row(const float *row, int64_t K, int dynamic, float static_scale, int8_t *qt,
                                 int32_t *sum) {
    float st = static_scale;
    if (dynamic) {
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(row[k]));
        st = fmaxf(amax / 127.0f, FLT_MIN);
    }
    int32_t s = 0;
    int finite = 1;
    for (int64_t k = 0; k < K; k++) {
        finite &= isfinite(row[k]) != 0;
        float v = nearbyintf(row[k] / st); /* default rounding mode: half to even, as torch.round */
        v = fminf(fmaxf(v, -128.0f), 127.0f);
        qt[k] = (int8_t)v;
        s += qt[k];
    }
    *sum = s;
    return finite ? st : NAN;
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
/* quantize_row for one row of x, sixteen lanes at a time: IEEE division, rounding half to
 * even and the clamp, as the scalar code and torch do, so the codes are the same (and the
 * scale NaN for a row that holds a NaN or an infinity, as there). */
static float quantize_row16(const void *x, int x_dtype, int64_t K, int dynamic, float static_scale, int8_t *qt) {
    float st = static_scale;
    if (dynamic) {
        __m512 amax = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x, x_dtype, k, K)));
        st = fmaxf(_mm512_reduce_max_ps(amax) / 127.0f, FLT_MIN);
    }
    const __m512 vs = _mm512_set1_ps(st), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    const __m512 inf = _mm512_set1_ps(INFINITY);
    __mmask16 bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 xv = load16(x, x_dtype, k, K);
        bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(xv), inf, _CMP_NLT_UQ); /* |x| = inf, or NaN */
        __m512 v = _mm512_div_ps(xv, vs);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_mask_storeu_epi8(qt + k, lanes16(k, K), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
    return bad ? NAN : st;
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

/* The rows' fake quantization, out [T, K] (row stride K; out_dtype 2 float32, 1 bfloat16 rounded
 * to nearest even) = (float)q[t, k] * s_t with q and s_t as w8a8_quantize_rows makes them: bit for
 * bit torch's (q.float() * s).to(dtype), in one pass (the W4A8 layers that multiply fq(x) by
 * grouped 4-bit weights; through torch, the quantization and these two ops took 17 us a row on a
 * 576-wide layer). Returns 0, 1 when scratch memory cannot be allocated, or 2 in a build without
 * AVX-512 (w8a8_quantize_is_vectorized). */
int w8a8_fake_quantize_rows(const void *x, int x_dtype, int64_t T, int64_t K, int64_t x_stride, int dynamic,
                            float static_scale, void *out, int out_dtype, int threads) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const size_t elem = x_dtype == 2 ? sizeof(float) : sizeof(uint16_t);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int8_t *q = malloc((size_t)K);
        /* every thread meets the loop (a worksharing loop's barrier waits for all of them) */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (!q) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            const float s = quantize_row16((const char *)x + (size_t)(t * x_stride) * elem, x_dtype, K, dynamic,
                                           static_scale, q);
            if (out_dtype == 2) {
                float *o = (float *)out + t * K;
#pragma omp simd
                for (int64_t k = 0; k < K; k++) o[k] = (float)q[k] * s;
            } else {
                uint16_t *o = (uint16_t *)out + t * K;
#pragma omp simd
                for (int64_t k = 0; k < K; k++) o[k] = float_to_bf16((float)q[k] * s);
            }
        }
        free(q);
    }
    return failed;
#else
    (void)x; (void)x_dtype; (void)T; (void)K; (void)x_stride; (void)dynamic; (void)static_scale; (void)out;
    (void)out_dtype; (void)threads;
    return 2;
#endif
}

/* out [T, N]: float32 (out_dtype 2) or bfloat16 (1). Returns 0, or 1 when scratch memory cannot
 * be allocated. */
int w8a8_linear(const void *x, int x_dtype, int64_t T, int64_t K, int64_t x_stride, const int8_t *w,
                const int32_t *w_sum, int64_t N, const float *w_scale, const float *corr, const float *bias,
                int dynamic, float static_scale, void *out, int out_dtype, int threads) {
    int8_t *q = malloc((size_t)(T * K));
    uint8_t *qu = malloc((size_t)(T * K));
    float *s = malloc(sizeof(float) * (size_t)T);
    int32_t *qsum = malloc(sizeof(int32_t) * (size_t)T);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    float *row = NULL; /* the vectorized quantization reads x in place */
    const int row_missing = 0;
#else
    float *row = malloc(sizeof(float) * (size_t)K); /* a row of x as float32 */
    const int row_missing = !row;
#endif
    if (!q || !qu || !s || !qsum || row_missing) {
        free(q); free(qu); free(s); free(qsum); free(row);
        return 1;
    }
    for (int64_t t = 0; t < T; t++) {
        int8_t *qt = q + t * K;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        /* sixteen lanes at a time, the same codes and scale as the scalar quantize_row (whose
         * division and nearbyintf per value took most of a small layer's time) */
        const size_t elem = x_dtype == 2 ? sizeof(float) : sizeof(uint16_t);
        s[t] = quantize_row16((const char *)x + (size_t)(t * x_stride) * elem, x_dtype, K, dynamic, static_scale, qt);
        int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < K; k++) sum += qt[k];
        qsum[t] = sum;
#else
        load_floats(x, t * x_stride, K, x_dtype, row); /* x_dtype: 1 bfloat16, 2 float32 */
        s[t] = quantize_row(row, K, dynamic, static_scale, qt, &qsum[t]);
#endif
        for (int64_t k = 0; k < K; k++) qu[t * K + k] = (uint8_t)((int32_t)qt[k] + 128);
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
            if (out_dtype == 1)
                ((uint16_t *)out)[t * N + n] = y != y ? (uint16_t)0x7FC0 : float_to_bf16(y);
            else
                ((float *)out)[t * N + n] = y;
        }
    }
    free(q); free(qu); free(s); free(qsum); free(row);
    return 0;
}

/* w8a8_linear with a layer's fixed arguments in one array, plan = {w, w_sum, N, w_scale, corr,
 * dynamic, static_scale, K} (pointers as integers, 0 for NULL; static_scale the address of one
 * float32, read at each call, or 0 when dynamic): at one row, ctypes took as long to convert
 * w8a8_linear's fifteen arguments as the kernel took on SmolLM2's smaller layers (as for
 * decode_cpu.c's decode_planned). */
int w8a8_planned(const int64_t *plan, const void *x, int x_dtype, int64_t T, int64_t x_stride, const float *bias,
                 void *out, int out_dtype, int threads) {
    const float *static_scale = (const float *)(intptr_t)plan[6];
    return w8a8_linear(x, x_dtype, T, plan[7], x_stride, (const int8_t *)(intptr_t)plan[0],
                       (const int32_t *)(intptr_t)plan[1], plan[2], (const float *)(intptr_t)plan[3],
                       (const float *)(intptr_t)plan[4], bias, (int)plan[5], static_scale ? *static_scale : 0.0f, out,
                       out_dtype, threads);
}

/* ---- AMX (Sapphire Rapids and later): prefill matmuls with their epilogues ----
 *
 * Two tile kernels share one driver (amx_linear), for calls of many rows (the caller decides):
 *
 * - int8 (w8a8_amx_linear, tdpbssd): int8 activation codes q [T, K] against signed weight
 *   codes, exact int32 sums. Per channel with symmetric weights:
 *
 *       y[t, n] = (float)(q[t] . w[n]) * s_t * w_scale[n]  (+ bias[n])
 *
 *   in the order and precision of cpu_w8a8.py's torch._int_mm path: the product in float32,
 *   times the row's scale, times the channel's; a bfloat16 output is that rounded to nearest
 *   even, and the bias (already in the output dtype, given as float32) is added after the
 *   rounding and the sum rounded again, as torch adds a bfloat16 bias to a bfloat16 result.
 *   So the two paths agree bit for bit. oneDNN's op, the alternative, takes only a per-tensor
 *   activation scale: a per-token scale costs it one more pass over the output.
 * - bfloat16 (w8a8_amx_bf16_linear, tdpbf16ps): bfloat16 activations [T, K] against the
 *   weight codes widened to bfloat16 (exact: |code| <= 128), float32 sums; weight-only layers.
 *
 * Both take one float32 scale per channel and group of `group` inputs (w_scale [G, N], the
 * last group may be shorter) and, for asymmetric weights, offsets [G, N] = (o - z) * s with o
 * = 2^(bits-1), added times the row's sum over the group (codes are stored as c = q - o, and
 * (q - z) * s = c * s + (o - z) * s):
 *
 *       y[t, n] = s_t * sum over g of (w_scale[g, n] * sum_{k in g} a[t, k] c[n, k]
 *                                      + offsets[g, n] * sum_{k in g} a[t, k])   (+ bias[n])
 *
 * with s_t = 1 for the bfloat16 kernel. One group without offsets is the first form.
 *
 * Weights are packed once into the tile layout the instruction reads (w8a8_amx_pack): for each
 * block of 16 channels and one k step (64 int8 or 32 bfloat16 inputs), 16 rows of 64 bytes,
 * row r holding the 4 (int8) or 2 (bfloat16) consecutive inputs of each channel in turn, kept
 * as int8 codes, or two 4-bit codes to a byte. Channels are zero-padded to a multiple of 32; K
 * and the group size must be multiples of the k step (the caller checks). Each step multiplies
 * a 32 x 32 block of the output: two 16-row tiles of activations against two 16-channel tiles
 * of weights, four products into four accumulator tiles. Each thread takes blocks of 32
 * channels (widening their codes, for bfloat16 or 4-bit packs, once into scratch) and runs
 * every row block against them; the row tail (T not a multiple of 32) is copied into a
 * zero-padded block. */

/* 1 when this build has the AMX kernels and the kernel granted this process the tile data
 * state (Linux asks for it once: arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). */
int w8a8_amx_init(void) {
#ifdef W8A8_AMX
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

/* w [N, K] int8 (row-major) into out, the layout above for k steps of `step` inputs (64: the
 * int8 kernel, 32: the bfloat16 one), channels zero-padded to a multiple of 32:
 * [ceil(N / 32) * 32 * K] int8, or for 4-bit codes (nibbles, codes in [-8, 7]) half that, two
 * codes a byte: of each 32 consecutive positions p of the int8 layout, byte p % 16 holds
 * position p + 8 in its low nibble if p % 32 < 16, else in its high nibble. */
void w8a8_amx_pack(const int8_t *w, int64_t N, int64_t K, int64_t step, int nibbles, int8_t *out) {
    int64_t n_pad = (N + 31) / 32 * 32, k_steps = K / step, per_row = step / 16;
    memset(out, nibbles ? 0x88 : 0, (size_t)(nibbles ? n_pad * K / 2 : n_pad * K)); /* code 0 is nibble 8 */
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            int64_t p = ((n / 16) * k_steps + k / step) * 16 * step + ((k % step) / per_row) * 16 * per_row + (n % 16) * per_row +
                        k % per_row;
            if (!nibbles) {
                out[p] = w[n * K + k];
                continue;
            }
            uint8_t *byte = (uint8_t *)out + p / 32 * 16 + p % 16, code = (uint8_t)(w[n * K + k] + 8);
            *byte = p % 32 < 16 ? (uint8_t)((*byte & 0xF0) | code) : (uint8_t)((*byte & 0x0F) | (code << 4));
        }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* Round-to-nearest-even float32 -> bfloat16 bits, as torch converts (finite values). */
static inline __m256i to_bf16_bits(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

static inline __m512 from_bf16_bits(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The sum over [k0, k1) of row a (int8 or bfloat16) as float32 (int8 sums are exact in int32,
 * then exact in float32 below 2^24); positions from k1 on are not read. */
static float row_sum(const void *a, int bf16, int64_t k0, int64_t k1) {
    if (bf16) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 16)
            sum = _mm512_add_ps(sum, from_bf16_bits(_mm256_maskz_loadu_epi16(lanes16(k, k1), (const uint16_t *)a + k)));
        return _mm512_reduce_add_ps(sum);
    }
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 16)
        sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lanes16(k, k1), (const int8_t *)a + k)));
    return (float)_mm512_reduce_add_epi32(sum);
}

/* Rows [m0, m0 + rows) and channels [n0, n0 + cols) of y from the block acc [32][32] (int32
 * sums if acc_int, else float32); sx or w_scale NULL means scales of 1. */
static void amx_epilogue(const void *acc, int acc_int, const float *sx, int sx_per_row, int64_t m0, int64_t rows,
                         int64_t n0, int64_t cols, const float *w_scale, const float *bias, int64_t N, void *y,
                         int out_dtype) {
    for (int64_t c0 = 0; c0 < 32 && c0 < cols; c0 += 16) {
        __mmask16 mask = lanes16(c0, cols);
        __m512 ws = w_scale ? _mm512_maskz_loadu_ps(mask, w_scale + n0 + c0) : _mm512_set1_ps(1.0f);
        __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0 + c0) : _mm512_setzero_ps();
        for (int64_t r = 0; r < rows; r++) {
            __m512 v = acc_int ? _mm512_cvtepi32_ps(_mm512_loadu_si512((const int32_t *)acc + r * 32 + c0))
                               : _mm512_loadu_ps((const float *)acc + r * 32 + c0);
            if (sx) v = _mm512_mul_ps(v, _mm512_set1_ps(sx[sx_per_row ? m0 + r : 0]));
            if (w_scale) v = _mm512_mul_ps(v, ws);
            int64_t at = (m0 + r) * N + n0 + c0;
            if (out_dtype == 2) {
                if (bias) v = _mm512_add_ps(v, b);
                _mm512_mask_storeu_ps((float *)y + at, mask, v);
            } else {
                __m256i o = to_bf16_bits(v);
                if (bias) o = to_bf16_bits(_mm512_add_ps(from_bf16_bits(o), b));
                _mm256_mask_storeu_epi16((uint16_t *)y + at, mask, o);
            }
        }
    }
}

/* total (first group: =, else +=) acc * s_g + row_sums_g * offsets_g over the block's rows
 * and channels [n0, n0 + cols); row_sums_g[r * stride] is row m0 + r's sum over the group. */
static void amx_add_group(const void *acc, int acc_int, float *total, int first, int64_t rows, int64_t n0,
                          int64_t cols, const float *s_g, const float *offsets_g, const float *row_sums_g,
                          int64_t stride) {
    for (int64_t c0 = 0; c0 < 32; c0 += 16) {
        __mmask16 mask = lanes16(c0, cols);
        __m512 s = _mm512_maskz_loadu_ps(mask, s_g + n0 + c0);
        __m512 o = offsets_g ? _mm512_maskz_loadu_ps(mask, offsets_g + n0 + c0) : _mm512_setzero_ps();
        for (int64_t r = 0; r < rows; r++) {
            __m512 v = acc_int ? _mm512_cvtepi32_ps(_mm512_loadu_si512((const int32_t *)acc + r * 32 + c0))
                               : _mm512_loadu_ps((const float *)acc + r * 32 + c0);
            v = _mm512_mul_ps(v, s);
            if (offsets_g) v = _mm512_fmadd_ps(_mm512_set1_ps(row_sums_g[r * stride]), o, v);
            if (!first) v = _mm512_add_ps(_mm512_loadu_ps(total + r * 32 + c0), v);
            _mm512_storeu_ps(total + r * 32 + c0, v);
        }
    }
}
#endif

#ifdef W8A8_AMX
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* All eight tiles 16 rows of 64 bytes: int8 or bfloat16 operands, int32 or float32 sums. */
static void amx_configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* bfloat16 bits of 16 small integers (exact: |v| <= 128). */
static inline __m256i small_ints_to_bf16(__m512i v) {
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(v)), 16));
}

/* The packed-layout positions [0, count) of codes src (int8, or two 4-bit codes a byte) as
 * bfloat16 (to_bf16) or int8 into dst. */
static void widen_codes(const int8_t *src, int64_t count, int nibbles, int to_bf16, void *dst) {
#if defined(__AVX512VL__) && defined(__AVX512BF16__)
    /* To bfloat16, where the instructions are here: a quarter to a third of the instructions of
     * the general loop below, the same values. */
    if (to_bf16 && nibbles) { /* each code's bfloat16 looked up: word j of the table is j - 8 */
        const __m256i table = _mm256_setr_epi16((short)0xC100, (short)0xC0E0, (short)0xC0C0, (short)0xC0A0,
                                                (short)0xC080, (short)0xC040, (short)0xC000, (short)0xBF80, 0,
                                                0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0);
        for (int64_t i = 0; i < count; i += 32) { /* vpermw reads the low 4 bits of each word */
            const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(src + i / 2)));
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i), _mm256_permutexvar_epi16(v, table));
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i + 16),
                                _mm256_permutexvar_epi16(_mm256_srli_epi16(v, 4), table));
        }
        return;
    }
    if (to_bf16) { /* int8 codes: two float32 vectors of them to one of bfloat16 (exact) */
        for (int64_t i = 0; i < count; i += 32) {
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + i))));
            const __m512 hi =
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + i + 16))));
            _mm512_storeu_si512((uint16_t *)dst + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
        return;
    }
#endif
    for (int64_t i = 0; i < count; i += 32) {
        __m128i lo, hi; /* positions i..i+15 and i+16..i+31 as int8 */
        if (nibbles) {
            __m128i v = _mm_loadu_si128((const __m128i *)(src + i / 2)), nib = _mm_set1_epi8(15);
            lo = _mm_sub_epi8(_mm_and_si128(v, nib), _mm_set1_epi8(8));
            hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), nib), _mm_set1_epi8(8));
        } else {
            lo = _mm_loadu_si128((const __m128i *)(src + i));
            hi = _mm_loadu_si128((const __m128i *)(src + i + 16));
        }
        if (to_bf16) {
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i), small_ints_to_bf16(_mm512_cvtepi8_epi32(lo)));
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i + 16), small_ints_to_bf16(_mm512_cvtepi8_epi32(hi)));
        } else {
            _mm_storeu_si128((__m128i *)((int8_t *)dst + i), lo);
            _mm_storeu_si128((__m128i *)((int8_t *)dst + i + 16), hi);
        }
    }
}

/* The rows [m0, m0 + 32) of a [T, row_bytes] matrix, or, for the last partial block, a copy
 * zero-padded to 32 rows in *pad (allocated and filled on first use); NULL when that fails. */
static const char *amx_row_block(const char *a, int64_t T, int64_t m0, int64_t row_bytes, char **pad) {
    int64_t rows = T - m0;
    if (rows >= 32) return a + m0 * row_bytes;
    if (*pad) return *pad; /* only the last block is partial: filled once, on the first call (a copy
                            * per block of channels took a quarter of a 1-row call) */
    if (!(*pad = malloc((size_t)(32 * row_bytes)))) return NULL;
    memcpy(*pad, a + m0 * row_bytes, (size_t)(rows * row_bytes));
    memset(*pad + rows * row_bytes, 0, (size_t)((32 - rows) * row_bytes));
    return *pad;
}

/* One k step of the driver's block against its first row tile only, with the tile product `dp`
 * (its tile operands are immediates, so the two kernels differ by macro argument, not by
 * pointer): each tile is loaded just before its first product, so products start while the rest
 * load. Alone, it serves blocks of at most 16 rows, where the second row tile would multiply only
 * padding (at one row that was a quarter of the call). */
#define AMX_K_STEP_HALF(dp, kb)                           \
    do {                                                  \
        _tile_loadd(4, a0 + (kb) * 64, row_bytes);        \
        _tile_loadd(6, b0 + (kb) * 1024, 64);             \
        dp(0, 4, 6);                                      \
        _tile_loadd(7, b1 + (kb) * 1024, 64);             \
        dp(1, 4, 7);                                      \
    } while (0)

/* The whole 32 x 32 block: the first row tile's products, then the second's. */
#define AMX_K_STEP(dp, kb)                                \
    do {                                                  \
        AMX_K_STEP_HALF(dp, kb);                          \
        _tile_loadd(5, a1 + (kb) * 64, row_bytes);        \
        dp(2, 5, 6);                                      \
        dp(3, 5, 7);                                      \
    } while (0)

/* The driver: a [T, K] int8 codes (bf16 == 0, tdpbssd, k steps of 64) or bfloat16 (tdpbf16ps,
 * k steps of 32); wp the weights packed for that step. Returns 0, or 1 when scratch memory
 * cannot be allocated. */
static int amx_linear(int bf16, const void *a, int64_t T, int64_t K, const int8_t *wp, int nibbles, const float *sx,
                      int sx_per_row, const float *w_scale, int64_t group, const float *offsets, const float *bias,
                      int64_t N, void *y, int out_dtype, int threads) {
    int64_t step = bf16 ? 32 : 64, row_bytes = bf16 ? 2 * K : K;
    int64_t k_steps = K / step, n_blocks = (N + 31) / 32, m_blocks = (T + 31) / 32;
    int64_t group_steps = group / step, groups = (k_steps + group_steps - 1) / group_steps;
    int scaled = groups > 1 || offsets != NULL; /* else one epilogue with sx and w_scale */
    int widen = bf16 || nibbles;               /* codes widened per block of channels */
    int failed = 0;
    float *row_sums = offsets ? malloc(sizeof(float) * (size_t)(T * groups)) : NULL; /* [T, G] */
    if (offsets && !row_sums) return 1;
#pragma omp parallel num_threads(threads)
    {
        amx_configure();
        int32_t acc[32 * 32]; /* int32 or float32 sums */
        float total[32 * 32];
        char *pad = NULL;
        int8_t *b = widen ? malloc((size_t)(2 * k_steps * 1024)) : NULL; /* 2 channel tiles per k step */
        if (widen && !b) {
#pragma omp atomic write
            failed = 1;
        }
        if (offsets) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++)
                for (int64_t g = 0; g < groups; g++)
                    row_sums[t * groups + g] = row_sum((const char *)a + t * row_bytes, bf16, g * group,
                                                       (g + 1) * group < K ? (g + 1) * group : K);
        }
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < n_blocks; nb++) {
            if (widen && !b) continue;
            int64_t at = 2 * nb * k_steps * 1024 / (bf16 ? 2 : 1); /* packed-layout position of the block */
            const int8_t *b0 = wp + (nibbles ? at / 2 : at);
            if (widen) {
                widen_codes(b0, 2 * k_steps * 1024 / (bf16 ? 2 : 1), nibbles, bf16, b);
                b0 = b;
            }
            const int8_t *b1 = b0 + k_steps * 1024;
            int64_t n0 = nb * 32, cols = N - n0 < 32 ? N - n0 : 32;
            for (int64_t mb = 0; mb < m_blocks; mb++) {
                int64_t m0 = mb * 32, rows = T - m0 < 32 ? T - m0 : 32;
                const char *a0 = amx_row_block((const char *)a, T, m0, row_bytes, &pad);
                if (!a0) {
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
                const char *a1 = a0 + 16 * row_bytes;
                for (int64_t g = 0; g < groups; g++) {
                    int64_t kb_end = (g + 1) * group_steps < k_steps ? (g + 1) * group_steps : k_steps;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    if (rows <= 16 && bf16)
                        for (int64_t kb = g * group_steps; kb < kb_end; kb++) AMX_K_STEP_HALF(_tile_dpbf16ps, kb);
                    else if (rows <= 16)
                        for (int64_t kb = g * group_steps; kb < kb_end; kb++) AMX_K_STEP_HALF(_tile_dpbssd, kb);
                    else if (bf16)
                        for (int64_t kb = g * group_steps; kb < kb_end; kb++) AMX_K_STEP(_tile_dpbf16ps, kb);
                    else
                        for (int64_t kb = g * group_steps; kb < kb_end; kb++) AMX_K_STEP(_tile_dpbssd, kb);
                    _tile_stored(0, acc, 128);
                    _tile_stored(1, acc + 16, 128);
                    if (rows > 16) {
                        _tile_stored(2, acc + 512, 128);
                        _tile_stored(3, acc + 528, 128);
                    }
                    if (!scaled) break;
                    amx_add_group(acc, !bf16, total, g == 0, rows, n0, cols, w_scale + g * N,
                                  offsets ? offsets + g * N : NULL, row_sums ? row_sums + m0 * groups + g : NULL,
                                  groups);
                }
                if (scaled)
                    amx_epilogue(total, 0, sx, sx_per_row, m0, rows, n0, cols, NULL, bias, N, y, out_dtype);
                else
                    amx_epilogue(acc, !bf16, sx, sx_per_row, m0, rows, n0, cols, w_scale, bias, N, y, out_dtype);
            }
        }
        free(b);
        free(pad);
        _tile_release();
    }
    free(row_sums);
    return failed;
}
#endif

/* y [T, N] (out_dtype 2: float32, 1: bfloat16) from int8 codes q [T, K] (row stride K), the row
 * scales sx ([T] if sx_per_row, else [1]), the weights packed for k steps of 64 (wp, nibbles),
 * w_scale [G, N] (G = ceil(K / group)), offsets [G, N] (or NULL) and bias [N] (float32, or
 * NULL). Returns 0; 1 when scratch memory cannot be allocated; 2 in a build without AMX. */
int w8a8_amx_linear(const int8_t *q, const float *sx, int sx_per_row, int64_t T, int64_t K, const int8_t *wp,
                    int nibbles, const float *w_scale, int64_t group, const float *offsets, const float *bias, int64_t N,
                    void *y, int out_dtype, int threads) {
#ifdef W8A8_AMX
    return amx_linear(0, q, T, K, wp, nibbles, sx, sx_per_row, w_scale, group, offsets, bias, N, y, out_dtype,
                      threads);
#else
    (void)q; (void)sx; (void)sx_per_row; (void)T; (void)K; (void)wp; (void)nibbles; (void)w_scale; (void)group;
    (void)offsets; (void)bias; (void)N; (void)y; (void)out_dtype; (void)threads;
    return 2;
#endif
}

/* The same from bfloat16 activations x [T, K] (row stride K; no row scales), the weights
 * packed for k steps of 32. */
int w8a8_amx_bf16_linear(const uint16_t *x, int64_t T, int64_t K, const int8_t *wp, int nibbles,
                         const float *w_scale, int64_t group, const float *offsets, const float *bias, int64_t N,
                         void *y, int out_dtype, int threads) {
#ifdef W8A8_AMX
    return amx_linear(1, x, T, K, wp, nibbles, NULL, 0, w_scale, group, offsets, bias, N, y, out_dtype, threads);
#else
    (void)x; (void)T; (void)K; (void)wp; (void)nibbles; (void)w_scale; (void)group; (void)offsets; (void)bias;
    (void)N; (void)y; (void)out_dtype; (void)threads;
    return 2;
#endif
}

/* -- Grouped W4A8 without AMX: AVX-512 VNNI ------------------------------------------------------
 *
 * w8a8_vnni_linear computes what w8a8_amx_linear does for 4-bit codes with one scale per group of
 * inputs (several groups a row), on CPUs with AVX-512 VNNI and no AMX: exact int32 sums of the
 * int8 activations against the signed codes c - 8 per group, then the AMX kernel's own steps
 * (amx_add_group: acc * w_scale[g] + row_sum_g * offsets[g] summed over the groups; amx_epilogue:
 * times the row's scale, plus the bias), so the two agree bit for bit.
 *
 * vpdpbusd multiplies unsigned bytes by signed ones: the weights' unsigned codes c (0 .. 15)
 * against the activations' int8 codes x, four products a lane, 16 channels a vector; then
 * sum x (c - 8) = sum x c - 8 sum x, with sum x the row's exact sum over the group. The pack
 * (cpu_w8a8._build_vnni_pack) keeps two codes a byte, as small as the layer's own codes: for each
 * block of 16 channels (zero-padded to a multiple of 32) and each run of 8 inputs k .. k + 7, 64
 * bytes, channel n's 4 bytes holding inputs k + j (low nibble) and k + 4 + j (high nibble) of byte
 * j. A load, a mask and a shift give the two operands; each row's 4 activation codes are
 * broadcast to every lane. Tiles of 8 rows x 32 channels (16 int32 sums in registers); each
 * thread takes tiles of 32 channels, whose codes stay in L1, and runs every row through them. K
 * and the group size must be multiples of 8. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define W4A8_VNNI 1
#define VNNI_ROWS 8

/* acc + the products of a's unsigned bytes and b's signed ones, four a lane (vpdpbusd), summed
 * in place: written with the intrinsic, GCC 12 copied accumulators between registers around most
 * of them (26 copies a step of 32 products), and the kernel took about 10% longer. */
static inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* p's 4 bytes in every lane, broadcast from memory (a load, not a shuffle port's work). */
static inline __m512i broadcast4(const int8_t *p) {
    return _mm512_broadcastd_epi32(_mm_loadu_si32(p));
}

/* Rows t0 .. t0 + R - 1 (R a literal at each call) and channels [n0, n0 + 32) of y; row_sums
 * [T, G] are the rows' exact sums per group. Each group's sums go through amx_add_group and the
 * total through amx_epilogue, the AMX kernel's own steps. */
static inline __attribute__((always_inline)) void vnni_tile(const int8_t *q, int64_t K, int64_t t0,
                                                            const uint8_t *w0, const float *w_scale,
                                                            const float *offsets, int64_t group, int64_t G,
                                                            const float *row_sums, int64_t n0, int64_t N,
                                                            const float *sx, int sx_per_row, const float *bias,
                                                            void *y, int out_dtype, const int R) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const uint8_t *w1 = w0 + (K / 8) * 64; /* the tile's second block of 16 channels */
    const int64_t cols = N - n0 < 32 ? N - n0 : 32;
    int32_t sums[VNNI_ROWS * 32]; /* a group's int32 sums, rows of 32 channels as the AMX helpers read */
    float total[VNNI_ROWS * 32];  /* the float32 sums over the groups so far */
    for (int64_t g = 0; g < G; g++) {
        const int64_t k1 = (g + 1) * group < K ? (g + 1) * group : K;
        __m512i acc[VNNI_ROWS][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
        for (int64_t kp = g * group / 8; kp < k1 / 8; kp++) {
            const __m512i b0 = _mm512_loadu_si512(w0 + kp * 64), b1 = _mm512_loadu_si512(w1 + kp * 64);
            const __m512i l0 = _mm512_and_si512(b0, low), h0 = _mm512_and_si512(_mm512_srli_epi16(b0, 4), low);
            const __m512i l1 = _mm512_and_si512(b1, low), h1 = _mm512_and_si512(_mm512_srli_epi16(b1, 4), low);
            for (int r = 0; r < R; r++) {
                const int8_t *xr = q + (t0 + r) * K + kp * 8;
                const __m512i xl = broadcast4(xr), xh = broadcast4(xr + 4);
                acc[r][0] = dpbusd(dpbusd(acc[r][0], l0, xl), h0, xh);
                acc[r][1] = dpbusd(dpbusd(acc[r][1], l1, xl), h1, xh);
            }
        }
        for (int r = 0; r < R; r++) { /* sum x (c - 8) = sum x c - 8 sum x, exact */
            const __m512i eight_sum = _mm512_set1_epi32(8 * (int32_t)row_sums[(t0 + r) * G + g]);
            _mm512_storeu_si512(sums + r * 32, _mm512_sub_epi32(acc[r][0], eight_sum));
            _mm512_storeu_si512(sums + r * 32 + 16, _mm512_sub_epi32(acc[r][1], eight_sum));
        }
        amx_add_group(sums, 1, total, g == 0, R, n0, cols, w_scale + g * N, offsets ? offsets + g * N : NULL,
                      row_sums + t0 * G + g, G);
    }
    amx_epilogue(total, 0, sx, sx_per_row, t0, R, n0, cols, NULL, bias, N, y, out_dtype);
}
#endif

/* 1 when this build has w8a8_vnni_linear (AVX-512 F, BW and VNNI). */
int w8a8_vnni_built(void) {
#ifdef W4A8_VNNI
    return 1;
#else
    return 0;
#endif
}

/* y [T, N] (out_dtype 2: float32, 1: bfloat16) from int8 codes q [T, K] (row stride K), the row
 * scales sx ([T] if sx_per_row, else [1]), 4-bit codes packed as above (wp), w_scale [G, N]
 * (G = ceil(K / group) > 1: several groups a row), offsets [G, N] (or NULL: symmetric) and bias
 * [N] (float32, or NULL). Returns 0; 1 when scratch memory cannot be allocated; 2 in a build
 * without VNNI, or for K or a group size that is not a multiple of 8. */
int w8a8_vnni_linear(const int8_t *q, const float *sx, int sx_per_row, int64_t T, int64_t K, const uint8_t *wp,
                     const float *w_scale, int64_t group, const float *offsets, const float *bias, int64_t N, void *y,
                     int out_dtype, int threads) {
#ifdef W4A8_VNNI
    if (K % 8 || group % 8 || group <= 0) return 2;
    if (T <= 0) return 0;
    const int64_t G = (K + group - 1) / group, tiles = (N + 31) / 32;
    float *row_sums = malloc(sizeof(float) * (size_t)(T * G)); /* [T, G]: each row's exact sum per group */
    if (!row_sums) return 1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++)
            for (int64_t g = 0; g < G; g++)
                row_sums[t * G + g] = row_sum(q + t * K, 0, g * group, (g + 1) * group < K ? (g + 1) * group : K);
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < tiles; tile++) {
            const int64_t n0 = tile * 32;
            const uint8_t *w0 = wp + tile * 2 * (K / 8) * 64;
            int64_t t0 = 0;
            for (; t0 + VNNI_ROWS <= T; t0 += VNNI_ROWS)
                vnni_tile(q, K, t0, w0, w_scale, offsets, group, G, row_sums, n0, N, sx, sx_per_row, bias, y, out_dtype,
                          VNNI_ROWS);
            switch (T - t0) { /* the row tail */
#define VNNI_TAIL(R)                                                                                              \
    case R:                                                                                                       \
        vnni_tile(q, K, t0, w0, w_scale, offsets, group, G, row_sums, n0, N, sx, sx_per_row, bias, y, out_dtype, R); \
        break;
                VNNI_TAIL(7)
                VNNI_TAIL(6)
                VNNI_TAIL(5)
                VNNI_TAIL(4)
                VNNI_TAIL(3)
                VNNI_TAIL(2)
                VNNI_TAIL(1)
#undef VNNI_TAIL
            default:
                break;
            }
        }
    }
    free(row_sums);
    return 0;
#else
    (void)q; (void)sx; (void)sx_per_row; (void)T; (void)K; (void)wp; (void)w_scale; (void)group; (void)offsets;
    (void)bias; (void)N; (void)y; (void)out_dtype; (void)threads;
    return 2;
#endif
}

/* w8a8_vnni_linear from x itself (float32, x_dtype 2, or bfloat16, 1; row stride x_stride), its
 * rows quantized here as w8a8_quantize_rows quantizes them (a scale per row: per token, or the
 * static per-tensor scale, NaN for a row holding a NaN or an infinity), the layer's fixed
 * arguments in one array: plan = {wp, w_scale, group, offsets, dynamic, static_scale, K, N}
 * (pointers as integers, 0 for NULL; static_scale the address of one float32, read at each call).
 * For decoding: one C call a layer instead of a quantization, a kernel call and the Python
 * between them. Returns as w8a8_vnni_linear. */
int w8a8_vnni_planned(const int64_t *plan, const void *x, int x_dtype, int64_t T, int64_t x_stride,
                      const float *bias, void *y, int out_dtype, int threads) {
#ifdef W4A8_VNNI
    const int64_t K = plan[6];
    const float *static_scale = (const float *)(intptr_t)plan[5];
    if (T <= 0) return 0;
    int8_t *q = malloc((size_t)(T * K));
    float *s = malloc(sizeof(float) * (size_t)T);
    if (!q || !s) {
        free(q); free(s);
        return 1;
    }
    const size_t elem = x_dtype == 2 ? sizeof(float) : sizeof(uint16_t);
    for (int64_t t = 0; t < T; t++)
        s[t] = quantize_row16((const char *)x + (size_t)(t * x_stride) * elem, x_dtype, K, (int)plan[4],
                              static_scale ? *static_scale : 0.0f, q + t * K);
    const int failed = w8a8_vnni_linear(q, s, 1, T, K, (const uint8_t *)(intptr_t)plan[0],
                                        (const float *)(intptr_t)plan[1], plan[2], (const float *)(intptr_t)plan[3],
                                        bias, plan[7], y, out_dtype, threads);
    free(q); free(s);
    return failed;
#else
    (void)plan; (void)x; (void)x_dtype; (void)T; (void)x_stride; (void)bias; (void)y; (void)out_dtype; (void)threads;
    return 2;
#endif
}
