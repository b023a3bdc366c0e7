// quant_avx2.cpp - AVX2 + FMA + F16C kernels for quant.cpp's dispatch table.
//
// This file alone is compiled with -mavx2 -mfma -mf16c; quant.cpp calls into it only after the
// CPU reported those features. Matrix-vector products at decode time stream every weight byte
// once, so the quantized dots are written to keep up with memory: weights stay 4/5/6/8-bit
// integers and meet the int8 activations in vpmaddubsw (u8 x s8 -> pairs summed to s16) and
// vpmaddwd (s16 x s16 -> pairs summed to s32); floats appear once per block.
//
// vpmaddubsw wants one unsigned operand. Unsigned weights (q4_1, the k-quants) go in directly;
// signed ones (q8_0, q4_0 after -8) use |w| and sign(w) * x. That needs x in [-127, 127], which
// the activation quantizers guarantee (x = -128 would wrap when negated); w may be any int8.

#if defined(__x86_64__) || defined(__i386__)

#include "quant.h"

#include "cpu/simd_avx2.h"

#include <immintrin.h>

#include <cstring>

namespace sparrow {
namespace avx2 {

// ---- float weights ---------------------------------------------------------------------------
// Four independent accumulators hide the FMA latency; the tail (n not a multiple of 8) is
// scalar. The weight-to-float conversion is the only difference between the three, and bf16's
// activations, which are bf16 too (traits' dot type), widened the same way.

template <typename LoadW8, typename LoadW1, typename LoadX8, typename LoadX1>
static inline float dot_float_weights(int64_t n, LoadW8 load8, LoadW1 load1, LoadX8 x8, LoadX1 x1) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(load8(i), x8(i), acc0);
        acc1 = _mm256_fmadd_ps(load8(i + 8), x8(i + 8), acc1);
        acc2 = _mm256_fmadd_ps(load8(i + 16), x8(i + 16), acc2);
        acc3 = _mm256_fmadd_ps(load8(i + 24), x8(i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(load8(i), x8(i), acc0);
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; i++) sum += load1(i) * x1(i);
    return sum;
}

template <typename LoadW8, typename LoadW1>
static inline float dot_float_weights(int64_t n, const float * x, LoadW8 load8, LoadW1 load1) {
    return dot_float_weights(
        n, load8, load1, [x](int64_t i) { return _mm256_loadu_ps(x + i); }, [x](int64_t i) { return x[i]; });
}

float vec_dot_f32(int64_t n, const void * wv, const void * xv) {
    const float * w = (const float *) wv;
    return dot_float_weights(
        n, (const float *) xv, [w](int64_t i) { return _mm256_loadu_ps(w + i); }, [w](int64_t i) { return w[i]; });
}

float vec_dot_f16(int64_t n, const void * wv, const void * xv) {
    const uint16_t * w = (const uint16_t *) wv;
    return dot_float_weights(
        n, (const float *) xv, [w](int64_t i) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (w + i))); },
        [w](int64_t i) { return fp16(w[i]); });
}

float vec_dot_bf16(int64_t n, const void * wv, const void * xv) {
    const uint16_t * w = (const uint16_t *) wv;
    const uint16_t * x = (const uint16_t *) xv;
    return dot_float_weights(
        n, [w](int64_t i) { return load_bf16x8(w + i); }, [w](int64_t i) { return bf16_to_fp32(w[i]); },
        [x](int64_t i) { return load_bf16x8(x + i); }, [x](int64_t i) { return bf16_to_fp32(x[i]); });
}

// ---- 32-element blocks, q8_0 activations -----------------------------------------------------
// Two blocks per iteration into two accumulators so consecutive blocks' FMAs do not wait on
// each other.

float vec_dot_q8_0(int64_t n, const void * wv, const void * xv) {
    const BlockQ8_0 * w = (const BlockQ8_0 *) wv;
    const BlockQ8_0 * x = (const BlockQ8_0 *) xv;
    const int64_t nb = n / QK_32;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m256i p0 = dot_i8_groups(loadu(w[i].qs), loadu(x[i].qs));
        const __m256i p1 = dot_i8_groups(loadu(w[i + 1].qs), loadu(x[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w[i].d) * fp16(x[i].d)), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w[i + 1].d) * fp16(x[i + 1].d)), _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++) {
        const __m256i p = dot_i8_groups(loadu(w[i].qs), loadu(x[i].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w[i].d) * fp16(x[i].d)), _mm256_cvtepi32_ps(p), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}

