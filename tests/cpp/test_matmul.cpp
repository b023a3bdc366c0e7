// test_matmul.cpp - the tiled matrix-product kernels and the fused attention / silu kernels
// against their scalar references, on random shapes with ragged edges: row and column counts
// that are not multiples of any tile size, float rows that are not multiples of 8, every type.
//
// Usage: test_matmul [repo root, unused]. Exits non-zero with the first failures listed.

#include "common.h"
#include "cpu/ops.h"
#include "cpu/panels.h"
#include "quant.h"
#include "test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace sparrow;

namespace {

using namespace sparrow_test;

// y (stride ys, prefilled with -7) against the reference products y_ref of the same weights
// (file layout) and activations (in the dot type): within 1e-5 of the sum of |w x| terms, and
// nothing written past row nr.
void check_against_ref(const char * what, DType t, int64_t k, const uint8_t * w, int64_t nr, const uint8_t * x,
                       int64_t nc, const float * y, const float * y_ref, int64_t ys) {
    const DType dt = traits(t).dot_type;
    const size_t wrb = row_size(t, k), xrb = row_size(dt, k);
    std::vector<float> wf((size_t) k), xc((size_t) k);
    for (int64_t c = 0; c < nc; c++) {
        ref::dequantize_row(dt, x + c * xrb, xc.data(), k);
        for (int64_t r = 0; r < nr; r++) {
            ref::dequantize_row(t, w + r * wrb, wf.data(), k);
            double magnitude = 0.0;
            for (int64_t i = 0; i < k; i++) magnitude += std::fabs((double) wf[i] * xc[i]);
            const float a = y[c * ys + r], b = y_ref[c * ys + r];
            check(std::fabs((double) a - b) <= 1e-5 * magnitude + 1e-30,
                  format("%s %s k=%lld nr=%lld nc=%lld (r=%lld, c=%lld): %.9g vs ref %.9g", what, traits(t).name,
                         (long long) k, (long long) nr, (long long) nc, (long long) r, (long long) c, a, b));
        }
        for (int64_t r = nr; r < ys; r++) check(y[c * ys + r] == -7.0f, format("%s %s wrote past nr", what, traits(t).name));
    }
}

// mul_mat(SIMD) vs ref::mul_mat (one reference vec_dot per pair) on an nr x nc block with
// row strides larger than the rows (as when the backend passes a slice of a bigger matrix).
void test_mul_mat(DType t) {
    const DType dt = traits(t).dot_type;
    const int64_t bs = traits(t).block_size;
    int cases = 0;
    const int64_t shapes[][3] = {  // k (in blocks for quantized types, elements for float), nr, nc
        {1, 1, 1}, {3, 1, 2}, {5, 3, 4}, {7, 5, 3}, {9, 8, 8}, {2, 17, 16}, {4, 2, 5}, {6, 7, 9}, {11, 4, 13},
        // whole 16-row panels with rows left over, 1..21 activation rows (AVX-512 panels take 16)
        {3, 33, 2}, {2, 48, 17}, {5, 16, 7}, {1, 31, 11}, {4, 37, 1}, {2, 16, 1}};
    for (int rep = 0; rep < 3; rep++) {
        for (const auto & s : shapes) {
            int64_t k = bs == 1 ? s[0] * 8 + (rep == 0 ? 0 : pick(1, 7)) : s[0] * bs;  // ragged float tails
            if (bs == 1 && rep == 2) k = pick(1, 300);
            const int64_t nr = s[1] + (rep ? pick(0, 5) : 0), nc = s[2] + (rep ? pick(0, 5) : 0);
            const std::vector<uint8_t> w = make_weights(t, nr, k);
            const size_t wrb = row_size(t, k), xrb = row_size(dt, k);
            std::vector<uint8_t> x(xrb * (size_t) nc);
            std::vector<float> xf((size_t) k);
            for (int64_t c = 0; c < nc; c++) {
                for (auto & v : xf) v = normal();
                ref::quantize_row(dt, xf.data(), x.data() + c * xrb, k);
            }
            const int64_t ys = nr + 3;  // output row stride != nr
            std::vector<float> y((size_t) (nc * ys), -7.0f), y_ref((size_t) (nc * ys), -7.0f);
            mul_mat(t, k, w.data(), wrb, nr, x.data(), xrb, nc, y.data(), ys);
            ref::mul_mat(t, k, w.data(), wrb, nr, x.data(), xrb, nc, y_ref.data(), ys);
            check_against_ref("mul_mat", t, k, w.data(), nr, x.data(), nc, y.data(), y_ref.data(), ys);
            cases++;
        }
    }
    std::printf("  mul_mat %-5s %3d cases\n", traits(t).name, cases);
}

// Panels: packing round-trips byte for byte; the panel kernel of the active SIMD level matches
// ref::mul_mat on the file layout; and a (row, activation row) result is the same bits whatever
// run of panels and range of activation rows the call that computed it covered.
// The nr x k matrix w packed into panels at the store's alignment (in buf); every row checked to
// unpack to its bytes.
const uint8_t * pack_and_check(DType t, int64_t k, int64_t nr, const std::vector<uint8_t> & w, std::vector<uint8_t> & buf) {
    const size_t wrb = row_size(t, k);
    buf.assign(packed_bytes(t, k, nr) + 64, 0);
    uint8_t * pk = (uint8_t *) (((uintptr_t) buf.data() + 63) / 64 * 64);
    pack_panels(t, k, w.data(), wrb, nr, pk);
    std::vector<uint8_t> row(wrb);
    for (int64_t r = 0; r < nr; r++) {
        unpack_panel_row(t, k, pk, r, row.data());
        check(std::memcmp(row.data(), w.data() + r * wrb, wrb) == 0,
              format("panels %s k=%lld: row %lld does not round-trip", traits(t).name, (long long) k, (long long) r));
    }
    return pk;
}

// f16 / bf16 panels (rows interleaved in groups of 4): packing round-trips; products equal the
// rows' kernel (mul_mat) bit for bit, whole and in pieces (runs of groups, a few activation rows
// at a time, as jobs cut them), at column counts with and without a 16-column tail.
void test_float_panels(DType t) {
    int cases = 0;
    const int64_t shapes[][3] = {{1, 1, 1}, {16, 5, 2}, {17, 16, 7}, {33, 13, 6}, {64, 37, 9}, {576, 21, 1}, {100, 8, 13}};
    for (const auto & s : shapes) {
        const int64_t k = s[0], nr = s[1], nc = s[2];
        const std::vector<uint8_t> w = make_weights(t, nr, k);
        const DType dt = traits(t).dot_type;  // f32 for f16, bf16 for bf16
        const size_t wrb = row_size(t, k), xrb = row_size(dt, k);
        std::vector<uint8_t> packed;
        const uint8_t * pk = pack_and_check(t, k, nr, w, packed);
        std::vector<float> xf((size_t) (k * nc));
        for (auto & v : xf) v = normal();
        std::vector<uint8_t> x(xrb * (size_t) nc);
        for (int64_t c = 0; c < nc; c++) quantize_row(dt, xf.data() + c * k, x.data() + c * xrb, k);
        const int64_t ys = nr + 3;
        std::vector<float> y((size_t) (nc * ys), -7.0f), y_rows((size_t) (nc * ys), -7.0f), y_split((size_t) (nc * ys), -7.0f);
        float_panel_mul_mat(t, k, pk, nr, x.data(), xrb, nc, y.data(), ys);
        mul_mat(t, k, w.data(), wrb, nr, x.data(), xrb, nc, y_rows.data(), ys);
        for (int64_t r0 = 0; r0 < nr;) {  // groups of 4 rows in runs of 1-3 groups
            const int64_t rr = std::min<int64_t>(nr - r0, 4 * pick(1, 3));
            for (int64_t c0 = 0; c0 < nc;) {
                const int64_t cc = std::min<int64_t>(nc - c0, pick(1, 5));
                float_panel_mul_mat(t, k, pk + r0 * float_panel_row_stride(k), rr, x.data() + c0 * xrb, xrb, cc,
                                    y_split.data() + c0 * ys + r0, ys);
                c0 += cc;
            }
            r0 += rr;
        }
        check(std::memcmp(y.data(), y_rows.data(), y.size() * sizeof(float)) == 0,
              format("panels %s k=%lld nr=%lld nc=%lld: not the rows' bits (or wrote outside)", traits(t).name, (long long) k,
                     (long long) nr, (long long) nc));
        check(std::memcmp(y_split.data(), y_rows.data(), y.size() * sizeof(float)) == 0,
              format("panels %s k=%lld: in pieces not the rows' bits", traits(t).name, (long long) k));
        cases++;
    }
    std::printf("  panels  %-5s %3d cases (groups of 4 rows)\n", traits(t).name, cases);
}

void test_panels(DType t) {
    if (!panels_supported(t)) return;
    if (is_float_panel_type(t)) {
        test_float_panels(t);
        return;
    }
    const DType dt = traits(t).dot_type;
    const int64_t bs = traits(t).block_size;
    int cases = 0;
    const int64_t shapes[][3] = {{1, 1, 1}, {3, 15, 2}, {2, 16, 17}, {5, 17, 5}, {1, 33, 16}, {4, 50, 9}, {2, 64, 21}, {7, 3, 1}};
    for (const auto & s : shapes) {
        const int64_t k = s[0] * bs, nr = s[1], nc = s[2];
        const std::vector<uint8_t> w = make_weights(t, nr, k);
        const size_t wrb = row_size(t, k), xrb = row_size(dt, k);
        std::vector<uint8_t> packed;
        const uint8_t * pk = pack_and_check(t, k, nr, w, packed);
        std::vector<uint8_t> x(xrb * (size_t) nc), sums(summary_bytes(t, k) * (size_t) nc);
        std::vector<float> xf((size_t) k);
        for (int64_t c = 0; c < nc; c++) {
            for (auto & v : xf) v = normal();
            ref::quantize_row(dt, xf.data(), x.data() + c * xrb, k);
        }
        summarize_activations(t, k, x.data(), xrb, nc, sums.data());
        const int64_t ys = nr + 3;
        std::vector<float> y((size_t) (nc * ys), -7.0f), y_ref((size_t) (nc * ys), -7.0f), y_split((size_t) (nc * ys), -7.0f);
        PanelProduct p{t, k, pk, nr, x.data(), xrb, sums.data(), y.data(), ys};
        const int64_t n_panels = (nr + kPanelRows - 1) / kPanelRows;
        panel_mul_mat(p, 0, n_panels, 0, nc);
        ref::mul_mat(t, k, w.data(), wrb, nr, x.data(), xrb, nc, y_ref.data(), ys);
        // the same products one panel and a few activation rows at a time
        p.y = y_split.data();
        for (int64_t pi = 0; pi < n_panels; pi++) {
            for (int64_t c0 = 0; c0 < nc;) {
                const int64_t cc = std::min<int64_t>(nc - c0, pick(1, 5));
                panel_mul_mat(p, pi, 1, c0, cc);
                c0 += cc;
            }
        }
        check_against_ref("panels", t, k, w.data(), nr, x.data(), nc, y.data(), y_ref.data(), ys);
        for (int64_t c = 0; c < nc; c++) {
            for (int64_t r = 0; r < nr; r++) {
                check(std::memcmp(&y[c * ys + r], &y_split[c * ys + r], sizeof(float)) == 0,
                      format("panels %s: (r=%lld, c=%lld) differs when computed in pieces", traits(t).name, (long long) r, (long long) c));
            }
        }
        cases++;
    }
    std::printf("  panels  %-5s %3d cases\n", traits(t).name, cases);
}

// Attention: the SIMD kernel against the reference for f16/f32 caches, head sizes that are and
// are not whole vectors, GQA groups of 1..8, lengths around the block size, row lists (masks)
// that skip whole blocks, and a query with nothing visible (zeros).
void test_attention() {
    const OpsKernels & simd = ops_kernels();
    const OpsKernels & scalar = ref::ops_kernels();
    int cases = 0;
    for (int hd : {8, 16, 64, 80, 128, 12}) {
        for (int group : {1, 2, 7, 8}) {
            for (int64_t n_kv : {1, 5, 63, 64, 65, 130, 300}) {
                for (int kv_kind = 0; kv_kind < 4; kv_kind++) {
                    for (int mask_kind = 0; mask_kind < 4; mask_kind++) {
                        const bool k_f16 = kv_kind & 1, v_f16 = kv_kind & 2;
                        const int n_head_kv = 2;  // rows hold two KV heads; the task uses the second
                        std::vector<float> q((size_t) group * hd), kf((size_t) n_kv * n_head_kv * hd), vf(kf.size());
                        for (auto & v : q) v = normal();
                        for (auto & v : kf) v = normal();
                        for (auto & v : vf) v = normal();
                        // a few large scores so the running max moves inside and across blocks
                        for (int64_t j = 0; j < n_kv; j += 37) kf[(size_t) j * n_head_kv * hd + hd] *= 8.0f;
                        std::vector<uint8_t> kc, vc;
                        auto store = [&](const std::vector<float> & src, bool f16, std::vector<uint8_t> & dst) {
                            dst.resize(src.size() * (f16 ? 2 : 4));
                            if (f16) ref::quantize_row(DType::F16, src.data(), dst.data(), (int64_t) src.size());
                            else std::memcpy(dst.data(), src.data(), dst.size());
                        };
                        store(kf, k_f16, kc);
                        store(vf, v_f16, vc);
                        std::vector<uint8_t> mask((size_t) n_kv, 1);
                        if (mask_kind == 1) for (auto & m : mask) m = (uint8_t) (rng()() % 3 == 0);  // sparse tree-like
                        if (mask_kind == 2) for (int64_t j = 0; j < n_kv; j++) mask[j] = j >= n_kv / 2;  // window: late rows only
                        if (mask_kind == 3) std::fill(mask.begin(), mask.end(), 0);  // nothing visible
                        AttnTask t;
                        t.q = q.data();
                        t.n_group = group;
                        t.head_dim = hd;
                        t.scale = 1.0f / std::sqrt((float) hd);
                        t.k = kc.data() + (size_t) hd * (k_f16 ? 2 : 4);
                        t.v = vc.data() + (size_t) hd * (v_f16 ? 2 : 4);
                        t.k_stride = (size_t) n_head_kv * hd * (k_f16 ? 2 : 4);
                        t.v_stride = (size_t) n_head_kv * hd * (v_f16 ? 2 : 4);
                        t.k_f16 = k_f16;
                        t.v_f16 = v_f16;
                        std::vector<int32_t> rows;  // a mask becomes the list of rows it shows
                        for (int64_t j = 0; j < n_kv; j++) {
                            if (mask[j]) rows.push_back((int32_t) j);
                        }
                        t.n_kv = mask_kind ? (int64_t) rows.size() : n_kv;
                        t.rows = mask_kind ? rows.data() : nullptr;
                        std::vector<float> out((size_t) group * hd), out_ref(out.size());
                        std::vector<float> scratch(attention_scratch_floats(group, hd));
                        t.out = out.data();
                        simd.attention(t, scratch.data());
                        t.out = out_ref.data();
                        scalar.attention(t, scratch.data());
                        float worst = 0.0f;
                        for (size_t i = 0; i < out.size(); i++) worst = std::max(worst, std::fabs(out[i] - out_ref[i]));
                        // outputs are convex combinations of values ~N(0, 1): absolute error is meaningful
                        check(worst <= 2e-5f, format("attention hd=%d group=%d n_kv=%lld kv=%d mask=%d: max error %.3g", hd,
                                                     group, (long long) n_kv, kv_kind, mask_kind, worst));
                        if (mask_kind == 3) check(*std::max_element(out.begin(), out.end()) == 0.0f, "attention: no visible row gives zeros");
                        cases++;
                    }
                }
            }
        }
    }
    std::printf("  attention %d cases\n", cases);
}

// Runs of causal queries in one task: each query's output is the same bits as the query alone
// (the SIMD kernel's batch invariance), and matches the reference.
void test_attention_runs() {
    const OpsKernels & simd = ops_kernels();
    const OpsKernels & scalar = ref::ops_kernels();
    int cases = 0;
    for (int hd : {16, 64, 80, 128, 12}) {
        for (int group : {1, 7}) {
            for (int n_queries : {2, 5, 8}) {
                for (int64_t n_kv : {1, 60, 64, 130}) {
                    for (int kv_kind = 0; kv_kind < 4; kv_kind++) {
                        const bool k_f16 = kv_kind & 1, v_f16 = kv_kind & 2;
                        const int64_t rows = n_kv + n_queries - 1;
                        const size_t q_stride = (size_t) (group + 1) * hd;  // rows wider than the group
                        std::vector<float> q(q_stride * n_queries), kf((size_t) rows * hd), vf(kf.size());
                        for (auto & v : q) v = normal();
                        for (auto & v : kf) v = normal();
                        for (auto & v : vf) v = normal();
                        std::vector<uint8_t> kc(kf.size() * (k_f16 ? 2 : 4)), vc(vf.size() * (v_f16 ? 2 : 4));
                        if (k_f16) ref::quantize_row(DType::F16, kf.data(), kc.data(), (int64_t) kf.size());
                        else std::memcpy(kc.data(), kf.data(), kc.size());
                        if (v_f16) ref::quantize_row(DType::F16, vf.data(), vc.data(), (int64_t) vf.size());
                        else std::memcpy(vc.data(), vf.data(), vc.size());
                        AttnTask t;
                        t.n_group = group;
                        t.head_dim = hd;
                        t.scale = 1.0f / std::sqrt((float) hd);
                        t.k = kc.data();
                        t.v = vc.data();
                        t.k_stride = (size_t) hd * (k_f16 ? 2 : 4);
                        t.v_stride = (size_t) hd * (v_f16 ? 2 : 4);
                        t.k_f16 = k_f16;
                        t.v_f16 = v_f16;
                        std::vector<float> out(q.size(), -7.0f), one((size_t) group * hd), one_ref(one.size());
                        std::vector<float> scratch(attention_scratch_floats(group, hd, n_queries));
                        t.q = q.data();
                        t.out = out.data();
                        t.n_kv = n_kv;
                        t.n_queries = n_queries;
                        t.q_stride = q_stride;
                        simd.attention(t, scratch.data());
                        for (int i = 0; i < n_queries; i++) {
                            AttnTask a = t;
                            a.q = q.data() + i * q_stride;
                            a.n_kv = n_kv + i;
                            a.n_queries = 1;
                            a.out = one.data();
                            simd.attention(a, scratch.data());
                            a.out = one_ref.data();
                            scalar.attention(a, scratch.data());
                            const float * got = out.data() + i * q_stride;
                            float worst = 0.0f;
                            for (size_t d = 0; d < one.size(); d++) worst = std::max(worst, std::fabs(got[d] - one_ref[d]));
                            check(std::memcmp(got, one.data(), one.size() * sizeof(float)) == 0 && worst <= 2e-5f,
                                  format("attention run hd=%d group=%d queries=%d n_kv=%lld kv=%d: query %d differs from "
                                         "alone (max error vs ref %.3g)", hd, group, n_queries, (long long) n_kv, kv_kind, i, worst));
                            check(got[one.size()] == -7.0f || i + 1 == n_queries, "attention run wrote past a query's heads");
                        }
                        cases++;
                    }
                }
            }
        }
    }
    std::printf("  attention runs %d cases\n", cases);
}

void test_silu_mul() {
    for (int64_t n : {1, 7, 8, 9, 100, 4864}) {
        std::vector<float> g((size_t) n), u((size_t) n), o((size_t) n), o_ref((size_t) n);
        for (int64_t i = 0; i < n; i++) {
            g[i] = normal() * (i % 5 == 0 ? 40.0f : 3.0f);  // includes exp over/underflow territory
            u[i] = normal();
        }
        if (n > 2) g[1] = -200.0f, g[2] = 200.0f;
        ops_kernels().silu_mul(g.data(), u.data(), o.data(), n);
        ref::ops_kernels().silu_mul(g.data(), u.data(), o_ref.data(), n);
        for (int64_t i = 0; i < n; i++) {
            const float tol = 1e-6f * std::fabs(o_ref[i]) + 1e-30f + 2e-6f * std::fabs(g[i] * u[i]) * (std::fabs(g[i]) > 80.0f);
            if (!(std::fabs(o[i] - o_ref[i]) <= tol)) {
                check(false, format("silu_mul n=%lld i=%lld gate=%.6g: %.9g vs ref %.9g", (long long) n, (long long) i, g[i], o[i], o_ref[i]));
                break;
            }
        }
    }
    std::printf("  silu_mul ok\n");
}

}  // namespace

int main(int argc, char ** argv) {
    (void) argc, (void) argv;
    std::printf("test_matmul: kernels %s / %s\n", simd_level(), ops_kernels().level);
    try {
        for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4_K,
                        DType::Q5_K, DType::Q6_K}) {
            test_mul_mat(t);
            test_panels(t);
        }
        test_attention();
        test_attention_runs();
        test_silu_mul();
    } catch (const std::exception & e) {
        std::fprintf(stderr, "FAIL: unexpected exception: %s\n", e.what());
        return 1;
    }
    return finish("test_matmul");
}
