// bench_quant.cpp - matrix-vector product speed of each weight type, one thread: the dispatched
// (SIMD) vec_dot against the scalar reference in the same run, reported as GB/s of weight bytes
// read. Decode is bound by these bytes, so GB/s near the machine's streaming-read bandwidth
// (printed first, as the baseline) means the kernel keeps up with memory.
//
// Built by CMake with the tests (build/bench_quant); run it under SPARROW_SIMD=avx2 to compare
// kernel levels:
//   bench_quant [rows cols]      (default 4096 4096)
//
// A second table times mul_mat with 1, 2, 4, 8 and 16 activation rows (decode, verify batches)
// as weight GB/s and as time relative to one row: a batch of k should cost far less than k.
//
// Each type gets enough copies of the matrix to exceed 128 MiB, cycled through, so the weights
// come from DRAM as at decode time rather than from the last-level cache.

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

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

volatile float g_sink;  // keeps results alive

// One matrix of the type: quantized from random floats where a quantizer exists, random bytes
// with small finite scales for the k-quants (the kernels' speed does not depend on values).
std::vector<uint8_t> make_matrix(DType t, int64_t rows, int64_t cols, std::mt19937 & rng) {
    const size_t row_bytes = row_size(t, cols);
    std::vector<uint8_t> m(row_bytes * (size_t) rows);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    if (t == DType::Q4_K || t == DType::Q5_K || t == DType::Q6_K) {
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
    for (int64_t r = 0; r < rows; r++) {
        for (auto & v : row) v = normal(rng);
        ref::quantize_row(t, row.data(), m.data() + (size_t) r * row_bytes, cols);
    }
    return m;
}

// Streaming-read baseline: sum the buffer as 64-bit words, four independent sums so the loop
// is limited by loads, not by the add chain.
double read_bandwidth(const std::vector<std::vector<uint8_t>> & copies, int passes) {
    double best = 0.0;
    for (int p = 0; p < passes; p++) {
        const std::vector<uint8_t> & m = copies[(size_t) p % copies.size()];
        const auto t0 = Clock::now();
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        const uint64_t * words = (const uint64_t *) m.data();
        for (size_t i = 0; i + 4 <= m.size() / 8; i += 4) {
            s0 += words[i], s1 += words[i + 1], s2 += words[i + 2], s3 += words[i + 3];
        }
        const double dt = seconds_since(t0);
        g_sink = (float) (s0 + s1 + s2 + s3);
        best = std::max(best, m.size() / dt / 1e9);
    }
    return best;
}

// Best GB/s over `passes` full matrix-vector products, each on the next copy of the matrix.
template <typename Dot>
double matvec_bandwidth(DType t, const std::vector<std::vector<uint8_t>> & copies, const std::vector<uint8_t> & x,
                        int64_t rows, int64_t cols, int passes, Dot dot) {
    const size_t row_bytes = row_size(t, cols);
    std::vector<float> y((size_t) rows);
    double best = 0.0;
    for (int p = 0; p < passes; p++) {
        const uint8_t * m = copies[(size_t) p % copies.size()].data();
        const auto t0 = Clock::now();
        for (int64_t r = 0; r < rows; r++) y[(size_t) r] = dot(t, cols, m + (size_t) r * row_bytes, x.data());
        const double dt = seconds_since(t0);
        g_sink = y[0];
        best = std::max(best, (double) row_bytes * rows / dt / 1e9);
    }
    return best;
}

}  // namespace

int main(int argc, char ** argv) {
    const int64_t rows = argc > 2 ? atoll(argv[1]) : 4096;
    const int64_t cols = argc > 2 ? atoll(argv[2]) : 4096;
    if (cols % QK_K != 0) {
        std::fprintf(stderr, "cols must be a multiple of %lld\n", (long long) QK_K);
        return 1;
    }
    std::mt19937 rng(42);
    std::printf("bench_quant: %lld x %lld matrix-vector product, 1 thread, kernels %s\n", (long long) rows,
                (long long) cols, simd_level());

    const DType types[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0,
                           DType::Q4_1, DType::Q4_K, DType::Q5_K, DType::Q6_K};
    const size_t min_working_set = (size_t) 128 << 20;
    bool printed_baseline = false;
    std::printf("%-6s %10s %12s %14s %8s\n", "type", "MiB/matrix", "SIMD GB/s", "scalar GB/s", "ratio");
    for (DType t : types) {
        const size_t bytes = row_size(t, cols) * (size_t) rows;
        const size_t n_copies = std::max<size_t>(2, (min_working_set + bytes - 1) / bytes);
        std::vector<std::vector<uint8_t>> copies;
        copies.push_back(make_matrix(t, rows, cols, rng));
        for (size_t c = 1; c < n_copies; c++) copies.push_back(copies[0]);
        if (!printed_baseline) {
            std::printf("%-6s %10s %12.2f   (streaming read of the same buffers)\n", "read", "", read_bandwidth(copies, 8));
            printed_baseline = true;
        }

        std::vector<float> xf((size_t) cols);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (auto & v : xf) v = normal(rng);
        const DType dt = traits(t).dot_type;
        std::vector<uint8_t> x(row_size(dt, cols));
        quantize_row(dt, xf.data(), x.data(), cols);

        const int simd_passes = (int) std::max<size_t>(8, 2 * n_copies);
        const double simd = matvec_bandwidth(t, copies, x, rows, cols, simd_passes,
                                             [](DType tt, int64_t n, const void * w, const void * xx) { return vec_dot(tt, n, w, xx); });
        const double scalar = matvec_bandwidth(t, copies, x, rows, cols, 3, [](DType tt, int64_t n, const void * w, const void * xx) {
            return ref::vec_dot(tt, n, w, xx);
        });
        std::printf("%-6s %10.1f %12.2f %14.2f %7.1fx\n", traits(t).name, bytes / 1048576.0, simd, scalar, simd / scalar);
    }

    std::printf("\nmul_mat, 1 thread: weight GB/s with k activation rows (time relative to k = 1)\n%-6s", "type");
    const int batches[] = {1, 2, 4, 8, 16};
    for (int k : batches) std::printf("  %13s", ("k=" + std::to_string(k)).c_str());
    std::printf("\n");
    for (DType t : types) {
        const size_t row_bytes = row_size(t, cols), bytes = row_bytes * (size_t) rows;
        const size_t n_copies = std::max<size_t>(2, (min_working_set + bytes - 1) / bytes);
        std::vector<std::vector<uint8_t>> copies(n_copies, make_matrix(t, rows, cols, rng));
        const DType dt = traits(t).dot_type;
        const size_t x_row = row_size(dt, cols);
        std::vector<float> xf((size_t) cols);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<uint8_t> x(x_row * 16);
        for (int c = 0; c < 16; c++) {
            for (auto & v : xf) v = normal(rng);
            quantize_row(dt, xf.data(), x.data() + c * x_row, cols);
        }
        std::vector<float> y((size_t) rows * 16);
        std::printf("%-6s", traits(t).name);
        double t1 = 0.0;
        for (int k : batches) {
            double best = 1e30;
            for (size_t p = 0; p < std::max<size_t>(6, 2 * n_copies); p++) {
                const auto t0 = Clock::now();
                mul_mat(t, cols, copies[p % n_copies].data(), row_bytes, rows, x.data(), x_row, k, y.data(), rows);
                best = std::min(best, seconds_since(t0));
            }
            g_sink = y[0];
            if (k == 1) t1 = best;
            std::printf("  %6.2f (%4.2fx)", bytes / best / 1e9, best / t1);
        }
        std::printf("\n");
    }
    return 0;
}
