// panels_avx512.cpp - matrix products over 16-row panels (cpu/panels.h) with AVX-512 VNNI.
//
// One 512-bit vector holds 4 quants of each of a panel's 16 rows (row r in dword lane r), so one
// vpdpbusd against a broadcast group of 4 activation quants advances all 16 rows, and row r's
// sum ends in lane r: no horizontal reductions, no transposes, no gathers. A tile is one panel
// times C activation rows: the panel's unpacked quants stay in registers while the C rows go
// past. Per (row, activation row) the operations and their order do not depend on C or on the
// panel's place, which is what makes the products batch-invariant (see panels.h).
//
// vpdpbusd multiplies unsigned weight bytes by signed activation bytes: q8_0's quants are stored
// plus 128 and q4_0's nibbles are 8 above their value, so each block's integer sum starts from
// -128 (or -8) times the activation block's quant sum (SumQ8_0::sum); q6_K's from -32 times
// each 16 quants' sum. k-quant sub-block scales are applied in float, once per 16 or 32 quants.

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/panel_driver.h"

#include <immintrin.h>

#include <cstring>

namespace sparrow {
namespace avx512 {
namespace {

using panel::SumQ8_0;
using panel::SumQ8_K;

inline __m512i bcast_group(const int8_t * q) {
    int32_t v;
    std::memcpy(&v, q, 4);
    return _mm512_set1_epi32(v);
}

inline __m512i load(const uint8_t * p) { return _mm512_load_si512((const void *) p); }
inline __m512 load_halfs(const uint8_t * p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) p)); }

// Store 16 rows of one activation row's results, fewer for a partial panel.
inline void store_rows(float * y, __m512 v, int valid) {
    if (valid >= kPanelRows) _mm512_storeu_ps(y, v);
    else _mm512_mask_storeu_ps(y, (__mmask16) ((1u << valid) - 1), v);
}

// ---- q8_0, q4_0, q4_1: 32-quant blocks against q8_0 activations ---------------------------------

// The 8 quant vectors of a block, vector j against activation quants 4j .. 4j + 3.
// vector(q, g): vector g alone, its quants at face value (q4's high nibbles shifted down), for
// tiles that load a vector where they use it (Kern32Pair).
struct UnpackQ8_0 {
    static constexpr int32_t kOffset = 128;  // stored quant - value
    static constexpr bool kHighTimes16 = false;
    static void unpack(const uint8_t * q, __m512i * w) {
        for (int j = 0; j < 8; j++) w[j] = vector(q, j);
    }
    static __m512i vector(const uint8_t * q, int g) { return load(q + 64 * g); }
};
// q4_0 / q4_1: low nibbles are quants 4j.., high nibbles 16 + 4j... The high nibbles stay in
// place (16 times their value: one AND instead of a shift and an AND); their integer sum is
// divided by 16 again, exactly, since every term is a multiple of 16.
struct UnpackQ4 {
    static constexpr int32_t kOffset = 8;
    static constexpr bool kHighTimes16 = true;
    static void unpack(const uint8_t * q, __m512i * w) {
        const __m512i low4 = _mm512_set1_epi8(0x0f), high4 = _mm512_set1_epi8((char) 0xf0);
        for (int j = 0; j < 4; j++) {
            const __m512i v = load(q + 64 * j);
            w[j] = _mm512_and_si512(v, low4);
            w[j + 4] = _mm512_and_si512(v, high4);
        }
    }
    static __m512i vector(const uint8_t * q, int g) {
        const __m512i v = load(q + 64 * (g & 3));
        return _mm512_and_si512(g < 4 ? v : _mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0f));
    }
};

// The block's integer dot: quants 0..15 and 16..31 in two chains (shorter dependencies).
template <typename Unpack>
inline __m512i dot_block(__m512i start, const __m512i * w, const int8_t * xq) {
    __m512i a = start, b = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
        a = _mm512_dpbusd_epi32(a, w[j], bcast_group(xq + 4 * j));
        b = _mm512_dpbusd_epi32(b, w[j + 4], bcast_group(xq + 16 + 4 * j));
    }
    return _mm512_add_epi32(a, Unpack::kHighTimes16 ? _mm512_srai_epi32(b, 4) : b);
}