// sum((q - 8) y) = sum(q y) - sum(8 y): both vpmaddubsw products fit int16 (pairs up to 3810
// and 2032), so the offset is removed with one vpsubw instead of the sign trick's three ops.
static inline __m256i dot_q4_0_groups(const uint8_t * qs, __m256i y) {
    const __m256i qy = _mm256_maddubs_epi16(unpack_nibbles(qs), y);
    const __m256i offset = _mm256_maddubs_epi16(_mm256_set1_epi8(8), y);
    return _mm256_madd_epi16(_mm256_sub_epi16(qy, offset), _mm256_set1_epi16(1));
}

float vec_dot_q4_0(int64_t n, const void * wv, const void * xv) {
    const BlockQ4_0 * w = (const BlockQ4_0 *) wv;
    const BlockQ8_0 * x = (const BlockQ8_0 *) xv;
    const int64_t nb = n / QK_32;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m256i p0 = dot_q4_0_groups(w[i].qs, loadu(x[i].qs));
        const __m256i p1 = dot_q4_0_groups(w[i + 1].qs, loadu(x[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w[i].d) * fp16(x[i].d)), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w[i + 1].d) * fp16(x[i + 1].d)), _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++) {
        const __m256i p = dot_q4_0_groups(w[i].qs, loadu(x[i].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w[i].d) * fp16(x[i].d)), _mm256_cvtepi32_ps(p), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}

// d dx sum(q y) + m dx sum(y): the unsigned nibbles go straight into vpmaddubsw, and a second
// vpmaddubsw against ones gives the activation sum the min term needs.
float vec_dot_q4_1(int64_t n, const void * wv, const void * xv) {
    const BlockQ4_1 * w = (const BlockQ4_1 *) wv;
    const BlockQ8_0 * x = (const BlockQ8_0 *) xv;
    const int64_t nb = n / QK_32;
    const __m256i ones = _mm256_set1_epi8(1);
    __m256 acc_q = _mm256_setzero_ps(), acc_m = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m256i y = loadu(x[i].qs);
        const __m256i p = dot_u8_i8_groups(unpack_nibbles(w[i].qs), y);
        const __m256i s = dot_u8_i8_groups(ones, y);
        const float dx = fp16(x[i].d);
        acc_q = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w[i].d) * dx), _mm256_cvtepi32_ps(p), acc_q);
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w[i].m) * dx), _mm256_cvtepi32_ps(s), acc_m);
    }
    return hsum(_mm256_add_ps(acc_q, acc_m));
}

// ---- k-quants, q8_K activations --------------------------------------------------------------

namespace {

// The shared body of q4_K and q5_K: quants in 0..31 (0..15 for q4_K) per 64-element chunk,
// scale per 32, min per 32. Returns d * sum(scale q y) - dmin * sum(min y) for one block.
template <bool kFiveBits>
inline void dot_k4_k5_block(uint16_t d16, uint16_t dmin16, const uint8_t * scale_bytes, const uint8_t * qs,
                            const uint8_t * qh, const BlockQ8_K & x, __m256 & acc, __m128 & acc_min) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m128i scales_mins = unpack_k_scales(scale_bytes);

    // min term: the 8 mins against the 8 sub-block sums of y (pairs of bsums)
    const __m128i mins16 = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(scales_mins, scales_mins));
    const __m128i bsums_lo = _mm_loadu_si128((const __m128i *) x.bsums);
    const __m128i bsums_hi = _mm_loadu_si128((const __m128i *) (x.bsums + 8));
    const __m128i y_sums = _mm_hadd_epi16(bsums_lo, bsums_hi);
    const __m128i min_dot = _mm_madd_epi16(mins16, y_sums);
    acc_min = _mm_fmadd_ps(_mm_set1_ps(fp16(dmin16) * x.d), _mm_cvtepi32_ps(min_dot), acc_min);

    const __m256i scales16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scales_mins));
    __m256i high_bits = kFiveBits ? loadu(qh) : _mm256_setzero_si256();
    __m256i sumi = _mm256_setzero_si256();
    for (int c = 0; c < QK_K / 64; c++) {
        const __m256i packed = loadu(qs + 32 * c);
        __m256i q_lo = _mm256_and_si256(packed, low4);
        __m256i q_hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
        if (kFiveBits) {
            // bit 2c of qh[l] -> element 64c + l, bit 2c + 1 -> element 64c + 32 + l
            const __m256i one = _mm256_set1_epi8(1);
            q_lo = _mm256_or_si256(q_lo, _mm256_slli_epi16(_mm256_and_si256(high_bits, one), 4));
            q_hi = _mm256_or_si256(q_hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high_bits, 1), one), 4));
            high_bits = _mm256_srli_epi16(high_bits, 2);
        }
        const __m256i p_lo = _mm256_maddubs_epi16(q_lo, loadu(x.qs + 64 * c));
        const __m256i p_hi = _mm256_maddubs_epi16(q_hi, loadu(x.qs + 64 * c + 32));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p_lo, broadcast_i16(scales16, 2 * c)));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p_hi, broadcast_i16(scales16, 2 * c + 1)));
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(fp16(d16) * x.d), _mm256_cvtepi32_ps(sumi), acc);
}

