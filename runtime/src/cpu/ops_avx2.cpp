// ops_avx2.cpp - AVX2 + FMA + F16C versions of cpu/ops.h's kernels.
//
// Attention walks the cache in blocks of kBlock rows, flash-attention style: the block's keys
// and values converted to f32 once for the task (its GQA group and its consecutive queries: a
// verify's tokens read a long cache once, not once each), then per query and head the scores
// of its rows, one max / rescale / vector exp per block instead of per row, and the
// probabilities times the block's value rows. Memory stays O(block), never O(n_q x n_kv).
// Each query's scores, maxima, sums and products are the steps it would take alone, in the same
// order: the same bits as a lone query (and as this kernel before runs shared their blocks).

#if defined(__x86_64__) || defined(__i386__)

#include "cpu/ops.h"
#include "cpu/prefetch.h"
#include "cpu/simd_avx2.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace sparrow {

namespace ref {
const OpsKernels & ops_kernels();
}

namespace avx2 {
namespace {

constexpr int kBlock = 64;  // cache rows per block; see attention_scratch_floats

// exp(x) for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-6
// polynomial (about 1 ulp), 2^n built in the exponent bits. Inputs below -87.3 (including
// -inf, a masked score) give exactly 0; above 88 they saturate at exp(88).
inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.0f);
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);  // ln2 split in two for accuracy
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
    return _mm256_and_ps(result, _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
}

template <bool kF16>
inline __m256 load_row8(const void * row, int d) {
    if (kF16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) ((const uint16_t *) row + d)));
    return _mm256_loadu_ps((const float *) row + d);
}

// A vector several FMAs share is loaded once: GCC otherwise folds the load into each FMA, and
// the repeated loads bound the loop.
inline void keep_in_register(__m256 & v) { asm("" : "+x"(v)); }

// scores[g * kBlock + i] = scale * q[g] . k_i for NG heads of the group and NK keys: each key row
// is loaded (and converted) once per 8 elements for all NG heads, and the NG x NK accumulators
// are independent FMA chains (4 alone leave the FMA units waiting on each other's latency).
// Every (head, key) is the same chain of FMAs whatever NG and NK: the same bits.
template <bool kF16, int NG, int NK>
inline void dot_heads(const float * q, int hd, const void * const * k, float scale, float * scores) {
    __m256 acc[NK][NG];
    for (int i = 0; i < NK; i++)
        for (int g = 0; g < NG; g++) acc[i][g] = _mm256_setzero_ps();
    for (int d = 0; d < hd; d += 8) {
        __m256 kv[NK];
        for (int i = 0; i < NK; i++) kv[i] = load_row8<kF16>(k[i], d);
        for (int g = 0; g < NG; g++) {
            __m256 qv = _mm256_loadu_ps(q + (size_t) g * hd + d);
            if (NK > 1) keep_in_register(qv);
            for (int i = 0; i < NK; i++) acc[i][g] = _mm256_fmadd_ps(qv, kv[i], acc[i][g]);
        }
    }
    for (int i = 0; i < NK; i++)
        for (int g = 0; g < NG; g++) scores[g * kBlock + i] = hsum(acc[i][g]) * scale;
}

template <bool kF16, int NK>
void block_scores(const float * q, int n_group, int hd, const void * const * k, float scale, float * scores) {
    int g = 0;
    for (; g + 4 <= n_group; g += 4) dot_heads<kF16, 4, NK>(q + (size_t) g * hd, hd, k, scale, scores + g * kBlock);
    switch (n_group - g) {
        case 3: dot_heads<kF16, 3, NK>(q + (size_t) g * hd, hd, k, scale, scores + g * kBlock); break;
        case 2: dot_heads<kF16, 2, NK>(q + (size_t) g * hd, hd, k, scale, scores + g * kBlock); break;
        case 1: dot_heads<kF16, 1, NK>(q + (size_t) g * hd, hd, k, scale, scores + g * kBlock); break;
        default: break;
    }
}

