// bench_quant.cpp - matrix products of each weight type through the CPU backend (weights in the
// store's form: panels where the type has them), against the machine's streaming-read bandwidth
// measured in the same run with the same threads.
//
// Decode is bound by weight bytes, so the first number per type (GB/s of weights at one
// activation row) should approach the read baseline; the others (time of k activation rows
// relative to one) say what a verify batch or a prefill chunk costs.
//
// Built by CMake with the tests (build/bench_quant); run it under SPARROW_SIMD=avx2 to compare
// kernel levels:
//   bench_quant [rows cols [threads...]]      (default 4096 4096, threads 1 2)
//   bench_quant model [threads...]            (SmolLM2-135M's products in a decode's order, below)
// SPARROW_BENCH_TYPES=f32,f16 measures only the types named; SPARROW_BENCH_CACHED=1 one copy of
// the matrix, so a small one stays in cache; SPARROW_BENCH_ROWS=3 gives `model` a verify of 3
// rows instead of 6 (its cost by chain length).
//
// Each type gets enough copies of the matrix to exceed 1 GiB, cycled through, so the weights
// come from DRAM as at decode time rather than from the last-level cache.
//
// To compare two versions of a kernel, build both and alternate processes (or libraries under
// the same script): a run-time switch inside a kernel changes the code of both arms (q8_0's
// one-row prefetches looked 4-13% faster switched in one process and were slower built apart).

#include "backend.h"
#include "bench_util.h"
#include "cpu/huge_pages.h"
#include "cpu/threadpool.h"
#include "quant.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace sparrow;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

volatile uint64_t g_sink;  // keeps results alive

std::vector<uint8_t> make_matrix(DType t, int64_t rows, int64_t cols, std::mt19937 & rng) {
    const size_t row_bytes = row_size(t, cols);
    std::vector<uint8_t> m(row_bytes * (size_t) rows);
    if (t == DType::Q4_K || t == DType::Q5_K || t == DType::Q6_K) {  // random blocks, small scales
        for (auto & b : m) b = (uint8_t) rng();
        const size_t block = traits(t).type_size;
        const uint16_t scale = fp32_to_fp16(0.001f);
        for (size_t off = 0; off < m.size(); off += block) {
            if (t == DType::Q6_K) {
                std::memcpy(&m[off + offsetof(BlockQ6_K, d)], &scale, 2);
            } else {
                std::memcpy(&m[off], &scale, 2);
                std::memcpy(&m[off + 2], &scale, 2);
            }
        }
        return m;
    }
    std::vector<float> row((size_t) cols);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int64_t r = 0; r < rows; r++) {
        for (auto & v : row) v = normal(rng);
        ref::quantize_row(t, row.data(), m.data() + (size_t) r * row_bytes, cols);
    }
    return m;
}

// OR of the bytes in [p, p + n), four chains of the widest loads the CPU has: limited by
// memory, not by arithmetic.
#if defined(__x86_64__)
__attribute__((target("avx512f"))) uint64_t read_span_512(const uint8_t * p, size_t n) {
    __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
    for (size_t i = 0; i + 256 <= n; i += 256) {
        a = _mm512_or_si512(a, _mm512_loadu_si512(p + i));
        b = _mm512_or_si512(b, _mm512_loadu_si512(p + i + 64));
        c = _mm512_or_si512(c, _mm512_loadu_si512(p + i + 128));
        d = _mm512_or_si512(d, _mm512_loadu_si512(p + i + 192));
    }
    return (uint64_t) _mm512_reduce_or_epi64(_mm512_or_si512(_mm512_or_si512(a, b), _mm512_or_si512(c, d)));
}
__attribute__((target("avx2"))) uint64_t read_span_256(const uint8_t * p, size_t n) {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    for (size_t i = 0; i + 128 <= n; i += 128) {
        a = _mm256_or_si256(a, _mm256_loadu_si256((const __m256i *) (p + i)));
        b = _mm256_or_si256(b, _mm256_loadu_si256((const __m256i *) (p + i + 32)));
        c = _mm256_or_si256(c, _mm256_loadu_si256((const __m256i *) (p + i + 64)));
        d = _mm256_or_si256(d, _mm256_loadu_si256((const __m256i *) (p + i + 96)));
    }
    const __m256i s = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
    return (uint64_t) _mm256_extract_epi64(s, 0) | (uint64_t) _mm256_extract_epi64(s, 3);
}
uint64_t read_span(const uint8_t * p, size_t n) {
    static const bool wide = __builtin_cpu_supports("avx512f");
    return wide ? read_span_512(p, n) : read_span_256(p, n);
}
#else
uint64_t read_span(const uint8_t * p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i + 8 <= n; i += 8) {
        uint64_t v;
        std::memcpy(&v, p + i, 8);
        s |= v;
    }
    return s;
}
#endif

