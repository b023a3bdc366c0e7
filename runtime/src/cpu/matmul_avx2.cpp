// matmul_avx2.cpp - register-tiled matrix products (quant.h's mul_mat) for AVX2 + FMA + F16C.
//
// vec_dot streams one weight row against one activation row. With several activation rows
// (prefill, a verify batch) the same weight row would be fetched and unpacked once per token,
// and even for one (decode) a single stream of reads leaves memory bandwidth unused. Here a
// micro-kernel computes an R x C tile (R weight rows x C activation rows) with R * C
// accumulators that stay in registers: every weight vector (loaded, converted or unpacked from
// nibbles once) meets C activation vectors, and every activation vector R weight rows. The
// driver cuts the requested block into such tiles, spreading the activation rows evenly over
// tiles (9 rows -> 3 + 3 + 3, not 4 + 4 + 1) so no tile degenerates to a matrix-vector product.
//
// Tile shapes follow the 16 ymm registers: float weights 4 x 3 (12 accumulators, a weight and
// the activations), integer ones 2 x 4 (8 float accumulators plus unpacked weights and their
// scales). Arithmetic per block is the same as vec_dot's, so results agree with the scalar
// reference to float rounding.

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/matmul_tiles.h"
#include "cpu/simd_avx2.h"

#include <immintrin.h>

namespace sparrow {
namespace avx2 {
namespace {

// ---- float weights: f32, f16, bf16 against f32 activations ----------------------------------

struct LoadF32 {
    static __m256 load8(const uint8_t * row, int64_t i) { return _mm256_loadu_ps((const float *) row + i); }
    static float load1(const uint8_t * row, int64_t i) { return ((const float *) row)[i]; }
};
struct LoadF16 {
    static __m256 load8(const uint8_t * row, int64_t i) {
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) ((const uint16_t *) row + i)));
    }
    static float load1(const uint8_t * row, int64_t i) { return fp16(((const uint16_t *) row)[i]); }
};
struct LoadBF16 {
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

// ---- 32-element blocks against q8_0 activations: q8_0, q4_0, q4_1 ----------------------------
// Per block and tile: each weight row is unpacked once into 32 int8/uint8, each activation
// block loaded once; the integer dot of every pair is scaled by d_w * d_x into a float
// accumulator.

struct Q8_0Kern {
    static constexpr int RM = 2, RN = 4;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        const int64_t nb = k / QK_32;
        __m256 acc[R][C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
        const __m256i ones = _mm256_set1_epi16(1);
        for (int64_t b = 0; b < nb; b++) {
            // vpmaddubsw wants one unsigned operand: |w| against sign(w) * x (x never -128)
            __m256i w_abs[R], w_raw[R];
            __m256 dw[R];
            for (int r = 0; r < R; r++) {
                const BlockQ8_0 & blk = ((const BlockQ8_0 *) (w + r * ws))[b];
                w_raw[r] = loadu(blk.qs);
                w_abs[r] = _mm256_sign_epi8(w_raw[r], w_raw[r]);
                dw[r] = _mm256_set1_ps(fp16(blk.d));
            }
            for (int c = 0; c < C; c++) {
                const BlockQ8_0 & xb = ((const BlockQ8_0 *) (x + c * xs))[b];
                const __m256i xq = loadu(xb.qs);
                const __m256 dx = _mm256_set1_ps(fp16(xb.d));
                for (int r = 0; r < R; r++) {
                    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs[r], _mm256_sign_epi8(xq, w_raw[r])), ones);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(dw[r], dx), _mm256_cvtepi32_ps(p), acc[r][c]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) y[c * ys + r] = hsum(acc[r][c]);
    }
};

// q4_0: sum((q - 8) x) = sum(q x) - sum(8 x); the second product depends on the activation only,
// so it is computed once per activation block and shared by the R weight rows.
struct Q4_0Kern {
    static constexpr int RM = 2, RN = 4;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        const int64_t nb = k / QK_32;
        __m256 acc[R][C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i eights = _mm256_set1_epi8(8);
        for (int64_t b = 0; b < nb; b++) {
            __m256i q[R];
            __m256 dw[R];
            for (int r = 0; r < R; r++) {
                const BlockQ4_0 & blk = ((const BlockQ4_0 *) (w + r * ws))[b];
                q[r] = unpack_nibbles(blk.qs);
                dw[r] = _mm256_set1_ps(fp16(blk.d));
            }
            for (int c = 0; c < C; c++) {
                const BlockQ8_0 & xb = ((const BlockQ8_0 *) (x + c * xs))[b];
                const __m256i xq = loadu(xb.qs);
                const __m256i offset = _mm256_maddubs_epi16(eights, xq);
                const __m256 dx = _mm256_set1_ps(fp16(xb.d));
                for (int r = 0; r < R; r++) {
                    const __m256i qx = _mm256_sub_epi16(_mm256_maddubs_epi16(q[r], xq), offset);
                    const __m256i p = _mm256_madd_epi16(qx, ones);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(dw[r], dx), _mm256_cvtepi32_ps(p), acc[r][c]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) y[c * ys + r] = hsum(acc[r][c]);
    }
};

// q4_1: d dx sum(q x) + m dx sum(x); sum(x) (as 8 partial sums) is per activation block.
struct Q4_1Kern {
    static constexpr int RM = 2, RN = 4;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        const int64_t nb = k / QK_32;
        __m256 acc[R][C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
        const __m256i ones16 = _mm256_set1_epi16(1);
        const __m256i ones8 = _mm256_set1_epi8(1);
        for (int64_t b = 0; b < nb; b++) {
            __m256i q[R];
            __m256 dw[R], mw[R];
            for (int r = 0; r < R; r++) {
                const BlockQ4_1 & blk = ((const BlockQ4_1 *) (w + r * ws))[b];
                q[r] = unpack_nibbles(blk.qs);
                dw[r] = _mm256_set1_ps(fp16(blk.d));
                mw[r] = _mm256_set1_ps(fp16(blk.m));
            }
            for (int c = 0; c < C; c++) {
                const BlockQ8_0 & xb = ((const BlockQ8_0 *) (x + c * xs))[b];
                const __m256i xq = loadu(xb.qs);
                const __m256 dx = _mm256_set1_ps(fp16(xb.d));
                const __m256 xsum = _mm256_mul_ps(dx, _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ones8, xq), ones16)));
                for (int r = 0; r < R; r++) {
                    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[r], xq), ones16);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(dw[r], dx), _mm256_cvtepi32_ps(p), acc[r][c]);
                    acc[r][c] = _mm256_fmadd_ps(mw[r], xsum, acc[r][c]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) y[c * ys + r] = hsum(acc[r][c]);
    }
};

