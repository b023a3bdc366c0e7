// ops_avx512.cpp - AVX-512 fused attention for cpu/ops.h (same task, same online softmax as
// ops_avx2.cpp), for several consecutive queries at once: a verify batch's tokens share each
// block of keys and values, read and converted once, instead of each query reading the whole
// cache (at 16k-25k video tokens that read is most of a verify's cost).
//
// The AVX2 kernel computes each (head, key) score as a dot product ending in a horizontal sum.
// Here a block of 64 keys is transposed once per task into kT[d][key] (f32), shared by the GQA
// group's heads: 16 keys' scores come from head_dim FMAs of a broadcast query element against a
// kT row, with no horizontal sums; values are converted once per block and accumulated 16 floats
// per FMA. Two accumulator sets (even / odd steps) keep enough FMA chains in flight.

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/ops.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace sparrow {

namespace avx2 {
void attention(const AttnTask & t, float * scratch);  // cpu/ops_avx2.cpp: head sizes this file does not take
}

namespace avx512 {
namespace {

constexpr int kBlock = 64;     // cache rows per block (attention_scratch_floats sizes for it)
constexpr int kMaxHeadDim = 128;  // the value accumulators (2 x head_dim / 16 vectors) stay in registers

// exp8 of ops_avx2.cpp on 16 lanes, operation for operation.
inline __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.0f);
    const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i pow2n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __m512 result = _mm512_mul_ps(p, _mm512_castsi512_ps(pow2n));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), result);
}

// A 16 x 16 transpose in four stages; stage s swaps bit s of the row index with bit s of the
// column index between rows a (bit s clear) and b = a | 2^s, one vpermt2ps per output row.
struct TransposeIndex {
    alignas(64) int32_t keep[4][16];  // new row a
    alignas(64) int32_t swap[4][16];  // new row b
};
constexpr TransposeIndex make_transpose_index() {
    TransposeIndex t{};
    for (int s = 0; s < 4; s++) {
        const int bit = 1 << s;
        for (int c = 0; c < 16; c++) {
            t.keep[s][c] = (c & bit) ? 16 + (c ^ bit) : c;  // a[c], or b[c - 2^s]
            t.swap[s][c] = (c & bit) ? 16 + c : (c | bit);   // a[c + 2^s], or b[c]
        }
    }
    return t;
}
constexpr TransposeIndex kTransposeIndex = make_transpose_index();

inline void transpose16(__m512 * r) {
    for (int s = 0; s < 4; s++) {
        const int bit = 1 << s;
        const __m512i keep = _mm512_load_si512(kTransposeIndex.keep[s]);
        const __m512i swap = _mm512_load_si512(kTransposeIndex.swap[s]);
        for (int a = 0; a < 16; a++) {
            if (a & bit) continue;
            const __m512 ra = r[a], rb = r[a | bit];
            r[a] = _mm512_permutex2var_ps(ra, keep, rb);
            r[a | bit] = _mm512_permutex2var_ps(ra, swap, rb);
        }
    }
}

template <bool kF16>
inline __m512 load_row16(const void * row, int d) {
    if (kF16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) ((const uint16_t *) row + d)));
    return _mm512_loadu_ps((const float *) row + d);
}

