// spec-policy.cpp - see spec-policy.h.
#include "spec-policy.h"

#include <algorithm>
#include <iterator>

namespace sparrow {

namespace {
// Each round's evidence weighs as much as the last ~20 rounds' together: enough to settle the
// estimates, quick enough to follow a change of text (code, then prose).
constexpr double kDecay = 0.95;
// Timings are only ever thrown upwards (a thread descheduled, a page fault, the first decode after
// a prefill touching fresh buffers), and a length that is not chosen again keeps its estimate
// for a while: so a cost estimate follows the fast end of its timings. The first estimate is
// the fastest of the first few samples; then a faster sample pulls it down at once, a slower
// one only a little (a lasting slowdown, the machine getting busy, is followed in ~20 rounds).
constexpr int32_t kFirstSamples = 3;
constexpr double kWeightDown = 0.3, kWeightUp = 0.05;
// ... and a slow sample counts as at most this many times the estimate: one round several times
// as long (a stall; before kUntimed, the draft catching up on the prompt) moved T(5) of the real
// pair from 9.4 to 10.7 ms, and a length not chosen again is only timed again kExploreEvery rounds
// later. A lasting slowdown is still followed, 5% a round. (At 1.5 the simulated machines of
// test_spec_policy, whose slow rounds take 1.5x to 3x, fell below their bounds.)
constexpr double kMostUp = 2.0;
// Before any evidence a draft token is taken to be accepted half the time (pseudo-counts: 0.25
// accepted of 0.5 drafted): optimistic enough that speculation is tried, light enough that a
// draft never accepted is estimated at 0.012 (the evidence saturates at ~20 rounds), and heavy
// enough that one rejection reads 0.17, not 0.08: at 0.08 (0.1 of 0.2) the SmolLM2 demo's one
// early rejection at depth 2 kept it at k = 1 for a whole caption. The evidence decays and the
// prior does not, so a depth no longer reached drifts back to even odds within ~50 rounds and is
// tried again: an estimate that happened to come out low does not stay low for good.
constexpr double kPriorAccepted = 0.25, kPriorReached = 0.5;
// A longer chain than any timed costs this much more per token, as a fraction of a decode step:
// cheap, so that it is tried (and then timed) when the acceptance suggests it could pay.
constexpr double kGuessPerToken = 0.1;
// The chosen k's neighbours are timed (again) after this many rounds without a sample: one
// unlucky timing of a length that is then never chosen would otherwise decide for good.
constexpr int32_t kExploreEvery = 64;
// While speculation is off, a one-token round (or one tree) now and then (chain_probes(),
// tree_probes() in spec-policy.h), until the estimates say speculation pays. And never sooner than
// kProbeBudget times what a probe costs beyond a plain step, in plain steps: probes take at most
// ~2% of the time while resting, even a tree that costs 8 decodes.
constexpr double kProbeBudget = 50.0;
// A draft's calibration is a property of the draft, not of the text: its counts decay slowly
// (~100 rounds, a few hundred tokens), and until they come a tenth's scale is held at 1 by this
// many tokens' worth of pseudo-counts.
constexpr double kConfidenceDecay = 0.99, kConfidencePrior = 2.0;
// A chain is chosen over plain decoding only when it promises this much more speed. The prior
// keeps a useless draft's estimated yield a little above one token a round (E(k) ~1.02), and on a
// target in the CPU's cache a one-token round costs what a plain step does (one more verified row
// and a draft step are lost in the noise): that draft looked a hair faster and drafted for a third
// of a run, gaining nothing. (A tree's yield has no prior: a useless tree yields 1.0 and never
// beats a plain step, which no timed round is slower than: rate(0).)
constexpr double kMustGain = 1.05;
}  // namespace

void SpecPolicy::Cost::add(double sample) {
    if (n < kFirstSamples) ms = n == 0 ? sample : std::min(ms, sample);
    else ms += sample < ms ? kWeightDown * (sample - ms) : kWeightUp * (std::min(sample, kMostUp * ms) - ms);
    n += 1;
    age = 0;
}

void SpecPolicy::reset() { *this = SpecPolicy(); }

void SpecPolicy::reset_tree() {
    for (Cost & c : tree_cost_) c = Cost();
    std::fill(std::begin(tree_gain_), std::end(tree_gain_), 0.0);
    std::fill(std::begin(tree_seen_), std::end(tree_seen_), 0.0);
    tree_probes_ = tree_probes();
}

void SpecPolicy::tick() {
    for (Cost & c : cost_) c.age += 1;
    for (Cost & c : tree_cost_) c.age += 1;
}

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

double SpecPolicy::interpolate(const Cost * costs, int32_t max, int32_t n, bool own) const {
    n = std::min(std::max(n, 0), max);
    auto at = [&](int32_t i) -> const Cost & { return i == 0 ? cost_[0] : costs[i]; };
    if (n == 0 || (own && at(n).n > 0)) return at(n).ms;
    if (cost_[0].n == 0) return 0.0;
    int32_t lo = n - 1, hi = n + 1;
    while (at(lo).n == 0) lo--;  // stops at 0 at the latest
    while (hi <= max && at(hi).n == 0) hi++;
    if (hi <= max) {  // between two timed sizes
        return at(lo).ms + (at(hi).ms - at(lo).ms) * (n - lo) / (double) (hi - lo);
    }
    // larger than any timed: the slope between the two largest timed sizes, or the guess
    int32_t lo2 = lo - 1;
    while (lo2 >= 1 && at(lo2).n == 0) lo2--;
    const double slope = lo >= 1 && lo2 >= 1 ? std::max(0.0, (at(lo).ms - at(lo2).ms) / (lo - lo2))
                                             : kGuessPerToken * fastest_round_ms();
    return at(lo).ms + slope * (n - lo);
}

double SpecPolicy::fastest_round_ms() const {
    // every chain or tree round runs the target once, so none is faster than a plain step: the
    // fastest timed round bounds a decode from above even while the decode's own timing is the
    // slow first one after a prefill
    double ms = cost_[0].ms;
    for (int32_t k = 1; k <= kMaxDepth; ++k) {
        if (cost_[k].n > 0) ms = std::min(ms, cost_[k].ms);
    }
    for (int32_t n = 1; n <= kMaxTreeNodes; ++n) {
        if (tree_cost_[n].n > 0) ms = std::min(ms, tree_cost_[n].ms);
    }
    return ms;
}

double SpecPolicy::round_ms(int32_t k) const { return interpolate(cost_, kMaxDepth, k); }

double SpecPolicy::tree_round_ms(int32_t n) const { return interpolate(tree_cost_, kMaxTreeNodes, n); }

double SpecPolicy::tree_step(int32_t m) const { return tree_seen_[m] > 0.0 ? tree_gain_[m] / tree_seen_[m] : 0.0; }

double SpecPolicy::tree_tokens(int32_t n) const {
    n = std::min(std::max(n, 0), (int32_t) kMaxTreeNodes);
    double tokens = 1.0;  // no node verified: the target's own token
    for (int32_t m = 1; m <= n; ++m) tokens += tree_step(m);
    return tokens;
}

double SpecPolicy::rate(int32_t k) const {
    // plain decoding: no slower than the fastest timed round, which ran the target once too (its
    // own estimate may still carry a slow sample: it is timed only now and then while speculating)
    if (k == 0) return 1.0 / fastest_round_ms();
    double ms = round_ms(k);
    // A length timed fewer than kFirstSamples times costs no more than the other lengths' timings
    // say: its first round is often slow (the draft's first round catches up on the prompt; a
    // verify of more rows than before touches fresh buffers), and one such timing kept the SmolLM2
    // demo at k = 1 or plain for a whole caption (1.9x where k = 4 gives 3x). Chosen again, it is
    // timed again, and its estimate follows the fastest of its first samples.
    if (cost_[k].n > 0 && cost_[k].n < kFirstSamples) ms = std::min(ms, interpolate(cost_, kMaxDepth, k, false));
    return expected_tokens(k) / ms;
}

int32_t SpecPolicy::choose_chain(int32_t max_k) {
    timing_chain_ = false;
    if (max_k <= 0 || cost_[0].n == 0) return 0;  // first time what plain decoding costs
    max_k = std::min(max_k, (int32_t) kMaxDepth);
    int32_t best = 0;
    double best_rate = kMustGain * rate(0);
    for (int32_t k = 1; k <= max_k; ++k) {
        const double r = rate(k);
        if (r > best_rate) best = k, best_rate = r;
    }
    if (best == 0) return probe_now(chain_probes_, round_ms(1)) ? 1 : 0;
    chain_probes_ = chain_probes();
    if (cost_[0].age >= refresh_every(best_rate)) return 0;  // what speculation is compared with, timed again
    // the chosen length and its neighbours timed again, as whole chains: rounds cut by the draft's
    // confidence rarely reach the longer lengths, and one slow timing of those, never retimed,
    // had raised the cut threshold until nearly every round stopped at one token
    for (const int32_t k : {best, best + 1, best - 1}) {
        if (k >= 1 && k <= max_k && cost_[k].age >= kExploreEvery) {
            timing_chain_ = true;
            return k;
        }
    }
    return best;
}

double SpecPolicy::chain_stop_below(int32_t k) const {
    k = std::min(k, (int32_t) kMaxDepth);
    if (k < 2 || spec_ms_ <= 0.0 || timing_chain_) return 0.0;
    const double first = round_ms(1), last = round_ms(k);
    if (first <= 0.0 || last <= 0.0) return 0.0;
    const double ms_per_token = std::max(0.0, (last - first) / (k - 1));
    return spec_tokens_ / spec_ms_ * ms_per_token;
}

int SpecPolicy::confidence_bin(double p) { return std::min(kConfidenceBins - 1, (int) (p * kConfidenceBins)); }

double SpecPolicy::calibrated(double p, Confidence kind) const {
    p = std::min(std::max(p, 0.0), 1.0);
    const int b = confidence_bin(p);
    // accepted tokens over expected ones (their probabilities' sum) in p's tenth: a scale, so
    // that the order of probabilities within a tenth still counts
    return std::min(1.0, p * (conf_accepted_[kind][b] + kConfidencePrior) / (conf_expected_[kind][b] + kConfidencePrior));
}

void SpecPolicy::record_confidences(const float * p, int32_t n, int32_t accepted, Confidence kind) {
    double * expected = conf_expected_[kind];
    double * accepted_count = conf_accepted_[kind];
    for (int b = 0; b < kConfidenceBins; ++b) {
        expected[b] *= kConfidenceDecay;
        accepted_count[b] *= kConfidenceDecay;
    }
    // tokens 1 .. accepted were accepted; the next one, if drafted, was reached and rejected
    for (int32_t i = 0; i < n && i <= accepted; ++i) {
        const double q = std::min(std::max((double) p[i], 0.0), 1.0);
        const int b = confidence_bin(q);
        expected[b] += q;
        if (i < accepted) accepted_count[b] += 1.0;
    }
}

int32_t SpecPolicy::choose_tree(int32_t max_nodes) {
    if (max_nodes <= 0 || cost_[0].n == 0) return 0;  // first time what plain decoding costs
    max_nodes = std::min(max_nodes, (int32_t) kMaxTreeNodes);
    // an untried tree is tried whole: that round tells what every smaller one would have yielded
    if (tree_seen_[max_nodes] == 0.0) return max_nodes;
    int32_t best = 0;
    double best_rate = rate(0), tokens = 1.0;
    for (int32_t n = 1; n <= max_nodes; ++n) {
        tokens += tree_step(n);  // Y(n) = tree_tokens(n), summed as n grows
        const double r = tokens / tree_round_ms(n);
        if (r > best_rate) best = n, best_rate = r;
    }
    if (best == 0) return probe_now(tree_probes_, tree_round_ms(max_nodes)) ? max_nodes : 0;
    tree_probes_ = tree_probes();
    if (cost_[0].age >= refresh_every(best_rate)) return 0;  // what speculation is compared with, timed again
    // a tree twice the chosen size now and then (every smaller size's yield told again; growing
    // by doubling when the draft improves), and the chosen size's neighbours timed again
    const int32_t wide = std::min(max_nodes, 2 * best + 1);
    if (wide != best && tree_cost_[wide].age >= kExploreEvery) return wide;
    for (const int32_t n : {best + 1, best - 1}) {
        if (n >= 1 && n <= max_nodes && tree_cost_[n].age >= kExploreEvery) return n;
    }
    return best;
}

int32_t SpecPolicy::refresh_every(double best_rate) const {
    // far ahead, a stale decode timing could not change the choice: time it less often; but not
    // before the decode is timed kFirstSamples times (the first decode after a prefill is slow,
    // and against it any speculation looks far ahead)
    const bool settled = cost_[0].n >= kFirstSamples;
    return settled && best_rate > kFarAhead * rate(0) ? kFarRefreshEvery : kRefreshEvery;
}

bool SpecPolicy::probe_now(Probes & p, double probe_ms) {
    const double plain_ms = cost_[0].ms;
    const double budget_wait = kProbeBudget * std::max(0.0, probe_ms - plain_ms) / plain_ms;
    if (++p.since < std::max((double) p.every, budget_wait)) return false;
    p.since = 0;
    p.probing = true;
    p.every = std::min(2 * p.every, p.most);  // back to p.start once speculation pays
    return true;
}

void SpecPolicy::record_chain(int32_t k, int32_t accepted, double ms) {
    k = std::min(std::max(k, 0), (int32_t) kMaxDepth);
    tick();
    if (ms != kUntimed) cost_[k].add(ms);
    if (k == 0) return;
    if (ms != kUntimed) {
        spec_tokens_ = kDecay * spec_tokens_ + (accepted + 1);
        spec_ms_ = kDecay * spec_ms_ + ms;
    }
    if (chain_probes_.probing && accepted > 0) chain_probes_.every = chain_probes_.start;  // the draft may be waking up: look again soon
    chain_probes_.probing = false;
    for (int32_t d = 0; d < kMaxDepth; ++d) {
        accepted_[d] *= kDecay;
        reached_[d] *= kDecay;
    }
    // depths 1 .. accepted were accepted; the next one, if drafted, was reached and rejected
    for (int32_t d = 0; d < k; ++d) {
        if (d > accepted) break;
        reached_[d] += 1.0;
        if (d < accepted) accepted_[d] += 1.0;
    }
}

void SpecPolicy::record_tree(const int32_t * produced_if, int32_t n, double ms) {
    n = std::min(std::max(n, 0), (int32_t) kMaxTreeNodes);
    tick();
    if (ms != kUntimed) tree_cost_[n].add(ms);
    if (tree_probes_.probing && produced_if[n] > 1) tree_probes_.every = tree_probes_.start;
    tree_probes_.probing = false;
    // Y(m) is kept as its steps Y(m) - Y(m - 1), each a decayed mean over the rounds that told
    // it: paired within a round, the steps are small and never negative, so Y rises with m and
    // sizes reached by few rounds are not left to a lucky sample (nor is a size above this round's
    // aged by it: decayed by every round, its last sample alone would count)
    for (int32_t m = 1; m <= n; ++m) {
        tree_gain_[m] = kDecay * tree_gain_[m] + (produced_if[m] - produced_if[m - 1]);
        tree_seen_[m] = kDecay * tree_seen_[m] + 1.0;
    }
}

}  // namespace sparrow