// acc_g[0 .. 8 NV) += sum over the block's n rows of p_g[row] * v[row][0 .. 8 NV) for GH heads
// (p rows kBlock apart, acc rows hd apart), in registers: each value vector is loaded once for
// the GH heads, whose accumulators are independent chains. A head's sums are the same chain
// whatever GH: the same bits.
template <int NV, int GH>
inline void accumulate_values(float * acc, const float * p, const float * vrows, int v_row_floats, int hd, int n) {
    __m256 a[GH][NV];
    for (int g = 0; g < GH; g++)
        for (int i = 0; i < NV; i++) a[g][i] = _mm256_loadu_ps(acc + (size_t) g * hd + 8 * i);
    for (int jj = 0; jj < n; jj++) {
        const float * v = vrows + (size_t) jj * v_row_floats;
        __m256 vv[NV];
        for (int i = 0; i < NV; i++) {
            vv[i] = _mm256_loadu_ps(v + 8 * i);
            if (GH > 1) keep_in_register(vv[i]);
        }
        for (int g = 0; g < GH; g++) {
            const __m256 pv = _mm256_broadcast_ss(p + (size_t) g * kBlock + jj);
            for (int i = 0; i < NV; i++) a[g][i] = _mm256_fmadd_ps(pv, vv[i], a[g][i]);
        }
    }
    for (int g = 0; g < GH; g++)
        for (int i = 0; i < NV; i++) _mm256_storeu_ps(acc + (size_t) g * hd + 8 * i, a[g][i]);
}

// The value sums of GH heads over every 32 (then 8 .. 24) dimensions.
template <int GH>
void head_values(float * acc, const float * p, const float * vrows, int v_row_floats, int hd, int n) {
    int d = 0;
    for (; d + 32 <= hd; d += 32) accumulate_values<4, GH>(acc + d, p, vrows + d, v_row_floats, hd, n);
    switch ((hd - d) / 8) {
        case 3: accumulate_values<3, GH>(acc + d, p, vrows + d, v_row_floats, hd, n); break;
        case 2: accumulate_values<2, GH>(acc + d, p, vrows + d, v_row_floats, hd, n); break;
        case 1: accumulate_values<1, GH>(acc + d, p, vrows + d, v_row_floats, hd, n); break;
        default: break;
    }
}

// Row j + kBlock of a KV head's cache into L1 or L2 (attention_prefetch_into_l1, cpu/ops.h),
// while row j's block is computed: read a block at a time, the rows would arrive in a burst that
// leaves memory idle through the block's arithmetic (bench_attention with SPARROW_SIMD=avx2,
// Qwen2-0.5B shapes, 16k rows, 2 threads, into L1 on a Zen 5: decode 1.00 -> 0.69 ms a layer).
template <bool kF16>
inline void prefetch_row_ahead(const AttnTask & t, const void * base, size_t stride, int64_t j, int64_t n_rows, bool into_l1) {
    if (j + kBlock >= n_rows) return;
    const char * row = (const char *) base + (size_t) t.row(j + kBlock) * stride;
    const int bytes = t.head_dim * (kF16 ? 2 : 4);
    for (int b = 0; b < bytes; b += 64) prefetch_line(row + b, into_l1);
}

// Rows [j0, j0 + n) of a KV head's cache converted to f32 into buf (n x head_dim). f16 -> f32
// is exact: a converted row gives the bits its f16 row gives when converted in registers.
// Rows past n_rows (the rows the task reads) are not prefetched.
template <bool kF16>
void convert_rows(const AttnTask & t, const void * base, size_t stride, int64_t j0, int n, int64_t n_rows, bool into_l1,
                  float * buf) {
    for (int jj = 0; jj < n; jj++) {
        prefetch_row_ahead<kF16>(t, base, stride, j0 + jj, n_rows, into_l1);
        const void * src = (const uint8_t *) base + (size_t) t.row(j0 + jj) * stride;
        for (int d = 0; d < t.head_dim; d += 8) _mm256_storeu_ps(buf + (size_t) jj * t.head_dim + d, load_row8<kF16>(src, d));
    }
}

