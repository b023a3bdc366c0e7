// spec-policy.h - adaptive speculation: how many tokens to draft in the next round.
//
// A round that drafts k tokens yields E(k) = 1 + sum_{i <= k} prod_{j <= i} a_j tokens, where a_j
// is the chance that the draft's j-th token is accepted once the first j - 1 were, and costs
// T(k) = draft(k) + verify(k). Plain decoding (k = 0) yields 1 token in one decode step. The
// policy keeps running estimates of a_j (counts that decay, so it follows the text as it
// changes) and of the costs measured on this machine (a decode step, the extra cost of each
// verified token, a draft step), and picks the k that maximizes E(k) / T(k), down to 0 when
// speculation does not pay and back up when it does: speculation never costs the user much,
// whatever the draft. While at 0 it tries a short round now and then, so that a draft that
// starts to agree is noticed: after 32 plain steps, then twice as many after each probe (up to
// 512: a tree probe costs several decodes), and every 32 again once speculation pays.
//
// Trees are judged as a whole: tokens per round and time per round of tree rounds against the
// plain decode step.
#pragma once

#include <cstdint>

namespace sparrow {

class SpecPolicy {
public:
    static constexpr int kMaxDepth = 32;

    void reset();
    // Tokens to draft in the next chain round, at most max_k (0: a plain decode step).
    int32_t choose_chain(int32_t max_k);
    // Whether the next round should be a tree round (else a plain decode step).
    bool choose_tree();

    // After a chain round that drafted k tokens (k = 0: a plain step) of which `accepted` were
    // kept: the draft's and the target's milliseconds.
    void record_chain(int32_t k, int32_t accepted, double draft_ms, double verify_ms);
    // After a tree round: tokens produced (accepted + bonus) and its milliseconds.
    void record_tree(int32_t produced, double ms);

    double acceptance(int32_t depth) const;  // the current estimate of a_depth (1-based)
    double expected_tokens(int32_t k) const;  // E(k)

private:
    double rate(int32_t k) const;  // estimated tokens per millisecond of a k-token chain round
    bool probe_now();              // counts a plain step; true when it is time to try speculating

    double accepted_[kMaxDepth] = {};  // decayed counts: drafts accepted at depth d + 1
    double reached_[kMaxDepth] = {};   // and drafts proposed there (the depth was reached)
    double plain_ms_ = 0.0;            // a decode step (0: not measured yet)
    double verify_extra_ms_ = 0.0;     // each token a verify batch holds beyond the first
    double draft_step_ms_ = 0.0;       // the draft, per token drafted
    double tree_tokens_ = 0.0, tree_ms_ = 0.0;  // per tree round (decayed means)
    int32_t rounds_since_probe_ = 0;   // plain steps since speculation was last tried
    int32_t probe_every_ = 32;         // plain steps between probes (kProbeEvery; backs off while they fail)
    bool have_verify_ = false, have_tree_ = false;
};

}  // namespace sparrow