// Seconds for `threads` threads to stream-read n bytes of buf from `offset` (each its share).
double read_seconds(const uint8_t * buf, size_t offset, size_t n, int threads) {
    std::vector<std::thread> pool;
    std::vector<uint64_t> out((size_t) threads);
    const size_t share = n / threads / 256 * 256;
    const auto t0 = Clock::now();
    for (int i = 0; i < threads; i++) {
        pool.emplace_back([&, i] { out[(size_t) i] = read_span(buf + offset + share * i, share); });
    }
    for (auto & t : pool) t.join();
    const double dt = seconds_since(t0);
    for (uint64_t v : out) g_sink = g_sink ^ v;
    return dt * n / (share * threads);
}

std::string format_line(const char * fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format_line(const char * fmt, ...) {
    char buf[256];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof buf, fmt, args);
    va_end(args);
    return buf;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// SPARROW_BENCH_TYPES: a comma-separated list of type names (all when unset)
bool type_wanted(DType t) {
    const char * list = std::getenv("SPARROW_BENCH_TYPES");
    if (list == nullptr) return true;
    const std::string names = std::string(",") + list + ",";
    return names.find(std::string(",") + traits(t).name + ",") != std::string::npos;
}

// bench_quant model: a decode's and a verify's products as a model runs them, SmolLM2-135M's
// shapes (30 layers of q/k/v as one group, o, gate/up as one group, down; the tied 49,152-row
// head), each layer its own weights (~270 MB in f16, from DRAM as in the model), one activation
// row against 6 (a verify of 5 drafts), passes alternating, medians. The model's verify costs
// more than bench_quant's single matrix says when memory is fast: 6 rows stream at a rate of
// their own, below both one row's and their in-cache arithmetic's (Zen 5, fast-memory state: 75
// GB/s at one row, 52-55 at six in f16 and bf16 alike, which run six rows from cache at 67 and 96).
int bench_model(const std::vector<int> & thread_counts) {
    constexpr int kLayers = 30, kDim = 576, kKv = 192, kFfn = 1536, kVocab = 49152, kPasses = 30;
    const char * rows_env = std::getenv("SPARROW_BENCH_ROWS");  // a verify's rows (default 6: 5 drafts)
    const int verify_rows = rows_env != nullptr && atoi(rows_env) > 0 ? std::min(atoi(rows_env), 64) : 6;
    const DType types[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1};
    std::printf("# %s; bench_quant model: SmolLM2-135M's products, %d layers + head; kernels %s\n",
                bench::cpu_model().c_str(), kLayers, simd_level());
    std::printf("threads  type   1 row ms  GB/s   %d rows ms  GB/s   %d rows / 1 (paired)\n", verify_rows, verify_rows);
    std::mt19937 rng(7);
    for (const int threads : thread_counts) {
        auto be = make_cpu_backend(threads);
        for (const DType t : types) {
            if (!type_wanted(t)) continue;
            auto store = make_cpu_weight_store(false);
            std::vector<std::vector<uint8_t>> bytes;
            double total_bytes = 0.0;
            auto weight = [&](int64_t rows, int64_t cols) {
                bytes.push_back(make_matrix(t, rows, cols, rng));
                total_bytes += (double) bytes.back().size();
                return store->matmul_weight(Tensor::matrix(t, cols, rows, bytes.back().data()));
            };
            struct Layer { Tensor q, k, v, o, gate, up, down; };
            std::vector<Layer> layers;
            for (int l = 0; l < kLayers; l++) {
                Layer L{weight(kDim, kDim), weight(kKv, kDim), weight(kKv, kDim), weight(kDim, kDim),
                        weight(kFfn, kDim), weight(kFfn, kDim), weight(kDim, kFfn)};
                layers.push_back(L);
            }
            const Tensor head = weight(kVocab, kDim);
            std::vector<float> x((size_t) kFfn * verify_rows), out((size_t) kVocab * verify_rows);
            std::normal_distribution<float> normal(0.0f, 1.0f);
            for (auto & v : x) v = normal(rng);
            auto pass = [&](int n) {  // outputs overwrite one buffer: only the products' time counts
                const Tensor xd = Tensor::matrix(DType::F32, kDim, n, x.data()), xf = Tensor::matrix(DType::F32, kFfn, n, x.data());
                Tensor yd = Tensor::matrix(DType::F32, kDim, n, out.data()), ykv = Tensor::matrix(DType::F32, kKv, n, out.data());
                Tensor ykv2 = ykv, yd2 = yd, yf = Tensor::matrix(DType::F32, kFfn, n, out.data()), yf2 = yf;
                Tensor yh = Tensor::matrix(DType::F32, kVocab, n, out.data());
                const auto t0 = Clock::now();
                for (const Layer & L : layers) {
                    const MatmulOut qkv[3] = {{&L.q, &yd, nullptr}, {&L.k, &ykv, nullptr}, {&L.v, &ykv2, nullptr}};
                    be->matmul_group(xd, qkv, 3);
                    be->matmul(L.o, xd, yd2, nullptr);
                    const MatmulOut gate_up[2] = {{&L.gate, &yf, nullptr}, {&L.up, &yf2, nullptr}};
                    be->matmul_group(xd, gate_up, 2);
                    be->matmul(L.down, xf, yd, nullptr);
                }
                be->matmul(head, xd, yh, nullptr);
                return seconds_since(t0);
            };
            for (int i = 0; i < 5; i++) pass(1);  // the workers settle on their cores
            std::vector<double> one, many, ratio;
            for (int i = 0; i < kPasses; i++) {
                one.push_back(pass(1));
                many.push_back(pass(verify_rows));
                ratio.push_back(many.back() / one.back());
            }
            const double t1 = median(one), tn = median(many);
            std::printf("%7d  %-5s  %9.3f  %5.1f   %9.3f  %5.1f   %.3f\n", threads, traits(t).name, t1 * 1e3,
                        total_bytes / t1 / 1e9, tn * 1e3, total_bytes / tn / 1e9, median(ratio));
        }
    }
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc > 1 && std::string(argv[1]) == "model") {
        std::vector<int> thread_counts;
        for (int i = 2; i < argc; i++) thread_counts.push_back(atoi(argv[i]));
        if (thread_counts.empty()) thread_counts = {1, 2};
        return bench_model(thread_counts);
    }
    const int64_t rows = argc > 2 ? atoll(argv[1]) : 4096;
    const int64_t cols = argc > 2 ? atoll(argv[2]) : 4096;
    std::vector<int> thread_counts;
    for (int i = 3; i < argc; i++) thread_counts.push_back(atoi(argv[i]));
    if (thread_counts.empty()) thread_counts = {1, 2};
    if (cols % 32 != 0) {
        std::fprintf(stderr, "cols must be a multiple of 32 (of %lld for the k-quants)\n", (long long) QK_K);
        return 1;
    }
    std::mt19937 rng(42);
    const size_t min_working_set = (size_t) 1 << 30;  // well past any last-level cache (260 MiB seen)
    // the read baseline streams from huge pages, as the store's weights do (cpu/huge_pages.h)
    StreamedArena big_memory;
    uint8_t * big = (uint8_t *) big_memory.alloc(min_working_set);
    if (!big) return 1;
    std::memset(big, 1, min_working_set);
    const DType types[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0,
                           DType::Q4_1, DType::Q4_K, DType::Q5_K, DType::Q6_K};
    const int batches[] = {1, 2, 3, 4, 6, 8, 16};

    std::printf("# %s; bench_quant: %lld x %lld weights, kernels %s\n", bench::cpu_model().c_str(), (long long) rows,
                (long long) cols, simd_level());
    // What a parallel op pays to start and join its threads (a decode step runs ~5 per layer).
    for (int threads : thread_counts) {
        if (threads < 2) continue;
        ThreadPool pool(threads);
        std::atomic<int64_t> sink{0};
        const int n = 200000;
        pool.run([&](int ith, int) { sink += ith; });  // wake the workers
        const auto t0 = Clock::now();
        for (int i = 0; i < n; i++) pool.run([&](int ith, int) { sink += ith; });
        std::printf("thread pool, %d threads: %.2f us per dispatch (empty job)\n", threads, seconds_since(t0) / n * 1e6);
    }
    // The machine's bandwidth drifts (other tenants, frequency): the read baseline is measured
    // before and after each thread count's table, and the kernels' medians are set against both.
    for (int threads : thread_counts) {
        auto be = make_cpu_backend(threads);
        auto read_gbs = [&] {
            std::vector<double> v;
            for (int i = 0; i < 5; i++) v.push_back(min_working_set / read_seconds(big, 0, min_working_set, threads) / 1e9);
            return median(v);
        };
        const double read_before = read_gbs();
        std::vector<std::string> lines;
        std::vector<double> k1_gbs;
        for (DType t : types) {
            // a model's shapes (SmolLM2's 576 columns) leave out the types whose blocks do not fit
            if (!type_wanted(t) || cols % traits(t).block_size != 0) continue;
            const size_t bytes = row_size(t, cols) * (size_t) rows;
            // SPARROW_BENCH_CACHED=1: one copy, so a small matrix stays in cache (kernel compute speed)
            const size_t n_copies = getenv("SPARROW_BENCH_CACHED") ? 1 : std::max<size_t>(2, (min_working_set + bytes - 1) / bytes);
            const std::vector<uint8_t> matrix = make_matrix(t, rows, cols, rng);
            std::vector<std::vector<uint8_t>> copies(n_copies, matrix);
            auto store = make_cpu_weight_store(false);
            std::vector<Tensor> w;
            for (auto & c : copies) w.push_back(store->matmul_weight(Tensor::matrix(t, cols, rows, c.data())));
            if (w[0].panels) copies.clear();  // the store holds what the backend reads

            std::vector<float> x((size_t) cols * 16), y((size_t) rows * 16);
            std::normal_distribution<float> normal(0.0f, 1.0f);
            for (auto & v : x) v = normal(rng);
            std::string line = format_line("%-6s", traits(t).name);
            double t1 = 0.0;
            // A new pool's worker can start on its caller's core and wait for the scheduler to
            // move it (the first calls ran at a tenth of the speed): run untimed until that passed.
            {
                Tensor xt = Tensor::matrix(DType::F32, cols, 1, x.data()), yt = Tensor::matrix(DType::F32, rows, 1, y.data());
                for (const auto t0 = Clock::now(); seconds_since(t0) < 0.2;) be->matmul(w[0], xt, yt, nullptr);
            }
            for (int k : batches) {
                std::vector<double> times;
                Tensor xt = Tensor::matrix(DType::F32, cols, k, x.data()), yt = Tensor::matrix(DType::F32, rows, k, y.data());
                for (size_t p = 0; p < std::max<size_t>(9, 2 * n_copies + 1); p++) {
                    const auto t0 = Clock::now();
                    be->matmul(w[p % n_copies], xt, yt, nullptr);
                    times.push_back(seconds_since(t0));
                }
                if (k == 1) {
                    t1 = median(times);
                    k1_gbs.push_back(bytes / t1 / 1e9);
                    line += format_line(" %8.2f %%READ%%", k1_gbs.back());
                } else {
                    line += format_line("  %7.2f", median(times) / t1);
                }
            }
            lines.push_back(line + (w[0].panels ? "  (panels)" : "  (rows)"));
        }
        const double read_after = read_gbs(), read = 0.5 * (read_before + read_after);
        std::printf("\n%d thread(s): streaming read %.1f GB/s before, %.1f after\n%-6s %8s %7s", threads, read_before,
                    read_after, "type", "k=1 GB/s", "/ read");
        for (int k : batches) {
            if (k > 1) std::printf("  %7s", ("t(" + std::to_string(k) + ")/t(1)").c_str());
        }
        std::printf("\n");
        for (size_t i = 0; i < lines.size(); i++) {
            std::string l = lines[i];
            l.replace(l.find("%READ%"), 6, format_line("%6.0f%%", 100.0 * k1_gbs[i] / read));
            std::printf("%s\n", l.c_str());
        }
    }
    return 0;
}
