// spec-policy.h - adaptive speculation: how many tokens to draft in the next round.
//
// A round that drafts k tokens yields E(k) = 1 + sum_{i <= k} prod_{j <= i} a_j tokens, where a_j
// is the chance that the draft's j-th token is accepted once the first j - 1 were, and costs
// T(k) milliseconds, all of it: the draft catching up on the last round's tokens and drafting,
// the target verifying k + 1 tokens, the bookkeeping. Plain decoding (k = 0) yields 1 token in
// T(0). The policy keeps running estimates of a_j (counts that decay, so it follows the text as
// it changes) and of T(k) as measured on this machine for each k it has run, and picks the k
// that maximizes E(k) / T(k), down to 0 when speculation does not pay and back up when it does:
// speculation never costs the user much, whatever the draft.
//
// Costs are measured, never modelled from parts: on a CPU a verify of k + 1 tokens costs
// anything from about one decode (memory-bound target) to k + 1 of them (a target small enough
// to be compute-bound), and a draft step more or less than its size suggests. A k never run is
// interpolated between measured neighbours, or extrapolated upwards with a cheap guess so that
// it gets tried once and measured. Measurements go stale (the first decode after a prefill is
// slow; the machine gets busy), so the comparison point is re-measured: while speculating, a
// plain step every kRefreshEvery rounds (kFarRefreshEvery while speculation is far ahead), and
// the chosen k and its neighbours every few dozen rounds (as whole chains, see below). The first
// round after a prefill, whose draft catches up on the whole prompt, is not timed (kUntimed): on
// a context that serves one prompt after another, every generation's first round had set the cost
// of the length it drafted (a chain of 5 on the real pair, 9.4 ms a round, timed at ~33 ms once,
// then drafted 4 for 64 rounds).
// A plain step is taken to cost no more than the fastest timed round (each runs the target once),
// and a chain must promise 5% more speed than plain decoding (a useless draft's estimated yield
// stays a little above one token a round).
// While at 0 it tries a short round now and then, so that a draft that starts to agree is
// noticed: a one-token chain after 4 plain steps, then twice as many after each probe that fails,
// up to 64 (a whole tree: after 32, up to 512), and 4 (32) again once speculation pays or a probe
// is accepted; never so often that probes take more than ~2% of the time (a tree probe can cost
// several decodes). Text moves in and out of what a draft predicts within a few dozen tokens (a
// list, a name, then prose again), and on a memory-bound target a one-token probe costs a few
// percent of a decode: on simulated text of that kind, chains that rested 32 to 512 steps before
// looking again reached 0.93 of the best fixed chain's speed, 0.98 with these probes.
//
// Within a chain round the draft's own confidence decides how far to go (EAGLE-2 stops drafting
// the same way): drafted token i adds a token to the round only if it and every token before it
// are accepted, about the product c_i of the draft's confidences in its tokens (greedy: its
// probability of its choice; calibrated on the real pair: tokens it gave 0.3-0.4 were accepted
// 39% of the time, 0.9-1.0 95%; sampled: its distribution's largest probability, see Confidence),
// and it costs the round's marginal time per drafted token. So the chain stops before
// token i (after the first) when c_i < chain_stop_below(k) = (the tokens per millisecond that
// speculation has been giving) x (the marginal milliseconds of a drafted token, from T(1) and
// T(k); a cut round, which ran one draft step more than it kept, is timed as a round of the
// length it kept): the round then yields more per millisecond without it. On the real pair's
// logged rounds (held-out prompts, chains of up to 7, T(k) measured) this gave 1.84x plain
// decoding's speed against 1.76x for the best fixed length; the threshold came out at ~0.16,
// where a sweep of fixed thresholds peaked (0.15-0.2). A draft's probabilities are taken through
// what they turned out to mean (calibrated(): in each tenth of probability, the tokens accepted
// over the sum of their probabilities scales the probability, counted over the tokens reached as
// the depths' acceptance is; 1 until tokens come): on a simulated draft that halves its
// probabilities, cutting by the raw ones ran 4.5% slower than whole chains, by the calibrated
// ones 5% faster, as a calibrated draft does (squared ones: as much; overstated ones, whose
// tenths keep less of the order: 2.6%). The lengths choose_chain times again run whole.
//
// Trees are sized the same way: a tree round verifies the n best nodes of its draft tree (by the
// draft's path probability), n chosen to maximize Y(n) / T(n) against the plain step. Y(n), the
// tokens a round yields, is measured for every size at once: a round that verified n nodes tells
// what each smaller tree (its m best nodes) would have produced, since the target's verdict on
// a node does not depend on the others in the batch (the accepted path is cut where it leaves
// the m best: exact for greedy decoding, close for sampling). So a full tree now and then keeps
// every Y(m) current, and T(n) is timed per size as chains' T(k) are. (Cutting a greedy tree round
// as a chain is cut, leaving out the nodes whose calibrated path probability is below the tree
// rounds' tokens per millisecond times a node's marginal milliseconds, was tried on the real pair:
// 0.98-1.04x whole trees in four runs, one process alternating the two: not kept.)
#pragma once

