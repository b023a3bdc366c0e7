// matmul_avx512.cpp - matrix products (quant.h's mul_mat) for AVX-512 (F, BW, VL, DQ) with VNNI.
//
// Same plan as matmul_avx2.cpp, with what AVX-512 adds: 32 registers of 16 lanes, vpdpbusd
// (u8 x s8, four products summed straight into int32: one instruction where AVX2 needs
// vpmaddubsw + vpmaddwd, and no int16 saturation) and masked loads for ragged tails.
//
// q4_0 / q8_0: 16-row panels. The 16 rows' blocks are transposed in registers so that dword r of
// one vector holds 4 quants of row r; each 4-byte group of an activation block is broadcast
// against it, so one vpdpbusd advances 16 rows, and the float tail (convert, scale, FMA) runs
// once per 16 rows. The transpose and the scale gather are paid once per block and shared by up
// to 16 activation rows, so a verify batch of 5 or 8 tokens reads every weight once.
// vpdpbusd wants the weights unsigned: q4_0's nibbles are (q - 8 is applied as -8 sum(x)), and
// q8_0's are made so by flipping the sign bit (w + 128, applied as -128 sum(x)). The activation
// sums are per block and activation row, computed once per call for all the panels.
//
// q4_K: 16-row panels too, its sub-block scales applied per 32 quants in float. Float weights:
// 4 x 6 tiles of 16-float vectors. q6_K (and q4_K's leftover rows): the AVX2 tiles on 512-bit
// vectors, two 32-quant sub-blocks per vpmaddubsw.

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/matmul_tiles.h"
#include "cpu/simd_avx2.h"

#include <immintrin.h>

#include <cstring>
#include <vector>

namespace sparrow {

namespace avx2 {  // cpu/matmul_avx2.cpp: rows left over after the whole 16-row panels
void mul_mat_q8_0(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys);
void mul_mat_q4_0(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys);
}  // namespace avx2

namespace avx512 {
namespace {

inline int32_t load_i32(const void * p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// ---- 16-row panels: q4_0, q8_0 ---------------------------------------------------------------

// Per activation row and block: its scale and -offset * (sum of its quants), the int32 the
// panel's integer accumulator starts from.
struct BlockSummary {
    float d;
    int32_t start;
};

inline int32_t block_quant_sum(const int8_t * qs) {
    const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), avx2::loadu(qs));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    return _mm_cvtsi128_si32(t);
}

void summarize(const uint8_t * x, size_t xs, int64_t nc, int64_t nb, int32_t offset, BlockSummary * out) {
    for (int64_t c = 0; c < nc; c++) {
        const BlockQ8_0 * xb = (const BlockQ8_0 *) (x + c * xs);
        for (int64_t b = 0; b < nb; b++) out[c * nb + b] = {avx2::fp16(xb[b].d), -offset * block_quant_sum(xb[b].qs)};
    }
}

// 4 x 4 transpose of dwords within each 128-bit lane: out[j] lane dword r = in[r] lane dword j.
inline void transpose4_epi32(const __m512i * in, __m512i * out) {
    const __m512i u0 = _mm512_unpacklo_epi32(in[0], in[1]), u1 = _mm512_unpackhi_epi32(in[0], in[1]);
    const __m512i u2 = _mm512_unpacklo_epi32(in[2], in[3]), u3 = _mm512_unpackhi_epi32(in[2], in[3]);
    out[0] = _mm512_unpacklo_epi64(u0, u2);
    out[1] = _mm512_unpackhi_epi64(u0, u2);
    out[2] = _mm512_unpacklo_epi64(u1, u3);
    out[3] = _mm512_unpackhi_epi64(u1, u3);
}

// 16 bytes from each of rows r, r + 4, r + 8, r + 12 (one per 128-bit lane), at `offset` bytes
// into each row: after transpose4_epi32 of r = 0..3, dword p of vector j is row p's dword j.
inline void load_panel_quarters(const uint8_t * w, size_t ws, size_t offset, __m512i * out) {
    for (int r = 0; r < 4; r++) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *) (w + r * ws + offset)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *) (w + (r + 4) * ws + offset)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *) (w + (r + 8) * ws + offset)), 2);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *) (w + (r + 12) * ws + offset)), 3);
        out[r] = v;
    }
}

// Byte offset of each of the panel's 16 rows (lane r: r * ws), for gathers.
inline __m512i panel_row_offsets(size_t ws) {
    return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                              _mm512_set1_epi32((int32_t) ws));
}

