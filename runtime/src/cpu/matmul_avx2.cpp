// matmul_avx2.cpp - register-tiled products of float weights (f32, f16, bf16) with f32
// activations, for quant.h's mul_mat, on AVX2 + FMA + F16C.
//
// vec_dot streams one weight row against one activation row. With several activation rows
// (prefill, a verify batch) the same weight row would be fetched and converted once per token,
// and even for one (decode) a single stream of reads leaves memory bandwidth unused. Here a
// micro-kernel computes an R x C tile (R weight rows x C activation rows) with R * C
// accumulators that stay in registers: every weight vector (loaded and converted once) meets C
// activation vectors, and every activation vector R weight rows. The driver cuts the requested
// block into such tiles (cpu/matmul_tiles.h). A (row, activation row) result goes through the
// same operations in every tile shape, so it does not depend on the batch around it.
//
// Tile shape 4 x 3 follows the 16 ymm registers (12 accumulators, a weight and the activations).
// Quantized weights are multiplied in 16-row panels instead (cpu/panels_avx2.cpp).

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/matmul_tiles.h"
#include "cpu/simd_avx2.h"

#include <immintrin.h>

namespace sparrow {
namespace avx2 {
namespace {

// ---- float weights: f32, f16, bf16 against f32 activations ----------------------------------

// Each weight row's stream is prefetched this far ahead into L1, and the next tile's rows into L2
// (see matmul_avx512.cpp).
constexpr int kPrefetchBytes = 512;

struct LoadF32 {
    static constexpr int kBytes = 4;
    static __m256 load8(const uint8_t * row, int64_t i) { return _mm256_loadu_ps((const float *) row + i); }
    static float load1(const uint8_t * row, int64_t i) { return ((const float *) row)[i]; }
};
struct LoadF16 {
    static constexpr int kBytes = 2;
    static __m256 load8(const uint8_t * row, int64_t i) {
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) ((const uint16_t *) row + i)));
    }
    static float load1(const uint8_t * row, int64_t i) { return fp16(((const uint16_t *) row)[i]); }
};
struct LoadBF16 {
    static constexpr int kBytes = 2;
    static __m256 load8(const uint8_t * row, int64_t i) { return load_bf16x8((const uint16_t *) row + i); }
    static float load1(const uint8_t * row, int64_t i) { return bf16_to_fp32(((const uint16_t *) row)[i]); }
};

template <typename Load>
struct FloatKern {
    static constexpr int RM = 4, RN = 3;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        __m256 acc[R][C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) {
            __m256 xv[C];
            for (int c = 0; c < C; c++) xv[c] = _mm256_loadu_ps((const float *) (x + c * xs) + i);
            for (int r = 0; r < R; r++) {
                if (i % 16 == 0) {
                    _mm_prefetch((const char *) (w + r * ws + i * Load::kBytes + kPrefetchBytes), _MM_HINT_T0);
                    _mm_prefetch((const char *) (w + (R + r) * ws + i * Load::kBytes), _MM_HINT_T1);
                }
                const __m256 wv = Load::load8(w + r * ws, i);
                for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(wv, xv[c], acc[r][c]);
            }
        }
        for (int r = 0; r < R; r++) {
            for (int c = 0; c < C; c++) {
                float sum = hsum(acc[r][c]);
                const float * xc = (const float *) (x + c * xs);
                for (int64_t j = i; j < k; j++) sum += Load::load1(w + r * ws, j) * xc[j];
                y[c * ys + r] = sum;
            }
        }
    }
};

}  // namespace

void mul_mat_f32(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive<FloatKern<LoadF32>>(k, w, ws, nr, x, xs, nc, y, ys);
}
void mul_mat_f16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive<FloatKern<LoadF16>>(k, w, ws, nr, x, xs, nc, y, ys);
}
void mul_mat_bf16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive<FloatKern<LoadBF16>>(k, w, ws, nr, x, xs, nc, y, ys);
}
}  // namespace avx2
}  // namespace sparrow

#endif  // x86
