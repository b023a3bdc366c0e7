// matmul_tiles.h - the driver that cuts a block of a matrix product into register tiles.
//
// A kernel type Kern provides tile<R, C>(k, w, ws, x, xs, y, ys) for 1 <= R <= Kern::RM weight
// rows and 1 <= C <= Kern::RN activation rows. drive() walks the R x C grid, spreading the
// activation rows evenly over tiles (9 rows with RN = 4 -> 3 + 3 + 3, not 4 + 4 + 1) so no tile
// degenerates to a matrix-vector product. Each *_avx*.cpp file includes this with its own
// kernels; the anonymous namespace keeps every file's instantiations, compiled with that file's
// instruction set, to itself.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace sparrow {
namespace {

// How far ahead the float kernels prefetch (every *_avx*.cpp's tiles; measured and explained in
// matmul_avx512.cpp): a weight row's stream into L1 (rows' tiles), and a panel's stream (f16 /
// bf16 panels).
constexpr int kPrefetchBytes = 512;
constexpr size_t kPanelPrefetchBytes = 8192;
// Whether a float panel tile of C activation rows prefetches its stream: only at three rows and
// more (one or two rows stream best from huge pages alone; measured in matmul_avx512.cpp).
template <int C>
constexpr bool kPanelPrefetch = C > 2;

using TileFn = void (*)(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys);

template <typename Kern, int... I>
constexpr std::array<TileFn, sizeof...(I)> make_tiles(std::integer_sequence<int, I...>) {
    return {{&Kern::template tile<I / Kern::RN + 1, I % Kern::RN + 1>...}};
}

// Activation rows [0, nc) cut into ceil(nc / max_cols) tiles of near-equal width; fn(c0, cc).
template <typename F>
inline void for_even_col_tiles(int64_t nc, int max_cols, F && fn) {
    const int64_t n_tiles = (nc + max_cols - 1) / max_cols;
    for (int64_t t = 0, c0 = 0; t < n_tiles; t++) {
        const int cc = (int) ((nc - c0) / (n_tiles - t));  // even split of what is left
        fn(c0, cc);
        c0 += cc;
    }
}

template <typename Kern>
void drive(int64_t k, const void * wv, size_t ws, int64_t nr, const void * xv, size_t xs, int64_t nc, float * y,
           int64_t ys) {
    constexpr int RM = Kern::RM, RN = Kern::RN;
    static constexpr std::array<TileFn, RM * RN> tiles = make_tiles<Kern>(std::make_integer_sequence<int, RM * RN>());
    const uint8_t * w = (const uint8_t *) wv;
    const uint8_t * x = (const uint8_t *) xv;
    for (int64_t r0 = 0; r0 < nr; r0 += RM) {
        const int rr = (int) std::min<int64_t>(RM, nr - r0);
        // the weight rows of this tile stay in L1 while the activation tiles go past
        for_even_col_tiles(nc, RN, [&](int64_t c0, int cc) {
            tiles[(rr - 1) * RN + (cc - 1)](k, w + r0 * ws, ws, x + c0 * xs, xs, y + c0 * ys + r0, ys);
        });
    }
}

// f16 / bf16 panels (cpu/panels.h): groups of 4 interleaved weight rows, ws bytes a row (a group
// 4 ws), each group against activation tiles of up to 6 rows; tiles[C - 1] takes C rows and how
// many of the group's rows are real (the last group's may be fewer).
using PanelTileFn = void (*)(int64_t k, const uint8_t * g, const uint8_t * x, size_t xs, float * y, int64_t ys, int valid);

inline void drive_panel_groups(const PanelTileFn (&tiles)[6], int64_t k, const void * packed, size_t ws, int64_t nr,
                               const void * xv, size_t xs, int64_t nc, float * y, int64_t ys) {
    const size_t group_bytes = 4 * ws;
    const uint8_t * x = (const uint8_t *) xv;
    for (int64_t r0 = 0; r0 < nr; r0 += 4) {
        const uint8_t * g = (const uint8_t *) packed + (size_t) (r0 / 4) * group_bytes;
        const int valid = (int) std::min<int64_t>(4, nr - r0);
        for_even_col_tiles(nc, 6, [&](int64_t c0, int cc) { tiles[cc - 1](k, g, x + c0 * xs, xs, y + c0 * ys + r0, ys, valid); });
    }
}

}  // namespace
}  // namespace sparrow