#include <cstdint>

namespace sparrow {

class SpecPolicy {
public:
    static constexpr int kMaxDepth = 32;
    static constexpr int kMaxTreeNodes = 127;     // a tree's drafted nodes verified at most (n_batch - 1)
    static constexpr int32_t kRefreshEvery = 16;  // speculative rounds between two timed plain steps
    // ... or this many while speculation is kFarAhead times as fast as plain decoding or more
    static constexpr int32_t kFarRefreshEvery = 64;
    static constexpr double kFarAhead = 1.5;

    void reset();
    void reset_tree();  // what was learned of trees only (their shape changed)
    // Tokens to draft in the next chain round, at most max_k (0: a plain decode step).
    int32_t choose_chain(int32_t max_k);
    // Nodes to verify in the next tree round, at most max_nodes (0: a plain decode step instead).
    int32_t choose_tree(int32_t max_nodes);

    // A round's `ms` that says nothing of what such a round costs (the draft caught up on a whole
    // prompt in it): its acceptance is learned, its time is not.
    static constexpr double kUntimed = -1.0;

    // After a chain round that drafted k tokens (k = 0: a plain step) of which `accepted` were
    // kept, and took `ms` milliseconds in all (or kUntimed).
    void record_chain(int32_t k, int32_t accepted, double ms);
    // After a tree round that verified n nodes and took `ms` in all (or kUntimed): produced_if[m],
    // m = 0..n, is what it would have produced (accepted + bonus) had only its m best nodes been
    // verified; produced_if[n] is what it did produce.
    void record_tree(const int32_t * produced_if, int32_t n, double ms);

    // While drafting a chain round of up to k tokens: the product of the draft's (calibrated)
    // confidences in its tokens so far under which the next token is not worth drafting (0:
    // nothing timed yet, k < 2, or a round choose_chain chose to time a length).
    double chain_stop_below(int32_t k) const;
    // What a drafted token's confidence p is: greedy, the draft's probability of the token it
    // chose; sampled, the largest probability in the distribution it is drawn from, taken before
    // the draw (a stop that looked at the drawn token would make the output's distribution
    // depend on it). Each kind is calibrated on its own: a sampled token is accepted with
    // probability min(1, target / draft), not when it is the target's argmax.
    enum Confidence { kGreedy = 0, kSampled = 1 };
    // The chance that a drafted token of confidence p is accepted once the tokens before it were,
    // as the rounds so far tell (p itself before they tell anything).
    double calibrated(double p, Confidence kind = kGreedy) const;
    // After a chain round whose drafted tokens had confidences p[0 .. n) and of which `accepted`
    // were kept.
    void record_confidences(const float * p, int32_t n, int32_t accepted, Confidence kind = kGreedy);