// ---- 8-row panels: q4_0 and q8_0 with weight rows interleaved on the fly -----------------------
// The tiles above pay the integer-to-float tail (vpmaddwd, convert, scale, FMA) once per weight
// row, activation row and block. Here 8 weight rows are transposed in registers so that one
// vector holds the same 4 elements of all 8 rows; each group of 4 activation bytes is broadcast
// against it, so one vpmaddubsw serves 8 rows at once, the products of a whole block sum in int16
// lanes (row r in dword r) and the float tail runs once per 8 rows. The transpose costs a few
// shuffles per block, shared by every activation row of the panel.

// vpmaddubsw over the 8 dword groups of an activation block against the 8 transposed vectors,
// summed to one int32 per weight row. w[j] must keep each pair sum of one call plus the other
// seven within int16: true for 4-bit weights (8 x 2 x 15 x 127 < 32768).
inline __m256i dot_panel_u4(const __m256i * w, const int8_t * xq) {
    __m256i sum16 = _mm256_setzero_si256();
    for (int j = 0; j < 8; j++) {
        int32_t group;
        std::memcpy(&group, xq + 4 * j, 4);
        sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(group)));
    }
    return _mm256_madd_epi16(sum16, _mm256_set1_epi16(1));
}

// Sum of an activation block's 32 quants times `scale`, in every lane.
inline __m256i block_sum_broadcast(const int8_t * xq, __m256i scale_u8) {
    __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(scale_u8, loadu(xq)), _mm256_set1_epi16(1));
    s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0x4e));
    s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0xb1));
    return _mm256_add_epi32(s, _mm256_permute2x128_si256(s, s, 0x01));
}

