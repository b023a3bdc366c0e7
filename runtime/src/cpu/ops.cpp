// ops.cpp - scalar references of ops.h and the run-time choice of SIMD versions.
#include "cpu/ops.h"

#include "cpu/features.h"
#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define SPARROW_HAVE_AVX2_KERNELS 1
#endif

namespace sparrow {

#if SPARROW_HAVE_AVX2_KERNELS
namespace avx2 {  // cpu/ops_avx2.cpp
void attention(const AttnTask & t, float * scratch);
void silu_mul(const float * gate, const float * up, float * out, int64_t n);
void rope(float * x, int n_head, int head_dim, int n_dims, bool adjacent, const float * cs);
void rms_norm(const float * x, const float * g, float eps, float * y, int64_t n);
}  // namespace avx2
namespace avx512 {  // cpu/ops_avx512.cpp
void attention(const AttnTask & t, float * scratch);
void silu_mul(const float * gate, const float * up, float * out, int64_t n);
void rope(float * x, int n_head, int head_dim, int n_dims, bool adjacent, const float * cs);
void rms_norm(const float * x, const float * g, float eps, float * y, int64_t n);
}  // namespace avx512
#endif

// Enough for either implementation: the SIMD one converts blocks of K and V rows to f32 (V rows
// also when a row list scatters them) and keeps a block of scores, the accumulators and the
// running max / sum per head of the group.
size_t attention_scratch_floats(int n_group, int head_dim, int n_queries) {
    constexpr size_t kBlock = 64;
    return (size_t) n_group * kBlock + 2 * kBlock * (size_t) head_dim +
           (size_t) n_queries * n_group * ((size_t) head_dim + 2) + 64;
}

bool attention_prefetch_into_l1() { return !small_l1_data_cache(); }

void attention_finish(const AttnTask & t, int qi, int g, const float * acc, float m, float l) {
    const int hd = t.head_dim;
    if (t.partial) {
        float * state = t.partial + (size_t) qi * t.partial_stride + (size_t) g * (hd + 2);
        std::copy(acc, acc + hd, state);
        state[hd] = m;
        state[hd + 1] = l;
        return;
    }
    float * o = t.out + (size_t) qi * t.q_stride + (size_t) g * hd;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int d = 0; d < hd; d++) o[d] = acc[d] * inv;
}

void attention_merge(const float * states, int n_chunks, size_t stride, int hd, float * out) {
    float m = -INFINITY;
    for (int c = 0; c < n_chunks; c++) {
        const float * s = states + (size_t) c * stride;
        if (s[hd + 1] > 0.0f) m = std::max(m, s[hd]);
    }
    float l = 0.0f;
    bool first = true;
    for (int c = 0; c < n_chunks; c++) {
        const float * s = states + (size_t) c * stride;
        if (!(s[hd + 1] > 0.0f)) continue;
        const float w = std::exp(s[hd] - m);  // 1 exactly for the chunk that holds the max
        if (first) {
            for (int d = 0; d < hd; d++) out[d] = s[d] * w;
            l = s[hd + 1] * w;
            first = false;
        } else {
            for (int d = 0; d < hd; d++) out[d] += s[d] * w;
            l += s[hd + 1] * w;
        }
    }
    if (first) {  // nothing visible anywhere
        std::fill(out, out + hd, 0.0f);
        return;
    }
    const float inv = 1.0f / l;
    for (int d = 0; d < hd; d++) out[d] *= inv;
}

void attention_one_query_at_a_time(const AttnTask & t, float * scratch, void (*single)(const AttnTask &, float *)) {
    for (int i = 0; i < t.n_queries; i++) {
        AttnTask one = t;
        one.q = t.q + i * t.q_stride;
        one.out = t.out + i * t.q_stride;
        if (t.partial) one.partial = t.partial + i * t.partial_stride;
        one.n_kv = t.n_kv + i;
        one.n_queries = 1;
        single(one, scratch);
    }
}