// The fp16 scales (the first field of every block) of the 16 rows as floats, row r in lane r.
inline __m512 gather_scales(const uint8_t * first_block, __m512i row_offsets) {
    const __m512i words = _mm512_i32gather_epi32(row_offsets, first_block, 1);
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words));
}

// wq[j]: dword r = the 4 unsigned quants of row r at elements 4j .. 4j + 3.
struct PanelQ4_0 {
    using Block = BlockQ4_0;
    static constexpr int32_t kOffset = 8;
    static void unpack(const uint8_t * w, size_t ws, __m512i * wq) {
        __m512i rows[4], t[4];
        load_panel_quarters(w, ws, offsetof(BlockQ4_0, qs), rows);
        transpose4_epi32(rows, t);
        const __m512i low4 = _mm512_set1_epi8(0x0f);
        for (int j = 0; j < 4; j++) {
            wq[j] = _mm512_and_si512(t[j], low4);                             // low nibbles: elements 4j ..
            wq[j + 4] = _mm512_and_si512(_mm512_srli_epi16(t[j], 4), low4);  // high: 16 + 4j ..
        }
    }
};

struct PanelQ8_0 {
    using Block = BlockQ8_0;
    static constexpr int32_t kOffset = 128;
    static void unpack(const uint8_t * w, size_t ws, __m512i * wq) {
        __m512i rows[4], t[4];
        const __m512i sign = _mm512_set1_epi8((char) 0x80);
        for (int half = 0; half < 2; half++) {
            load_panel_quarters(w, ws, offsetof(BlockQ8_0, qs) + 16 * half, rows);
            transpose4_epi32(rows, t);
            for (int j = 0; j < 4; j++) wq[4 * half + j] = _mm512_xor_si512(t[j], sign);  // w + 128
        }
    }
};

template <typename Panel, int C>
void panel16(int64_t nb, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, const BlockSummary * sums,
             float * y, int64_t ys) {
    using Block = typename Panel::Block;
    const __m512i row_offsets = panel_row_offsets(ws);
    __m512 acc[C];
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t * wb = w + b * sizeof(Block);
        __m512i wq[8];
        Panel::unpack(wb, ws, wq);
        const __m512 dw = gather_scales(wb, row_offsets);
        for (int c = 0; c < C; c++) {
            const BlockSummary s = sums[c * nb + b];
            const int8_t * xq = ((const BlockQ8_0 *) (x + c * xs))[b].qs;
            __m512i isum = _mm512_set1_epi32(s.start);
            for (int j = 0; j < 8; j++) isum = _mm512_dpbusd_epi32(isum, wq[j], _mm512_set1_epi32(load_i32(xq + 4 * j)));
            acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(s.d)), _mm512_cvtepi32_ps(isum), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm512_storeu_ps(y + c * ys, acc[c]);
}

using PanelFn = void (*)(int64_t nb, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs,
                         const BlockSummary * sums, float * y, int64_t ys);
constexpr int kPanelRows = 16, kPanelCols = 16;

template <typename Panel, int... I>
constexpr std::array<PanelFn, sizeof...(I)> make_panels(std::integer_sequence<int, I...>) {
    return {{&panel16<Panel, I + 1>...}};
}

template <typename Panel>
void drive_panels(int64_t k, const void * wv, size_t ws, int64_t nr, const void * xv, size_t xs, int64_t nc, float * y,
                  int64_t ys, decltype(&avx2::mul_mat_q4_0) rest) {
    static constexpr std::array<PanelFn, kPanelCols> panels =
        make_panels<Panel>(std::make_integer_sequence<int, kPanelCols>());
    const uint8_t * w = (const uint8_t *) wv;
    const uint8_t * x = (const uint8_t *) xv;
    const int64_t nb = k / QK_32;
    int64_t r0 = 0;
    if (nr >= kPanelRows) {
        // grows to the largest call seen, per thread: no allocation once warm
        thread_local std::vector<BlockSummary> sums;
        if ((int64_t) sums.size() < nc * nb) sums.resize((size_t) (nc * nb));
        summarize(x, xs, nc, nb, Panel::kOffset, sums.data());
        for (; r0 + kPanelRows <= nr; r0 += kPanelRows) {
            for_even_col_tiles(nc, kPanelCols, [&](int64_t c0, int cc) {
                panels[cc - 1](nb, w + r0 * ws, ws, x + c0 * xs, xs, sums.data() + c0 * nb, y + c0 * ys + r0, ys);
            });
        }
    }
    if (r0 < nr) rest(k, w + r0 * ws, ws, nr - r0, x, xs, nc, y + r0, ys);
}