// kMins: q4_1, whose blocks add m_w d_x sum(q_x) to the scaled integer dot.
template <typename Unpack, bool kMins>
struct Kern32 {
    static constexpr int kCols = 16, kParts = 1;
    template <int C>
    static void tile(const Job & j, const uint8_t * panel, int, int64_t c0, int valid) {
        __m512 acc[C];
        for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
        const uint8_t * meta = panel + j.nb * j.quant;
        for (int64_t b = 0; b < j.nb; b++) {
            __m512i w[8];
            prefetch_block(j, panel, meta, b);
            Unpack::unpack(panel + b * j.quant, w);
            const __m512 dw = load_halfs(meta + b * j.meta);
            const __m512 mw = kMins ? load_halfs(meta + b * j.meta + 32) : _mm512_setzero_ps();
            for (int c = 0; c < C; c++) {
                const SumQ8_0 s = sums_of<SumQ8_0>(j, c0 + c)[b];
                const int8_t * xq = ((const BlockQ8_0 *) row_of(j, c0 + c))[b].qs;
                const __m512i start = _mm512_set1_epi32(kMins ? 0 : -Unpack::kOffset * s.sum);
                const __m512i isum = dot_block<Unpack>(start, w, xq);
                acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(s.d)), _mm512_cvtepi32_ps(isum), acc[c]);
                if (kMins) acc[c] = _mm512_fmadd_ps(mw, _mm512_set1_ps(s.dsum), acc[c]);
            }
        }
        for (int c = 0; c < C; c++) store_rows(out_of(j, c0 + c, panel, 0), acc[c], valid);
    }
};

// Two panels against C <= kCols activation rows (run_panel_pairs): per broadcast activation
// group two vpdpbusd, and each row's start and scale broadcast once for both. The broadcasts and
// the per-row scalar work, not the multiplies, bound the one-panel tile at a few rows: a Zen 5
// core, 6 rows in L2 (bench_quant 1024 x 512), 12% (q8_0) to 18% (q4_1) faster; the real pair
// at 2 threads (chains of 5), tokens/s: q8_0 decode 227-240 -> 283-286 and speculative 297-322
// -> 345-355, Q4_1 337-344 -> 351-374 and 368-389 -> 418-455; prefill 2,500-2,800 -> 2,900-3,200.
// One chain of 8 per (panel, activation row) (24 vector registers for 6 rows): q4's
// high nibbles are shifted down (an op per vector a block, shared by the rows) rather than
// kept 16 times their value, so that the two halves can share the chain.
template <typename Unpack, bool kMins>
struct Kern32Pair {
    static constexpr int kCols = 6;
    template <int C>
    static void tile(const Job & j, const uint8_t * panel, int64_t c0, int valid1) {  // valid1: rows of the second
        const uint8_t * panel1 = panel + j.pb;
        __m512 acc0[C], acc1[C];
        for (int c = 0; c < C; c++) acc0[c] = acc1[c] = _mm512_setzero_ps();
        const uint8_t * meta0 = panel + j.nb * j.quant, * meta1 = panel1 + j.nb * j.quant;
        for (int64_t b = 0; b < j.nb; b++) {
            // At one row of q8_0 the hardware prefetchers keep up with the two streams, and the
            // software prefetches only cost (real pair, q8_0 at 2 threads: decode 233-241 -> 283-286
            // tok/s without them); q4's unpacking slows the stream enough that they pay (bench_quant
            // 3072 x 512 at one row: 27-28 -> 35 GB/s at 1 thread, 32-37 -> 37-40 at 2), and at
            // several rows they are what keeps memory busy (q8_0 6-row verify 2.0-2.2 decodes
            // without them, 1.2-1.6 with).
            if constexpr (C > 1 || Unpack::kHighTimes16) prefetch_pair_block(j, panel, b);
            const uint8_t * q0 = panel + b * j.quant, * q1 = panel1 + b * j.quant;
            __m512i i0[C], i1[C];
            for (int c = 0; c < C; c++) {
                i0[c] = i1[c] = _mm512_set1_epi32(kMins ? 0 : -Unpack::kOffset * sums_of<SumQ8_0>(j, c0 + c)[b].sum);
            }
            for (int g = 0; g < 8; g++) {
                const __m512i w0 = Unpack::vector(q0, g), w1 = Unpack::vector(q1, g);
                for (int c = 0; c < C; c++) {
                    const int8_t * xg = ((const BlockQ8_0 *) row_of(j, c0 + c))[b].qs + 4 * g;
                    const __m512i x = bcast_group(xg);
                    i0[c] = _mm512_dpbusd_epi32(i0[c], w0, x);
                    i1[c] = _mm512_dpbusd_epi32(i1[c], w1, x);
                }
            }
            const __m512 dw0 = load_halfs(meta0 + b * j.meta), dw1 = load_halfs(meta1 + b * j.meta);
            const __m512 mw0 = kMins ? load_halfs(meta0 + b * j.meta + 32) : _mm512_setzero_ps();
            const __m512 mw1 = kMins ? load_halfs(meta1 + b * j.meta + 32) : _mm512_setzero_ps();
            for (int c = 0; c < C; c++) {
                const SumQ8_0 & s = sums_of<SumQ8_0>(j, c0 + c)[b];
                const __m512 dx = _mm512_set1_ps(s.d);
                acc0[c] = _mm512_fmadd_ps(_mm512_mul_ps(dw0, dx), _mm512_cvtepi32_ps(i0[c]), acc0[c]);
                acc1[c] = _mm512_fmadd_ps(_mm512_mul_ps(dw1, dx), _mm512_cvtepi32_ps(i1[c]), acc1[c]);
                if (kMins) {
                    acc0[c] = _mm512_fmadd_ps(mw0, _mm512_set1_ps(s.dsum), acc0[c]);
                    acc1[c] = _mm512_fmadd_ps(mw1, _mm512_set1_ps(s.dsum), acc1[c]);
                }
            }
        }
        for (int c = 0; c < C; c++) {
            store_rows(out_of(j, c0 + c, panel, 0), acc0[c], kPanelRows);
            store_rows(out_of(j, c0 + c, panel1, 0), acc1[c], valid1);
        }
    }
};