inline float finish_k4_k5(__m256 acc, __m128 acc_min) {
    __m128 m = _mm_add_ps(acc_min, _mm_movehl_ps(acc_min, acc_min));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return hsum(acc) - _mm_cvtss_f32(m);
}

}  // namespace

float vec_dot_q4_K(int64_t n, const void * wv, const void * xv) {
    const BlockQ4_K * w = (const BlockQ4_K *) wv;
    const BlockQ8_K * x = (const BlockQ8_K *) xv;
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_min = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        dot_k4_k5_block<false>(w[i].d, w[i].dmin, w[i].scales, w[i].qs, nullptr, x[i], acc, acc_min);
    }
    return finish_k4_k5(acc, acc_min);
}

float vec_dot_q5_K(int64_t n, const void * wv, const void * xv) {
    const BlockQ5_K * w = (const BlockQ5_K *) wv;
    const BlockQ8_K * x = (const BlockQ8_K *) xv;
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_min = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        dot_k4_k5_block<true>(w[i].d, w[i].dmin, w[i].scales, w[i].qs, w[i].qh, x[i], acc, acc_min);
    }
    return finish_k4_k5(acc, acc_min);
}

// q6_K: sum_s scale_s sum((q - 32) y) = sum_s scale_s sum(q y) - 32 sum_s scale_s bsum_s, so the
// unsigned 6-bit q goes into vpmaddubsw and the -32 is applied once per block via bsums.
float vec_dot_q6_K(int64_t n, const void * wv, const void * xv) {
    const BlockQ6_K * w = (const BlockQ6_K *) wv;
    const BlockQ8_K * x = (const BlockQ8_K *) xv;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i low2 = _mm256_set1_epi8(0x03);
    // picks scales k and k + 1 of a 16-byte table: bytes {k x 8, k+1 x 8}, widened to int16 it
    // gives the first 16 elements scale k and the next 16 scale k + 1
    const __m128i pair_pick = _mm_set_epi8(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const BlockQ6_K & b = w[i];
        const __m128i scales8 = _mm_loadu_si128((const __m128i *) b.scales);
        const __m256i offset = _mm256_madd_epi16(loadu(x[i].bsums), _mm256_cvtepi8_epi16(scales8));
        __m256i sumi = _mm256_setzero_si256();
        for (int half = 0; half < 2; half++) {
            const __m256i ql0 = loadu(b.ql + 64 * half);
            const __m256i ql1 = loadu(b.ql + 64 * half + 32);
            const __m256i qh = loadu(b.qh + 32 * half);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_slli_epi16(_mm256_and_si256(qh, low2), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(ql1, low4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), low2), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), low2), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), low2), 4));
            for (int g = 0; g < 4; g++) {
                const int k = 8 * half + 2 * g;
                const __m128i pick = _mm_add_epi8(pair_pick, _mm_set1_epi8((char) k));
                const __m256i scale16 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales8, pick));
                const __m256i p = _mm256_maddubs_epi16(q[g], loadu(x[i].qs + 128 * half + 32 * g));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale16));
            }
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(offset, 5));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(fp16(b.d) * x[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum(acc);
}

// ---- activation quantizers -------------------------------------------------------------------
// Bit-identical to ref::quantize_row: the scale is computed with the same scalar operations, and
// each quant is the same single float multiply followed by the same rounding rule.

namespace {

// A function, not a global: a namespace-scope __m256 would be built by a static initializer,
// i.e. run AVX code at load time even on CPUs that never take this path.
inline __m256 abs_mask() { return _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)); }

// 32 int32 (four vectors, in order) -> 32 int8 in order. packs interleaves 128-bit lanes; the
// final permute restores element order.
inline __m256i pack_i32_to_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_packs_epi32(a, b);
    const __m256i cd = _mm256_packs_epi32(c, d);
    const __m256i abcd = _mm256_packs_epi16(ab, cd);
    return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// roundf: nearest, ties away from zero. v - trunc(v) is exact, so comparing its magnitude with
// 0.5 decides the rounding without the double rounding of floor(v + 0.5).
inline __m256 round_half_away(__m256 v) {
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 frac = _mm256_and_ps(_mm256_sub_ps(v, t), abs_mask());
    const __m256 away = _mm256_or_ps(_mm256_andnot_ps(abs_mask(), v), _mm256_set1_ps(1.0f));  // copysign(1, v)
    const __m256 up = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    return _mm256_add_ps(t, _mm256_and_ps(up, away));
}

}  // namespace