// ---- float weights: f32, f16, bf16 against f32 activations ----------------------------------
// Ragged tails (k not a multiple of 16) are masked loads: the missing lanes read as zero.

struct LoadF32 {
    static __m512 load16(const uint8_t * row, int64_t i) { return _mm512_loadu_ps((const float *) row + i); }
    static __m512 load_tail(const uint8_t * row, int64_t i, __mmask16 m) {
        return _mm512_maskz_loadu_ps(m, (const float *) row + i);
    }
};
struct LoadF16 {
    static __m512 load16(const uint8_t * row, int64_t i) {
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) ((const uint16_t *) row + i)));
    }
    static __m512 load_tail(const uint8_t * row, int64_t i, __mmask16 m) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *) row + i));
    }
};
struct LoadBF16 {
    static __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    static __m512 load16(const uint8_t * row, int64_t i) {
        return widen(_mm256_loadu_si256((const __m256i *) ((const uint16_t *) row + i)));
    }
    static __m512 load_tail(const uint8_t * row, int64_t i, __mmask16 m) {
        return widen(_mm256_maskz_loadu_epi16(m, (const uint16_t *) row + i));
    }
};

template <typename Load>
struct FloatKern {
    static constexpr int RM = 4, RN = 6;  // 24 accumulators, 4 weight vectors, 1 activation vector

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        __m512 acc[R][C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
        auto step = [&](int64_t i, auto load_w, auto load_x) {
            __m512 wv[R];
            for (int r = 0; r < R; r++) wv[r] = load_w(w + r * ws, i);
            for (int c = 0; c < C; c++) {
                const __m512 xv = load_x((const float *) (x + c * xs) + i);
                for (int r = 0; r < R; r++) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
            }
        };
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            step(i, [](const uint8_t * row, int64_t j) { return Load::load16(row, j); },
                 [](const float * p) { return _mm512_loadu_ps(p); });
        }
        if (i < k) {
            const __mmask16 m = (__mmask16) ((1u << (k - i)) - 1);
            step(i, [m](const uint8_t * row, int64_t j) { return Load::load_tail(row, j, m); },
                 [m](const float * p) { return _mm512_maskz_loadu_ps(m, p); });
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) y[c * ys + r] = _mm512_reduce_add_ps(acc[r][c]);
    }
};

// ---- k-quants against q8_K activations ---------------------------------------------------------
// As matmul_avx2.cpp, with each vpmaddubsw / vpmaddwd covering 64 quants (two sub-blocks, their
// two scales side by side in the int16 multiplier vector).

// int16 multiplier for sub-blocks (2 pair) and (2 pair + 1) of a table of 8 int16 scales: lanes
// 0..15 repeat entry 2 pair, lanes 16..31 entry 2 pair + 1.
inline __m512i pick_scale_pair(__m512i table, int pair) {
    const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16((short) (2 * pair)), _mm256_set1_epi16((short) (2 * pair + 1)), 1);
    return _mm512_permutexvar_epi16(idx, table);
}

