// panels.h - quantized weight matrices repacked at load into 16-row panels, and the matrix
// products that stream them.
//
// A GGUF row of blocks is laid out for reading one row at a time. A kernel that wants a vector
// lane per weight row (so that one integer dot instruction advances 16 rows, and a row's sum
// never needs a horizontal reduction) would have to transpose 16 rows' blocks in registers on
// every pass. Here that transpose happens once, at load: rows are grouped into panels of 16
// (the last one padded with zero rows) and each block position of the panel stores the 16
// rows' blocks interleaved, 4 quant bytes of row 0, of row 1, ..., of row 15, then the next 4
// bytes. A panel block is exactly 16 file blocks in size (the k-quants' packed 6-bit scales are
// only regrouped), so decode reads the same number of bytes, now as one sequential stream.
//
// Batch invariance. Every row of every panel goes through one kernel per type and SIMD level,
// whose per-(row, activation row) arithmetic does not depend on how many activation rows share
// the call, which panel range a thread was given, whether the row is in a padded panel, or
// whether its panel went through alone or beside the next one (AVX-512's q8_0 / q4_0 / q4_1
// tiles take panels two at a time, one broadcast activation group serving both). A
// token's logits are then the same bits whether it is decoded alone, verified in a batch of 5
// or prefilled with 500 others, at any thread count: greedy speculative decoding equals plain
// decoding on quantized models, token for token.
//
// Activations. Each matmul quantizes its activation rows once into the weight type's dot type
// (quant.h) and then summarizes each block once (summarize_activations): its scale as a float
// and the integer offsets the kernels add per block, so that no job recomputes them.
//
// Layout. A panel of 16 rows holds, for its nb blocks in order, first every block's quants
// (Q bytes each) and then every block's scales (M bytes each), padded to 64 bytes: quant loads
// stay aligned and both regions stream sequentially. All of ggml's values are kept bit for bit;
// only their order changes. Rows r, 4-byte groups i:
//   q8_0  Q 512: qs[8][16][4], row r's quant 4j + i plus 128 (unsigned for vpdpbusd)
//         M  32: d[16] fp16
//   q4_0  Q 256: qs[4][16][4], row r's qs bytes 4j + i (low nibble quant 4j + i, high 16 + 4j + i)
//         M  32: d[16]
//   q4_1  Q 256: as q4_0;  M 64: d[16], m[16]
//   q4_K  Q 2048: qs[4][8][16][4], pair p, group g: row r's qs bytes 32p + 4g + i (low nibble:
//         sub-block 2p, quant 4g + i; high nibble: sub-block 2p + 1)
//         M 256: d[16], dmin[16] fp16, scales[3][16][4]: row r's packed scale bytes 4w + i
//   q5_K  Q 2560: qh[8][16][4], row r's qh bytes 4g + i (bit s: fifth bit of sub-block s, quant
//         4g + i), then qs as q4_K;  M 256: as q4_K
//   q6_K  Q 3072: ql[32][16][4], row r's ql bytes 4j + i, then qh[16][16][4], its qh bytes
//         M 288: d[16], scales[16][16] int8 ([sub-block][row])
//
// f16 and bf16 (AVX-512 only) are not blocks but rows of 4 interleaved: a panel is 4 groups of 4
// rows, and a group holds, for every 16 columns j (k padded to a multiple of 16 with zeros), the
// 4 rows' 16 values: group[j][row][16]. Their tile (4 rows x up to 6 activation rows, the one
// the file's rows go through, fp32 activations) then reads one stream at any batch, where it read
// 4 rows a row apart; decoding one row had gone a row at a time for the single stream, with one
// chain of FMAs, which bounded it on a Zen 5 core: bench_quant 49152 x 576 at one row, 1 thread,
// 31-33 -> 37-39 GB/s. Each row's sum is the same chain of FMAs and the same reduction: the same bits.
#pragma once

#include "quant.h"

#include <cstddef>
#include <cstdint>

namespace sparrow {

constexpr int kPanelRows = 16;

// Does this type have panel kernels at the active SIMD level? (Float types keep their rows:
// their tiles are already batch-invariant and bound by memory.)
bool panels_supported(DType t);
// Bytes of one panel (16 rows of k elements).
size_t panel_bytes(DType t, int64_t k);
// Bytes of a whole packed matrix of `rows` rows.
size_t packed_bytes(DType t, int64_t k, int64_t rows);
// Repack rows [0, rows) (row_stride bytes apart, in the file's layout) into panels; the padding
// rows of the last panel are zero blocks (they produce 0 and are never stored).
void pack_panels(DType t, int64_t k, const void * src, size_t row_stride, int64_t rows, void * dst);
// The inverse, for tests: row r of the packed matrix in the file's layout.
void unpack_panel_row(DType t, int64_t k, const void * packed, int64_t r, void * dst_row);

// Activation rows quantized into traits(t).dot_type, x_stride bytes apart, summarized per block
// for weights of type t. summary_bytes(t, k) bytes per activation row.
size_t summary_bytes(DType t, int64_t k);  // the same for weight types with one dot type
void summarize_activations(DType t, int64_t k, const void * x, size_t x_stride, int64_t n, void * summaries);

// y[c * ys + r] = dot(weight row r, activation row c) for the panels [first_panel,
// first_panel + n_panels) of a packed matrix with `rows` rows in all, and activation rows
// [0, nc). Only rows < rows are written.
struct PanelProduct {
    DType type;
    int64_t k;
    const uint8_t * panels;     // the packed matrix
    int64_t rows;
    const uint8_t * x;          // activation rows in the dot type
    size_t x_stride;
    const uint8_t * summaries;  // summarize_activations of those rows
    float * y;
    int64_t y_stride;
};
void panel_mul_mat(const PanelProduct & p, int64_t first_panel, int64_t n_panels, int64_t c0, int64_t nc);

// f16 / bf16 panels: y[c * ys + r] = dot(weight row r, activation row c) for rows [0, nr) of
// the packed matrix from `packed`, which points at a row that is a multiple of 4, that is at
// packed_base + row * float_panel_row_stride(k); activations are fp32 rows xs bytes apart.
bool is_float_panel_type(DType t);
size_t float_panel_row_stride(int64_t k);
void float_panel_mul_mat(DType t, int64_t k, const void * packed, int64_t nr, const void * x, size_t xs, int64_t nc,
                         float * y, int64_t ys);

}  // namespace sparrow

// ---- for the kernel files (cpu/panels*.cpp) ----------------------------------------------------
namespace sparrow {
namespace panel {

// Per block of one panel: quant bytes (Q) and scale bytes (M), as the layout above says.
struct Geometry {
    int64_t block;   // elements per block
    size_t quant;    // Q
    size_t meta;     // M
};
// Geometry of a panel type; block == 0 for a type without panels.
Geometry geometry(DType t);

// The activation summaries, one per activation row and block; they depend on the dot type only,
// so one summary serves every weight type that shares it.
struct SumQ8_0 {     // q8_0, q4_0, q4_1 against q8_0 activations
    float d;         // the block's scale
    int32_t sum;     // the sum of its quants: an offset o on the weights' quants adds -o * sum
    float dsum;      // d * sum (q4_1's mins: y = d_w d_x sum(q_w q_x) + m_w d_x sum(q_x))
};
struct SumQ8_K {     // k-quants against q8_K activations
    float d;
    int32_t start16[16];  // q6_K: -32 * the sum of each 16 quants
    float dsum32[8];      // q4_K / q5_K: d * the sum of each 32 quants (for the mins)
};

}  // namespace panel
}  // namespace sparrow
