// bench_attention.cpp - the attention op of the CPU backend at long contexts: a decode (one query)
// and a verify batch (several causal queries) over an f16 KV cache of n_kv rows, per layer, with
// as many layers' caches as the model has (cycled, so the cache is read from wherever a real
// model's would be: the last-level cache or DRAM).
//
// Printed per context length: milliseconds per layer for one query and for the verify batch,
// their ratio (what a verify's attention costs in decodes' attention: 1.0 would be one read of the
// cache for all queries, with compute hidden under it), and the KV bytes read per second by the
// decode.
//
// Built by CMake with the tests (build/bench_attention):
//   bench_attention [model [threads...]]      model: qwen2-0.5b (default), qwen2-7b or smollm2-135m (the real
//                                             pair's target, bench/bench_real_pair.py); threads 1 2;
//                                             SPARROW_BENCH_LENGTHS=256,1024 picks the context lengths

#include "backend.h"
#include "bench_util.h"
#include "quant.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace sparrow;

namespace {

using Clock = std::chrono::steady_clock;

struct Shape {
    const char * name;
    int n_layer, n_head, n_head_kv, head_dim;
};

double ms_per_layer(Backend & be, const Shape & s, std::vector<Tensor> & k, std::vector<Tensor> & v, Tensor & q,
                    Tensor & out, int64_t n_kv, int64_t n_q, int reps) {
    AttentionParams p;
    p.n_head = s.n_head;
    p.n_head_kv = s.n_head_kv;
    p.head_dim = s.head_dim;
    p.scale = 1.0f / std::sqrt((float) s.head_dim);
    p.n_kv = n_kv;
    p.q_first = n_kv - n_q;
    Tensor qn = q.row_slice(0, n_q), on = out.row_slice(0, n_q);
    std::vector<double> times;
    for (int r = 0; r < reps; r++) {
        const auto t0 = Clock::now();
        for (int l = 0; l < s.n_layer; l++) {
            Tensor kl = k[(size_t) l], vl = v[(size_t) l];
            be.attention(qn, kl, vl, p, on);
        }
        times.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / s.n_layer);
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

}  // namespace

int main(int argc, char ** argv) {
    const std::string model = argc > 1 ? argv[1] : "qwen2-0.5b";
    const Shape shape = model == "qwen2-7b"       ? Shape{"Qwen2-7B", 28, 28, 4, 128}
                        : model == "smollm2-135m" ? Shape{"SmolLM2-135M", 30, 9, 3, 64}
                                                  : Shape{"Qwen2-0.5B", 24, 14, 2, 64};
    std::vector<int> threads;
    for (int i = 2; i < argc; i++) threads.push_back(std::atoi(argv[i]));
    if (threads.empty()) threads = {1, 2};
    // SPARROW_BENCH_LENGTHS=256,1024 measures those context lengths only (and fills only as much cache)
    std::vector<int64_t> lengths = {256, 1024, 4096, 16384, 25600};
    if (const char * list = std::getenv("SPARROW_BENCH_LENGTHS")) {
        lengths.clear();
        for (const char * p = list; *p;) {
            char * end = nullptr;
            const long long n = std::strtoll(p, &end, 10);
            if (end == p || n < 5 || n > (1 << 20)) {  // at least the verify batch
                std::fprintf(stderr, "SPARROW_BENCH_LENGTHS: expected lengths 5..1048576 separated by commas, got \"%s\"\n", list);
                return 2;
            }
            lengths.push_back(n);
            p = *end == ',' ? end + 1 : end;
        }
    }
    const int64_t max_kv = *std::max_element(lengths.begin(), lengths.end()), n_verify = 5;
    const int64_t kv_cols = (int64_t) shape.n_head_kv * shape.head_dim, q_cols = (int64_t) shape.n_head * shape.head_dim;

    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    // the caches from the backend's allocator, as the runtime's KV cache
    auto memory = make_cpu_backend(1);
    std::vector<Tensor> k, v;
    for (int l = 0; l < shape.n_layer; l++) {
        for (auto * list : {&k, &v}) {
            Tensor t = Tensor::matrix(DType::F16, kv_cols, max_kv, nullptr);
            t.data = memory->alloc(t.nbytes());
            uint16_t * d = (uint16_t *) t.data;
            for (int64_t i = 0; i < max_kv * kv_cols; i++) d[i] = fp32_to_fp16(normal(rng));
            list->push_back(t);
        }
    }
    std::vector<float> q_data((size_t) (n_verify * q_cols)), out_data(q_data.size());
    for (auto & x : q_data) x = normal(rng);
    Tensor q = Tensor::matrix(DType::F32, q_cols, n_verify, q_data.data());
    Tensor out = Tensor::matrix(DType::F32, q_cols, n_verify, out_data.data());

    std::printf("# %s; attention, %s shapes (%d layers, %d/%d heads, head_dim %d), f16 KV; ms per layer, medians\n",
                bench::cpu_model().c_str(), shape.name, shape.n_layer, shape.n_head, shape.n_head_kv, shape.head_dim);
    std::printf("%7s %7s %12s %14s %10s %12s\n", "threads", "n_kv", "decode ms", "verify-5 ms", "ratio", "KV GB/s");
    for (int nt : threads) {
        auto be = make_cpu_backend(nt);
        for (int64_t n_kv : lengths) {
            const int reps = n_kv >= 16384 ? 5 : 11;
            ms_per_layer(*be, shape, k, v, q, out, n_kv, 1, 1);  // warm up
            const double dec = ms_per_layer(*be, shape, k, v, q, out, n_kv, 1, reps);
            const double ver = ms_per_layer(*be, shape, k, v, q, out, n_kv, n_verify, reps);
            const double kv_bytes = 2.0 * (double) n_kv * (double) kv_cols * 2.0;
            std::printf("%7d %7lld %12.3f %14.3f %10.2f %12.1f\n", nt, (long long) n_kv, dec, ver, ver / dec,
                        kv_bytes / (dec * 1e-3) / 1e9);
        }
    }
    for (auto * list : {&k, &v}) {
        for (Tensor & t : *list) memory->free(t.data);
    }
    return 0;
}