// NV = head_dim / 16: the value accumulators are named registers, not an array indexed at run
// time (which the compiler kept in memory: a store and a reload around every FMA).
template <bool kKF16, bool kVF16, int NV>
void attention_impl(const AttnTask & t, float * scratch) {
    const int G = t.n_group, hd = t.head_dim, Q = t.n_queries;
    float * scores = scratch;                          // G x kBlock (one query at a time)
    float * kT = scores + (size_t) G * kBlock;         // hd x kBlock: the block's keys, transposed
    float * vbuf = kT + (size_t) hd * kBlock;          // kBlock x hd (f16 or scattered values as f32)
    float * acc = vbuf + (size_t) kBlock * hd;         // Q x G x hd
    float * m_run = acc + (size_t) Q * G * hd;         // Q x G
    float * l_run = m_run + (size_t) Q * G;            // Q x G
    const bool v_in_place = !kVF16 && !t.rows;         // a contiguous run of f32 value rows

    std::fill(acc, acc + (size_t) Q * G * hd, 0.0f);
    std::fill(m_run, m_run + (size_t) Q * G, -INFINITY);
    std::fill(l_run, l_run + (size_t) Q * G, 0.0f);
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    const int64_t n_kv_last = t.n_kv + Q - 1;  // rows the last query sees

    for (int64_t j0 = 0; j0 < n_kv_last; j0 += kBlock) {
        const int nb_all = (int) std::min<int64_t>(kBlock, n_kv_last - j0);
        const int n16_all = (nb_all + 15) / 16;
        // keys -> kT, 16 keys x 16 dimensions per transpose (rows past the block are zeros)
        for (int tile = 0; tile < n16_all; tile++) {
            for (int d0 = 0; d0 < hd; d0 += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; i++) {
                    const int j = 16 * tile + i;
                    r[i] = j < nb_all ? load_row16<kKF16>((const uint8_t *) t.k + (size_t) t.row(j0 + j) * t.k_stride, d0)
                                      : _mm512_setzero_ps();
                }
                transpose16(r);
                for (int i = 0; i < 16; i++) _mm512_storeu_ps(kT + (size_t) (d0 + i) * kBlock + 16 * tile, r[i]);
            }
        }
        // value rows of the block as f32, once for the whole group and every query
        const float * vrows;
        size_t v_row_floats;
        if (!v_in_place) {
            for (int j = 0; j < nb_all; j++) {
                const uint8_t * src = (const uint8_t *) t.v + (size_t) t.row(j0 + j) * t.v_stride;
                for (int d = 0; d < hd; d += 16) _mm512_storeu_ps(vbuf + (size_t) j * hd + d, load_row16<kVF16>(src, d));
            }
            vrows = vbuf;
            v_row_floats = (size_t) hd;
        } else {
            vrows = (const float *) ((const uint8_t *) t.v + (size_t) j0 * t.v_stride);
            v_row_floats = t.v_stride / sizeof(float);
        }

        // Each query goes through exactly the steps it would take alone: its own rows of the
        // block (nb), its own tiles, later rows of the block masked off (batch invariance).
        for (int qi = 0; qi < Q; qi++) {
            const int nb = (int) std::min<int64_t>(kBlock, t.n_kv + qi - j0);
            if (nb <= 0) continue;
            const int n16 = (nb + 15) / 16;
            __mmask16 visible[kBlock / 16];
            for (int tile = 0; tile < n16; tile++) visible[tile] = (__mmask16) ((1u << std::min(16, nb - 16 * tile)) - 1);
            for (int g = 0; g < G; g++) {
                const float * q = t.q + (size_t) qi * t.q_stride + (size_t) g * hd;
                float * s = scores + (size_t) g * kBlock;
                // scores of the block's keys: even and odd dimensions in separate chains. Every
                // tile of the block is computed (a constant count keeps the accumulators in
                // registers); tiles past the query's rows are masked off below.
                constexpr int kTiles = kBlock / 16;
                __m512 sc_even[kTiles], sc_odd[kTiles];
                for (int tile = 0; tile < kTiles; tile++) sc_even[tile] = sc_odd[tile] = _mm512_setzero_ps();
                for (int d = 0; d < hd; d += 2) {
                    const __m512 q0 = _mm512_set1_ps(q[d]), q1 = _mm512_set1_ps(q[d + 1]);
                    const float * k0 = kT + (size_t) d * kBlock;
                    for (int tile = 0; tile < kTiles; tile++) {
                        sc_even[tile] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(k0 + 16 * tile), sc_even[tile]);
                        sc_odd[tile] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(k0 + kBlock + 16 * tile), sc_odd[tile]);
                    }
                }
                __m512 mx = neg_inf;
                for (int tile = 0; tile < n16; tile++) {
                    const __m512 v = _mm512_mask_mov_ps(neg_inf, visible[tile],
                                                        _mm512_mul_ps(_mm512_add_ps(sc_even[tile], sc_odd[tile]), _mm512_set1_ps(t.scale)));
                    _mm512_storeu_ps(s + 16 * tile, v);
                    mx = _mm512_max_ps(mx, v);
                }
                const float block_max = _mm512_reduce_max_ps(mx);
                if (block_max == -INFINITY) continue;  // every score -inf: nothing to add
                const size_t state = (size_t) qi * G + g;
                float * a = acc + state * hd;
                if (block_max > m_run[state]) {
                    // rescale what was accumulated under the old max (exp(-inf) = 0 the first time)
                    const float correction = std::exp(m_run[state] - block_max);
                    const __m512 cv = _mm512_set1_ps(correction);
                    for (int d = 0; d < hd; d += 16) _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), cv));
                    l_run[state] *= correction;
                    m_run[state] = block_max;
                }
                const __m512 m = _mm512_set1_ps(m_run[state]);
                __m512 sum = _mm512_setzero_ps();
                for (int tile = 0; tile < n16; tile++) {
                    const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * tile), m));
                    _mm512_storeu_ps(s + 16 * tile, p);
                    sum = _mm512_add_ps(sum, p);
                }
                l_run[state] += _mm512_reduce_add_ps(sum);
                // probabilities times values: even keys into one accumulator set, odd into the other
                __m512 even[NV], odd[NV];
                for (int i = 0; i < NV; i++) {
                    even[i] = _mm512_loadu_ps(a + 16 * i);
                    odd[i] = _mm512_setzero_ps();
                }
                int j = 0;
                for (; j + 1 < nb; j += 2) {
                    const __m512 p0 = _mm512_set1_ps(s[j]), p1 = _mm512_set1_ps(s[j + 1]);
                    const float * v0 = vrows + (size_t) j * v_row_floats;
                    const float * v1 = v0 + v_row_floats;
                    for (int i = 0; i < NV; i++) even[i] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * i), even[i]);
                    for (int i = 0; i < NV; i++) odd[i] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1 + 16 * i), odd[i]);
                }
                if (j < nb) {
                    const __m512 p0 = _mm512_set1_ps(s[j]);
                    const float * v0 = vrows + (size_t) j * v_row_floats;
                    for (int i = 0; i < NV; i++) even[i] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * i), even[i]);
                }
                for (int i = 0; i < NV; i++) _mm512_storeu_ps(a + 16 * i, _mm512_add_ps(even[i], odd[i]));
            }
        }
    }
    for (int qi = 0; qi < Q; qi++) {
        for (int g = 0; g < G; g++) {
            const size_t state = (size_t) qi * G + g;
            const __m512 inv = _mm512_set1_ps(l_run[state] > 0.0f ? 1.0f / l_run[state] : 0.0f);
            const float * a = acc + state * hd;
            float * o = t.out + (size_t) qi * t.q_stride + (size_t) g * hd;
            for (int d = 0; d < hd; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), inv));
        }
    }
}

