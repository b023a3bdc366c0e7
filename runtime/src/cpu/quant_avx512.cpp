// quant_avx512.cpp - AVX-512 VNNI dot products (decode's matrix-vector rows) for quant.cpp.
//
// Compiled with AVX-512 F/BW/VL/DQ + VNNI flags; quant.cpp calls in only when the CPU has them
// (cpu/features.h). Two 32-quant blocks share one 512-bit vpdpbusd, which wants its first
// operand unsigned: q4_0's nibbles are, and q8_0's weights are made so by flipping the sign bit
// (w + 128). The shift comes back out as a second vpdpbusd of the same activations against a
// constant (8 or 128), which sums to offset * sum(x) per 4-quant group. Products of u8 and s8
// accumulate exactly in int32, so x may be any int8 here (no [-127, 127] requirement).

#if defined(__x86_64__) || defined(__i386__)

#include "quant.h"

#include "cpu/simd_avx2.h"

#include <immintrin.h>

namespace sparrow {
namespace avx512 {

namespace {

// Scales of blocks i (low 8 lanes) and i + 1 (high 8 lanes).
inline __m512 pair_scales(float s0, float s1) { return _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1); }

// Two activation blocks' quants side by side.
inline __m512i load_x_pair(const BlockQ8_0 * x) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(avx2::loadu(x[0].qs)), avx2::loadu(x[1].qs), 1);
}

// sum over each 4-quant group of (u - offset) * x, with u the unsigned form of the weights.
inline __m512i dot_offset_groups(__m512i u, __m512i x, __m512i offset) {
    const __m512i zero = _mm512_setzero_si512();
    return _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, u, x), _mm512_dpbusd_epi32(zero, offset, x));
}
inline __m256i dot_offset_groups(__m256i u, __m256i x, __m256i offset) {
    const __m256i zero = _mm256_setzero_si256();
    return _mm256_sub_epi32(_mm256_dpbusd_epi32(zero, u, x), _mm256_dpbusd_epi32(zero, offset, x));
}

inline float block_scale(uint16_t dw, uint16_t dx) { return avx2::fp16(dw) * avx2::fp16(dx); }

}  // namespace

float vec_dot_q8_0(int64_t n, const void * wv, const void * xv) {
    const BlockQ8_0 * w = (const BlockQ8_0 *) wv;
    const BlockQ8_0 * x = (const BlockQ8_0 *) xv;
    const int64_t nb = n / QK_32;
    const __m512i sign = _mm512_set1_epi8((char) 0x80);
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m512i u = _mm512_xor_si512(load_x_pair(w + i), sign);  // the weight pair, + 128
        const __m512i p = dot_offset_groups(u, load_x_pair(x + i), sign);
        acc = _mm512_fmadd_ps(pair_scales(block_scale(w[i].d, x[i].d), block_scale(w[i + 1].d, x[i + 1].d)),
                              _mm512_cvtepi32_ps(p), acc);
    }
    float sum = _mm512_reduce_add_ps(acc);
    if (i < nb) {
        const __m256i s = _mm256_set1_epi8((char) 0x80);
        const __m256i p = dot_offset_groups(_mm256_xor_si256(avx2::loadu(w[i].qs), s), avx2::loadu(x[i].qs), s);
        sum += block_scale(w[i].d, x[i].d) * avx2::hsum(_mm256_cvtepi32_ps(p));
    }
    return sum;
}

float vec_dot_q4_0(int64_t n, const void * wv, const void * xv) {
    const BlockQ4_0 * w = (const BlockQ4_0 *) wv;
    const BlockQ8_0 * x = (const BlockQ8_0 *) xv;
    const int64_t nb = n / QK_32;
    const __m512i low4 = _mm512_set1_epi8(0x0f), eights = _mm512_set1_epi8(8);
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m256i packed = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *) w[i].qs)),
                                                       _mm_loadu_si128((const __m128i *) w[i + 1].qs), 1);
        // [block i, block i + 1, their high nibbles] -> [i low, i high, i + 1 low, i + 1 high]
        __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1);
        q = _mm512_and_si512(_mm512_shuffle_i64x2(q, q, _MM_SHUFFLE(3, 1, 2, 0)), low4);
        const __m512i p = dot_offset_groups(q, load_x_pair(x + i), eights);
        acc = _mm512_fmadd_ps(pair_scales(block_scale(w[i].d, x[i].d), block_scale(w[i + 1].d, x[i + 1].d)),
                              _mm512_cvtepi32_ps(p), acc);
    }
    float sum = _mm512_reduce_add_ps(acc);
    if (i < nb) {
        const __m256i p = dot_offset_groups(avx2::unpack_nibbles(w[i].qs), avx2::loadu(x[i].qs), _mm256_set1_epi8(8));
        sum += block_scale(w[i].d, x[i].d) * avx2::hsum(_mm256_cvtepi32_ps(p));
    }
    return sum;
}

}  // namespace avx512
}  // namespace sparrow

#endif  // x86
