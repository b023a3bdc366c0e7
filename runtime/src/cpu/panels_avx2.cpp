// panels_avx2.cpp - matrix products over 16-row panels (cpu/panels.h) with AVX2.
//
// The panels_avx512.cpp plan on 256-bit vectors: a panel is two halves of 8 rows (the first and
// second 32 bytes of each 64-byte group), each run as its own tile with row r of the half in
// dword lane r. Without VNNI the integer dot of 4 quants is vpmaddubsw (unsigned weight bytes x
// signed activation bytes -> int16 pair sums) then vpmaddwd by ones; small quants let several
// groups add in int16 before the widening (8 groups for 4-bit values, 4 for 5-bit, 2 for 6-bit:
// each stays below 32768). q8_0's bytes are turned back into signed values, whose products take
// the sign trick (|w| times x with w's sign). As there, a (row, activation row) result does not
// depend on how many activation rows share the tile.

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/panel_driver.h"

#include <immintrin.h>

#include <cstring>

namespace sparrow {
namespace avx2 {
namespace {

using panel::SumQ8_0;
using panel::SumQ8_K;

constexpr int kHalfRows = 8;

inline __m256i bcast_group(const int8_t * q) {
    int32_t v;
    std::memcpy(&v, q, 4);
    return _mm256_set1_epi32(v);
}
inline __m256i load(const uint8_t * p) { return _mm256_load_si256((const __m256i *) p); }
inline __m256 load_halfs(const uint8_t * p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p)); }
inline __m256i widen_pairs(__m256i sum16) { return _mm256_madd_epi16(sum16, _mm256_set1_epi16(1)); }

inline void store_rows(float * y, __m256 v, int valid) {
    if (valid >= kHalfRows) {
        _mm256_storeu_ps(y, v);
        return;
    }
    alignas(32) float tmp[kHalfRows];
    _mm256_store_ps(tmp, v);
    for (int r = 0; r < valid; r++) y[r] = tmp[r];
}

// ---- q8_0, q4_0, q4_1 -------------------------------------------------------------------------

struct KernQ8_0 {
    static constexpr int kCols = 4, kParts = 2;
    template <int C>
    static void tile(const Job & j, const uint8_t * panel, int half, int64_t c0, int valid) {
        const __m256i flip = _mm256_set1_epi8((char) 0x80);
        __m256 acc[C];
        for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
        const uint8_t * meta = panel + j.nb * j.quant;
        for (int64_t b = 0; b < j.nb; b++) {
            if (half == 0) prefetch_block(j, panel, meta, b);  // the second half finds it cached
            __m256i w[8], w_abs[8];
            for (int g = 0; g < 8; g++) {
                w[g] = _mm256_xor_si256(load(panel + b * j.quant + 64 * g + 32 * half), flip);  // signed again
                w_abs[g] = _mm256_sign_epi8(w[g], w[g]);
            }
            const __m256 dw = load_halfs(meta + b * j.meta + 16 * half);
            for (int c = 0; c < C; c++) {
                const BlockQ8_0 & xb = ((const BlockQ8_0 *) row_of(j, c0 + c))[b];
                __m256i isum = _mm256_setzero_si256();
                for (int g = 0; g < 8; g++) {
                    const __m256i xs = _mm256_sign_epi8(bcast_group(xb.qs + 4 * g), w[g]);
                    isum = _mm256_add_epi32(isum, widen_pairs(_mm256_maddubs_epi16(w_abs[g], xs)));
                }
                const float dx = sums_of<SumQ8_0>(j, c0 + c)[b].d;
                acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(dx)), _mm256_cvtepi32_ps(isum), acc[c]);
            }
        }
        for (int c = 0; c < C; c++) store_rows(out_of(j, c0 + c, panel, half * kHalfRows), acc[c], valid);
    }
};

// q4_0 / q4_1: the 8 nibble vectors of a half block (vector g against activation quants 4g..),
// their int16 products summed over the block.
inline void unpack_q4(const uint8_t * q, int half, __m256i * w) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int g = 0; g < 4; g++) {
        const __m256i v = load(q + 64 * g + 32 * half);
        w[g] = _mm256_and_si256(v, low4);
        w[g + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    }
}
inline __m256i dot_q4_block(const __m256i * w, const int8_t * xq) {
    __m256i sum16 = _mm256_setzero_si256();
    for (int g = 0; g < 8; g++) sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(w[g], bcast_group(xq + 4 * g)));
    return widen_pairs(sum16);
}

