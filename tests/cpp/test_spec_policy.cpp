// test_spec_policy.cpp - adaptive speculation's choices (spec-policy.h) on synthetic rounds, where
// the right answer follows from the cost model by hand:
//   - before a plain step has been timed it decodes plainly; then an untried draft is tried;
//   - a draft that is always accepted, on a machine where a verified token costs 10% of a
//     decode and a draft step 5%, gets the longest chain allowed;
//   - a draft that is never accepted falls to plain steps within a few rounds, tries a one-token
//     round after 32 plain steps, then 64, 128 ... (up to 512), and goes back to drafting once the
//     probes show the draft agreeing;
//   - expensive verification (each extra token as dear as a decode) makes even a perfect draft
//     not worth it beyond what pays: E(k) / T(k) computed here agrees with the choice;
//   - trees give way to plain steps when their tokens per millisecond fall below a decode's.

#include "spec-policy.h"
#include "test_util.h"

#include <cstdio>
#include <string>

using namespace sparrow;

namespace {

using namespace sparrow_test;

constexpr double kDecodeMs = 10.0;

// A chain round of k drafts of which `accepted` were kept, with the given costs per token.
void chain(SpecPolicy & p, int32_t k, int32_t accepted, double verify_extra, double draft_step) {
    p.record_chain(k, accepted, draft_step * k, kDecodeMs + verify_extra * k);
}

void test_first_step_is_plain() {
    SpecPolicy p;
    check(p.choose_chain(6) == 0, "no decode step timed yet: plain");
    check(!p.choose_tree(), "no decode step timed yet: no tree");
    p.record_chain(0, 0, 0.0, kDecodeMs);
    check(p.choose_chain(6) >= 1, "an untried draft (even odds, cheap guesses) is tried");
    check(p.choose_chain(0) == 0, "max 0 means plain");
}

void test_good_draft_gets_long_chains() {
    SpecPolicy p;
    p.record_chain(0, 0, 0.0, kDecodeMs);
    for (int i = 0; i < 40; i++) chain(p, 6, 6, 1.0, 0.5);
    check(p.acceptance(1) > 0.9 && p.acceptance(6) > 0.9, "acceptance estimates follow a perfect draft");
    check(p.choose_chain(6) == 6, "perfect draft, cheap verification: the longest chain");
    check(p.expected_tokens(6) > 5.5, "E(6) of a perfect draft approaches 7");
}

void test_useless_draft_rests_and_recovers() {
    SpecPolicy p;
    p.record_chain(0, 0, 0.0, kDecodeMs);
    int rounds_to_rest = 0;
    for (; rounds_to_rest < 20; rounds_to_rest++) {
        const int32_t k = p.choose_chain(6);
        if (k == 0) break;
        chain(p, k, 0, 1.0, 0.5);
    }
    check(rounds_to_rest < 20, "a draft that is never accepted is given up");
    check(rounds_to_rest <= 6, "and quickly (" + std::to_string(rounds_to_rest) + " rounds)");
    // resting: plain steps, with one-token probes after 32, 64, 128, 256, 512, 512 ... of them
    int probes = 0, plain = 0;
    for (int i = 0; i < 32 + 64 + 128 + 256 + 512 + 512; i++) {
        const int32_t k = p.choose_chain(6);
        if (k == 0) {
            plain++;
            p.record_chain(0, 0, 0.0, kDecodeMs);
        } else {
            check(k == 1, "a probe drafts one token");
            probes++;
            chain(p, k, 0, 1.0, 0.5);
        }
    }
    check(probes == 6, "probes back off while they fail (got " + std::to_string(probes) + ")");
    // the draft starts agreeing: probes see it, and chains come back
    bool back = false;
    for (int i = 0; i < 600 && !back; i++) {  // (the next probe may be up to 512 steps away)
        const int32_t k = p.choose_chain(6);
        if (k == 0) {
            p.record_chain(0, 0, 0.0, kDecodeMs);
        } else {
            back = k > 1;
            chain(p, k, k, 1.0, 0.5);
        }
    }
    check(back, "a draft that starts agreeing gets chains again");
}

void test_expensive_verification() {
    SpecPolicy p;
    p.record_chain(0, 0, 0.0, kDecodeMs);
    // each extra verified token costs a whole decode: 70% acceptance cannot pay for it
    for (int i = 0; i < 60; i++) chain(p, 3, i % 10 < 7 ? 3 : 1, kDecodeMs, 0.5);
    const int32_t k = p.choose_chain(6);
    double best = 1.0 / kDecodeMs;
    int32_t best_k = 0;
    const double extra = kDecodeMs, step = 0.5;
    for (int32_t j = 1; j <= 6; j++) {
        const double r = p.expected_tokens(j) / (kDecodeMs + j * (extra + step));
        if (r > best) best = r, best_k = j;
    }
    check(k == best_k || (k == 1 && best_k == 0), "the choice maximizes E(k) / T(k) (" + std::to_string(k) + " vs " +
                                                      std::to_string(best_k) + ")");
}

void test_trees() {
    SpecPolicy p;
    p.record_chain(0, 0, 0.0, kDecodeMs);
    check(p.choose_tree(), "an untried tree is tried");
    for (int i = 0; i < 30; i++) p.record_tree(3, 20.0);  // 0.15 tokens/ms > 0.1
    check(p.choose_tree(), "a tree that beats decoding is kept");
    for (int i = 0; i < 60; i++) p.record_tree(1, 30.0);  // 0.033 tokens/ms < 0.1
    int trees = 0;
    for (int i = 0; i < 32 + 64 + 128; i++) trees += p.choose_tree();
    check(trees == 3, "a losing tree gives way to plain steps, probed after 32, 64, 128 (got " + std::to_string(trees) +
                          ")");
    // the tree starts paying: kept, and when it loses again the probes start over at 32
    for (int i = 0; i < 60; i++) p.record_tree(3, 20.0);
    check(p.choose_tree(), "a tree that pays again is kept");
    for (int i = 0; i < 60; i++) p.record_tree(1, 30.0);
    int wait = 1;
    while (!p.choose_tree() && wait < 1000) wait++;
    check(wait == 32, "probes start over at 32 steps (got " + std::to_string(wait) + ")");
}

}  // namespace

int main(int argc, char ** argv) {
    (void) argc, (void) argv;
    test_first_step_is_plain();
    test_good_draft_gets_long_chains();
    test_useless_draft_rests_and_recovers();
    test_expensive_verification();
    test_trees();
    return finish("test_spec_policy");
}