struct Q4_KKern {
    static constexpr int RM = 2, RN = 4;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        const int64_t nb = k / QK_K;
        const __m512i low4 = _mm512_set1_epi8(0x0f);
        __m512 acc[R][C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            __m512i scales16[R];
            __m128i mins16[R];
            for (int r = 0; r < R; r++) {
                const __m128i sm = avx2::unpack_k_scales(((const BlockQ4_K *) (w + r * ws))[b].scales);
                scales16[r] = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
                mins16[r] = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));
            }
            __m512i isum[R][C];
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) isum[r][c] = _mm512_setzero_si512();
            for (int pair = 0; pair < QK_K / 64; pair++) {  // sub-blocks 2 pair (low nibbles), 2 pair + 1 (high)
                __m512i q[R], s[R];
                for (int r = 0; r < R; r++) {
                    const __m256i packed = avx2::loadu(((const BlockQ4_K *) (w + r * ws))[b].qs + 32 * pair);
                    q[r] = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1), low4);
                    s[r] = pick_scale_pair(scales16[r], pair);
                }
                for (int c = 0; c < C; c++) {
                    const __m512i xq = _mm512_loadu_si512(((const BlockQ8_K *) (x + c * xs))[b].qs + 64 * pair);
                    for (int r = 0; r < R; r++) {
                        isum[r][c] = _mm512_add_epi32(isum[r][c], _mm512_madd_epi16(_mm512_maddubs_epi16(q[r], xq), s[r]));
                    }
                }
            }
            for (int c = 0; c < C; c++) {
                const BlockQ8_K & xb = ((const BlockQ8_K *) (x + c * xs))[b];
                const __m128i y_sums = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *) xb.bsums),
                                                      _mm_loadu_si128((const __m128i *) (xb.bsums + 8)));
                for (int r = 0; r < R; r++) {
                    const BlockQ4_K & blk = ((const BlockQ4_K *) (w + r * ws))[b];
                    const __m512i min_dot = _mm512_zextsi128_si512(_mm_madd_epi16(mins16[r], y_sums));
                    acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(avx2::fp16(blk.d) * xb.d), _mm512_cvtepi32_ps(isum[r][c]), acc[r][c]);
                    acc[r][c] = _mm512_fnmadd_ps(_mm512_set1_ps(avx2::fp16(blk.dmin) * xb.d), _mm512_cvtepi32_ps(min_dot), acc[r][c]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) y[c * ys + r] = _mm512_reduce_add_ps(acc[r][c]);
    }
};

// q4_K in 16-row panels, as q4_0's: the quants of 16 rows transposed so that one vpdpbusd
// advances all 16 rows by 4 quants. Each 32-quant sub-block's int32 sums meet floats once,
// times the rows' d * scale_s (a vector over the rows, unpacked once per block for the panel)
// and the activation's d; the mins term dmin * min_s * d_x * sum_s(x) comes from the bsums.

struct KSummary {
    float d;
    float sub_sums[QK_K / 32];  // d * the sum of each 32-quant sub-block's quants
};

void summarize_q8_K(const uint8_t * x, size_t xs, int64_t nc, int64_t nb, KSummary * out) {
    for (int64_t c = 0; c < nc; c++) {
        const BlockQ8_K * xb = (const BlockQ8_K *) (x + c * xs);
        for (int64_t b = 0; b < nb; b++) {
            KSummary & s = out[c * nb + b];
            s.d = xb[b].d;
            for (int j = 0; j < QK_K / 32; j++) s.sub_sums[j] = xb[b].d * (float) (xb[b].bsums[2 * j] + xb[b].bsums[2 * j + 1]);
        }
    }
}

struct PanelKScales {  // one block of 16 rows, row r in lane r
    __m512 scale[8];  // d * scale_s
    __m512 min[8];    // dmin * min_s
};

// unpack_k_scales on 16 rows at once: their 12 scale bytes gathered as three dwords per row.
inline void panel_k_scales(const uint8_t * block, __m512i row_offsets, PanelKScales & out) {
    const __m512i d_dmin = _mm512_i32gather_epi32(row_offsets, block, 1);  // d | dmin << 16
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d_dmin));
    const __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(d_dmin, 16)));
    const uint8_t * sb = block + offsetof(BlockQ4_K, scales);
    const __m512i w0 = _mm512_i32gather_epi32(row_offsets, sb, 1);
    const __m512i w1 = _mm512_i32gather_epi32(row_offsets, sb + 4, 1);
    const __m512i w2 = _mm512_i32gather_epi32(row_offsets, sb + 8, 1);
    const __m512i low6 = _mm512_set1_epi32(0x3f3f3f3f), low4 = _mm512_set1_epi32(0x0f0f0f0f);
    const __m512i low2 = _mm512_set1_epi32(0x03030303), byte = _mm512_set1_epi32(0xff);
    const __m512i packed[4] = {
        _mm512_and_si512(w0, low6),  // scales 0..3
        _mm512_or_si512(_mm512_and_si512(w2, low4), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w0, 6), low2), 4)),
        _mm512_and_si512(w1, low6),  // mins 0..3
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w2, 4), low4),
                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w1, 6), low2), 4)),
    };
    for (int j = 0; j < 4; j++) {
        auto field = [&](int which) { return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(packed[which], 8 * j), byte)); };
        out.scale[j] = _mm512_mul_ps(d, field(0));
        out.scale[j + 4] = _mm512_mul_ps(d, field(1));
        out.min[j] = _mm512_mul_ps(dmin, field(2));
        out.min[j + 4] = _mm512_mul_ps(dmin, field(3));
    }
}

