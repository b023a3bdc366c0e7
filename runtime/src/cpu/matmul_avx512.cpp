// matmul_avx512.cpp - register-tiled products of float weights (f32, f16, bf16) with f32
// activations (bf16 for bf16 weights), for quant.h's mul_mat, on AVX-512: the plan of
// matmul_avx2.cpp on 16-float vectors, 4 x 6 tiles in the 32 zmm registers (1 x 1 for f16 / bf16
// decoding), ragged tails (k not a multiple of 16) by masked loads whose missing lanes read as
// zero. Quantized weights are multiplied in 16-row panels (cpu/panels_avx512.cpp); bf16 on CPUs
// with AVX512_BF16 in cpu/matmul_avx512bf16.cpp.

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/features.h"
#include "cpu/matmul_tiles.h"
#include "cpu/simd_avx2.h"
#include "cpu/simd_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <type_traits>

namespace sparrow {
namespace avx512 {
namespace {

// Each weight row's stream is prefetched kPrefetchBytes ahead into L1 where a tile has several
// activation rows: converting f16 / bf16 and the FMAs of 2-6 rows take long enough per cache
// line that the tile's own misses alone leave memory idle. At one activation row (decode) the
// hardware prefetchers keep up with the stream and the 4 prefetches a step only take load slots
// (Zen 5, bench_quant 3072 x 512, GB/s of weights at one row: f16 at 1 thread 26-28 -> 31-33,
// at 2 threads on two CCDs 47 -> 53-55, on one CCD even at 39-41; f32 32-35 -> 35-37).
// (kPrefetchBytes and kPanelPrefetchBytes are in matmul_tiles.h, shared with the other files.)
// ... and the next tile's rows (the same columns, R rows further on) into L2. A row of a small
// model is only a few KiB, so the near prefetch alone leaves every tile's first lines cold; and
// with several activation rows the FMAs are long enough that only a request issued a whole tile
// ahead keeps memory busy (SmolLM2-135M in f32, 6-row verify: 1.33 -> 1.18 decodes; decode
// itself 3-5% faster; the next tile is at most 4 rows, well inside L2). Every tile but f32 at
// one row, a load and an FMA per line, a pure stream (3072 x 512 at 2 threads: 43 -> 38-42
// with it); f16 and bf16 at one row lose 10-25% without it. f16 and bf16 at several rows go two
// tiles ahead (6 rows at 2 threads: 39.8 -> 41.9 GB/s of weights on one CCD, 41 -> 45 on two);
// f32 there loses by it (1.20 -> 1.31 of one row's time), one row gains nothing.

// ---- float weights: f32, f16, bf16 against f32 (bf16) activations ----------------------------
// Ragged tails (k not a multiple of 16) are masked loads: the missing lanes read as zero.

// What a weight row's values are converted from (load16 / load_tail), and the activations they
// meet (x16 / x_tail): f32 for f32 and f16 weights, bf16 for bf16 (its dot type, quant.cpp; the
// tiles on vdpbf16ps are in cpu/matmul_avx512bf16.cpp, these serve CPUs without it).
struct ActivationsF32 {
    static __m512 x16(const uint8_t * row, int64_t i) { return _mm512_loadu_ps((const float *) row + i); }
    static __m512 x_tail(const uint8_t * row, int64_t i, __mmask16 m) {
        return _mm512_maskz_loadu_ps(m, (const float *) row + i);
    }
};
struct LoadF32 : ActivationsF32 {
    static constexpr int kBytes = 4;
    static __m512 load16(const uint8_t * row, int64_t i) { return _mm512_loadu_ps((const float *) row + i); }
    static __m512 load_tail(const uint8_t * row, int64_t i, __mmask16 m) {
        return _mm512_maskz_loadu_ps(m, (const float *) row + i);
    }
};
struct LoadF16 : ActivationsF32 {
    static constexpr int kBytes = 2;
    static __m512 load16(const uint8_t * row, int64_t i) {
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) ((const uint16_t *) row + i)));
    }
    static __m512 load_tail(const uint8_t * row, int64_t i, __mmask16 m) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *) row + i));
    }
};
struct LoadBF16 {
    static constexpr int kBytes = 2;
    static __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    static __m512 load16(const uint8_t * row, int64_t i) {
        return widen(_mm256_loadu_si256((const __m256i *) ((const uint16_t *) row + i)));
    }
    static __m512 load_tail(const uint8_t * row, int64_t i, __mmask16 m) {
        return widen(_mm256_maskz_loadu_epi16(m, (const uint16_t *) row + i));
    }
    static __m512 x16(const uint8_t * row, int64_t i) { return load16(row, i); }
    static __m512 x_tail(const uint8_t * row, int64_t i, __mmask16 m) { return load_tail(row, i, m); }
};