template <int NV>
void dispatch_kv(const AttnTask & t, float * scratch) {
    if (t.k_f16) {
        if (t.v_f16) attention_impl<true, true, NV>(t, scratch); else attention_impl<true, false, NV>(t, scratch);
    } else {
        if (t.v_f16) attention_impl<false, true, NV>(t, scratch); else attention_impl<false, false, NV>(t, scratch);
    }
}

}  // namespace

void attention(const AttnTask & t, float * scratch) {
    // f32 value rows are read in place, so their stride must be whole floats
    if (t.head_dim % 16 != 0 || t.head_dim > kMaxHeadDim || (!t.v_f16 && t.v_stride % sizeof(float) != 0)) {
        avx2::attention(t, scratch);
        return;
    }
    switch (t.head_dim / 16) {
        case 1: return dispatch_kv<1>(t, scratch);
        case 2: return dispatch_kv<2>(t, scratch);
        case 3: return dispatch_kv<3>(t, scratch);
        case 4: return dispatch_kv<4>(t, scratch);
        case 5: return dispatch_kv<5>(t, scratch);
        case 6: return dispatch_kv<6>(t, scratch);
        case 7: return dispatch_kv<7>(t, scratch);
        default: return dispatch_kv<8>(t, scratch);
    }
}

}  // namespace avx512
}  // namespace sparrow

#endif  // x86