template <bool kMins>  // false: q4_0, true: q4_1
struct KernQ4 {
    static constexpr int kCols = 4, kParts = 2;
    template <int C>
    static void tile(const Job & j, const uint8_t * panel, int half, int64_t c0, int valid) {
        __m256 acc[C];
        for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
        const uint8_t * meta = panel + j.nb * j.quant;
        for (int64_t b = 0; b < j.nb; b++) {
            if (half == 0) prefetch_block(j, panel, meta, b);  // the second half finds it cached
            __m256i w[8];
            unpack_q4(panel + b * j.quant, half, w);
            const __m256 dw = load_halfs(meta + b * j.meta + 16 * half);
            const __m256 mw = kMins ? load_halfs(meta + b * j.meta + 32 + 16 * half) : _mm256_setzero_ps();
            for (int c = 0; c < C; c++) {
                const int8_t * xq = ((const BlockQ8_0 *) row_of(j, c0 + c))[b].qs;
                __m256i isum = dot_q4_block(w, xq);
                if (kMins) {
                    const SumQ8_0 s = sums_of<SumQ8_0>(j, c0 + c)[b];
                    acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(s.d)), _mm256_cvtepi32_ps(isum), acc[c]);
                    acc[c] = _mm256_fmadd_ps(mw, _mm256_set1_ps(s.dsum), acc[c]);
                } else {
                    const SumQ8_0 s = sums_of<SumQ8_0>(j, c0 + c)[b];
                    isum = _mm256_add_epi32(isum, _mm256_set1_epi32(-8 * s.sum));
                    acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(s.d)), _mm256_cvtepi32_ps(isum), acc[c]);
                }
            }
        }
        for (int c = 0; c < C; c++) store_rows(out_of(j, c0 + c, panel, half * kHalfRows), acc[c], valid);
    }
};

// ---- k-quants ---------------------------------------------------------------------------------

// d * scale_s and dmin * min_s of the half's 8 rows (see panels_avx512.cpp's unpack_k_scales).
struct KScales {
    __m256 scale[8];
    __m256 min[8];
};

inline void unpack_k_scales(const uint8_t * meta, int half, KScales & out) {
    const __m256 d = load_halfs(meta + 16 * half), dmin = load_halfs(meta + 32 + 16 * half);
    const __m256i w0 = load(meta + 64 + 32 * half), w1 = load(meta + 128 + 32 * half), w2 = load(meta + 192 + 32 * half);
    const __m256i low6 = _mm256_set1_epi32(0x3f3f3f3f), low4 = _mm256_set1_epi32(0x0f0f0f0f);
    const __m256i low2 = _mm256_set1_epi32(0x03030303), byte = _mm256_set1_epi32(0xff);
    const __m256i packed[4] = {
        _mm256_and_si256(w0, low6),
        _mm256_or_si256(_mm256_and_si256(w2, low4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w0, 6), low2), 4)),
        _mm256_and_si256(w1, low6),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(w2, 4), low4),
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w1, 6), low2), 4)),
    };
    for (int s = 0; s < 4; s++) {
        auto field = [&](int which) { return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(packed[which], 8 * s), byte)); };
        out.scale[s] = _mm256_mul_ps(d, field(0));
        out.scale[s + 4] = _mm256_mul_ps(d, field(1));
        out.min[s] = _mm256_mul_ps(dmin, field(2));
        out.min[s + 4] = _mm256_mul_ps(dmin, field(3));
    }
}

