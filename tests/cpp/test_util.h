// test_util.h - what the kernel and runtime tests share: failure counting, a seeded generator and
// weights of every type.
#pragma once

#include "quant.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace sparrow_test {

inline int g_failures = 0;

// Records a failure (the first 30 are printed) without stopping the test.
inline void check(bool ok, const std::string & what) {
    if (ok) return;
    if (g_failures < 30) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    g_failures++;
}

// The exit status of a test program, with its summary line.
inline int finish(const char * name) {
    if (g_failures) {
        std::fprintf(stderr, "%s: %d failure(s)\n", name, g_failures);
        return 1;
    }
    std::printf("%s: all passed\n", name);
    return 0;
}

inline std::mt19937_64 & rng() {
    static std::mt19937_64 r(777);
    return r;
}
inline float normal() { return std::normal_distribution<float>(0.0f, 1.0f)(rng()); }
inline int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng()); }

// A rows x k matrix of type t: quantized from normal floats where a quantizer exists, otherwise
// random bytes with sane fp16 scales (every k-quant bit pattern is a valid block).
inline std::vector<uint8_t> make_weights(sparrow::DType t, int64_t rows, int64_t k) {
    using namespace sparrow;
    const size_t rb = row_size(t, k);
    std::vector<uint8_t> w(rb * (size_t) rows);
    if (t != DType::Q4_K && t != DType::Q5_K && t != DType::Q6_K) {
        std::vector<float> f((size_t) k);
        for (int64_t r = 0; r < rows; r++) {
            for (auto & v : f) v = normal();
            ref::quantize_row(t, f.data(), w.data() + r * rb, k);
        }
        return w;
    }
    for (auto & b : w) b = (uint8_t) rng()();
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < k / QK_K; i++) {
            uint8_t * blk = w.data() + r * rb + i * traits(t).type_size;
            if (t == DType::Q6_K) {
                ((BlockQ6_K *) blk)->d = fp32_to_fp16(0.01f * normal());
            } else {  // q4_K / q5_K start with d, dmin
                ((uint16_t *) blk)[0] = fp32_to_fp16(0.01f * std::fabs(normal()));
                ((uint16_t *) blk)[1] = fp32_to_fp16(0.01f * std::fabs(normal()));
            }
        }
    }
    return w;
}

}  // namespace sparrow_test