void quantize_row_q8_0(const float * src, void * dst, int64_t n) {
    BlockQ8_0 * y = (BlockQ8_0 *) dst;
    for (int64_t i = 0; i < n / QK_32; i++, src += QK_32) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(src + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], abs_mask()));
        }
        const float d = hmax(amax) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        const __m256 scale = _mm256_set1_ps(id);
        __m256i q[4];
        for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(round_half_away(_mm256_mul_ps(v[j], scale)));
        _mm256_storeu_si256((__m256i *) y[i].qs, pack_i32_to_i8(q[0], q[1], q[2], q[3]));
    }
}

void quantize_row_q8_K(const float * src, void * dst, int64_t n) {
    BlockQ8_K * y = (BlockQ8_K *) dst;
    for (int64_t i = 0; i < n / QK_K; i++, src += QK_K) {
        __m256 amax_v = _mm256_setzero_ps();
        for (int j = 0; j < QK_K; j += 8) amax_v = _mm256_max_ps(amax_v, _mm256_and_ps(_mm256_loadu_ps(src + j), abs_mask()));
        const float amax = hmax(amax_v);
        if (amax == 0.0f) {
            std::memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        // the reference takes the sign of the first element of largest magnitude
        float max = amax;
        const __m256 target = _mm256_set1_ps(amax);
        for (int j = 0; j < QK_K; j += 8) {
            const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(src + j), abs_mask()), target, _CMP_EQ_OQ));
            if (hits) {
                max = src[j + __builtin_ctz((unsigned) hits)];
                break;
            }
        }
        const float iscale = -127.0f / max;
        const __m256 scale = _mm256_set1_ps(iscale);
        for (int j = 0; j < QK_K; j += 32) {
            __m256i q[4];
            for (int k = 0; k < 4; k++) {
                const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(src + j + 8 * k), scale);
                q[k] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            }
            // |q| <= 127 by construction (|x| <= amax), so the saturating pack is the clamp
            const __m256i q8 = pack_i32_to_i8(q[0], q[1], q[2], q[3]);
            _mm256_storeu_si256((__m256i *) (y[i].qs + j), q8);
            // bsums of the two 16-element groups: byte sums in 4s, then in 16s
            const __m256i sums4 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q8), _mm256_set1_epi16(1));
            const __m256i sums16 = _mm256_hadd_epi32(_mm256_hadd_epi32(sums4, sums4), sums4);
            y[i].bsums[j / 16] = (int16_t) _mm256_extract_epi32(sums16, 0);
            y[i].bsums[j / 16 + 1] = (int16_t) _mm256_extract_epi32(sums16, 4);
        }
        y[i].d = 1.0f / iscale;
    }
}

// ---- float conversion ------------------------------------------------------------------------

void quantize_row_f16(const float * src, void * dst, int64_t n) {
    uint16_t * y = (uint16_t *) dst;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_storeu_si128((__m128i *) (y + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) y[i] = fp32_to_fp16(src[i]);
}

void dequantize_row_f16(const void * src, float * dst, int64_t n) {
    const uint16_t * x = (const uint16_t *) src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + i))));
    for (; i < n; i++) dst[i] = fp16_to_fp32(x[i]);
}

// Same rule as fp32_to_bf16: round to nearest even, and nans get the quiet bit.
void quantize_row_bf16(const float * src, void * dst, int64_t n) {
    uint16_t * y = (uint16_t *) dst;
    const __m256i bias = _mm256_set1_epi32(0x7fff);
    const __m256i one = _mm256_set1_epi32(1);
    const __m256i quiet = _mm256_set1_epi32(0x400000);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 f = _mm256_loadu_ps(src + i);
        const __m256i u = _mm256_castps_si256(f);
        const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
        const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
        const __m256i bits = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, _mm256_or_si256(u, quiet), is_nan), 16);
        // 8 uint32 (< 65536) -> 8 uint16: pack within lanes, then gather the two lane halves
        const __m256i packed = _mm256_packus_epi32(bits, bits);
        const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);
        _mm_storeu_si128((__m128i *) (y + i), _mm256_castsi256_si128(ordered));
    }
    for (; i < n; i++) y[i] = fp32_to_bf16(src[i]);
}

void dequantize_row_bf16(const void * src, float * dst, int64_t n) {
    const uint16_t * x = (const uint16_t *) src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load_bf16x8(x + i));
    for (; i < n; i++) dst[i] = bf16_to_fp32(x[i]);
}

}  // namespace avx2
}  // namespace sparrow

#endif  // x86
