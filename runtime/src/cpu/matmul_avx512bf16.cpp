// matmul_avx512bf16.cpp - bf16 weights against bf16 activations on vdpbf16ps (AVX512_BF16), for
// quant.h's mul_mat (rows) and the store's f16 / bf16 panels (cpu/panels.h).
//
// vdpbf16ps multiplies 32 bf16 pairs into 16 f32 lanes, lane j adding columns 2j and 2j + 1 of
// a 32-column step: twice the products of an f32 fma at nearly its rate (Zen 5: 7.8 against 8.4
// G instructions a second a core). Against matmul_avx512.cpp's fma tiles (f16 weights converted
// on load), SmolLM2-135M's prefill of 512 tokens ran 1.48x (2 threads) and 1.50x (1 thread)
// faster, bench_quant's 16 rows of 3072 x 576 took 1.3-1.4x one row's time against 1.8-1.9;
// the model's 6-row verify did not get cheaper (~1.35x a row a product either way at 2 threads:
// its limit there is not the arithmetic).
//
// Both kernels run the same chain per (weight row, activation row): 32-column steps from column
// 0, the last one with the columns past k zero in weights and activations, then reduce4. So a
// row's result is the same bits in the rows' kernel and in the panels, at every batch size.
// (The same products on a CPU without the instruction, matmul_avx512.cpp's widening fmas, round
// differently: results are the same per machine, not across machines.)

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/matmul_tiles.h"
#include "cpu/simd_avx512.h"

#include <immintrin.h>

namespace sparrow {
namespace avx512bf16 {
namespace {

using avx512::reduce4;

inline __m512 dot(__m512 acc, __m512i w, __m512i x) { return _mm512_dpbf16_ps(acc, (__m512bh) w, (__m512bh) x); }

// The columns of the last step (k not a multiple of 32): its loads are masked, the rest zero.
inline __mmask32 tail_mask(int64_t n) { return (__mmask32) ((1u << n) - 1); }

// RM_ weight rows a tile: 4, or 1 at one activation row (one stream, see matmul_avx512.cpp).
template <int RM_>
struct RowsKern {
    static constexpr int RM = RM_, RN = 6;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        constexpr int kTilesAhead = C > 1 ? 2 : 1;
        __m512 acc[4][C];  // rows past R stay zero: reduce4 takes four
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
        auto step = [&](int64_t i, auto load) {
            if constexpr (C > 1) {
                for (int r = 0; r < R; r++) _mm_prefetch((const char *) (w + r * ws + i * 2 + kPrefetchBytes), _MM_HINT_T0);
            }
            for (int r = 0; r < R; r++) _mm_prefetch((const char *) (w + (kTilesAhead * R + r) * ws + i * 2), _MM_HINT_T1);
            __m512i wv[R];
            for (int r = 0; r < R; r++) wv[r] = load((const uint16_t *) (w + r * ws) + i);
            for (int c = 0; c < C; c++) {
                const __m512i xv = load((const uint16_t *) (x + c * xs) + i);
                for (int r = 0; r < R; r++) acc[r][c] = dot(acc[r][c], wv[r], xv);
            }
        };
        int64_t i = 0;
        for (; i + 32 <= k; i += 32) step(i, [](const uint16_t * p) { return _mm512_loadu_si512(p); });
        if (i < k) {
            const __mmask32 m = tail_mask(k - i);
            step(i, [m](const uint16_t * p) { return _mm512_maskz_loadu_epi16(m, p); });
        }
        for (int c = 0; c < C; c++) {
            const __m128 sums = reduce4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]);
            if constexpr (R == 4) _mm_storeu_ps(y + c * ys, sums);
            else _mm_mask_storeu_ps(y + c * ys, (__mmask8) ((1u << R) - 1), sums);
        }
    }
};

// Panels: 4 rows interleaved per group, every 16 columns the 4 rows' 16 values (32 bytes each),
// zeros past k up to a multiple of 16. A 32-column step of row r joins its two 16-column pieces,
// 128 bytes apart, into the rows' kernel's lanes; a last step of at most 16 columns has only the
// first piece (the second lanes zero, as the rows' masked load leaves them).
template <int C>
void panel_tile(int64_t k, const uint8_t * g, const uint8_t * x, size_t xs, float * y, int64_t ys, int valid) {
    __m512 acc[4][C];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    auto step = [&](const uint8_t * p, auto load_w, auto load_x) {
        if constexpr (kPanelPrefetch<C>) {
            for (int line = 0; line < 4; line++) _mm_prefetch((const char *) (p + kPanelPrefetchBytes + 64 * line), _MM_HINT_T1);
        }
        __m512i wv[4];
        for (int r = 0; r < 4; r++) wv[r] = load_w(p + 32 * r);
        for (int c = 0; c < C; c++) {
            const __m512i xv = load_x(x + c * xs);
            for (int r = 0; r < 4; r++) acc[r][c] = dot(acc[r][c], wv[r], xv);
        }
    };
    auto both_pieces = [](const uint8_t * q) {
        const __m256i lo = _mm256_loadu_si256((const __m256i *) q);
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_loadu_si256((const __m256i *) (q + 128)), 1);
    };
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        step(g + i * 8, both_pieces, [i](const uint8_t * row) { return _mm512_loadu_si512((const uint16_t *) row + i); });
    }
    if (i < k) {
        const __mmask32 m = tail_mask(k - i);
        auto load_x = [i, m](const uint8_t * row) { return _mm512_maskz_loadu_epi16(m, (const uint16_t *) row + i); };
        if (k - i > 16) step(g + i * 8, both_pieces, load_x);
        else step(g + i * 8, [](const uint8_t * q) { return _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *) q)); }, load_x);
    }
    for (int c = 0; c < C; c++) {
        const __m128 sums = reduce4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]);
        if (valid == 4) _mm_storeu_ps(y + c * ys, sums);
        else _mm_mask_storeu_ps(y + c * ys, (__mmask8) ((1u << valid) - 1), sums);
    }
}

}  // namespace

// ws: the packed matrix's bytes per row (float_panel_row_stride)
void panel_bf16(int64_t k, const void * packed, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y,
                int64_t ys) {
    static constexpr PanelTileFn tiles[6] = {panel_tile<1>, panel_tile<2>, panel_tile<3>, panel_tile<4>, panel_tile<5>, panel_tile<6>};
    drive_panel_groups(tiles, k, packed, ws, nr, x, xs, nc, y, ys);
}

void mul_mat_bf16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    if (nc == 1) drive<RowsKern<1>>(k, w, ws, nr, x, xs, nc, y, ys);
    else drive<RowsKern<4>>(k, w, ws, nr, x, xs, nc, y, ys);
}

}  // namespace avx512bf16
}  // namespace sparrow

#endif  // x86