template <int C>
void panel16_q4_K(int64_t nb, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, const KSummary * sums,
                  float * y, int64_t ys) {
    const __m512i row_offsets = panel_row_offsets(ws);
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512 acc[C];
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t * wb = w + b * sizeof(BlockQ4_K);
        PanelKScales ps;
        panel_k_scales(wb, row_offsets, ps);
        for (int c = 0; c < C; c++) {
            const KSummary & s = sums[c * nb + b];
            __m512 m = _mm512_mul_ps(ps.min[0], _mm512_set1_ps(s.sub_sums[0]));
            for (int j = 1; j < 8; j++) m = _mm512_fmadd_ps(ps.min[j], _mm512_set1_ps(s.sub_sums[j]), m);
            acc[c] = _mm512_sub_ps(acc[c], m);
        }
        for (int pair = 0; pair < QK_K / 64; pair++) {  // 32 bytes per row: sub-blocks 2 pair (low), 2 pair + 1 (high)
            __m512i lo[8], hi[8];
            for (int half = 0; half < 2; half++) {
                __m512i rows[4], t[4];
                load_panel_quarters(wb, ws, offsetof(BlockQ4_K, qs) + 32 * pair + 16 * half, rows);
                transpose4_epi32(rows, t);
                for (int g = 0; g < 4; g++) {
                    lo[4 * half + g] = _mm512_and_si512(t[g], low4);
                    hi[4 * half + g] = _mm512_and_si512(_mm512_srli_epi16(t[g], 4), low4);
                }
            }
            for (int c = 0; c < C; c++) {
                const int8_t * xq = ((const BlockQ8_K *) (x + c * xs))[b].qs + 64 * pair;
                __m512i sum_lo = _mm512_setzero_si512(), sum_hi = _mm512_setzero_si512();
                for (int g = 0; g < 8; g++) {
                    sum_lo = _mm512_dpbusd_epi32(sum_lo, lo[g], _mm512_set1_epi32(load_i32(xq + 4 * g)));
                    sum_hi = _mm512_dpbusd_epi32(sum_hi, hi[g], _mm512_set1_epi32(load_i32(xq + 32 + 4 * g)));
                }
                const __m512 dx = _mm512_set1_ps(sums[c * nb + b].d);
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_lo), _mm512_mul_ps(ps.scale[2 * pair], dx), acc[c]);
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_hi), _mm512_mul_ps(ps.scale[2 * pair + 1], dx), acc[c]);
            }
        }
    }
    for (int c = 0; c < C; c++) _mm512_storeu_ps(y + c * ys, acc[c]);
}

using KPanelFn = void (*)(int64_t nb, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, const KSummary * sums,
                          float * y, int64_t ys);
constexpr int kKPanelCols = 16;  // more columns than registers allow spill a little, still faster

template <int... I>
constexpr std::array<KPanelFn, sizeof...(I)> make_k_panels(std::integer_sequence<int, I...>) {
    return {{&panel16_q4_K<I + 1>...}};
}

// q6_K: per half-block, quants 0..63 and 64..127 as two 64-byte vectors; each 16 quants has its
// own scale, so lane l of the int16 pair sums takes scale 8 half + 4 g + l / 8.
struct ScaleQuadIndex {
    alignas(64) int16_t lanes[4][32];  // [first / 4][l] = first + l / 8
};
constexpr ScaleQuadIndex make_scale_quad_index() {
    ScaleQuadIndex t{};
    for (int f = 0; f < 4; f++)
        for (int l = 0; l < 32; l++) t.lanes[f][l] = (int16_t) (4 * f + l / 8);
    return t;
}
constexpr ScaleQuadIndex kScaleQuadIndex = make_scale_quad_index();

inline __m512i pick_scale_quad(__m512i table, int first) {
    return _mm512_permutexvar_epi16(_mm512_load_si512(kScaleQuadIndex.lanes[first / 4]), table);
}