// ---- k-quants against q8_K activations ------------------------------------------------------------

// q4_K / q5_K: d * scale_s and dmin * min_s of the panel's 16 rows for the 8 sub-blocks, from the
// 12 packed scale bytes of each row (ggml's get_scale_min_k4 on 16 rows at once).
struct KScales {
    __m512 scale[8];
    __m512 min[8];
};

inline void unpack_k_scales(const uint8_t * meta, KScales & out) {
    const __m512 d = load_halfs(meta), dmin = load_halfs(meta + 32);
    const __m512i w0 = load(meta + 64), w1 = load(meta + 128), w2 = load(meta + 192);
    const __m512i low6 = _mm512_set1_epi32(0x3f3f3f3f), low4 = _mm512_set1_epi32(0x0f0f0f0f);
    const __m512i low2 = _mm512_set1_epi32(0x03030303), byte = _mm512_set1_epi32(0xff);
    const __m512i packed[4] = {
        _mm512_and_si512(w0, low6),  // scales 0..3
        _mm512_or_si512(_mm512_and_si512(w2, low4), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w0, 6), low2), 4)),
        _mm512_and_si512(w1, low6),  // mins 0..3
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w2, 4), low4),
                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w1, 6), low2), 4)),
    };
    for (int s = 0; s < 4; s++) {
        auto field = [&](int which) { return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(packed[which], 8 * s), byte)); };
        out.scale[s] = _mm512_mul_ps(d, field(0));
        out.scale[s + 4] = _mm512_mul_ps(d, field(1));
        out.min[s] = _mm512_mul_ps(dmin, field(2));
        out.min[s + 4] = _mm512_mul_ps(dmin, field(3));
    }
}

