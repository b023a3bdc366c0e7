// ops_avx512.cpp - AVX-512 fused attention for cpu/ops.h (same task, same online softmax as
// ops_avx2.cpp), for several consecutive queries at once: a verify batch's tokens share each
// block of keys and values, read and converted once, instead of each query reading the whole
// cache (at 16k-25k video tokens that read is most of a verify's cost).
//
// The AVX2 kernel computes each (head, key) score as a dot product ending in a horizontal sum.
// Here a block of 64 keys is transposed once per task into kT[d][key] (f32), shared by the GQA
// group's heads: 16 keys' scores come from head_dim FMAs of a broadcast query element against a
// kT row, with no horizontal sums; values are converted once per block and accumulated 16 floats
// per FMA. Scores and values go a few heads at a time (head_scores, head_values), so that each
// kT vector and value row loaded serves several heads' FMAs, whose accumulators are the
// independent chains that keep the FMA units busy. At 16k-25k rows of an f16 cache this took a
// decode's attention from 7.0 to 3.6 ms a layer at Qwen2-7B shapes and a 5-token verify's from
// 17.8 to 7.6 (bench_attention, 2 threads, AMD EPYC Zen 5; with the prefetch below).

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/ops.h"
#include "cpu/prefetch.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace sparrow {

namespace avx2 {  // cpu/ops_avx2.cpp
void attention(const AttnTask & t, float * scratch);  // head sizes this file does not take
void silu_mul(const float * gate, const float * up, float * out, int64_t n);  // tails
void rope(float * x, int n_head, int head_dim, int n_dims, bool adjacent, const float * cs);  // pair counts not of 8
}

namespace avx512 {
namespace {

constexpr int kBlock = 64;     // cache rows per block (attention_scratch_floats sizes for it)
constexpr int kMaxHeadDim = 128;  // a row of value accumulators (head_dim / 16 vectors) a head stays in registers
// While a block is computed, the rows of the block this far ahead are prefetched (into L1 or L2:
// attention_prefetch_into_l1, cpu/ops.h), a few lines with each 16 rows the transposes load: a
// block's rows, loaded in a burst when its transposes start, otherwise leave memory idle through
// the block's arithmetic. bench_attention, f16 cache from DRAM, 2 threads, 16k rows, AMD EPYC Zen
// 5 (into L1): decode 1.10 -> 0.60 ms a layer at Qwen2-0.5B shapes. All of a block's prefetches
// at once when it starts (one burst instead of the other) were slower than none; two blocks ahead
// measured +8% at head_dim 128 and -2% at 64.
constexpr int kPrefetchBlocks = 1;

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

// A 16 x 16 transpose (r[i] = row i in, column i out) in four stages of 16 two-input shuffles:
// 32-bit and then 64-bit interleaves of row pairs within 128-bit lanes (each lane then holds a 4
// x 4 block, transposed), and two rounds of whole-lane shuffles that put the lanes in order. Half
// the shuffles stay within lanes, which Zen 5 issues twice as fast as full permutes: a decode's
// attention at head_dim 64 took 24 ns a key and KV head with a vpermt2ps transpose, 18 with this.
inline void transpose16(__m512 * r) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    auto lo64 = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
    auto hi64 = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
    for (int i = 0; i < 16; i += 4) {
        u[i] = lo64(t[i], t[i + 2]);
        u[i + 1] = hi64(t[i], t[i + 2]);
        u[i + 2] = lo64(t[i + 1], t[i + 3]);
        u[i + 3] = hi64(t[i + 1], t[i + 3]);
    }
    // lane L of u[4 g + c] is column 4 L + c of rows 4 g .. 4 g + 3
    for (int c = 0; c < 4; c++) {
        const __m512 even01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);  // lanes 0, 2 of rows 0-3, then of rows 4-7
        const __m512 odd01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);   // lanes 1, 3
        const __m512 even23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        const __m512 odd23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
        r[c] = _mm512_shuffle_f32x4(even01, even23, 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(even01, even23, 0xdd);
        r[4 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0xdd);
    }
}

template <bool kF16>
inline __m512 load_row16(const void * row, int d) {
    if (kF16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) ((const uint16_t *) row + d)));
    return _mm512_loadu_ps((const float *) row + d);
}

constexpr int kTiles = kBlock / 16;
constexpr int kScoreHeads = 4;   // heads a pass over kT: 16 accumulators, 4 key vectors, a broadcast
constexpr int kMaxGroup = 64;    // query heads per KV head this file takes (more go to AVX2)