// The 8 fp16 block scales of the panel's rows as floats, row r in lane r.
template <typename Block>
inline __m256 panel_scales(const Block * const * blk) {
    const __m128i d16 = _mm_setr_epi16((short) blk[0]->d, (short) blk[1]->d, (short) blk[2]->d, (short) blk[3]->d,
                                       (short) blk[4]->d, (short) blk[5]->d, (short) blk[6]->d, (short) blk[7]->d);
    return _mm256_cvtph_ps(d16);
}

// 4 x 4 transpose of dwords within each 128-bit lane: out[j] lane dword r = in[r] lane dword j.
inline void transpose4_epi32(const __m256i * in, __m256i * out) {
    const __m256i u0 = _mm256_unpacklo_epi32(in[0], in[1]), u1 = _mm256_unpackhi_epi32(in[0], in[1]);
    const __m256i u2 = _mm256_unpacklo_epi32(in[2], in[3]), u3 = _mm256_unpackhi_epi32(in[2], in[3]);
    out[0] = _mm256_unpacklo_epi64(u0, u2);
    out[1] = _mm256_unpackhi_epi64(u0, u2);
    out[2] = _mm256_unpacklo_epi64(u1, u3);
    out[3] = _mm256_unpackhi_epi64(u1, u3);
}

// y[c * ys + r] for 8 weight rows and C activation rows.
template <int C>
void panel_q4_0(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
    const int64_t nb = k / QK_32;
    const __m256i low4 = _mm256_set1_epi8(0x0f), eights = _mm256_set1_epi8(8);
    __m256 acc[C];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const BlockQ4_0 * blk[8];
        for (int r = 0; r < 8; r++) blk[r] = (const BlockQ4_0 *) (w + r * ws) + b;
        // rows r and r + 4 share a vector (low / high lane), so after the in-lane transpose
        // dword r of t[j] is row r's nibble bytes 4j .. 4j + 3
        __m256i rows[4], t[4], wq[8];
        for (int r = 0; r < 4; r++) {
            rows[r] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *) blk[r]->qs)),
                                              _mm_loadu_si128((const __m128i *) blk[r + 4]->qs), 1);
        }
        transpose4_epi32(rows, t);
        for (int j = 0; j < 4; j++) {
            wq[j] = _mm256_and_si256(t[j], low4);                             // elements 4j .. 4j + 3
            wq[j + 4] = _mm256_and_si256(_mm256_srli_epi16(t[j], 4), low4);  // elements 16 + 4j ..
        }
        const __m256 dw = panel_scales(blk);
        for (int c = 0; c < C; c++) {
            const BlockQ8_0 & xb = ((const BlockQ8_0 *) (x + c * xs))[b];
            // sum((q - 8) x) = sum(q x) - 8 sum(x)
            const __m256i p = _mm256_sub_epi32(dot_panel_u4(wq, xb.qs), block_sum_broadcast(xb.qs, eights));
            acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(fp16(xb.d))), _mm256_cvtepi32_ps(p), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(y + c * ys, acc[c]);
}

// q8_0: signed weights, so the sign trick per group (|w| against sign(w) * x), and pair sums
// up to 2 x 127 x 127 that leave no room to add in int16: each group widens to int32.
template <int C>
void panel_q8_0(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
    const int64_t nb = k / QK_32;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[C];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const BlockQ8_0 * blk[8];
        for (int r = 0; r < 8; r++) blk[r] = (const BlockQ8_0 *) (w + r * ws) + b;
        __m256i lo[4], hi[4], tlo[4], thi[4], wq[8], wabs[8];
        for (int r = 0; r < 4; r++) lo[r] = loadu(blk[r]->qs), hi[r] = loadu(blk[r + 4]->qs);
        transpose4_epi32(lo, tlo);  // lane 0: elements 4j.., lane 1: elements 16 + 4j.. (rows 0..3)
        transpose4_epi32(hi, thi);  // same for rows 4..7
        for (int j = 0; j < 4; j++) {
            wq[j] = _mm256_permute2x128_si256(tlo[j], thi[j], 0x20);
            wq[j + 4] = _mm256_permute2x128_si256(tlo[j], thi[j], 0x31);
        }
        for (int j = 0; j < 8; j++) wabs[j] = _mm256_sign_epi8(wq[j], wq[j]);
        const __m256 dw = panel_scales(blk);
        for (int c = 0; c < C; c++) {
            const BlockQ8_0 & xb = ((const BlockQ8_0 *) (x + c * xs))[b];
            __m256i sum = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                int32_t group;
                std::memcpy(&group, xb.qs + 4 * j, 4);
                const __m256i xg = _mm256_sign_epi8(_mm256_set1_epi32(group), wq[j]);
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[j], xg), ones));
            }
            acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(fp16(xb.d))), _mm256_cvtepi32_ps(sum), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(y + c * ys, acc[c]);
}

