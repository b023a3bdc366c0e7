// spec-policy.cpp - see spec-policy.h.
#include "spec-policy.h"

#include <algorithm>

namespace sparrow {

namespace {
// Each round's evidence weighs as much as the last ~20 rounds' together: enough to settle the
// estimates, quick enough to follow a change of text (code, then prose).
constexpr double kDecay = 0.95;
constexpr double kCostWeight = 0.2;  // weight of a new timing in the running means
// Before any evidence a draft token is taken to be accepted half the time (one accepted of two
// pseudo-drafts): optimistic enough that speculation is tried.
constexpr double kPriorAccepted = 1.0, kPriorReached = 2.0;
// Unmeasured costs, as fractions of a decode step: cheap, so that speculation is tried.
constexpr double kGuessVerifyExtra = 0.05, kGuessDraftStep = 0.05;
// While speculation is off, a one-token round (or one tree) after this many plain steps, then
// twice as many after each probe, up to kMaxProbeEvery, until the estimates say speculation pays.
constexpr int32_t kProbeEvery = 32, kMaxProbeEvery = 512;

// A running mean that a single hiccup (the thread descheduled, a page fault) cannot throw far:
// a new timing counts for at most 4 times the current estimate.
double blend(double old, double sample, bool have) {
    if (!have) return sample;
    return old + kCostWeight * (std::min(sample, 4.0 * old) - old);
}
}  // namespace

void SpecPolicy::reset() { *this = SpecPolicy(); }

double SpecPolicy::acceptance(int32_t depth) const {
    const int32_t d = std::min(std::max(depth, 1), kMaxDepth) - 1;
    return (accepted_[d] + kPriorAccepted) / (reached_[d] + kPriorReached);
}

double SpecPolicy::expected_tokens(int32_t k) const {
    double tokens = 1.0, reach = 1.0;
    for (int32_t i = 1; i <= k; ++i) {
        reach *= acceptance(i);
        tokens += reach;
    }
    return tokens;
}

double SpecPolicy::rate(int32_t k) const {
    if (k == 0) return 1.0 / plain_ms_;
    const double extra = have_verify_ ? verify_extra_ms_ : kGuessVerifyExtra * plain_ms_;
    const double step = have_verify_ ? draft_step_ms_ : kGuessDraftStep * plain_ms_;
    return expected_tokens(k) / (plain_ms_ + k * (extra + step));
}

int32_t SpecPolicy::choose_chain(int32_t max_k) {
    if (max_k <= 0 || plain_ms_ <= 0.0) return 0;  // first measure what plain decoding costs
    int32_t best = 0;
    double best_rate = rate(0);
    for (int32_t k = 1; k <= std::min(max_k, kMaxDepth); ++k) {
        const double r = rate(k);
        if (r > best_rate) best = k, best_rate = r;
    }
    if (best > 0) {
        rounds_since_probe_ = 0;
        probe_every_ = kProbeEvery;
        return best;
    }
    return probe_now() ? 1 : 0;
}

bool SpecPolicy::choose_tree() {
    if (plain_ms_ <= 0.0) return false;
    if (!have_tree_ || tree_tokens_ / tree_ms_ > rate(0)) {
        rounds_since_probe_ = 0;
        probe_every_ = kProbeEvery;
        return true;
    }
    return probe_now();
}

bool SpecPolicy::probe_now() {
    if (++rounds_since_probe_ < probe_every_) return false;
    rounds_since_probe_ = 0;
    probe_every_ = std::min(2 * probe_every_, kMaxProbeEvery);  // back to kProbeEvery once speculation pays
    return true;
}

void SpecPolicy::record_chain(int32_t k, int32_t accepted, double draft_ms, double verify_ms) {
    if (k == 0) {
        plain_ms_ = blend(plain_ms_, verify_ms, plain_ms_ > 0.0);
        return;
    }
    for (int32_t d = 0; d < kMaxDepth; ++d) {
        accepted_[d] *= kDecay;
        reached_[d] *= kDecay;
    }
    // depths 1 .. accepted were accepted; the next one, if drafted, was reached and rejected
    for (int32_t d = 0; d < std::min(k, kMaxDepth); ++d) {
        if (d > accepted) break;
        reached_[d] += 1.0;
        if (d < accepted) accepted_[d] += 1.0;
    }
    if (plain_ms_ > 0.0) {
        verify_extra_ms_ = blend(verify_extra_ms_, std::max(0.0, verify_ms - plain_ms_) / k, have_verify_);
        draft_step_ms_ = blend(draft_step_ms_, draft_ms / k, have_verify_);
        have_verify_ = true;
    }
}

void SpecPolicy::record_tree(int32_t produced, double ms) {
    tree_tokens_ = blend(tree_tokens_, produced, have_tree_);
    tree_ms_ = blend(tree_ms_, ms, have_tree_);
    have_tree_ = true;
}

}  // namespace sparrow
