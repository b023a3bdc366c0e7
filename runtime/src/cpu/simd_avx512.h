// simd_avx512.h - small AVX-512 helpers shared by the *_avx512*.cpp kernel files.
//
// Include only from files compiled with the AVX-512 flags (CMakeLists.txt): these are inline
// functions and must never be instantiated in a translation unit that runs on CPUs without them.
#pragma once

#include <immintrin.h>

namespace sparrow {
namespace avx512 {

// The sums of four accumulators' lanes, in one vector: each added in the order
// _mm512_reduce_add_ps adds one vector's (lanes i + i+8, then j + j+4, then 0 + 2 and 1 + 3, then
// those two: the same bits), but the four share every shuffle and add, 13 operations for what
// took 32: a tile's reductions were ~10% of a 6-row f16 tile (bench_quant 1024 x 512 in L2).
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));  // [a 8 | b 8]
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee));
    const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));  // [a 4 | b 4 | c 4 | d 4]
    const __m512 h = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4e));  // lanes 0, 1 of each quarter: 0 + 2, 1 + 3
    const __m512 s = _mm512_add_ps(h, _mm512_permute_ps(h, 0xb1));  // lane 0 of each quarter: its sum
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s));
}

}  // namespace avx512
}  // namespace sparrow