struct Q6_KKern {
    static constexpr int RM = 2, RN = 4;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        const int64_t nb = k / QK_K;
        const __m512i low4 = _mm512_set1_epi8(0x0f);
        const __m512i low2 = _mm512_set1_epi8(0x03);
        __m512 acc[R][C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            __m512i isum[R][C];
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) isum[r][c] = _mm512_setzero_si512();
            for (int half = 0; half < 2; half++) {
                __m512i q[R][2], s[R][2];
                for (int r = 0; r < R; r++) {
                    const BlockQ6_K & blk = ((const BlockQ6_K *) (w + r * ws))[b];
                    const __m512i ql = _mm512_loadu_si512(blk.ql + 64 * half);  // low 4 bits of quants 0..63 | 64..127
                    const __m256i qh = avx2::loadu(blk.qh + 32 * half);
                    const __m512i qh2 = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
                    q[r][0] = _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_slli_epi16(_mm512_and_si512(qh2, low2), 4));
                    q[r][1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                                              _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qh2, 4), low2), 4));
                    const __m512i table = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *) blk.scales)));
                    s[r][0] = pick_scale_quad(table, 8 * half);
                    s[r][1] = pick_scale_quad(table, 8 * half + 4);
                }
                for (int c = 0; c < C; c++) {
                    const int8_t * xq = ((const BlockQ8_K *) (x + c * xs))[b].qs + 128 * half;
                    const __m512i x0 = _mm512_loadu_si512(xq), x1 = _mm512_loadu_si512(xq + 64);
                    for (int r = 0; r < R; r++) {
                        isum[r][c] = _mm512_add_epi32(isum[r][c], _mm512_madd_epi16(_mm512_maddubs_epi16(q[r][0], x0), s[r][0]));
                        isum[r][c] = _mm512_add_epi32(isum[r][c], _mm512_madd_epi16(_mm512_maddubs_epi16(q[r][1], x1), s[r][1]));
                    }
                }
            }
            for (int c = 0; c < C; c++) {
                const BlockQ8_K & xb = ((const BlockQ8_K *) (x + c * xs))[b];
                const __m256i bsums = avx2::loadu(xb.bsums);
                for (int r = 0; r < R; r++) {
                    const BlockQ6_K & blk = ((const BlockQ6_K *) (w + r * ws))[b];
                    const __m256i scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *) blk.scales));
                    const __m512i offset = _mm512_zextsi256_si512(_mm256_slli_epi32(_mm256_madd_epi16(bsums, scales16), 5));
                    const __m512i sumi = _mm512_sub_epi32(isum[r][c], offset);
                    acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(avx2::fp16(blk.d) * xb.d), _mm512_cvtepi32_ps(sumi), acc[r][c]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) y[c * ys + r] = _mm512_reduce_add_ps(acc[r][c]);
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
void mul_mat_q8_0(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive_panels<PanelQ8_0>(k, w, ws, nr, x, xs, nc, y, ys, avx2::mul_mat_q8_0);
}
void mul_mat_q4_0(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive_panels<PanelQ4_0>(k, w, ws, nr, x, xs, nc, y, ys, avx2::mul_mat_q4_0);
}
void mul_mat_q4_K(int64_t k, const void * wv, size_t ws, int64_t nr, const void * xv, size_t xs, int64_t nc, float * y,
                  int64_t ys) {
    static constexpr std::array<KPanelFn, kKPanelCols> panels = make_k_panels(std::make_integer_sequence<int, kKPanelCols>());
    const uint8_t * w = (const uint8_t *) wv;
    const uint8_t * x = (const uint8_t *) xv;
    const int64_t nb = k / QK_K;
    int64_t r0 = 0;
    if (nr >= kPanelRows) {
        thread_local std::vector<KSummary> sums;  // grows to the largest call seen, per thread
        if ((int64_t) sums.size() < nc * nb) sums.resize((size_t) (nc * nb));
        summarize_q8_K(x, xs, nc, nb, sums.data());
        for (; r0 + kPanelRows <= nr; r0 += kPanelRows) {
            for_even_col_tiles(nc, kKPanelCols, [&](int64_t c0, int cc) {
                panels[cc - 1](nb, w + r0 * ws, ws, x + c0 * xs, xs, sums.data() + c0 * nb, y + c0 * ys + r0, ys);
            });
        }
    }
    if (r0 < nr) drive<Q4_KKern>(k, w + r0 * ws, ws, nr - r0, x, xs, nc, y + r0, ys);
}
void mul_mat_q6_K(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive<Q6_KKern>(k, w, ws, nr, x, xs, nc, y, ys);
}

}  // namespace avx512
}  // namespace sparrow

#endif  // x86
