// matmul_avx2.cpp - register-tiled matrix products (quant.h's mul_mat) for AVX2 + FMA + F16C.
//
// vec_dot streams one weight row against one activation row, which is right for decode (every
// weight byte is read once and memory is the limit). With several activation rows (prefill, a
// verify batch) the same weight row would be fetched and unpacked once per token. Here a
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

#include "cpu/simd_avx2.h"

#include <immintrin.h>

#include <array>
#include <utility>

namespace sparrow {
namespace avx2 {
namespace {

using TileFn = void (*)(int64_t k, const uint8_t * w, size_t ws, const uint8_t * x, size_t xs, float * y, int64_t ys);

// Calls Kern::tile<R, C> for every (weight rows, activation rows) block of the request.
template <typename Kern, int... I>
constexpr std::array<TileFn, sizeof...(I)> make_tiles(std::integer_sequence<int, I...>) {
    return {{&Kern::template tile<I / Kern::RN + 1, I % Kern::RN + 1>...}};
}

template <typename Kern>
void drive(int64_t k, const void * wv, size_t ws, int64_t nr, const void * xv, size_t xs, int64_t nc, float * y,
           int64_t ys) {
    constexpr int RM = Kern::RM, RN = Kern::RN;
    static constexpr std::array<TileFn, RM * RN> tiles = make_tiles<Kern>(std::make_integer_sequence<int, RM * RN>());
    const uint8_t * w = (const uint8_t *) wv;
    const uint8_t * x = (const uint8_t *) xv;
    const int64_t n_col_tiles = (nc + RN - 1) / RN;
    for (int64_t r0 = 0; r0 < nr; r0 += RM) {
        const int rr = (int) std::min<int64_t>(RM, nr - r0);
        // the weight rows of this tile stay in L1 while the activation tiles go past
        for (int64_t t = 0, c0 = 0; t < n_col_tiles; t++) {
            const int cc = (int) ((nc - c0) / (n_col_tiles - t));  // even split of what is left
            tiles[(rr - 1) * RN + (cc - 1)](k, w + r0 * ws, ws, x + c0 * xs, xs, y + c0 * ys + r0, ys);
            c0 += cc;
        }
    }
}

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
    drive<Q8_0Kern>(k, w, ws, nr, x, xs, nc, y, ys);
}
void mul_mat_q4_0(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys) {
    drive<Q4_0Kern>(k, w, ws, nr, x, xs, nc, y, ys);
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