// q4_K (kFive = false) and q5_K, a pair of sub-blocks (the low and high nibbles of 32 bytes per
// row) at a time. Per activation row and super-block: blk = sum over sub-blocks s of isum_s *
// d scale_s, then acc += blk * d_x - sum_s dmin min_s * d_x sum_s(x). q4_K's high nibbles stay in
// place (16 times their value, as in UnpackQ4): their sub-block's scale is taken / 16 (exact).
template <bool kFive>
struct KernK45 {
    static constexpr int kCols = 16, kParts = 1;
    template <int C>
    static void tile(const Job & j, const uint8_t * panel, int, int64_t c0, int valid) {
        const __m512i low4 = _mm512_set1_epi8(0x0f), high4 = _mm512_set1_epi8((char) 0xf0), bit4 = _mm512_set1_epi8(0x10);
        const __m512 sixteenth = _mm512_set1_ps(1.0f / 16.0f);
        __m512 acc[C];
        for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
        const uint8_t * meta = panel + j.nb * j.quant;
        for (int64_t b = 0; b < j.nb; b++) {
            const uint8_t * quant = panel + b * j.quant;
            const uint8_t * qs = kFive ? quant + 512 : quant;
            prefetch_block(j, panel, meta, b);
            KScales ks;
            unpack_k_scales(meta + b * j.meta, ks);
            __m512 blk[C];
            for (int c = 0; c < C; c++) blk[c] = _mm512_setzero_ps();
            for (int p = 0; p < 4; p++) {  // sub-blocks 2p (low nibbles) and 2p + 1 (high)
                __m512i lo[8], hi[8];
                for (int g = 0; g < 8; g++) {
                    const __m512i v = load(qs + 64 * (8 * p + g));
                    lo[g] = _mm512_and_si512(v, low4);
                    if (kFive) {  // bit s of the qh bytes -> bit 4 of sub-block s's quants
                        const __m512i h = load(quant + 64 * g);
                        const int s0 = 2 * p, s1 = 2 * p + 1;
                        const __m512i m0 = s0 <= 4 ? _mm512_slli_epi16(h, 4 - s0) : _mm512_srli_epi16(h, s0 - 4);
                        const __m512i m1 = s1 <= 4 ? _mm512_slli_epi16(h, 4 - s1) : _mm512_srli_epi16(h, s1 - 4);
                        lo[g] = _mm512_ternarylogic_epi32(lo[g], m0, bit4, 0xf8);  // lo | (m0 & bit4)
                        hi[g] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), m1, bit4, 0xf8);
                    } else {
                        hi[g] = _mm512_and_si512(v, high4);
                    }
                }
                const __m512 scale_hi = kFive ? ks.scale[2 * p + 1] : _mm512_mul_ps(ks.scale[2 * p + 1], sixteenth);
                for (int c = 0; c < C; c++) {
                    const int8_t * xq = ((const BlockQ8_K *) row_of(j, c0 + c))[b].qs + 64 * p;
                    __m512i sum_lo = _mm512_setzero_si512(), sum_hi = _mm512_setzero_si512();
                    for (int g = 0; g < 8; g++) {
                        sum_lo = _mm512_dpbusd_epi32(sum_lo, lo[g], bcast_group(xq + 4 * g));
                        sum_hi = _mm512_dpbusd_epi32(sum_hi, hi[g], bcast_group(xq + 32 + 4 * g));
                    }
                    blk[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_lo), ks.scale[2 * p], blk[c]);
                    blk[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_hi), scale_hi, blk[c]);
                }
            }
            for (int c = 0; c < C; c++) {
                const SumQ8_K & sx = sums_of<SumQ8_K>(j, c0 + c)[b];
                __m512 mins = _mm512_mul_ps(ks.min[0], _mm512_set1_ps(sx.dsum32[0]));
                for (int s = 1; s < 8; s++) mins = _mm512_fmadd_ps(ks.min[s], _mm512_set1_ps(sx.dsum32[s]), mins);
                acc[c] = _mm512_sub_ps(_mm512_fmadd_ps(blk[c], _mm512_set1_ps(sx.d), acc[c]), mins);
            }
        }
        for (int c = 0; c < C; c++) store_rows(out_of(j, c0 + c, panel, 0), acc[c], valid);
    }
};

