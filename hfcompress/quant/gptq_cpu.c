/* GPTQ's inner loop on CPU, in C (hfcompress/techniques/gptq/columns.py builds and loads this
 * through native.py): Algorithm 1 of the GPTQ paper over a run of columns of one lazy block
 * that share how their scales are found. For each column c in [c0, c1), of every row:
 *
 *     q      = clamp(round(w[c] / s + z), 0, maxq)        (round half to even, as torch.round)
 *     err    = (w[c] - (q - z) * s) / Hinv[c, c]
 *     w[t]  -= err * Hinv[c, t]                           for t in [c, width)
 *
 * The rows are independent (each row's updates read only that row and Hinv), so each thread
 * takes whole rows and runs their columns in order, a row's `width` floats in L1. torch's
 * twin (columns.py, `quantize_columns_ref`) does the same a column at a time for all rows, a
 * dozen tensor operations per column: on SmolLM2-135M the loop was overhead-bound.
 *
 * Every operation is the IEEE float32 one torch performs, in the same order, with no multiply
 * and add fused into one rounding: GCC's -std=c11 (native.py's flags) means -ffp-contract=off,
 * and the pragma below says the same to clang. */
#include <math.h>
#include <stdint.h>

#pragma STDC FP_CONTRACT OFF

/* w [N, width] (row stride w_stride) is updated in place; hinv [width, width] (row stride
 * h_stride); s and z, float32, are read at s[r * s_row + (c - c0) * s_col] (a column stride of
 * 0 for one scale per row); codes (uint8) and unrounded (float32) receive column c at index
 * r * stride + (j0 + c - c0); err [N, width] (row stride err_stride) receives each column's
 * error. */
void gptq_columns(float *restrict w, int64_t N, int64_t width, int64_t w_stride, const float *restrict hinv, int64_t h_stride,
                 int64_t c0, int64_t c1, const float *s, const float *z, int64_t s_row, int64_t s_col, float maxq,
                 uint8_t *codes, float *unrounded, int64_t out_stride, int64_t j0, float *err, int64_t err_stride,
                 int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < N; r++) {
        float *row = w + r * w_stride;
        for (int64_t c = c0; c < c1; c++) {
            const float sc = s[r * s_row + (c - c0) * s_col], zr = z[r * s_row + (c - c0) * s_col];
            const float x = row[c];
            float q = nearbyintf(x / sc + zr);
            q = q < 0.0f ? 0.0f : (q > maxq ? maxq : q);
            if (q != q) q = 0.0f; /* a NaN weight gets code 0: C's cast of a NaN is undefined */
            const float e = (x - (q - zr) * sc) / hinv[c * h_stride + c];
            codes[r * out_stride + j0 + (c - c0)] = (uint8_t)q;
            unrounded[r * out_stride + j0 + (c - c0)] = x;
            err[r * err_stride + c] = e;
            const float *h = hinv + c * h_stride;
            for (int64_t t = c; t < width; t++) row[t] -= e * h[t];
        }
    }
}