// Whole 8-row panels through Panel<C> (C <= 4, activation rows split evenly), the remaining
// rows through the per-row tiles of Kern.
template <template <int> class PanelFn, typename Kern>
void drive_panels(int64_t k, const void * wv, size_t ws, int64_t nr, const void * xv, size_t xs, int64_t nc, float * y,
                  int64_t ys) {
    static constexpr TileFn panels[4] = {&PanelFn<1>::run, &PanelFn<2>::run, &PanelFn<3>::run, &PanelFn<4>::run};
    const uint8_t * w = (const uint8_t *) wv;
    const uint8_t * x = (const uint8_t *) xv;
    int64_t r0 = 0;
    for (; r0 + 8 <= nr; r0 += 8) {
        for_even_col_tiles(nc, 4, [&](int64_t c0, int cc) {
            panels[cc - 1](k, w + r0 * ws, ws, x + c0 * xs, xs, y + c0 * ys + r0, ys);
        });
    }
    if (r0 < nr) drive<Kern>(k, w + r0 * ws, ws, nr - r0, x, xs, nc, y + r0, ys);
}

template <int C> struct PanelQ4_0 { static void run(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) { panel_q4_0<C>(k, w, ws, x, xs, y, ys); } };
template <int C> struct PanelQ8_0 { static void run(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) { panel_q8_0<C>(k, w, ws, x, xs, y, ys); } };

// ---- k-quants against q8_K activations ---------------------------------------------------------
// A super-block has one float scale per row and small integer sub-block scales, so the whole
// 256 elements accumulate in int32 (sub-block scale applied by vpmaddwd) and meet floats once.

inline __m256i zext128(__m128i v) { return _mm256_inserti128_si256(_mm256_setzero_si256(), v, 0); }

struct Q4_KKern {
    static constexpr int RM = 2, RN = 4;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        const int64_t nb = k / QK_K;
        const __m256i low4 = _mm256_set1_epi8(0x0f);
        __m256 acc[R][C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            __m256i scales16[R];
            __m128i mins16[R];
            for (int r = 0; r < R; r++) {
                const __m128i sm = unpack_k_scales(((const BlockQ4_K *) (w + r * ws))[b].scales);
                scales16[r] = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
                mins16[r] = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));
            }
            __m256i isum[R][C];
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) isum[r][c] = _mm256_setzero_si256();
            for (int j = 0; j < QK_K / 32; j++) {  // sub-block j: nibble half (j & 1) of qs[32 (j/2) ..]
                __m256i q[R], s[R];
                for (int r = 0; r < R; r++) {
                    const __m256i packed = loadu(((const BlockQ4_K *) (w + r * ws))[b].qs + 32 * (j / 2));
                    q[r] = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(packed, 4) : packed, low4);
                    s[r] = broadcast_i16(scales16[r], j);
                }
                for (int c = 0; c < C; c++) {
                    const __m256i xq = loadu(((const BlockQ8_K *) (x + c * xs))[b].qs + 32 * j);
                    for (int r = 0; r < R; r++) {
                        isum[r][c] = _mm256_add_epi32(isum[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(q[r], xq), s[r]));
                    }
                }
            }
            for (int c = 0; c < C; c++) {
                const BlockQ8_K & xb = ((const BlockQ8_K *) (x + c * xs))[b];
                const __m128i y_sums = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *) xb.bsums),
                                                      _mm_loadu_si128((const __m128i *) (xb.bsums + 8)));
                for (int r = 0; r < R; r++) {
                    const BlockQ4_K & blk = ((const BlockQ4_K *) (w + r * ws))[b];
                    const __m256i min_dot = zext128(_mm_madd_epi16(mins16[r], y_sums));
                    acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(fp16(blk.d) * xb.d), _mm256_cvtepi32_ps(isum[r][c]), acc[r][c]);
                    acc[r][c] = _mm256_fnmadd_ps(_mm256_set1_ps(fp16(blk.dmin) * xb.d), _mm256_cvtepi32_ps(min_dot), acc[r][c]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) y[c * ys + r] = hsum(acc[r][c]);
    }
};