// A vector several FMAs share is loaded once: GCC otherwise folds the load into each FMA, and
// the repeated loads, not the FMAs, bound the loop (two 64-byte loads a cycle).
inline void keep_in_register(__m512 & v) { asm("" : "+v"(v)); }

// Scores of GH query heads (rows of q, hd apart) against the block's keys, kT (hd x kBlock,
// transposed): a single chain of FMAs over the dimensions per (head, 16 keys), each kT vector
// loaded once for the GH heads. Every tile is computed (a constant count keeps the accumulators
// in registers); rows the query does not see are masked to -inf. Scaled scores go to
// s[g * kBlock ..], each head's maximum to block_max[g].
template <int GH>
inline void head_scores(const float * q, int hd, const float * kT, float scale, const __mmask16 * visible, float * s,
                        float * block_max) {
    __m512 acc[GH][kTiles];
    for (int g = 0; g < GH; g++)
        for (int tile = 0; tile < kTiles; tile++) acc[g][tile] = _mm512_setzero_ps();
    for (int d = 0; d < hd; d++) {
        const float * kr = kT + (size_t) d * kBlock;
        __m512 kv[kTiles];
        for (int tile = 0; tile < kTiles; tile++) {
            kv[tile] = _mm512_loadu_ps(kr + 16 * tile);
            if (GH > 1) keep_in_register(kv[tile]);
        }
        for (int g = 0; g < GH; g++) {
            const __m512 qb = _mm512_set1_ps(q[(size_t) g * hd + d]);
            for (int tile = 0; tile < kTiles; tile++) acc[g][tile] = _mm512_fmadd_ps(qb, kv[tile], acc[g][tile]);
        }
    }
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), sv = _mm512_set1_ps(scale);
    for (int g = 0; g < GH; g++) {
        __m512 mx = neg_inf;
        for (int tile = 0; tile < kTiles; tile++) {
            if (!visible[tile]) continue;
            const __m512 v = _mm512_mask_mov_ps(neg_inf, visible[tile], _mm512_mul_ps(acc[g][tile], sv));
            _mm512_storeu_ps(s + (size_t) g * kBlock + 16 * tile, v);
            mx = _mm512_max_ps(mx, v);
        }
        block_max[g] = _mm512_reduce_max_ps(mx);
    }
}

// a[g][0 .. hd) += sum over the block's nb rows j of p[g][j] * v[j] for GH heads (p rows kBlock
// apart, a rows hd apart): each value row loaded once for the GH heads, one chain of FMAs per
// (head, 16 dimensions) over the rows.
template <int NV, int GH>
inline void head_values(const float * p, const float * vrows, size_t v_row_floats, int nb, float * a, int hd) {
    __m512 acc[GH][NV];
    for (int g = 0; g < GH; g++)
        for (int i = 0; i < NV; i++) acc[g][i] = _mm512_loadu_ps(a + (size_t) g * hd + 16 * i);
    for (int j = 0; j < nb; j++) {
        const float * v = vrows + (size_t) j * v_row_floats;
        __m512 vv[NV];
        for (int i = 0; i < NV; i++) {
            vv[i] = _mm512_loadu_ps(v + 16 * i);
            if (GH > 1) keep_in_register(vv[i]);
        }
        for (int g = 0; g < GH; g++) {
            const __m512 pb = _mm512_set1_ps(p[(size_t) g * kBlock + j]);
            for (int i = 0; i < NV; i++) acc[g][i] = _mm512_fmadd_ps(pb, vv[i], acc[g][i]);
        }
    }
    for (int g = 0; g < GH; g++)
        for (int i = 0; i < NV; i++) _mm512_storeu_ps(a + (size_t) g * hd + 16 * i, acc[g][i]);
}