// q4_K, q5_K: a pair of sub-blocks (the low and high nibbles of 32 bytes per row) at a time, each
// group of 4 quant bytes loaded once and met by every activation row of the tile. 4-bit values
// add 8 groups in int16 (a whole sub-block), 5-bit ones 4 (then widen): below 32768 either way.
template <bool kFive>
struct KernK45 {
    static constexpr int kCols = 4, kParts = 2;
    template <int C>
    static void tile(const Job & j, const uint8_t * panel, int half, int64_t c0, int valid) {
        const __m256i low4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
        __m256 acc[C];
        for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
        const uint8_t * meta = panel + j.nb * j.quant;
        for (int64_t b = 0; b < j.nb; b++) {
            if (half == 0) prefetch_block(j, panel, meta, b);  // the second half finds it cached
            const uint8_t * quant = panel + b * j.quant;
            const uint8_t * qs = kFive ? quant + 512 : quant;
            KScales ks;
            unpack_k_scales(meta + b * j.meta, half, ks);
            __m256 blk[C];
            for (int c = 0; c < C; c++) blk[c] = _mm256_setzero_ps();
            const int8_t * xs[C];
            for (int c = 0; c < C; c++) xs[c] = ((const BlockQ8_K *) row_of(j, c0 + c))[b].qs;
            for (int p = 0; p < 4; p++) {  // sub-blocks 2p (low nibbles) and 2p + 1 (high)
                __m256i lo16[C], hi16[C], lo32[C], hi32[C];
                for (int c = 0; c < C; c++) lo16[c] = hi16[c] = lo32[c] = hi32[c] = _mm256_setzero_si256();
                for (int g = 0; g < 8; g++) {
                    const __m256i v = load(qs + 64 * (8 * p + g) + 32 * half);
                    __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    if (kFive) {  // bit s of the qh bytes -> bit 4 of sub-block s's quants
                        const __m256i h = load(quant + 64 * g + 32 * half);
                        const __m256i m0 = 2 * p <= 4 ? _mm256_slli_epi16(h, 4 - 2 * p) : _mm256_srli_epi16(h, 2 * p - 4);
                        const __m256i m1 = 2 * p + 1 <= 4 ? _mm256_slli_epi16(h, 3 - 2 * p) : _mm256_srli_epi16(h, 2 * p - 3);
                        lo = _mm256_or_si256(lo, _mm256_and_si256(m0, bit4));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(m1, bit4));
                    }
                    for (int c = 0; c < C; c++) {
                        lo16[c] = _mm256_add_epi16(lo16[c], _mm256_maddubs_epi16(lo, bcast_group(xs[c] + 64 * p + 4 * g)));
                        hi16[c] = _mm256_add_epi16(hi16[c], _mm256_maddubs_epi16(hi, bcast_group(xs[c] + 64 * p + 32 + 4 * g)));
                    }
                    if (kFive && g % 4 == 3) {  // 5-bit values: widen every 4 groups
                        for (int c = 0; c < C; c++) {
                            lo32[c] = _mm256_add_epi32(lo32[c], widen_pairs(lo16[c]));
                            hi32[c] = _mm256_add_epi32(hi32[c], widen_pairs(hi16[c]));
                            lo16[c] = hi16[c] = _mm256_setzero_si256();
                        }
                    }
                }
                for (int c = 0; c < C; c++) {
                    const __m256i lo_sum = kFive ? lo32[c] : widen_pairs(lo16[c]);
                    const __m256i hi_sum = kFive ? hi32[c] : widen_pairs(hi16[c]);
                    blk[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo_sum), ks.scale[2 * p], blk[c]);
                    blk[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi_sum), ks.scale[2 * p + 1], blk[c]);
                }
            }
            for (int c = 0; c < C; c++) {
                const SumQ8_K & sx = sums_of<SumQ8_K>(j, c0 + c)[b];
                __m256 mins = _mm256_mul_ps(ks.min[0], _mm256_set1_ps(sx.dsum32[0]));
                for (int s = 1; s < 8; s++) mins = _mm256_fmadd_ps(ks.min[s], _mm256_set1_ps(sx.dsum32[s]), mins);
                acc[c] = _mm256_sub_ps(_mm256_fmadd_ps(blk[c], _mm256_set1_ps(sx.d), acc[c]), mins);
            }
        }
        for (int c = 0; c < C; c++) store_rows(out_of(j, c0 + c, panel, half * kHalfRows), acc[c], valid);
    }
};