// The task's consecutive queries walk the cache together: each block of keys and values is read
// (and converted) once for all of them, then every query takes, on its own rows of the block,
// the steps it would take alone (the same blocks, scores, maxima and sums: the same bits).
template <bool kKF16, bool kVF16>
void attention_impl(const AttnTask & t, float * scratch) {
    const int G = t.n_group, hd = t.head_dim, Q = t.n_queries;
    float * scores = scratch;                          // G x kBlock (one query at a time)
    float * kbuf = scores + (size_t) G * kBlock;       // kBlock x hd: the block's f16 keys as f32
    float * vbuf = kbuf + (size_t) kBlock * hd;        // kBlock x hd: its values as f32
    float * acc = vbuf + (size_t) kBlock * hd;         // Q x G x hd
    float * m_run = acc + (size_t) Q * G * hd;         // Q x G
    float * l_run = m_run + (size_t) Q * G;            // Q x G

    std::fill(acc, acc + (size_t) Q * G * hd, 0.0f);
    std::fill(m_run, m_run + (size_t) Q * G, -INFINITY);
    std::fill(l_run, l_run + (size_t) Q * G, 0.0f);
    const int64_t n_kv_last = std::min(t.n_kv + Q - 1, t.row_end);  // rows the last query sees, to the chunk's end
    const bool into_l1 = attention_prefetch_into_l1();  // where rows a block ahead are prefetched
    // f16 keys are converted once per block for a run of queries; a lone query converts them in
    // registers as it goes (a pass through kbuf would only add a store and a load), and f32 keys
    // are read in place
    const bool convert_keys = kKF16 && Q > 1;
    const bool v_in_place = !kVF16 && !t.rows;         // a contiguous run of f32 value rows
    const bool pair_keys = convert_keys || !kKF16 || hd <= 64;

    for (int64_t j0 = t.row_begin; j0 < n_kv_last; j0 += kBlock) {
        const int nb_all = (int) std::min<int64_t>(kBlock, n_kv_last - j0);
        if (convert_keys) convert_rows<kKF16>(t, t.k, t.k_stride, j0, nb_all, n_kv_last, into_l1, kbuf);
        const float * vrows = vbuf;
        int v_row_floats = hd;
        if (v_in_place) {
            vrows = (const float *) ((const uint8_t *) t.v + (size_t) j0 * t.v_stride);
            v_row_floats = (int) (t.v_stride / sizeof(float));
        } else {
            convert_rows<kVF16>(t, t.v, t.v_stride, j0, nb_all, n_kv_last, into_l1, vbuf);
        }
        for (int qi = 0; qi < Q; qi++) {
            const int nb = (int) std::min<int64_t>(kBlock, std::min(t.n_kv + qi, t.row_end) - j0);
            if (nb <= 0) continue;
            const float * q = t.q + (size_t) qi * t.q_stride;
            // scores; the padding up to a whole vector stays -inf (exp -> 0)
            const int nb8 = (nb + 7) & ~7;
            for (int g = 0; g < G; g++) std::fill(scores + g * kBlock, scores + g * kBlock + nb8, -INFINITY);
            // keys two at a time (the last alone when nb is odd), except f16 keys converted in
            // place at head_dim > 64: pairs took a decode's attention at Qwen2-7B shapes, 25.6k
            // rows, 2 threads from 4.0 to 4.4 ms a layer (at head_dim 64 from 1.33 to 1.08)
            auto key_row = [&](int jj) -> const void * {
                if (convert_keys) return kbuf + (size_t) jj * hd;
                prefetch_row_ahead<kKF16>(t, t.k, t.k_stride, j0 + jj, n_kv_last, into_l1);
                return (const uint8_t *) t.k + (size_t) t.row(j0 + jj) * t.k_stride;
            };
            int jj = 0;
            for (; pair_keys && jj + 2 <= nb; jj += 2) {
                const void * k[2] = {key_row(jj), key_row(jj + 1)};
                if (convert_keys) block_scores<false, 2>(q, G, hd, k, t.scale, scores + jj);
                else block_scores<kKF16, 2>(q, G, hd, k, t.scale, scores + jj);
            }
            for (; jj < nb; jj++) {
                const void * k[1] = {key_row(jj)};
                if (convert_keys) block_scores<false, 1>(q, G, hd, k, t.scale, scores + jj);
                else block_scores<kKF16, 1>(q, G, hd, k, t.scale, scores + jj);
            }
            for (int g = 0; g < G; g++) {
                float * s = scores + g * kBlock;
                __m256 mx = _mm256_set1_ps(-INFINITY);
                for (int jj = 0; jj < nb8; jj += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + jj));
                const float block_max = hmax(mx);
                const size_t state = (size_t) qi * G + g;
                float * a = acc + state * hd;
                if (block_max > m_run[state]) {
                    // rescale what was accumulated under the old max (exp(-inf) = 0 the first time)
                    const float correction = std::exp(m_run[state] - block_max);
                    const __m256 cv = _mm256_set1_ps(correction);
                    for (int d = 0; d < hd; d += 8) _mm256_storeu_ps(a + d, _mm256_mul_ps(_mm256_loadu_ps(a + d), cv));
                    l_run[state] *= correction;
                    m_run[state] = block_max;
                }
                const __m256 m = _mm256_set1_ps(m_run[state]);
                __m256 sum = _mm256_setzero_ps();
                for (int jj = 0; jj < nb8; jj += 8) {
                    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + jj), m));
                    _mm256_storeu_ps(s + jj, p);
                    sum = _mm256_add_ps(sum, p);
                }
                l_run[state] += hsum(sum);
            }
            // probabilities times values, heads two at a time
            float * a_q = acc + (size_t) qi * G * hd;
            int g = 0;
            for (; g + 2 <= G; g += 2) head_values<2>(a_q + (size_t) g * hd, scores + g * kBlock, vrows, v_row_floats, hd, nb);
            if (g < G) head_values<1>(a_q + (size_t) g * hd, scores + g * kBlock, vrows, v_row_floats, hd, nb);
        }
    }
    for (int qi = 0; qi < Q; qi++) {
        for (int g = 0; g < G; g++) {
            const size_t state = (size_t) qi * G + g;
            attention_finish(t, qi, g, acc + state * hd, m_run[state], l_run[state]);
        }
    }
}

}  // namespace