// RM_ weight rows a tile: 4 (24 accumulators, 4 weight vectors, 1 activation vector), or 1 for
// f16 / bf16 at one activation row (see mul_mat_f16). kF32OneRowAhead: f32 at one activation row
// prefetches the next tile too (see mul_mat_f32).
template <typename Load, int RM_ = 4, bool kF32OneRowAhead = false>
struct FloatKern {
    static constexpr int RM = RM_, RN = 6;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        constexpr int kTilesAhead = Load::kBytes == 2 && C > 1 ? 2 : 1;
        static_assert(R <= 4, "a tile's rows are reduced four at a time");
        __m512 acc[4][C];  // rows past R stay zero: reduce4 takes four
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
        auto step = [&](int64_t i, auto load_w, auto load_x) {
            __m512 wv[R];
            if constexpr (C > 1) {  // see kPrefetchBytes
                for (int r = 0; r < R; r++) _mm_prefetch((const char *) (w + r * ws + i * Load::kBytes + kPrefetchBytes), _MM_HINT_T0);
            }
            if constexpr (!(std::is_same_v<Load, LoadF32> && C == 1) || kF32OneRowAhead) {  // a tile or two ahead (see kPrefetchBytes)
                for (int r = 0; r < R; r++) _mm_prefetch((const char *) (w + (kTilesAhead * R + r) * ws + i * Load::kBytes), _MM_HINT_T1);
            }
            for (int r = 0; r < R; r++) wv[r] = load_w(w + r * ws, i);
            for (int c = 0; c < C; c++) {
                const __m512 xv = load_x(x + c * xs, i);
                for (int r = 0; r < R; r++) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
            }
        };
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            step(i, [](const uint8_t * row, int64_t j) { return Load::load16(row, j); },
                 [](const uint8_t * row, int64_t j) { return Load::x16(row, j); });
        }
        if (i < k) {
            const __mmask16 m = (__mmask16) ((1u << (k - i)) - 1);
            step(i, [m](const uint8_t * row, int64_t j) { return Load::load_tail(row, j, m); },
                 [m](const uint8_t * row, int64_t j) { return Load::x_tail(row, j, m); });
        }
        for (int c = 0; c < C; c++) {
            const __m128 sums = reduce4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]);
            if constexpr (R == 4) _mm_storeu_ps(y + c * ys, sums);
            else _mm_mask_storeu_ps(y + c * ys, (__mmask8) ((1u << R) - 1), sums);
        }
    }
};

// f16 / bf16 panels (cpu/panels.h): 4 rows interleaved per group, every 16 columns the 4 rows'
// 16 values, so a tile's weights are one stream. The tile is FloatKern's 4 x C with the same FMA
// chain per (row, activation row) and the same reduction (the same bits as the rows' kernels), the
// zero padding of the last 16 columns standing in for the masked weight load.
//
// Where a tile has three activation rows or more the stream is prefetched into L2
// kPanelPrefetchBytes (8 KiB) ahead: the hardware prefetchers follow it too, but the software
// prefetch keeps several tiles of FMAs from leaving memory idle (SmolLM2's products at 6 rows,
// bench_quant model, 1 thread, Zen 4: f16 16.2-16.5 ms with it, 28-31 without). A fixed distance,
// not a number of groups: two groups ahead (9 KiB on SmolLM2's 576 columns) was right there, but on
// ffn_down's 1,536 columns (24 KiB ahead) a 6-row verify took 1.40-1.55 of one row's time against
// 1.08-1.20 at 6-8 KiB (bench_quant 576 x 1536, 2 threads; 12 KiB and more as slow as 24). Cutting k
// into pieces whose activation rows stay in L1 was tried there too, and lost at both distances (the
// pieces break the stream the prefetch runs ahead of).
// At one activation row (decode) the panels are not prefetched at all: from huge pages (the
// store's arena, cpu/huge_pages.h) the hardware prefetchers follow the one stream by themselves,
// and software prefetches only compete with them (AMD EPYC Zen 4, bench_quant model at one row, 1
// thread, GB/s of weights: f16 23-24 with an 8 KiB prefetch into L1, 22 into L2, 31-32 without;
// bf16 on vdpbf16ps 22 with its L2 prefetch, 27-32 without; even from 4 KiB pages f16 went 18-21
// -> 24). Nor at two rows (a verify of one draft): there the prefetch made the product 1.30 times
// one row's in f16 and 1.41-1.49 in bf16, without it 1.08 and 1.05-1.11 (the same machine,
// SPARROW_BENCH_ROWS=2 bench_quant model, 1 thread; at 3 rows the prefetch still wins, f16 1.09
// against 1.32). On a Zen 5 with 4 KiB pages, prefetching one row had paid (into L2: 33-35 -> 37-39
// GB/s, bench_quant 49152 x 576; into L1: f16 decoding 10-15% faster at 1 thread); that CPU has not
// run the weights from huge pages yet. (kPanelPrefetch, matmul_tiles.h.)

