// matmul_avx2.cpp - register-tiled products of float weights (f32, f16, bf16) with f32
// activations (bf16 for bf16 weights), for quant.h's mul_mat, on AVX2 + FMA + F16C.
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
// Tile shapes 4 x 3 and 2 x 6 follow the 16 ymm registers (12 accumulators, the weights or the
// activations of the step, and one of the other side); see mul_mat_float for which is used when.
// Quantized weights are multiplied in 16-row panels instead (cpu/panels_avx2.cpp).

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/matmul_tiles.h"
#include "cpu/simd_avx2.h"

#include <immintrin.h>

#include <type_traits>

namespace sparrow {
namespace avx2 {
namespace {

// ---- float weights: f32, f16, bf16 against f32 (bf16) activations ----------------------------

// Each weight row's stream is prefetched kPrefetchBytes ahead into L1 (matmul_tiles.h), and the
// next tile's rows into L2 (see matmul_avx512.cpp).

// What a weight row's values are converted from (load8 / load1), and the activations they meet
// (x8 / x1): f32 for f32 and f16 weights, bf16 for bf16 (its dot type, quant.cpp).
struct ActivationsF32 {
    static __m256 x8(const uint8_t * row, int64_t i) { return _mm256_loadu_ps((const float *) row + i); }
    static float x1(const uint8_t * row, int64_t i) { return ((const float *) row)[i]; }
};
struct LoadF32 : ActivationsF32 {
    static constexpr int kBytes = 4;
    static __m256 load8(const uint8_t * row, int64_t i) { return _mm256_loadu_ps((const float *) row + i); }
    static float load1(const uint8_t * row, int64_t i) { return ((const float *) row)[i]; }
};
struct LoadF16 : ActivationsF32 {
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
    static __m256 x8(const uint8_t * row, int64_t i) { return load8(row, i); }
    static float x1(const uint8_t * row, int64_t i) { return load1(row, i); }
};

template <typename Load, int RM_, int RN_>
struct FloatKern {
    static constexpr int RM = RM_, RN = RN_;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        __m256 acc[R][C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) {
            if (i % 16 == 0) {
                for (int r = 0; r < R; r++) {
                    _mm_prefetch((const char *) (w + r * ws + i * Load::kBytes + kPrefetchBytes), _MM_HINT_T0);
                    _mm_prefetch((const char *) (w + (R + r) * ws + i * Load::kBytes), _MM_HINT_T1);
                }
            }
            // Whichever side is smaller is held in registers for the step: R * C accumulators
            // plus min(R, C) + 1 vectors fit the 16 ymm registers for 4 x 3 and 2 x 6.
            // Either order performs the same fma chain per accumulator.
            if constexpr (C <= R) {
                __m256 xv[C];
                for (int c = 0; c < C; c++) xv[c] = Load::x8(x + c * xs, i);
                for (int r = 0; r < R; r++) {
                    const __m256 wv = Load::load8(w + r * ws, i);
                    for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(wv, xv[c], acc[r][c]);
                }
            } else {
                __m256 wv[R];
                for (int r = 0; r < R; r++) wv[r] = Load::load8(w + r * ws, i);
                for (int c = 0; c < C; c++) {
                    const __m256 xv = Load::x8(x + c * xs, i);
                    for (int r = 0; r < R; r++) acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
                }
            }
        }
        for (int r = 0; r < R; r++) {
            for (int c = 0; c < C; c++) {
                float sum = hsum(acc[r][c]);
                for (int64_t j = i; j < k; j++) sum += Load::load1(w + r * ws, j) * Load::x1(x + c * xs, j);
                y[c * ys + r] = sum;
            }
        }
    }
};

// f32 weights: a verify of 4-6 rows goes over each weight row once, in one 2 x 6 tile, rather
// than twice in two 4 x 3 tiles: 6 rows of 576 x 1536 cost 1.01-1.28x one row against 1.24-1.41x
// (bench_quant, AVX2 AMD EPYC, 1 and 2 threads). Everything else takes 4 x 3, the tile with the
// fewest loads per fma: 1 x 8 for 7-8 rows was slower than three passes, and f16 / bf16 (whose
// loads convert) measured no gain from 2 x 6.
template <typename Load>
void mul_mat_float(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y,
                   int64_t ys) {
    if constexpr (std::is_same_v<Load, LoadF32>) {  // (f16 / bf16 never instantiate 2 x 6)
        if (nc >= 4 && nc <= 6) {
            drive<FloatKern<Load, 2, 6>>(k, w, ws, nr, x, xs, nc, y, ys);
            return;
        }
    }
    drive<FloatKern<Load, 4, 3>>(k, w, ws, nr, x, xs, nc, y, ys);
}

}  // namespace

void mul_mat_f32(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    mul_mat_float<LoadF32>(k, w, ws, nr, x, xs, nc, y, ys);
}
void mul_mat_f16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    mul_mat_float<LoadF16>(k, w, ws, nr, x, xs, nc, y, ys);
}
void mul_mat_bf16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    mul_mat_float<LoadBF16>(k, w, ws, nr, x, xs, nc, y, ys);
}
}  // namespace avx2
}  // namespace sparrow

#endif  // x86
