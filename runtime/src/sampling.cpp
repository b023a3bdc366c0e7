// sampling.cpp - see sampling.h.
#include "sampling.h"

#include "common.h"

#include <algorithm>
#include <cmath>

namespace sparrow {

void validate_sampler_params(const sparrow_sampler_params & p) {
    if (!std::isfinite(p.temperature) || p.temperature < 0.0f) {
        fail(SPARROW_ERR_INVALID_ARGUMENT, format("temperature must be a finite number >= 0 (got %g)", p.temperature));
    }
    if (p.top_k < 0) fail(SPARROW_ERR_INVALID_ARGUMENT, format("top_k must be >= 0 (got %d)", p.top_k));
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
        fail(SPARROW_ERR_INVALID_ARGUMENT, format("top_p must be in (0, 1] (got %g)", p.top_p));
    }
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) {
        fail(SPARROW_ERR_INVALID_ARGUMENT, format("min_p must be in [0, 1] (got %g)", p.min_p));
    }
}

namespace {
// NaN compares false: greedy would answer token 0 and sorting for sampling has no order at all.
[[noreturn]] void fail_nan_logits() {
    fail(SPARROW_ERR_INTERNAL, "the model computed NaN logits (its weights hold non-finite values, or its activations "
                               "overflowed)");
}
}  // namespace

int32_t argmax(const float * logits, int32_t n_vocab) {
    int32_t best = 0;
    for (int32_t i = 1; i < n_vocab; ++i) {
        if (logits[i] > logits[best]) best = i;
    }
    if (std::isnan(logits[best])) fail_nan_logits();
    return best;
}

void sampling_distribution(const float * logits, int32_t n_vocab, const sparrow_sampler_params & params,
                           std::vector<TokenProb> & out) {
    const float inv_t = 1.0f / params.temperature;
    out.resize((size_t) n_vocab);
    bool nan = false;
    for (int32_t i = 0; i < n_vocab; ++i) {
        out[i] = {i, logits[i] * inv_t};
        nan |= std::isnan(out[i].p);
    }
    if (nan) fail_nan_logits();  // before the sort, which needs an order
    auto by_logit = [](const TokenProb & a, const TokenProb & b) { return a.p > b.p || (a.p == b.p && a.id < b.id); };

    // top-k: keep the k largest logits
    size_t keep = out.size();
    if (params.top_k > 0 && (size_t) params.top_k < keep) {
        keep = (size_t) params.top_k;
        std::partial_sort(out.begin(), out.begin() + keep, out.end(), by_logit);
        out.resize(keep);
    } else {
        std::sort(out.begin(), out.end(), by_logit);
    }

    // softmax over the survivors (sorted, so the first is the max)
    const float max_logit = out[0].p;
    double sum = 0.0;
    for (auto & tp : out) {
        tp.p = std::exp(tp.p - max_logit);
        sum += tp.p;
    }
    for (auto & tp : out) tp.p = (float) (tp.p / sum);

    // top-p: the smallest prefix whose mass reaches top_p (at least one token)
    if (params.top_p < 1.0f) {
        double cum = 0.0;
        size_t n = 0;
        while (n < out.size()) {
            cum += out[n].p;
            ++n;
            if (cum >= params.top_p) break;
        }
        out.resize(n);
    }
    // min-p: drop tokens below min_p times the most probable one
    if (params.min_p > 0.0f) {
        const float threshold = params.min_p * out[0].p;
        size_t n = 1;
        while (n < out.size() && out[n].p >= threshold) ++n;
        out.resize(n);
    }
    double total = 0.0;
    for (const auto & tp : out) total += tp.p;
    for (auto & tp : out) tp.p = (float) (tp.p / total);
}

int32_t draw(const std::vector<TokenProb> & dist, Rng & rng) {
    double u = rng.uniform(), cum = 0.0;
    for (const auto & tp : dist) {
        cum += tp.p;
        if (u < cum) return tp.id;
    }
    return dist.back().id;  // u landed in the rounding gap at the top
}

int32_t sample_token(const float * logits, int32_t n_vocab, const sparrow_sampler_params & params, Rng & rng,
                     std::vector<TokenProb> & scratch) {
    if (params.temperature == 0.0f) return argmax(logits, n_vocab);
    sampling_distribution(logits, n_vocab, params, scratch);
    return draw(scratch, rng);
}

}  // namespace sparrow