namespace ref {
namespace {

const float * row_f32(const void * base, size_t stride, int64_t j, bool f16, int n, float * buf) {
    const uint8_t * p = (const uint8_t *) base + (size_t) j * stride;
    if (!f16) return (const float *) p;
    for (int d = 0; d < n; d++) buf[d] = fp16_to_fp32(((const uint16_t *) p)[d]);
    return buf;
}

// The definition, one query and head at a time: running max m and normaliser l; when a score
// raises the max, what was accumulated is rescaled by exp(m_old - m_new).
void attention_one(const AttnTask & t, float * scratch) {
    const int hd = t.head_dim;
    float * kbuf = scratch;
    float * vbuf = kbuf + hd;
    float * acc = vbuf + hd;
    for (int g = 0; g < t.n_group; g++) {
        const float * q = t.q + (size_t) g * hd;
        float m = -INFINITY, l = 0.0f;
        std::fill(acc, acc + hd, 0.0f);
        for (int64_t j = t.row_begin; j < std::min(t.n_kv, t.row_end); j++) {
            const float * k = row_f32(t.k, t.k_stride, t.row(j), t.k_f16, hd, kbuf);
            float s = 0.0f;
            for (int d = 0; d < hd; d++) s += q[d] * k[d];
            s *= t.scale;
            const float * v = row_f32(t.v, t.v_stride, t.row(j), t.v_f16, hd, vbuf);
            if (s > m) {
                const float correction = std::exp(m - s);
                for (int d = 0; d < hd; d++) acc[d] *= correction;
                l *= correction;
                m = s;
            }
            const float w = std::exp(s - m);
            l += w;
            for (int d = 0; d < hd; d++) acc[d] += w * v[d];
        }
        attention_finish(t, 0, g, acc, m, l);
    }
}

void attention(const AttnTask & t, float * scratch) { attention_one_query_at_a_time(t, scratch, attention_one); }

void silu_mul(const float * gate, const float * up, float * out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void rope(float * x, int n_head, int head_dim, int n_dims, bool adjacent, const float * cs) {
    const int half = n_dims / 2;
    for (int h = 0; h < n_head; ++h) {
        float * v = x + (int64_t) h * head_dim;
        for (int i = 0; i < half; ++i) {
            const int a = adjacent ? 2 * i : i, b = adjacent ? 2 * i + 1 : i + half;
            const float x0 = v[a], x1 = v[b], c = cs[i], s = cs[half + i];
            v[a] = mul_rounded(x0, c) - mul_rounded(x1, s);
            v[b] = mul_rounded(x0, s) + mul_rounded(x1, c);
        }
    }
}

void rms_norm(const float * x, const float * g, float eps, float * y, int64_t n) {
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const float scale = rms_scale(part, x, 0, n, eps);
    for (int64_t j = 0; j < n; ++j) y[j] = x[j] * scale * g[j];
}

}  // namespace

const OpsKernels & ops_kernels() {
    static const OpsKernels k = {attention, silu_mul, rope, rms_norm, "scalar"};
    return k;
}

}  // namespace ref

namespace {
OpsKernels select_ops() {
    OpsKernels k = ref::ops_kernels();
#if SPARROW_HAVE_AVX2_KERNELS
    if (simd_level_available() >= SimdLevel::Avx2) {
        k.attention = avx2::attention;
        k.silu_mul = avx2::silu_mul;
        k.rope = avx2::rope;
        k.rms_norm = avx2::rms_norm;
        k.level = "AVX2";
    }
    if (simd_level_available() >= SimdLevel::Avx512) {
        k.attention = avx512::attention;
        k.silu_mul = avx512::silu_mul;
        k.rope = avx512::rope;
        k.rms_norm = avx512::rms_norm;
        k.level = "AVX512";
    }
#endif
    return k;
}
}  // namespace

const OpsKernels & ops_kernels() {
    static const OpsKernels k = select_ops();
    return k;
}

}  // namespace sparrow