// q6_K: element 128 h + 32 g + 4 t + i (t < 8) has its low 4 bits in ql group 16 h + 8 (g & 1) + t
// (low nibble for g < 2) and its top 2 bits at bits 2g of qh group 8 h + t; it belongs to
// sub-block 8 h + 2 g + t / 4.
struct KernQ6_K {
    static constexpr int kCols = 16, kParts = 1;
    template <int C>
    static void tile(const Job & j, const uint8_t * panel, int, int64_t c0, int valid) {
        const __m512i low4 = _mm512_set1_epi8(0x0f), top2 = _mm512_set1_epi8(0x30);
        __m512 acc[C];
        for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
        const uint8_t * meta = panel + j.nb * j.quant;
        for (int64_t b = 0; b < j.nb; b++) {
            const uint8_t * ql = panel + b * j.quant;
            const uint8_t * qh = ql + 2048;
            const uint8_t * mb = meta + b * j.meta;
            prefetch_block(j, panel, meta, b);
            const __m512 d = load_halfs(mb);
            __m512 blk[C];
            for (int c = 0; c < C; c++) blk[c] = _mm512_setzero_ps();
            for (int h = 0; h < 2; h++) {
                for (int g = 0; g < 4; g++) {
                    __m512i w[8];
                    for (int t = 0; t < 8; t++) {
                        const __m512i lv = load(ql + 64 * (16 * h + 8 * (g & 1) + t));
                        const __m512i hv = load(qh + 64 * (8 * h + t));
                        const __m512i lo = _mm512_and_si512(g < 2 ? lv : _mm512_srli_epi16(lv, 4), low4);
                        const __m512i hi = g < 2 ? _mm512_slli_epi16(hv, 4 - 2 * g) : (g == 2 ? hv : _mm512_srli_epi16(hv, 2));
                        w[t] = _mm512_ternarylogic_epi32(lo, hi, top2, 0xf8);  // lo | (hi & 0x30)
                    }
                    for (int half = 0; half < 2; half++) {
                        const int s = 8 * h + 2 * g + half;
                        const __m512 scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                                  _mm_loadu_si128((const __m128i *) (mb + 32 + 16 * s)))));
                        for (int c = 0; c < C; c++) {
                            const int8_t * xq = ((const BlockQ8_K *) row_of(j, c0 + c))[b].qs + 128 * h + 32 * g + 16 * half;
                            // two chains of two, the start (loaded, moved into a vector) added last:
                            // at its head it delayed a chain of four (decode 27 -> 33 GB/s at 1
                            // thread, bench_quant 3072 x 512). Integer sums: the same bits.
                            const __m512i zero = _mm512_setzero_si512();
                            __m512i i0 = _mm512_dpbusd_epi32(zero, w[4 * half], bcast_group(xq));
                            __m512i i1 = _mm512_dpbusd_epi32(zero, w[4 * half + 1], bcast_group(xq + 4));
                            i0 = _mm512_dpbusd_epi32(i0, w[4 * half + 2], bcast_group(xq + 8));
                            i1 = _mm512_dpbusd_epi32(i1, w[4 * half + 3], bcast_group(xq + 12));
                            const __m512i isum = _mm512_add_epi32(_mm512_add_epi32(i0, i1),
                                                                  _mm512_set1_epi32(sums_of<SumQ8_K>(j, c0 + c)[b].start16[s]));
                            blk[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, blk[c]);
                        }
                    }
                }
            }
            for (int c = 0; c < C; c++) {
                acc[c] = _mm512_fmadd_ps(blk[c], _mm512_set1_ps(sums_of<SumQ8_K>(j, c0 + c)[b].d), acc[c]);
            }
        }
        for (int c = 0; c < C; c++) store_rows(out_of(j, c0 + c, panel, 0), acc[c], valid);
    }
};

}  // namespace

void panel_q8_0(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panel_pairs<Kern32<UnpackQ8_0, false>, Kern32Pair<UnpackQ8_0, false>>(p, f, n, c0, nc); }
void panel_q4_0(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panel_pairs<Kern32<UnpackQ4, false>, Kern32Pair<UnpackQ4, false>>(p, f, n, c0, nc); }
void panel_q4_1(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panel_pairs<Kern32<UnpackQ4, true>, Kern32Pair<UnpackQ4, true>>(p, f, n, c0, nc); }
void panel_q4_K(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panels<KernK45<false>>(p, f, n, c0, nc); }
void panel_q5_K(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panels<KernK45<true>>(p, f, n, c0, nc); }
void panel_q6_K(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panels<KernQ6_K>(p, f, n, c0, nc); }

}  // namespace avx512
}  // namespace sparrow

#endif  // x86