// q6_K (element layout as in panels_avx512.cpp's KernQ6_K), one 16-quant sub-block at a time: its
// 4 quant vectors stay in registers while up to 8 activation rows go past (the unpacking is
// shared by more rows than a whole half-block's 8 vectors would leave registers for).
struct KernQ6_K {
    static constexpr int kCols = 8, kParts = 2;
    template <int C>
    static void tile(const Job & j, const uint8_t * panel, int half, int64_t c0, int valid) {
        const __m256i low4 = _mm256_set1_epi8(0x0f), top2 = _mm256_set1_epi8(0x30);
        __m256 acc[C];
        for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
        const uint8_t * meta = panel + j.nb * j.quant;
        for (int64_t b = 0; b < j.nb; b++) {
            if (half == 0) prefetch_block(j, panel, meta, b);  // the second half finds it cached
            const uint8_t * ql = panel + b * j.quant;
            const uint8_t * qh = ql + 2048;
            const uint8_t * mb = meta + b * j.meta;
            const __m256 d = load_halfs(mb + 16 * half);
            __m256 blk[C];
            for (int c = 0; c < C; c++) blk[c] = _mm256_setzero_ps();
            for (int h = 0; h < 2; h++) {
                for (int g = 0; g < 4; g++) {
                    for (int sub = 0; sub < 2; sub++) {
                        __m256i w[4];
                        for (int tt = 0; tt < 4; tt++) {
                            const int t = 4 * sub + tt;
                            const __m256i lv = load(ql + 64 * (16 * h + 8 * (g & 1) + t) + 32 * half);
                            const __m256i hv = load(qh + 64 * (8 * h + t) + 32 * half);
                            const __m256i lo = _mm256_and_si256(g < 2 ? lv : _mm256_srli_epi16(lv, 4), low4);
                            const __m256i hi = g < 2 ? _mm256_slli_epi16(hv, 4 - 2 * g) : (g == 2 ? hv : _mm256_srli_epi16(hv, 2));
                            w[tt] = _mm256_or_si256(lo, _mm256_and_si256(hi, top2));
                        }
                        const int s = 8 * h + 2 * g + sub;
                        int64_t scales8;
                        std::memcpy(&scales8, mb + 32 + 16 * s + 8 * half, 8);
                        const __m256 scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(scales8))));
                        for (int c = 0; c < C; c++) {
                            const int8_t * xq = ((const BlockQ8_K *) row_of(j, c0 + c))[b].qs + 128 * h + 32 * g + 16 * sub;
                            // 6-bit values: 2 groups per int16 sum
                            const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(w[0], bcast_group(xq)),
                                                                _mm256_maddubs_epi16(w[1], bcast_group(xq + 4)));
                            const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(w[2], bcast_group(xq + 8)),
                                                                _mm256_maddubs_epi16(w[3], bcast_group(xq + 12)));
                            __m256i isum = _mm256_set1_epi32(sums_of<SumQ8_K>(j, c0 + c)[b].start16[s]);
                            isum = _mm256_add_epi32(isum, _mm256_add_epi32(widen_pairs(p0), widen_pairs(p1)));
                            blk[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, blk[c]);
                        }
                    }
                }
            }
            for (int c = 0; c < C; c++) {
                acc[c] = _mm256_fmadd_ps(blk[c], _mm256_set1_ps(sums_of<SumQ8_K>(j, c0 + c)[b].d), acc[c]);
            }
        }
        for (int c = 0; c < C; c++) store_rows(out_of(j, c0 + c, panel, half * kHalfRows), acc[c], valid);
    }
};

}  // namespace

void panel_q8_0(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panels<KernQ8_0>(p, f, n, c0, nc); }
void panel_q4_0(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panels<KernQ4<false>>(p, f, n, c0, nc); }
void panel_q4_1(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panels<KernQ4<true>>(p, f, n, c0, nc); }
void panel_q4_K(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panels<KernK45<false>>(p, f, n, c0, nc); }
void panel_q5_K(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panels<KernK45<true>>(p, f, n, c0, nc); }
void panel_q6_K(const PanelProduct & p, int64_t f, int64_t n, int64_t c0, int64_t nc) { run_panels<KernQ6_K>(p, f, n, c0, nc); }

}  // namespace avx2
}  // namespace sparrow

#endif  // x86