    double acceptance(int32_t depth) const;  // the current estimate of a_depth (1-based)
    double expected_tokens(int32_t k) const;  // E(k)
    double round_ms(int32_t k) const;         // the current estimate of T(k) (0 when nothing is timed)
    double tree_tokens(int32_t n) const;      // Y(n) of trees (1 + what the rounds so far tell)
    double tree_round_ms(int32_t n) const;    // T(n) of trees

private:
    double tree_step(int32_t m) const;  // Y(m) - Y(m-1): what the m-th best node adds (0 while untold)

    // A running mean of a round's milliseconds: the first few samples averaged, then an
    // exponential mean that a single hiccup (the thread descheduled, a page fault) cannot throw far.
    struct Cost {
        double ms = 0.0;
        int32_t n = 0;        // samples so far
        int32_t age = 0;      // rounds since the last sample
        void add(double sample);
    };
    double rate(int32_t k) const;  // estimated tokens per millisecond of a k-token chain round
    double fastest_round_ms() const;  // the fastest timed round, chain or tree (plain included): a decode's upper bound
    void tick();                   // one more round: every cost ages
    int32_t refresh_every(double best_rate) const;  // speculative rounds between timed plain steps
    // T(n) from the timed sizes among costs[1..max], size 0 being the plain step: timed, between
    // two timed sizes, or above the largest timed along the slope of the two largest (or the guess)
    // (own: false leaves out size n's own timing)
    double interpolate(const Cost * costs, int32_t max, int32_t n, bool own = true) const;

    // decayed sums of the tokens that timed speculative chain rounds produced and of their
    // milliseconds: the speed speculation is giving (chain_stop_below)
    double spec_tokens_ = 0.0, spec_ms_ = 0.0;
    bool timing_chain_ = false;  // the chain chosen last is there to be timed: whole, not cut
    // per Confidence kind, by tenths of confidence, over the drafted tokens reached (those before
    // them accepted): decayed sums of their confidences, and counts of those accepted
    static constexpr int kConfidenceBins = 10;
    static int confidence_bin(double p);  // p's tenth, p in [0, 1]
    double conf_expected_[2][kConfidenceBins] = {}, conf_accepted_[2][kConfidenceBins] = {};
    double accepted_[kMaxDepth] = {};  // decayed counts: drafts accepted at depth d + 1
    double reached_[kMaxDepth] = {};   // and drafts proposed there (the depth was reached)
    Cost cost_[kMaxDepth + 1];         // T(k), k = 0 the plain step
    Cost tree_cost_[kMaxTreeNodes + 1];       // T(n) of a tree round verifying n nodes ([0] unused)
    double tree_gain_[kMaxTreeNodes + 1] = {};   // decayed sums of Y(n) - Y(n - 1) over the rounds that tell it
    double tree_seen_[kMaxTreeNodes + 1] = {};   // and decayed counts of those rounds ([0] unused)
    // While resting: when to try speculating again. Chains and trees each have their own, so
    // that a context used for both keeps what it learned of each.
    struct Probes {
        int32_t start;         // plain steps before the first probe, and again once one is accepted
        int32_t most;          // the longest wait the back-off reaches
        int32_t since = 0;     // plain steps since speculation was last tried
        int32_t every;         // plain steps between probes (from start; doubles while they fail)
        bool probing = false;  // the round chosen last is a probe
        Probes(int32_t start_every, int32_t most_every) : start(start_every), most(most_every), every(start_every) {}
    };
    static Probes chain_probes() { return Probes(4, 64); }
    static Probes tree_probes() { return Probes(32, 512); }
    bool probe_now(Probes & p, double probe_ms);  // counts a plain step; true when it is time to try a round of probe_ms
    Probes chain_probes_ = chain_probes(), tree_probes_ = tree_probes();
};

}  // namespace sparrow
