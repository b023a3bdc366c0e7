// sampling.h - turning logits into a token: greedy, or sampling from the distribution that
// temperature, top-k, top-p and min-p define (applied in that order, as transformers does).
//
// sampling_distribution() is separate from drawing a token because speculative acceptance
// needs the target's filtered distribution p itself, not just a sample of it.
#pragma once

#include "sparrow.h"

#include <cstdint>
#include <random>
#include <vector>

namespace sparrow {

struct TokenProb {
    int32_t id;
    float p;
};

// Throws INVALID_ARGUMENT for NaN/negative temperature, top_k < 0, top_p outside (0, 1],
// min_p outside [0, 1].
void validate_sampler_params(const sparrow_sampler_params & params);

// The first index of the largest logit. Throws INTERNAL when a logit is NaN (a model whose
// numbers went non-finite), rather than answering token 0.
int32_t argmax(const float * logits, int32_t n_vocab);

// softmax(logits)[top], where top is the index of the largest logit (argmax): the model's own
// confidence in its greedy choice, to within 1e-6 (a vectorized exp; logits more than 30 below
// the largest add less than 1e-13 each and are left out).
float top_probability(const float * logits, int32_t n_vocab, int32_t top);

// The filtered distribution, most probable first, probabilities summing to 1.
// Requires temperature > 0. Throws INTERNAL when a logit is NaN.
void sampling_distribution(const float * logits, int32_t n_vocab, const sparrow_sampler_params & params,
                           std::vector<TokenProb> & out);

class Rng {
public:
    explicit Rng(uint64_t seed = 0) : engine_(seed) {}
    void seed(uint64_t s) { engine_.seed(s); }
    // uniform in [0, 1)
    double uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(engine_); }

private:
    std::mt19937_64 engine_;
};

// Draw from a distribution produced by sampling_distribution.
int32_t draw(const std::vector<TokenProb> & dist, Rng & rng);

// Greedy when temperature == 0, otherwise draw from the filtered distribution.
int32_t sample_token(const float * logits, int32_t n_vocab, const sparrow_sampler_params & params, Rng & rng,
                     std::vector<TokenProb> & scratch);

}  // namespace sparrow