// q6_K: sum_s scale_s sum((q - 32) x) = sum_s scale_s sum(q x) - 32 sum_s scale_s bsum_s.
struct Q6_KKern {
    static constexpr int RM = 2, RN = 4;

    template <int R, int C>
    static void tile(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys) {
        const int64_t nb = k / QK_K;
        const __m256i low4 = _mm256_set1_epi8(0x0f);
        const __m256i low2 = _mm256_set1_epi8(0x03);
        // bytes {k x 8, k+1 x 8}: widened, the first 16 elements get scale k, the next 16 k + 1
        const __m128i pair_pick = _mm_set_epi8(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        __m256 acc[R][C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            __m256i isum[R][C];
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) isum[r][c] = _mm256_setzero_si256();
            for (int half = 0; half < 2; half++) {
                for (int g = 0; g < 4; g++) {  // 32 elements: low/high nibble of ql, bits 2g of qh
                    __m256i q[R], s[R];
                    for (int r = 0; r < R; r++) {
                        const BlockQ6_K & blk = ((const BlockQ6_K *) (w + r * ws))[b];
                        const __m256i ql = loadu(blk.ql + 64 * half + 32 * (g & 1));
                        const __m256i qh = loadu(blk.qh + 32 * half);
                        const __m256i lo = _mm256_and_si256(g < 2 ? ql : _mm256_srli_epi16(ql, 4), low4);
                        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * g), low2);
                        q[r] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                        const __m128i scales8 = _mm_loadu_si128((const __m128i *) blk.scales);
                        const __m128i pick = _mm_add_epi8(pair_pick, _mm_set1_epi8((char) (8 * half + 2 * g)));
                        s[r] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales8, pick));
                    }
                    for (int c = 0; c < C; c++) {
                        const __m256i xq = loadu(((const BlockQ8_K *) (x + c * xs))[b].qs + 128 * half + 32 * g);
                        for (int r = 0; r < R; r++) {
                            isum[r][c] = _mm256_add_epi32(isum[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(q[r], xq), s[r]));
                        }
                    }
                }
            }
            for (int c = 0; c < C; c++) {
                const BlockQ8_K & xb = ((const BlockQ8_K *) (x + c * xs))[b];
                const __m256i bsums = loadu(xb.bsums);
                for (int r = 0; r < R; r++) {
                    const BlockQ6_K & blk = ((const BlockQ6_K *) (w + r * ws))[b];
                    const __m256i scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *) blk.scales));
                    const __m256i offset = _mm256_slli_epi32(_mm256_madd_epi16(bsums, scales16), 5);
                    const __m256i sumi = _mm256_sub_epi32(isum[r][c], offset);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(fp16(blk.d) * xb.d), _mm256_cvtepi32_ps(sumi), acc[r][c]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) y[c * ys + r] = hsum(acc[r][c]);
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
    drive_panels<PanelQ8_0, Q8_0Kern>(k, w, ws, nr, x, xs, nc, y, ys);
}
void mul_mat_q4_0(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive_panels<PanelQ4_0, Q4_0Kern>(k, w, ws, nr, x, xs, nc, y, ys);
}
void mul_mat_q4_1(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive<Q4_1Kern>(k, w, ws, nr, x, xs, nc, y, ys);
}
void mul_mat_q4_K(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive<Q4_KKern>(k, w, ws, nr, x, xs, nc, y, ys);
}
void mul_mat_q6_K(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive<Q6_KKern>(k, w, ws, nr, x, xs, nc, y, ys);
}

}  // namespace avx2
}  // namespace sparrow

#endif  // x86
