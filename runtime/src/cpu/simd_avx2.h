// simd_avx2.h - small AVX2 helpers shared by the *_avx2.cpp kernel files.
//
// Include only from files compiled with -mavx2 -mfma -mf16c: these are inline functions and
// must never be instantiated in a translation unit that runs on CPUs without those features.
#pragma once

#include "quant.h"

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace sparrow {
namespace avx2 {

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float fp16(uint16_t h) { return _cvtsh_ss(h); }

// Sum of w[i] * x[i] over each group of 4 bytes -> 8 int32; w any int8, x in [-127, 127].
static inline __m256i dot_i8_groups(__m256i w, __m256i x) {
    const __m256i w_abs = _mm256_sign_epi8(w, w);
    const __m256i x_signed = _mm256_sign_epi8(x, w);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, x_signed), _mm256_set1_epi16(1));
}

// Same for unsigned w (up to 127 here, so the int16 pair sums cannot saturate).
static inline __m256i dot_u8_i8_groups(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}

// 16 bytes of packed nibbles -> 32 bytes: the low nibbles, then the high nibbles (the order
// q4_0/q4_1/k-quant blocks store their two halves in).
static inline __m256i unpack_nibbles(const uint8_t * p) {
    const __m128i packed = _mm_loadu_si128((const __m128i *) p);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

static inline __m256i loadu(const void * p) { return _mm256_loadu_si256((const __m256i *) p); }

// bf16 is the top half of a float: widen to 32 bits and shift into place.
static inline __m256 load_bf16x8(const uint16_t * p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *) p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// q4_K/q5_K scales: 12 bytes -> 16 bytes, the 8 six-bit scales then the 8 six-bit mins, done on
// 32-bit words. Scales/mins 0..3 are the low 6 bits of bytes 0..3 / 4..7; scales/mins 4..7
// combine the low/high nibbles of bytes 8..11 with the top 2 bits of bytes 0..3 / 4..7.
static inline __m128i unpack_k_scales(const uint8_t * s) {
    uint32_t w[3];
    std::memcpy(w, s, sizeof w);
    const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
    const uint32_t scales_0_3 = w[0] & low6;
    const uint32_t mins_0_3 = w[1] & low6;
    const uint32_t scales_4_7 = (w[2] & low4) | (((w[0] >> 6) & low2) << 4);
    const uint32_t mins_4_7 = ((w[2] >> 4) & low4) | (((w[1] >> 6) & low2) << 4);
    return _mm_set_epi32((int) mins_4_7, (int) mins_0_3, (int) scales_4_7, (int) scales_0_3);
}

// A vector of int16 for vpmaddwd that repeats one 16-bit entry of a 128-bit table (already
// broadcast to both lanes) in every position.
static inline __m256i broadcast_i16(__m256i table, int index) {
    const __m256i pick = _mm256_set1_epi16((short) (0x0100 * (2 * index + 1) + 2 * index));
    return _mm256_shuffle_epi8(table, pick);
}

}  // namespace avx2
}  // namespace sparrow
