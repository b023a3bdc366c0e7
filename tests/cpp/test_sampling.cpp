// test_sampling.cpp - greedy and sampled token choice on NaN logits: an error, never token 0;
// argmax against its definition; top_probability against softmax in double.
// (NaN compares false, so a plain argmax over NaN logits answers index 0 and the text becomes
// "!!!!" without a word of warning.)

#include "common.h"
#include "sampling.h"
#include "test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace sparrow;
using namespace sparrow_test;

namespace {

bool throws_internal(const std::function<void()> & f) {
    try {
        f();
    } catch (const Error & e) {
        return e.status() == SPARROW_ERR_INTERNAL;
    }
    return false;
}

}  // namespace

int main() {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> logits = {0.5f, -1.0f, 3.0f, 3.0f, 2.0f};
    check(argmax(logits.data(), 5) == 2, "argmax: the first of equal maxima");
    sparrow_sampler_params greedy{}, sampled{};
    sampled.temperature = 0.7f;
    sampled.top_p = 1.0f;
    Rng rng(1);
    std::vector<TokenProb> scratch;
    check(sample_token(logits.data(), 5, greedy, rng, scratch) == 2, "greedy sampling is the argmax");

    std::vector<float> all_nan(5, nan);
    check(throws_internal([&] { argmax(all_nan.data(), 5); }), "argmax of NaN logits throws");
    check(throws_internal([&] { sample_token(all_nan.data(), 5, greedy, rng, scratch); }), "greedy on NaN logits throws");
    check(throws_internal([&] { sample_token(all_nan.data(), 5, sampled, rng, scratch); }), "sampling NaN logits throws");
    std::vector<float> first_nan = {nan, 1.0f, 2.0f, 0.0f, -1.0f};
    check(throws_internal([&] { argmax(first_nan.data(), 5); }), "a NaN where the scan starts throws too");
    for (const int32_t n : {9, 16, 17, 49152}) {  // a NaN anywhere, in the vector part or the tail
        for (const int32_t at : {1, n / 2, n - 1}) {
            std::vector<float> v((size_t) n, 0.5f);
            v[(size_t) at] = nan;
            check(throws_internal([&] { argmax(v.data(), n); }), "a NaN anywhere throws (n " + std::to_string(n) + ")");
        }
    }

    // against the definition (the first index of the largest), on lengths with tails, few distinct
    // values (ties everywhere), -inf, both zeros, and the maximum first, last or inside
    std::mt19937 gen(5);
    const float inf = std::numeric_limits<float>::infinity();
    int agree = 0, cases = 0;
    for (const int32_t n : {1, 2, 7, 8, 9, 15, 16, 17, 31, 100, 8192, 49152}) {
        for (int trial = 0; trial < 40; trial++) {
            std::vector<float> v((size_t) n);
            const int kind = trial % 4;
            std::uniform_int_distribution<int> small(-3, 3);
            std::normal_distribution<float> normal(0.0f, 4.0f);
            for (auto & x : v) {
                x = kind == 0 ? normal(gen) : kind == 1 ? (float) small(gen) : kind == 2 ? (small(gen) < 0 ? -inf : -0.0f) : 0.0f;
            }
            if (kind == 3 && n > 1) v[(size_t) (gen() % (uint32_t) n)] = -0.0f;  // +0 and -0 tie
            if (trial % 5 == 4) v[(size_t) (trial % 2 ? 0 : n - 1)] = 100.0f;  // the maximum at an end
            int32_t want = 0;
            for (int32_t i = 1; i < n; i++) {
                if (v[(size_t) i] > v[(size_t) want]) want = i;
            }
            agree += argmax(v.data(), n) == want;
            cases++;
        }
    }
    check(agree == cases, "argmax agrees with the first index of the largest (" + std::to_string(agree) + " of " +
                              std::to_string(cases) + ")");
    std::vector<float> all_minus_inf(20, -inf);
    check(argmax(all_minus_inf.data(), 20) == 0, "argmax of all -inf is 0");

    // top_probability = softmax(v)[argmax] within 1e-6 (relative), on peaked and flat logits,
    // spreads of 0.01 to 40 (the floor at 30 below the top), -inf, ties at the top, tails
    double worst = 0.0;
    for (const int32_t n : {1, 3, 4, 5, 17, 100, 8192, 49152}) {
        for (int trial = 0; trial < 24; trial++) {
            const float spread = std::vector<float>{0.01f, 0.5f, 2.0f, 6.0f, 15.0f, 40.0f}[(size_t) (trial % 6)];
            std::normal_distribution<float> normal(0.0f, spread);
            std::vector<float> v((size_t) n);
            for (auto & x : v) x = normal(gen);
            if (trial % 4 == 1 && n > 2) v[(size_t) (gen() % (uint32_t) n)] = -inf;
            if (trial % 4 == 2) v[(size_t) (gen() % (uint32_t) n)] += 8.0f;  // one clear favourite
            const int32_t top = argmax(v.data(), n);
            if (trial % 4 == 3 && n > 1) v[(size_t) (top == 0 ? n - 1 : 0)] = v[(size_t) top];  // a tie at the top
            double sum = 0.0;
            for (const float x : v) sum += std::exp((double) x - (double) v[(size_t) top]);
            const double want = 1.0 / sum, got = top_probability(v.data(), n, top);
            worst = std::max(worst, std::fabs(got - want) / want);
        }
    }
    char worst_text[32];
    std::snprintf(worst_text, sizeof worst_text, "%.2g", worst);
    check(worst < 1e-6, std::string("top_probability is softmax at the argmax (worst relative error ") + worst_text + ")");
    return finish("test_sampling");
}