template <typename Load>
struct PanelKern {
    template <int C>
    static void tile(int64_t k, const uint8_t * g, const uint8_t * x, size_t xs, float * y, int64_t ys, int valid) {
        __m512 acc[4][C];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
        auto step = [&](const uint8_t * p, auto load_x) {
            if constexpr (kPanelPrefetch<C>) {
                _mm_prefetch((const char *) (p + kPanelPrefetchBytes), _MM_HINT_T1);
                _mm_prefetch((const char *) (p + kPanelPrefetchBytes + 64), _MM_HINT_T1);
            }
            __m512 wv[4];
            for (int r = 0; r < 4; r++) wv[r] = Load::load16(p + 32 * r, 0);
            for (int c = 0; c < C; c++) {
                const __m512 xv = load_x(x + c * xs);
                for (int r = 0; r < 4; r++) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
            }
        };
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) step(g + i * 8, [i](const uint8_t * row) { return Load::x16(row, i); });
        if (i < k) {
            const __mmask16 m = (__mmask16) ((1u << (k - i)) - 1);
            step(g + i * 8, [i, m](const uint8_t * row) { return Load::x_tail(row, i, m); });
        }
        for (int c = 0; c < C; c++) {
            const __m128 sums = reduce4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]);
            if (valid == 4) _mm_storeu_ps(y + c * ys, sums);
            else _mm_mask_storeu_ps(y + c * ys, (__mmask8) ((1u << valid) - 1), sums);
        }
    }

    // ws: the packed matrix's bytes per row (float_panel_row_stride)
    static void run(int64_t k, const void * packed, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc,
                    float * y, int64_t ys) {
        static constexpr PanelTileFn tiles[6] = {tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};
        drive_panel_groups(tiles, k, packed, ws, nr, x, xs, nc, y, ys);
    }
};

}  // namespace

void panel_f16(int64_t k, const void * packed, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y,
               int64_t ys) {
    PanelKern<LoadF16>::run(k, packed, ws, nr, x, xs, nc, y, ys);
}
void panel_bf16(int64_t k, const void * packed, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y,
                int64_t ys) {
    PanelKern<LoadBF16>::run(k, packed, ws, nr, x, xs, nc, y, ys);
}

// f32 at one activation row prefetching the next tile into L2 (as every other tile does): on a
// Zen 5 a pure stream without it (above); on a Zen 4 (32 KiB L1d) it took SmolLM2-135M's f32
// products at one row (bench_quant model) from 34.5-34.9 to 24.5-25.2 ms at 1 thread and 19.8-27.4
// to 13.0-13.3 at 2 (6 rows unchanged), and plain decoding of the real pair's f32 file from
// 27.2-29.0 to 37.2-37.3 tokens/s at 1 thread and 46.5-49.6 to 64.7-68.9 at 2. The L1 data
// cache's size tells the two apart (small_l1_data_cache, the test the attention's prefetch uses).
void mul_mat_f32(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    if (small_l1_data_cache()) drive<FloatKern<LoadF32, 4, true>>(k, w, ws, nr, x, xs, nc, y, ys);
    else drive<FloatKern<LoadF32>>(k, w, ws, nr, x, xs, nc, y, ys);
}
// (The CPU backend's weight store packs f16 / bf16 matrices into panels at AVX-512, panel_f16
// above; these rows' kernels serve matrices that did not go through it, and set the bits the
// panels must equal. f32 stays on rows: packed the same way (PanelKern over 4-byte values, 2-16
// KiB ahead), the real pair's f32 file verified 6 tokens in 1.34-1.52 decodes against 1.33-1.34
// on rows, engines alternating in one process; bench_quant moved with the host's memory speed.)
// f16 / bf16 at one activation row (decode) take one weight row at a time: the rows, one after
// the other in memory, are then one stream rather than four a row apart, which the prefetchers
// follow better (bench_quant 3072 x 512 at 2 threads: 39-41 -> 43-45 GB/s; the real pair's f16
// decode at 2 threads 132-135 -> 145-148 tokens/s; 1 thread even, its single fma chain a row
// being about as fast as memory there). f32 measured no gain (and -6% on the real pair). A row's
// sum is the same chain of fmas and the same reduction either way: the same bits.
void mul_mat_f16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    if (nc == 1) drive<FloatKern<LoadF16, 1>>(k, w, ws, nr, x, xs, nc, y, ys);
    else drive<FloatKern<LoadF16>>(k, w, ws, nr, x, xs, nc, y, ys);
}
void mul_mat_bf16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    if (nc == 1) drive<FloatKern<LoadBF16, 1>>(k, w, ws, nr, x, xs, nc, y, ys);
    else drive<FloatKern<LoadBF16>>(k, w, ws, nr, x, xs, nc, y, ys);
}
}  // namespace avx512
}  // namespace sparrow

#endif  // x86