// NV = head_dim / 16, a compile-time count: head_values' accumulators are then named registers,
// not an array indexed at run time (which the compiler kept in memory).
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
    const int64_t n_kv_last = std::min(t.n_kv + Q - 1, t.row_end);  // rows the last query sees, to the chunk's end
    const bool into_l1 = attention_prefetch_into_l1();  // see cpu/ops.h
    constexpr size_t k_elem = kKF16 ? 2 : 4, v_elem = kVF16 ? 2 : 4;

    for (int64_t j0 = t.row_begin; j0 < n_kv_last; j0 += kBlock) {
        const int nb_all = (int) std::min<int64_t>(kBlock, n_kv_last - j0);
        const int n16_all = (nb_all + 15) / 16;
        // keys -> kT, 16 keys x 16 dimensions per transpose (rows past the block are zeros)
        for (int tile = 0; tile < n16_all; tile++) {
            const bool whole = !t.rows && 16 * tile + 16 <= nb_all;
            const uint8_t * base = (const uint8_t *) t.k + (size_t) (j0 + 16 * tile) * t.k_stride;
            for (int d0 = 0; d0 < hd; d0 += 16) {
                __m512 r[16];
                // with the rows a block ahead, the same dimensions, into L1 (see kPrefetchBlocks)
                const int64_t ahead = j0 + kPrefetchBlocks * kBlock + 16 * tile;
                if (ahead < n_kv_last) {
                    const int n_ahead = (int) std::min<int64_t>(16, n_kv_last - ahead);
                    for (int i = 0; i < n_ahead; i++) {
                        const size_t row = (size_t) t.row(ahead + i);
                        const char * k_line = (const char *) t.k + row * t.k_stride + (size_t) d0 * k_elem;
                        const char * v_line = (const char *) t.v + row * t.v_stride + (size_t) d0 * v_elem;
                        prefetch_line(k_line, into_l1);
                        prefetch_line(v_line, into_l1);
                    }
                }
                if (whole) {
                    for (int i = 0; i < 16; i++) r[i] = load_row16<kKF16>(base + (size_t) i * t.k_stride, d0);
                } else {
                    for (int i = 0; i < 16; i++) {
                        const int j = 16 * tile + i;
                        r[i] = j < nb_all ? load_row16<kKF16>((const uint8_t *) t.k + (size_t) t.row(j0 + j) * t.k_stride, d0)
                                          : _mm512_setzero_ps();
                    }
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
            const int nb = (int) std::min<int64_t>(kBlock, std::min(t.n_kv + qi, t.row_end) - j0);
            if (nb <= 0) continue;
            const int n16 = (nb + 15) / 16;
            __mmask16 visible[kTiles];
            for (int tile = 0; tile < kTiles; tile++)
                visible[tile] = tile < n16 ? (__mmask16) ((1u << std::min(16, nb - 16 * tile)) - 1) : (__mmask16) 0;
            const float * q = t.q + (size_t) qi * t.q_stride;
            float block_max[kMaxGroup];
            for (int g = 0; g < G; g += kScoreHeads) {
                switch (std::min(kScoreHeads, G - g)) {
                    case 1: head_scores<1>(q + (size_t) g * hd, hd, kT, t.scale, visible, scores + g * kBlock, block_max + g); break;
                    case 2: head_scores<2>(q + (size_t) g * hd, hd, kT, t.scale, visible, scores + g * kBlock, block_max + g); break;
                    case 3: head_scores<3>(q + (size_t) g * hd, hd, kT, t.scale, visible, scores + g * kBlock, block_max + g); break;
                    default: head_scores<4>(q + (size_t) g * hd, hd, kT, t.scale, visible, scores + g * kBlock, block_max + g); break;
                }
            }
            float * a_q = acc + (size_t) qi * G * hd;
            for (int g = 0; g < G; g++) {
                float * s = scores + g * kBlock;
                if (block_max[g] == -INFINITY) {  // every score -inf: nothing to add (zeros add nothing)
                    for (int tile = 0; tile < n16; tile++) _mm512_storeu_ps(s + 16 * tile, _mm512_setzero_ps());
                    continue;
                }
                const size_t state = (size_t) qi * G + g;
                float * a = a_q + (size_t) g * hd;
                if (block_max[g] > m_run[state]) {
                    // rescale what was accumulated under the old max (exp(-inf) = 0 the first time)
                    const float correction = std::exp(m_run[state] - block_max[g]);
                    const __m512 cv = _mm512_set1_ps(correction);
                    for (int d = 0; d < hd; d += 16) _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), cv));
                    l_run[state] *= correction;
                    m_run[state] = block_max[g];
                }
                const __m512 m = _mm512_set1_ps(m_run[state]);
                __m512 sum = _mm512_setzero_ps();
                for (int tile = 0; tile < n16; tile++) {
                    const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * tile), m));
                    _mm512_storeu_ps(s + 16 * tile, p);
                    sum = _mm512_add_ps(sum, p);
                }
                l_run[state] += _mm512_reduce_add_ps(sum);
            }
            constexpr int kValueHeads = NV <= 4 ? 4 : 2;
            for (int g = 0; g < G; g += kValueHeads) {
                const float * s = scores + g * kBlock;
                float * a = a_q + (size_t) g * hd;
                switch (std::min(kValueHeads, G - g)) {
                    case 1: head_values<NV, 1>(s, vrows, v_row_floats, nb, a, hd); break;
                    case 2: head_values<NV, 2>(s, vrows, v_row_floats, nb, a, hd); break;
                    case 3: head_values<NV, 3>(s, vrows, v_row_floats, nb, a, hd); break;
                    default: head_values<NV, kValueHeads>(s, vrows, v_row_floats, nb, a, hd); break;
                }
            }
        }
    }
    for (int qi = 0; qi < Q; qi++) {
        for (int g = 0; g < G; g++) {
            const size_t state = (size_t) qi * G + g;
            attention_finish(t, qi, g, acc + state * hd, m_run[state], l_run[state]);
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
    if (t.head_dim % 16 != 0 || t.head_dim > kMaxHeadDim || t.n_group > kMaxGroup || (!t.v_f16 && t.v_stride % sizeof(float) != 0)) {
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

void silu_mul(const float * gate, const float * up, float * out, int64_t n) {
    // ops_avx2.cpp's silu_mul on 16 lanes (exp16 is exp8): the same bits
    const __m512 one = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 g = _mm512_loadu_ps(gate + i);
        const __m512 e = exp16(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32((int) 0x80000000))));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
    }
    if (i < n) avx2::silu_mul(gate + i, up + i, out + i, n - i);
}

