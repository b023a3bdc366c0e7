// sampling.cpp - see sampling.h.
#include "sampling.h"

#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// Two passes: the largest value (any NaN noticed on the way), then the first index holding it.
// One scan keeping the index was a chain of dependent loads and compares, ~0.6 ns a logit: 28.5
// us for SmolLM2's 49,152 (Zen 5), paid again for every verified row and every draft token. Eight
// floats a step (SSE2, every x86-64) take it to 3.5 us.
int32_t argmax(const float * logits, int32_t n_vocab) {
    if (n_vocab <= 0) return 0;
    float best = -std::numeric_limits<float>::infinity();
    bool nan = false;
    int32_t i = 0;
#if defined(__SSE2__)
    __m128 m0 = _mm_set1_ps(best), m1 = m0, unordered = _mm_setzero_ps();
    for (; i + 8 <= n_vocab; i += 8) {
        const __m128 a = _mm_loadu_ps(logits + i), b = _mm_loadu_ps(logits + i + 4);
        unordered = _mm_or_ps(unordered, _mm_cmpunord_ps(a, b));
        m0 = _mm_max_ps(a, m0);  // a NaN in a gives m0 back: NaNs are noticed above, not kept
        m1 = _mm_max_ps(b, m1);
    }
    float lanes[4];
    _mm_storeu_ps(lanes, _mm_max_ps(m0, m1));
    best = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
    nan = _mm_movemask_ps(unordered) != 0;
#endif
    for (; i < n_vocab; ++i) {
        if (std::isnan(logits[i])) nan = true;
        else if (logits[i] > best) best = logits[i];
    }
    if (nan) fail_nan_logits();
    i = 0;
#if defined(__SSE2__)
    const __m128 target = _mm_set1_ps(best);
    for (; i + 8 <= n_vocab; i += 8) {
        const int hits = _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(logits + i), target)) |
                         _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(logits + i + 4), target)) << 4;
        if (hits) return i + __builtin_ctz((unsigned) hits);
    }
#endif
    for (; i < n_vocab; ++i) {
        if (logits[i] == best) return i;
    }
    return 0;  // not reached: best is one of the logits
}

// Logits this far below the largest count as this far below (e^-30 ~ 1e-13 each: 8,192 of
// them move the sum by 1e-9 of its first term), which keeps 2^t's exponent bits in range.
constexpr float kTopProbabilityFloor = -30.0f;

float top_probability(const float * logits, int32_t n_vocab, int32_t top) {
    const float best = logits[top];
    double sum = 0.0;  // sum of exp(l - best): the top's own term is 1
    int32_t i = 0;
#if defined(__SSE2__)
    // exp(x) = 2^t, t = x log2(e) in [-43.3, 0]: n = t rounded to the nearest integer (the
    // default rounding mode; under another, f below stays within (-1, 1) and the error within
    // 3e-5), f = t - n in [-0.5, 0.5], 2^f by its Taylor series to the 6th power (relative error
    // < 2e-7), 2^n added to the exponent bits. Four lanes a step, summed in double.
    const __m128 lowest = _mm_set1_ps(kTopProbabilityFloor), shift = _mm_set1_ps(best), log2e = _mm_set1_ps(1.44269504f);
    __m128d acc_lo = _mm_setzero_pd(), acc_hi = _mm_setzero_pd();
    for (; i + 4 <= n_vocab; i += 4) {
        const __m128 t = _mm_mul_ps(_mm_max_ps(_mm_sub_ps(_mm_loadu_ps(logits + i), shift), lowest), log2e);
        const __m128i n = _mm_cvtps_epi32(t);
        const __m128 f = _mm_sub_ps(t, _mm_cvtepi32_ps(n));
        __m128 p = _mm_set1_ps(1.5403530e-4f);
        p = _mm_add_ps(_mm_mul_ps(p, f), _mm_set1_ps(1.3333558e-3f));
        p = _mm_add_ps(_mm_mul_ps(p, f), _mm_set1_ps(9.6181291e-3f));
        p = _mm_add_ps(_mm_mul_ps(p, f), _mm_set1_ps(5.5504109e-2f));
        p = _mm_add_ps(_mm_mul_ps(p, f), _mm_set1_ps(2.4022651e-1f));
        p = _mm_add_ps(_mm_mul_ps(p, f), _mm_set1_ps(6.9314718e-1f));
        p = _mm_add_ps(_mm_mul_ps(p, f), _mm_set1_ps(1.0f));
        const __m128 e = _mm_castsi128_ps(_mm_add_epi32(_mm_castps_si128(p), _mm_slli_epi32(n, 23)));
        acc_lo = _mm_add_pd(acc_lo, _mm_cvtps_pd(e));
        acc_hi = _mm_add_pd(acc_hi, _mm_cvtps_pd(_mm_movehl_ps(e, e)));
    }
    double lanes[2];
    _mm_storeu_pd(lanes, _mm_add_pd(acc_lo, acc_hi));
    sum = lanes[0] + lanes[1];
#endif
    for (; i < n_vocab; ++i) sum += std::exp((double) std::max(logits[i] - best, kTopProbabilityFloor));
    return (float) (1.0 / sum);
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
