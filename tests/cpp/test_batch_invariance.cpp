// test_batch_invariance.cpp - a row's result is the same bits however it is batched.
//
// Lossless speculative decoding on quantized models rests on this: the target verifies k draft
// tokens in one batch, and what it computes for each must equal what plain decoding computes
// for that token alone, or greedy outputs drift apart at near-ties. Through the CPU backend
// (weights in the store's form, panels where the type has them):
//   - matmul: every row of a 16-row activation matrix, computed alone with 1 thread, equals the
//     same row computed in batches of 1..16 (at shifting positions) with 1, 2 and 3 threads, and
//     in a matmul_group with other weights;
//   - attention: a chain verify (queries at consecutive positions, causal) equals each query
//     alone; a tree verify (a mask over the batch) equals each node's query alone over a cache
//     holding just its path, the cache plain decoding would have built.
// Both at every SIMD level ctest runs (the kernel tests run again under SPARROW_SIMD=avx2).

#include "backend.h"
#include "common.h"
#include "cpu/ops.h"
#include "quant.h"
#include "test_util.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace sparrow;

namespace {

using namespace sparrow_test;

bool same_bits(const float * a, const float * b, int64_t n) { return std::memcmp(a, b, (size_t) n * sizeof(float)) == 0; }

void test_matmul(DType t, int64_t rows, int64_t k) {
    const int64_t n_rows = 16;
    const std::vector<uint8_t> w_bytes = make_weights(t, rows, k);
    auto store = make_cpu_weight_store(false);
    const Tensor w = store->matmul_weight(Tensor::matrix(t, k, rows, (void *) w_bytes.data()));
    std::vector<float> bias((size_t) rows);
    for (auto & b : bias) b = normal();
    const Tensor b = Tensor::matrix(DType::F32, rows, 1, bias.data());
    std::vector<float> x((size_t) (n_rows * k));
    for (auto & v : x) v = normal();

    // each activation row alone, one thread
    std::vector<float> alone((size_t) (n_rows * rows));
    {
        auto be = make_cpu_backend(1);
        for (int64_t i = 0; i < n_rows; i++) {
            Tensor xi = Tensor::matrix(DType::F32, k, 1, x.data() + i * k);
            Tensor yi = Tensor::matrix(DType::F32, rows, 1, alone.data() + i * rows);
            be->matmul(w, xi, yi, &b);
        }
    }
    int mismatches = 0;
    for (int threads : {1, 2, 3}) {
        auto be = make_cpu_backend(threads);
        for (int64_t n = 1; n <= n_rows; n++) {
            const int64_t first = (n * 5) % (n_rows - n + 1);  // the rows sit at shifting places
            std::vector<float> y((size_t) (n * rows));
            Tensor xb = Tensor::matrix(DType::F32, k, n, x.data() + first * k);
            Tensor yb = Tensor::matrix(DType::F32, rows, n, y.data());
            be->matmul(w, xb, yb, &b);
            for (int64_t i = 0; i < n; i++) {
                if (!same_bits(y.data() + i * rows, alone.data() + (first + i) * rows, rows)) mismatches++;
            }
        }
    }
    check(mismatches == 0, format("matmul %s [%lld x %lld]%s: %d batched rows differ from the row alone", traits(t).name,
                                  (long long) rows, (long long) k, w.panels ? " (panels)" : "", mismatches));

    // matmul_group: the same products in one pass (a second weight of the same type, and one of
    // another type: of the same dot type, sharing the pass, or of another, taking the per-product
    // path) give the same bits as matmul alone
    const DType other = t == DType::Q4_K ? DType::Q6_K : t == DType::Q6_K ? DType::Q5_K : t == DType::Q5_K ? DType::Q4_K
                      : t == DType::Q8_0 ? DType::Q4_0 : t == DType::Q4_0 ? DType::Q4_1 : t == DType::Q4_1 ? DType::Q8_0
                      : DType::Q8_0;
    const int64_t rows2 = rows / 2 + 3;
    const std::vector<uint8_t> w2_bytes = make_weights(t, rows2, k);
    const Tensor w2 = store->matmul_weight(Tensor::matrix(t, k, rows2, (void *) w2_bytes.data()));
    std::vector<uint8_t> w3_bytes;
    Tensor w3;
    if (k % traits(other).block_size == 0) {
        w3_bytes = make_weights(other, 24, k);
        w3 = store->matmul_weight(Tensor::matrix(other, k, 24, (void *) w3_bytes.data()));
    }
    for (int threads : {1, 2}) {
        auto be = make_cpu_backend(threads);
        const int64_t n = 5;
        Tensor xb = Tensor::matrix(DType::F32, k, n, x.data());
        std::vector<float> g1((size_t) (n * rows)), g2((size_t) (n * rows2)), g3((size_t) (n * 24));
        std::vector<float> s2(g2.size()), s3(g3.size());
        Tensor y1 = Tensor::matrix(DType::F32, rows, n, g1.data()), y2 = Tensor::matrix(DType::F32, rows2, n, g2.data());
        Tensor y3 = Tensor::matrix(DType::F32, 24, n, g3.data());
        const MatmulOut group[3] = {{&w, &y1, &b}, {&w2, &y2, nullptr}, {&w3, &y3, nullptr}};
        be->matmul_group(xb, group, w3.data ? 3 : 2);
        Tensor z2 = Tensor::matrix(DType::F32, rows2, n, s2.data()), z3 = Tensor::matrix(DType::F32, 24, n, s3.data());
        be->matmul(w2, xb, z2, nullptr);
        if (w3.data) be->matmul(w3, xb, z3, nullptr);
        check(same_bits(g1.data(), alone.data(), n * rows) && same_bits(g2.data(), s2.data(), n * rows2) &&
                  (!w3.data || same_bits(g3.data(), s3.data(), n * 24)),
              format("matmul_group %s, %d threads: differs from matmul alone", traits(t).name, threads));
    }
    std::printf("  matmul %-5s %4lld x %-5lld %s\n", traits(t).name, (long long) rows, (long long) k,
                w.panels ? "panels" : "rows");
}

// A KV cache of n rows of n_head_kv heads (f16 or f32), filled from floats.
struct Cache {
    DType type;
    int64_t cols;
    std::vector<uint8_t> bytes;
    Tensor tensor(int64_t rows) { return Tensor::matrix(type, cols, rows, bytes.data()); }
    void store(Backend & be, const float * src, int64_t first, int64_t n) {
        Tensor s = Tensor::matrix(DType::F32, cols, n, (void *) src);
        Tensor c = tensor((int64_t) (bytes.size() / row_size(type, cols)));
        be.store_rows(s, c, first);
    }
};

// prefix 150: the batch crosses a 64-key block edge; kAttnChunkRows - 3: the CPU backend's chunk
// edge (its first queries see one chunk, the others two, merged); past twice that: three chunks.
// Returns the chain batch's output, for comparing thread counts.
std::vector<float> test_attention(bool f16, int threads, int64_t prefix) {
    const int n_head = 4, n_head_kv = 2, hd = 64;
    const int64_t q_dim = n_head * hd, kv_dim = n_head_kv * hd;
    const int64_t n_q = 6;
    rng().seed(7);  // the same cache and queries for every thread count
    const int64_t n_kv = prefix + n_q;
    const DType kv_type = f16 ? DType::F16 : DType::F32;
    std::vector<float> kf((size_t) (n_kv * kv_dim)), vf(kf.size()), q((size_t) (n_q * q_dim));
    for (auto & v : kf) v = normal();
    for (auto & v : vf) v = normal();
    for (auto & v : q) v = normal();
    auto be = make_cpu_backend(threads);
    Cache K{kv_type, kv_dim, std::vector<uint8_t>(row_size(kv_type, kv_dim) * (size_t) n_kv)};
    Cache V{kv_type, kv_dim, std::vector<uint8_t>(K.bytes.size())};
    K.store(*be, kf.data(), 0, n_kv);
    V.store(*be, vf.data(), 0, n_kv);

    AttentionParams p;
    p.n_head = n_head;
    p.n_head_kv = n_head_kv;
    p.head_dim = hd;
    p.scale = 1.0f / std::sqrt((float) hd);
    auto run = [&](Cache & k, Cache & v, const float * queries, int64_t nq, int64_t kv_rows, int64_t q_first,
                   const uint8_t * mask, float * out) {
        AttentionParams a = p;
        a.n_kv = kv_rows;
        a.q_first = q_first;
        a.mask = mask;
        Tensor qt = Tensor::matrix(DType::F32, q_dim, nq, (void *) queries);
        Tensor ot = Tensor::matrix(DType::F32, q_dim, nq, out);
        Tensor kt = k.tensor(kv_rows), vt = v.tensor(kv_rows);
        be->attention(qt, kt, vt, a, ot);
    };

    // chain: query i at cache row prefix + i sees rows [0, prefix + i]
    std::vector<float> batch((size_t) (n_q * q_dim)), one((size_t) q_dim);
    run(K, V, q.data(), n_q, n_kv, prefix, nullptr, batch.data());
    int chain_bad = 0;
    for (int64_t i = 0; i < n_q; i++) {
        run(K, V, q.data() + i * q_dim, 1, prefix + i + 1, prefix + i, nullptr, one.data());
        if (!same_bits(one.data(), batch.data() + i * q_dim, q_dim)) chain_bad++;
    }
    check(chain_bad == 0, format("attention %s, %d threads, %lld rows: %d chain queries differ from decoding alone",
                                 f16 ? "f16" : "f32", threads, (long long) prefix, chain_bad));
    const std::vector<float> chain = batch;

    // tree: node x (cache row prefix + x) sees the prefix, its ancestors and itself
    const int parent[n_q] = {-1, 0, 0, 1, 3, 2};
    std::vector<uint8_t> mask((size_t) (n_q * n_kv), 0);
    for (int x = 0; x < n_q; x++) {
        for (int64_t j = 0; j < prefix; j++) mask[x * n_kv + j] = 1;
        for (int a = x; a >= 0; a = parent[a]) mask[x * n_kv + prefix + a] = 1;
    }
    run(K, V, q.data(), n_q, n_kv, prefix, mask.data(), batch.data());
    int tree_bad = 0;
    for (int x = 0; x < n_q; x++) {
        std::vector<int> path;
        for (int a = x; a >= 0; a = parent[a]) path.insert(path.begin(), a);
        // the cache plain decoding of this path builds: the prefix, then the path's rows in order
        Cache Kp{kv_type, kv_dim, std::vector<uint8_t>(K.bytes.size())}, Vp{kv_type, kv_dim, std::vector<uint8_t>(K.bytes.size())};
        const size_t rb = row_size(kv_type, kv_dim);
        std::memcpy(Kp.bytes.data(), K.bytes.data(), rb * prefix);
        std::memcpy(Vp.bytes.data(), V.bytes.data(), rb * prefix);
        for (size_t i = 0; i < path.size(); i++) {
            std::memcpy(Kp.bytes.data() + rb * (prefix + i), K.bytes.data() + rb * (prefix + path[i]), rb);
            std::memcpy(Vp.bytes.data() + rb * (prefix + i), V.bytes.data() + rb * (prefix + path[i]), rb);
        }
        const int64_t rows = prefix + (int64_t) path.size();
        run(Kp, Vp, q.data() + x * q_dim, 1, rows, rows - 1, nullptr, one.data());
        if (!same_bits(one.data(), batch.data() + x * q_dim, q_dim)) tree_bad++;
    }
    check(tree_bad == 0, format("attention %s, %d threads, %lld rows: %d tree nodes differ from decoding their path alone",
                                f16 ? "f16" : "f32", threads, (long long) prefix, tree_bad));
    std::printf("  attention %s, %d thread(s), %lld rows\n", f16 ? "f16" : "f32", threads, (long long) prefix);
    return chain;
}

}  // namespace

