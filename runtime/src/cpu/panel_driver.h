// panel_driver.h - what the panel kernel files (cpu/panels_avx512.cpp, cpu/panels_avx2.cpp) share:
// a job's geometry, where an activation row's data and a tile's outputs are, the software
// prefetch, and the drivers that cut a job into tiles.
//
// A kernel type Kern provides tile<C>(job, panel, part, c0, valid) for 1 <= C <= Kern::kCols
// activation rows starting at c0, on part `part` of the panel (Kern::kParts parts of
// 16 / kParts rows: one 16-lane vector on AVX-512, two 8-lane halves on AVX2), `valid` of whose
// rows exist. Each file includes this with its own kernels; the anonymous namespace keeps every
// file's instantiations, compiled with that file's instruction set, to itself.
#pragma once

#include "cpu/features.h"
#include "cpu/panels.h"
#include "cpu/prefetch.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace sparrow {
namespace {

struct Job {
    const PanelProduct & p;
    int64_t nb;          // blocks per row
    size_t quant, meta;  // bytes per block of each region
    size_t pb;           // bytes per panel
    size_t sum_bytes;    // summary bytes per activation row
    bool into_l1;        // the software prefetch's level (see kPrefetchBytes)
};

// Pointers for activation row c, and for its outputs of rows [part * rows_per_part, ...) of a panel.
template <typename Sum>
inline const Sum * sums_of(const Job & j, int64_t c) { return (const Sum *) (j.p.summaries + (size_t) c * j.sum_bytes); }
inline const uint8_t * row_of(const Job & j, int64_t c) { return j.p.x + (size_t) c * j.p.x_stride; }
inline float * out_of(const Job & j, int64_t c, const uint8_t * panel, int first_row) {
    return j.p.y + c * j.p.y_stride + (panel - j.p.panels) / (ptrdiff_t) j.pb * kPanelRows + first_row;
}

// Software prefetch of the bytes a little ahead of the block about to be read. The hardware
// prefetchers bring the stream to L2, but a kernel that computes for a while per cache line
// (the 4-bit types, the k-quants' scales, several activation rows) keeps too few of its own L1
// misses in flight to reach the read bandwidth. The distance must cover a DRAM access at the
// stream's own pace (~100 ns at 30-40 GB/s is 3-4 KiB): at 1,536 bytes a Zen 5 core read q4_0
// at 18 GB/s and a 6-row verify of q8_0 cost 1.5 decodes; at 6 KiB, 28-30 GB/s and 1.0
// (bench_quant 3072 x 512, 1 thread; q8_0 / q4_K / q5_K decode +20-40%; 4 KiB and 8 KiB in
// between and alike). Past a panel's end the addresses run on into the next panel, which is what
// usually comes next.
// Both helpers are forced inline: GCC 12 judged a call to a function of prefetches alone (not
// inlined early, as the pair's was not) free of effects and deleted it, prefetches and all (the
// pair tile ran without any: its 6-row q8_0 product from memory took 2.2 times one row, not 1.0).
constexpr size_t kPrefetchBytes = 6144;
// Into L1 where the L1 data cache is 48 KiB or more (the Zen 5 measured above), into L2 below
// (cpu/features.h small_l1_data_cache): on a Zen 4 (32 KiB) the lines brought into L1 were gone
// before use, and into L2, bench_quant model (SmolLM2-135M's products), 1 thread: q4_1 one row
// 5.7-5.8 -> 3.0-3.5 ms, six rows 6.7 -> 6.0; q8_0 six rows 11.5 -> 6.0-6.1 (its one row, which
// does not prefetch, unchanged); the AVX2 panels (SPARROW_SIMD=avx2) one row 10-20% faster, six
// rows as before. (The float tiles' near prefetch, cpu/matmul_avx512.cpp, gained nothing from L2
// there.) The level is chosen per line (cpu/prefetch.h says why).
__attribute__((always_inline)) inline void prefetch_block(const Job & j, const uint8_t * panel, const uint8_t * meta, int64_t b) {
    const uint8_t * q = panel + b * j.quant + kPrefetchBytes;
    for (size_t i = 0; i < j.quant; i += 64) prefetch_line(q + i, j.into_l1);
    prefetch_line(meta + b * j.meta + kPrefetchBytes / 4, j.into_l1);
}

// The same for a tile of two panels read side by side (a pair at pair_panel): each stream half
// the distance ahead, the same time ahead as one panel's 6 KiB, and past its panel's quants on
// into the same panel of the next pair, which it streams next (its neighbour is being read now).
// The scales are fetched a whole tile ahead, the next pair's at this block.
constexpr size_t kPairPrefetchBytes = kPrefetchBytes / 2;
__attribute__((always_inline)) inline void prefetch_pair_block(const Job & j, const uint8_t * pair_panel, int64_t b) {
    const size_t quant_bytes = (size_t) j.nb * j.quant, at = (size_t) b * j.quant + kPairPrefetchBytes;
    const size_t to_next_pair = at < quant_bytes ? 0 : 2 * j.pb - quant_bytes;
    for (int s = 0; s < 2; s++) {
        const uint8_t * q = pair_panel + s * j.pb + at + to_next_pair;
        for (size_t i = 0; i < j.quant; i += 64) prefetch_line(q + i, j.into_l1);
        prefetch_line(pair_panel + (2 + s) * j.pb + quant_bytes + b * j.meta, j.into_l1);
    }
}

// A job's geometry for product p.
inline Job job_of(const PanelProduct & p) {
    const panel::Geometry g = panel::geometry(p.type);
    return {p, p.k / g.block, g.quant, g.meta, panel_bytes(p.type, p.k), summary_bytes(p.type, p.k), !small_l1_data_cache()};
}

// Kern::tile<1> .. tile<Kern::kCols>, indexed by activation rows - 1, as function pointers Fn.
template <typename Fn, typename Kern, int... I>
constexpr std::array<Fn, sizeof...(I)> tile_table(std::integer_sequence<int, I...>) {
    return {{&Kern::template tile<I + 1>...}};
}
template <typename Fn, typename Kern>
constexpr std::array<Fn, Kern::kCols> tile_table() {
    return tile_table<Fn, Kern>(std::make_integer_sequence<int, Kern::kCols>());
}
using PanelTileFn = void (*)(const Job &, const uint8_t *, int, int64_t, int);

// Every panel of [first_panel, first_panel + n_panels), each part of it, every tile of up to
// Kern::kCols activation rows of [c0, c0 + nc).
template <typename Kern>
void run_panels(const PanelProduct & p, int64_t first_panel, int64_t n_panels, int64_t c0, int64_t nc) {
    static constexpr auto tiles = tile_table<PanelTileFn, Kern>();
    constexpr int kPartRows = kPanelRows / Kern::kParts;
    const Job job = job_of(p);
    for (int64_t pi = first_panel; pi < first_panel + n_panels; pi++) {
        const uint8_t * panel = p.panels + (size_t) pi * job.pb;
        for (int part = 0; part < Kern::kParts; part++) {
            const int valid = (int) std::min<int64_t>(kPartRows, p.rows - pi * kPanelRows - part * kPartRows);
            if (valid <= 0) break;
            for (int64_t c = c0; c < c0 + nc; c += Kern::kCols) {
                tiles[std::min<int64_t>(Kern::kCols, c0 + nc - c) - 1](job, panel, part, c, valid);
            }
        }
    }
}

// run_panels with a kernel that takes the panels two at a time: Pair::tile<C>(job, panel, c0,
// valid) for up to Pair::kCols activation rows (`valid` rows of the second panel exist), where
// one broadcast activation group, one row's start and scale serve 32 weight rows instead of 16.
// More rows go past a pair in runs of Pair::kCols; a lone last panel goes through Kern.
// Per (weight row, activation row) both compute the same operations in the same order (the
// integer sums are exact in any order): a row's result does not depend on which ran it.
using PairTileFn = void (*)(const Job &, const uint8_t *, int64_t, int);

template <typename Kern, typename Pair>
void run_panel_pairs(const PanelProduct & p, int64_t first_panel, int64_t n_panels, int64_t c0, int64_t nc) {
    if (n_panels < 2) {
        run_panels<Kern>(p, first_panel, n_panels, c0, nc);
        return;
    }
    static constexpr auto tiles = tile_table<PairTileFn, Pair>();
    const Job job = job_of(p);
    const int64_t end = first_panel + n_panels;
    int64_t pi = first_panel;
    for (; pi + 2 <= end; pi += 2) {
        const int valid = (int) std::min<int64_t>(kPanelRows, p.rows - (pi + 1) * kPanelRows);
        for (int64_t c = c0; c < c0 + nc; c += Pair::kCols)
            tiles[std::min<int64_t>(Pair::kCols, c0 + nc - c) - 1](job, p.panels + (size_t) pi * job.pb, c, valid);
    }
    if (pi < end) run_panels<Kern>(p, pi, 1, c0, nc);
}

}  // namespace
}  // namespace sparrow