void rope(float * x, int n_head, int head_dim, int n_dims, bool adjacent, const float * cs) {
    const int half = n_dims / 2;
    if ((adjacent ? n_dims : half) % 16 != 0) {  // a tail of pairs: the AVX2 kernel has one (same bits)
        avx2::rope(x, n_head, head_dim, n_dims, adjacent, cs);
        return;
    }
    // [c0 c0 c1 c1 ... c7 c7] from eight values: the angle of each adjacent pair on both its lanes
    const __m512i twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    for (int h = 0; h < n_head; ++h) {
        float * v = x + (int64_t) h * head_dim;
        if (adjacent) {
            for (int i = 0; i < half; i += 8) {
                const __m512 xv = _mm512_loadu_ps(v + 2 * i), sw = _mm512_permute_ps(xv, 0xb1);  // pairs swapped
                const __m512 c = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_loadu_ps(cs + i)));
                const __m512 sn = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_loadu_ps(cs + half + i)));
                __m512 p = _mm512_mul_ps(xv, c), q = _mm512_mul_ps(sw, sn);  // even lanes x0 c, x1 s; odd x1 c, x0 s
                keep_in_register(p), keep_in_register(q);  // unfused, as the scalar code
                _mm512_storeu_ps(v + 2 * i, _mm512_mask_sub_ps(_mm512_add_ps(p, q), (__mmask16) 0x5555, p, q));
            }
        } else {
            for (int i = 0; i < half; i += 16) {
                const __m512 x0 = _mm512_loadu_ps(v + i), x1 = _mm512_loadu_ps(v + half + i);
                const __m512 c = _mm512_loadu_ps(cs + i), sn = _mm512_loadu_ps(cs + half + i);
                __m512 a = _mm512_mul_ps(x0, c), b = _mm512_mul_ps(x1, sn), d = _mm512_mul_ps(x0, sn), e = _mm512_mul_ps(x1, c);
                keep_in_register(a), keep_in_register(b), keep_in_register(d), keep_in_register(e);
                _mm512_storeu_ps(v + i, _mm512_sub_ps(a, b));
                _mm512_storeu_ps(v + half + i, _mm512_add_ps(d, e));
            }
        }
    }
}

void rms_norm(const float * x, const float * g, float eps, float * y, int64_t n) {
    // part[u] in lane u, as the scalar code; a float's square is exact in double, so the fused
    // multiply-add rounds as its add does
    __m512d part = _mm512_setzero_pd();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m512d a = _mm512_cvtps_pd(_mm256_loadu_ps(x + j));
        part = _mm512_fmadd_pd(a, a, part);
    }
    double p[8];
    _mm512_storeu_pd(p, part);
    const float scale = rms_scale(p, x, j, n, eps);
    const __m512 sv = _mm512_set1_ps(scale);
    j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(y + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), sv), _mm512_loadu_ps(g + j)));
    for (; j < n; ++j) y[j] = x[j] * scale * g[j];
}

}  // namespace avx512
}  // namespace sparrow

#endif  // x86