int main(int argc, char ** argv) {
    (void) argc, (void) argv;
    std::printf("test_batch_invariance: kernels %s\n", simd_level());
    try {
        for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4_K,
                        DType::Q5_K, DType::Q6_K}) {
            const int64_t bs = traits(t).block_size == 1 ? 32 : traits(t).block_size;
            test_matmul(t, 37, 2 * bs);     // small: one thread does it all
            test_matmul(t, 30, 3 * bs);     // two panels, the second partial (read together at few rows)
            test_matmul(t, 203, 1024);      // large enough to be split over threads
        }
        for (bool f16 : {false, true}) {
            for (int64_t prefix : {(int64_t) 150, kAttnChunkRows - 3, 2 * kAttnChunkRows + 104}) {
                const std::vector<float> one_thread = test_attention(f16, 1, prefix);
                for (int threads : {2, 3}) {
                    check(same_bits(one_thread.data(), test_attention(f16, threads, prefix).data(), one_thread.size()),
                          format("attention %s, %lld rows: %d threads differ from 1", f16 ? "f16" : "f32", (long long) prefix, threads));
                }
            }
        }
    } catch (const std::exception & e) {
        std::fprintf(stderr, "FAIL: unexpected exception: %s\n", e.what());
        return 1;
    }
    return finish("test_batch_invariance");
}