void attention(const AttnTask & t, float * scratch) {
    // f32 value rows are read in place, so their stride must be whole floats; head sizes that
    // are not whole vectors (only tiny test models) take the reference path
    if (t.head_dim % 8 != 0 || (!t.v_f16 && t.v_stride % sizeof(float) != 0)) {
        ref::ops_kernels().attention(t, scratch);
        return;
    }
    if (t.k_f16) {
        if (t.v_f16) attention_impl<true, true>(t, scratch); else attention_impl<true, false>(t, scratch);
    } else {
        if (t.v_f16) attention_impl<false, true>(t, scratch); else attention_impl<false, false>(t, scratch);
    }
}

void silu_mul(const float * gate, const float * up, float * out, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp8(_mm256_xor_ps(g, sign));  // exp(-g)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void rope(float * x, int n_head, int head_dim, int n_dims, bool adjacent, const float * cs) {
    const int half = n_dims / 2;
    // [c0 c0 c1 c1 c2 c2 c3 c3] from four values: the angle of each adjacent pair on both its lanes
    const __m256i twice = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    for (int h = 0; h < n_head; ++h) {
        float * v = x + (int64_t) h * head_dim;
        int done = 0;  // pairs
        if (adjacent) {
            for (; 2 * done + 8 <= n_dims; done += 4) {
                const __m256 xv = _mm256_loadu_ps(v + 2 * done), sw = _mm256_permute_ps(xv, 0xb1);  // pairs swapped
                const __m256 c = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cs + done)), twice);
                const __m256 sn = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cs + half + done)), twice);
                __m256 p = _mm256_mul_ps(xv, c), q = _mm256_mul_ps(sw, sn);  // even lanes x0 c, x1 s; odd x1 c, x0 s
                keep_in_register(p), keep_in_register(q);  // unfused, as the scalar code
                _mm256_storeu_ps(v + 2 * done, _mm256_addsub_ps(p, q));
            }
        } else {
            for (; done + 8 <= half; done += 8) {
                const __m256 x0 = _mm256_loadu_ps(v + done), x1 = _mm256_loadu_ps(v + half + done);
                const __m256 c = _mm256_loadu_ps(cs + done), sn = _mm256_loadu_ps(cs + half + done);
                __m256 a = _mm256_mul_ps(x0, c), b = _mm256_mul_ps(x1, sn), d = _mm256_mul_ps(x0, sn), e = _mm256_mul_ps(x1, c);
                keep_in_register(a), keep_in_register(b), keep_in_register(d), keep_in_register(e);
                _mm256_storeu_ps(v + done, _mm256_sub_ps(a, b));
                _mm256_storeu_ps(v + half + done, _mm256_add_ps(d, e));
            }
        }
        for (int i = done; i < half; ++i) {
            const int ia = adjacent ? 2 * i : i, ib = adjacent ? 2 * i + 1 : i + half;
            const float x0 = v[ia], x1 = v[ib], c = cs[i], sn = cs[half + i];
            v[ia] = mul_rounded(x0, c) - mul_rounded(x1, sn);
            v[ib] = mul_rounded(x0, sn) + mul_rounded(x1, c);
        }
    }
}

void rms_norm(const float * x, const float * g, float eps, float * y, int64_t n) {
    // a float's square is exact in double, so a fused multiply-add rounds as the scalar add does
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        lo = _mm256_fmadd_pd(a, a, lo);
        hi = _mm256_fmadd_pd(b, b, hi);
    }
    double part[8];
    _mm256_storeu_pd(part, lo);
    _mm256_storeu_pd(part + 4, hi);
    const float scale = rms_scale(part, x, j, n, eps);
    const __m256 sv = _mm256_set1_ps(scale);
    j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), sv), _mm256_loadu_ps(g + j)));
    for (; j < n; ++j) y[j] = x[j] * scale * g[j];
}

}  // namespace avx2
}  // namespace sparrow

#endif  // x86
