// test_sampling.cpp - greedy and sampled token choice on NaN logits: an error, never token 0.
// (NaN compares false, so a plain argmax over NaN logits answers index 0 and the text becomes
// "!!!!" without a word of warning.)

#include "common.h"
#include "sampling.h"
#include "test_util.h"

#include <cmath>
#include <functional>
#include <limits>
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
    return finish("test_sampling");
}
