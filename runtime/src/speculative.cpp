// speculative.cpp - see speculative.h.
#include "speculative.h"

#include "common.h"
#include "context.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace sparrow {

namespace {

// A dense copy of a sparse distribution over n ids (zero elsewhere).
void densify(const std::vector<TokenProb> & dist, int32_t n, std::vector<float> & dense) {
    dense.assign((size_t) n, 0.0f);
    for (const auto & tp : dist) dense[tp.id] += tp.p;
}

// The draft's distribution mapped to target ids (a reduced vocabulary maps through d2t).
void draft_distribution(const sparrow_context & ctx, const float * logits, const sparrow_sampler_params & sp,
                        std::vector<TokenProb> & q) {
    const DraftState & d = *ctx.spec.state;
    sampling_distribution(logits, d.n_logits(), sp, q);
    for (auto & tp : q) tp.id = d.to_target_token(tp.id);
}

// The draft runs its queued committed entries; the last one (the lead) gives logits when asked.
// Its hidden state stays in the draft, for the speculative entries drafted after it.
void run_pending(sparrow_context & ctx, bool want_lead_logits) {
    auto & s = ctx.spec;
    const int64_t n = (int64_t) s.pending.size();
    std::vector<uint8_t> want((size_t) n, 0);
    want.back() = want_lead_logits;
    s.scratch_logits.resize((size_t) s.state->n_logits());
    s.state->run(s.pending.data(), n, s.pending_g.data(), want.data(), nullptr, s.scratch_logits.data());
    s.pending.clear();
    s.pending_g.clear();
    s.prompt_pending = false;
}

// Keep the verified rows `rows` (batch indices, increasing, starting with 0 = the lead token)
// in the target cache, queue their entries for the draft, and emit the accepted tokens and the
// bonus. tokens[i] is the token at batch row rows[i]; the token after the last is the bonus.
// The entries join those still pending: after a plain step (the draft does not run) the lead
// and whatever came before it are still owed to the draft. Dropping them left the draft's cache
// with a hole at every plain step (and without the prompt, when a generation's first step was
// plain): the real pair's acceptance at chains of one fell from 0.56 to 0.40 after six of them.
void finish_round(sparrow_context & ctx, int64_t n_before, int64_t n_batch_rows, const std::vector<int32_t> & rows,
                  const std::vector<int32_t> & accepted_tokens, int32_t bonus, std::vector<int32_t> & produced) {
    auto & s = ctx.spec;
    const int64_t H = ctx.model->hparams.n_embd;
    // target cache: the kept rows move down behind the cache before the batch
    std::vector<int32_t> src, dst;
    for (size_t i = 0; i < rows.size(); ++i) {
        src.push_back((int32_t) (n_before + rows[i]));
        dst.push_back((int32_t) (n_before + (int64_t) i));
    }
    context_move_rows(ctx, src.data(), dst.data(), (int64_t) src.size());
    context_truncate(ctx, (int32_t) (n_before + (int64_t) rows.size()));

    // the draft's next entries: the kept positions with their real features, fused from the
    // taps where the verify pass left them (backend memory)
    const size_t g_begin = s.pending_g.size();
    s.pending_g.resize(g_begin + rows.size() * H);
    s.state->fuse_tap_rows(ctx.hidden_rows, n_batch_rows, rows.data(), (int64_t) rows.size(), s.pending_g.data() + g_begin);
    // the kept rows' features join the cache's, if it has them up to here (see spec.text_g)
    if (s.g_rows == n_before) {
        s.text_g.insert(s.text_g.end(), s.pending_g.begin() + (std::ptrdiff_t) g_begin, s.pending_g.end());
        s.g_rows += (int32_t) rows.size();
    }
    for (size_t j = 0; j < rows.size(); ++j) {
        DraftEntry e;
        e.token = j + 1 < rows.size() ? accepted_tokens[j] : bonus;
        e.pos = ctx.cache_pos[n_before + (int64_t) j];  // where the target put it
        s.pending.push_back(e);
        produced.push_back(e.token);
    }
}

// Verify `tokens` (row 0 the lead token) with the target in one pass, tree-shaped if parents.
void verify(sparrow_context & ctx, const std::vector<int32_t> & tokens, const std::vector<int32_t> * parents) {
    std::vector<int8_t> all(tokens.size(), 1);
    ForwardOptions opt;
    opt.outputs = all.data();
    opt.parents = parents ? parents->data() : nullptr;
    opt.capture_layers = &spec_capture_layers(ctx);
    opt.capture_all_rows = true;
    opt.capture_in_backend = true;  // the draft fuses them there (finish_round)
    context_forward(ctx, tokens.data(), (int32_t) tokens.size(), opt);
    ctx.stats.n_target_forwards += 1;
}

// The target's own next token from logits: greedy or sampled, as plain decoding draws it.
int32_t target_token(sparrow_context & ctx, const float * logits) {
    const sparrow_sampler_params & sp = ctx.gen.params.sampling;
    const int32_t n_vocab = ctx.model->hparams.n_vocab;
    if (sp.temperature == 0.0f) return argmax(logits, n_vocab);
    sampling_distribution(logits, n_vocab, sp, ctx.spec.p_dist);
    return draw(ctx.spec.p_dist, ctx.gen.rng);
}

// A drafted token in a verify batch, for accept_drafts: node i sits at batch row i + 1 (the lead
// token is row 0). Its parent (-1: a child of the lead), its place among its siblings in the
// order they were drawn, and which of the draft's distributions (q_at) its own children were
// drawn from.
struct VerifyNode {
    int32_t token = 0;
    int32_t parent = -1;
    int32_t draw_rank = 0;
    int32_t children_q = 0;
};

struct Acceptance {
    std::vector<int32_t> rows{0};  // batch rows kept: the lead's, then each accepted node's
    std::vector<int32_t> tokens;   // the accepted drafts
    int32_t bonus = -1;            // the target's own token after them
};

// The one acceptance rule of chains and trees (a chain is a tree with one child per node). Walk
// down from the lead (nodes in batch order, the target's logits at every row in ctx.logits): at
// each node, greedy decoding takes the child that is the target's argmax, if any; sampling runs
// the recursive rejection over the children in draw order (SpecInfer / EAGLE-2), q_at[0] being
// the distribution the lead's children were drawn from. The walk ends at the first node where no
// child is accepted, with the bonus token: the argmax, or a draw from what is left of p.
Acceptance accept_drafts(sparrow_context & ctx, const std::vector<VerifyNode> & nodes,
                         const std::vector<std::vector<TokenProb>> & q_at) {
    auto & s = ctx.spec;
    auto & g = ctx.gen;
    const int32_t n_vocab = ctx.model->hparams.n_vocab;
    const sparrow_sampler_params & sp = g.params.sampling;
    const bool greedy = sp.temperature == 0.0f;
    Acceptance a;
    int32_t cur = -1, cur_row = 0, depth = 0;
    for (;;) {
        // the children of cur, in draw order
        std::vector<int32_t> children;
        for (size_t ni = 0; ni < nodes.size(); ++ni) {
            if (nodes[ni].parent == cur) children.push_back((int32_t) ni);
        }
        std::sort(children.begin(), children.end(), [&](int32_t x, int32_t y) { return nodes[x].draw_rank < nodes[y].draw_rank; });
        const float * logits = ctx.logits.data() + (size_t) cur_row * n_vocab;
        int32_t next = -1;
        if (!children.empty()) ctx.stats.drafted_by_depth[std::min(depth, 31)] += 1;
        if (greedy) {
            const int32_t t = argmax(logits, n_vocab);
            for (int32_t c : children) {
                if (nodes[c].token == t) next = c;
            }
            if (next < 0) a.bonus = t;
        } else {
            // recursive rejection over the siblings, which were drawn without replacement from q:
            // try them in draw order, and only a prefix of that order (a sibling dropped from the
            // tree ends the tries, as if the draft had proposed fewer)
            sampling_distribution(logits, n_vocab, sp, s.p_dist);
            densify(s.p_dist, n_vocab, s.p_dense);
            if (!children.empty()) densify(q_at[(size_t) (cur < 0 ? 0 : nodes[cur].children_q)], n_vocab, s.q_dense);
            for (size_t ci = 0; ci < children.size(); ++ci) {
                const int32_t c = children[ci];
                if (nodes[c].draw_rank != (int32_t) ci) break;  // a gap in the draw order
                const int32_t x = nodes[c].token;
                if (g.rng.uniform() < (double) s.p_dense[x] / s.q_dense[x]) {
                    next = c;
                    break;
                }
                // rejected: p <- norm(max(0, p - q)); q <- q without x, renormalised
                double p_total = 0.0;
                for (int32_t v = 0; v < n_vocab; ++v) {
                    s.p_dense[v] = std::max(0.0f, s.p_dense[v] - s.q_dense[v]);
                    p_total += s.p_dense[v];
                }
                if (p_total <= 0.0) {  // p was covered by q: fall back to the target's p
                    sampling_distribution(logits, n_vocab, sp, s.p_dist);
                    densify(s.p_dist, n_vocab, s.p_dense);
                    p_total = 1.0;
                }
                for (auto & v : s.p_dense) v = (float) (v / p_total);
                s.q_dense[x] = 0.0f;
                double q_total = 0.0;
                for (float v : s.q_dense) q_total += v;
                if (q_total > 0.0) {
                    for (auto & v : s.q_dense) v = (float) (v / q_total);
                }
            }
            if (next < 0) {
                std::vector<TokenProb> rest;
                for (int32_t v = 0; v < n_vocab; ++v) {
                    if (s.p_dense[v] > 0.0f) rest.push_back({v, s.p_dense[v]});
                }
                a.bonus = draw(rest, g.rng);
            }
        }
        if (next < 0) break;
        ctx.stats.accepted_by_depth[std::min(depth, 31)] += 1;
        a.tokens.push_back(nodes[next].token);
        cur = next;
        cur_row = next + 1;
        a.rows.push_back(cur_row);
        depth += 1;
    }
    return a;
}

// Pending committed entries the draft catches up on while speculation rests (plain steps), so
// that they do not pile up; the lead (the last) stays pending for the next round.
constexpr size_t kMaxPendingWhileResting = 64;

// A plain decode step inside a speculative generation: the target decodes the lead token alone
// (its taps captured, so the draft can pick up from here); the draft does nothing.
void plain_round(sparrow_context & ctx, std::vector<int32_t> & produced) {
    auto & s = ctx.spec;
    const int64_t H = ctx.model->hparams.n_embd;
    // the draft's catch-up belongs to the cost of resting: each plain step is charged its share
    double catch_up_ms = 0.0;
    if (s.pending.size() > kMaxPendingWhileResting) {
        const double t_catch0 = now_ms();
        const DraftEntry lead = s.pending.back();
        std::vector<float> lead_g(s.pending_g.end() - H, s.pending_g.end());
        s.pending.pop_back();
        s.pending_g.resize(s.pending_g.size() - H);
        const size_t n_caught_up = s.pending.size();
        run_pending(ctx, false);
        s.pending.push_back(lead);
        s.pending_g = std::move(lead_g);
        const double catch_ms = now_ms() - t_catch0;
        ctx.stats.t_draft_ms += catch_ms;
        catch_up_ms = catch_ms / (double) n_caught_up;
    }
    const double t0 = now_ms();
    const std::vector<int32_t> batch{s.pending.back().token};
    const int64_t n_before = ctx.cache->size();
    verify(ctx, batch, nullptr);
    const int32_t next = target_token(ctx, ctx.logits.data());
    finish_round(ctx, n_before, 1, {0}, {}, next, produced);
    const double ms = now_ms() - t0;
    ctx.stats.t_verify_ms += ms;
    ctx.stats.n_draft_rounds[0] += 1;
    s.policy.record_chain(0, 0, ms + catch_up_ms);
}

void chain_round(sparrow_context & ctx, std::vector<int32_t> & produced) {
    auto & s = ctx.spec;
    auto & g = ctx.gen;
    DraftState & draft = *s.state;
    const sparrow_sampler_params & sp = g.params.sampling;
    const bool greedy = sp.temperature == 0.0f;

    // room in the target cache: the verify batch is the lead token plus the drafts
    const int64_t room = ctx.cache->capacity() - ctx.cache->size();
    const int32_t k_max = (int32_t) std::max<int64_t>(0, std::min<int64_t>(s.n_draft, room - 1));
    const int32_t k = s.adaptive ? s.policy.choose_chain(k_max) : k_max;
    if (k == 0) {
        plain_round(ctx, produced);
        return;
    }
    const DraftEntry lead = s.pending.back();
    // the draft entry reading token d_i sits at the target position of the token before it
    const int32_t first_pos = context_next_pos(ctx);

    // ---- draft: the pending committed entries, then k - 1 speculative ones ----
    const double t_draft0 = now_ms();
    std::vector<int32_t> drafts;
    std::vector<std::vector<TokenProb>> q_dists;
    const bool timed = !s.prompt_pending;
    // An adaptive chain ends where the draft's confidence in it no longer pays for another token
    // (spec-policy.h), any chain where a token's confidence is below draft_p_min; the first token
    // is always drafted. A sampled token's confidence is its distribution's largest probability,
    // decided on before it is drawn: stopping on the drawn token itself would bias what the round
    // outputs at that position (the target's fresh draw there would stand in for some drafts and
    // not others).
    const double stop_below = s.adaptive ? s.policy.chain_stop_below(k) : 0.0;
    const bool cut = stop_below > 0.0 || s.draft_p_min > 0.0f;
    const SpecPolicy::Confidence kind = greedy ? SpecPolicy::kGreedy : SpecPolicy::kSampled;
    double chain_p = 1.0;  // the chance that the chain so far is accepted, by the draft's calibrated confidences
    std::vector<float> confidences;  // the draft's confidence in each drafted token
    run_pending(ctx, k > 0);
    for (int32_t i = 1; i <= k; ++i) {
        int32_t choice = -1;
        float confidence = 1.0f;
        if (greedy) {
            choice = argmax(s.scratch_logits.data(), draft.n_logits());
            if (cut) confidence = top_probability(s.scratch_logits.data(), draft.n_logits(), choice);
        } else {
            q_dists.emplace_back();
            draft_distribution(ctx, s.scratch_logits.data(), sp, q_dists.back());
            if (cut) {
                confidence = 0.0f;
                for (const TokenProb & tp : q_dists.back()) confidence = std::max(confidence, tp.p);
            }
        }
        if (cut) {
            chain_p *= s.policy.calibrated(confidence, kind);
            if (i > 1 && (confidence < s.draft_p_min || chain_p < stop_below)) {
                if (!greedy) q_dists.pop_back();
                break;
            }
            confidences.push_back(confidence);
        }
        const int32_t token = greedy ? draft.to_target_token(choice) : draw(q_dists.back(), g.rng);
        drafts.push_back(token);
        if (i == k) break;
        DraftEntry e;
        e.token = token;
        e.pos = first_pos + i - 1;
        e.speculative = true;
        e.parent = i - 2;  // a chain: each entry's parent is the previous one
        const uint8_t yes = 1;
        draft.run_speculative(&e, 1, &yes, s.scratch_logits.data());
    }
    ctx.stats.draft_kv_entries = (int32_t) std::max<int64_t>(ctx.stats.draft_kv_entries, draft.n_kv_entries());
    draft.drop_speculative();
    const int32_t n_drafted = (int32_t) drafts.size();  // k, or fewer where the chain stopped early
    const double draft_ms = now_ms() - t_draft0;
    ctx.stats.t_draft_ms += draft_ms;

    // ---- verify: the lead token and the drafts in one target forward ----
    const double t_verify0 = now_ms();
    std::vector<int32_t> batch;
    batch.push_back(lead.token);
    batch.insert(batch.end(), drafts.begin(), drafts.end());
    const int64_t n_before = ctx.cache->size();
    verify(ctx, batch, nullptr);

    // ---- accept: the chain as a tree of one child per node ----
    std::vector<VerifyNode> chain((size_t) n_drafted);
    for (int32_t i = 0; i < n_drafted; ++i) {
        chain[(size_t) i].token = drafts[(size_t) i];
        chain[(size_t) i].parent = i - 1;
        chain[(size_t) i].children_q = i + 1;  // draft i + 1 was drawn at draft i
    }
    const Acceptance acc = accept_drafts(ctx, chain, q_dists);
    const int32_t accepted = (int32_t) acc.tokens.size();
    ctx.stats.n_drafted += n_drafted;
    ctx.stats.n_accepted += accepted;
    finish_round(ctx, n_before, (int64_t) batch.size(), acc.rows, acc.tokens, acc.bonus, produced);
    const double verify_ms = now_ms() - t_verify0;
    ctx.stats.t_verify_ms += verify_ms;
    ctx.stats.n_draft_rounds[std::min(n_drafted, 32)] += 1;
    s.policy.record_chain(n_drafted, accepted, timed ? draft_ms + verify_ms : SpecPolicy::kUntimed);
    if (!confidences.empty()) s.policy.record_confidences(confidences.data(), (int32_t) confidences.size(), accepted, kind);
}

// ---- EAGLE-2 dynamic trees -------------------------------------------------------------------

struct TreeNode {
    int32_t token = 0;
    int32_t parent = -1;       // node index; -1: a child of the lead
    int32_t depth = 1;
    double score = 0.0;        // cumulative log-probability under the draft
    int32_t draw_rank = 0;     // order among its siblings (sampling: the order they were drawn in)
    int32_t spec_id = -1;      // speculative draft entry, once expanded
    int32_t batch_row = -1;    // row in the verify batch, if selected
};

// Children of a node from the draft's logits at it. Greedy: the top_k tokens, scored by their
// log-probability under the draft's full softmax (as EAGLE-2 ranks them). Sampling: top_k tokens
// drawn without replacement from the draft's filtered distribution q (Gumbel-top-k), kept in draw
// order, which the recursive rejection at verification needs; q (target ids) is returned for it.
void propose_children(sparrow_context & ctx, const float * logits, int32_t parent, int32_t depth, double parent_score,
                      std::vector<TreeNode> & nodes, std::vector<TokenProb> & q) {
    auto & s = ctx.spec;
    const auto & sp = ctx.gen.params.sampling;
    DraftState & draft = *s.state;
    const int32_t n_logits = draft.n_logits();
    std::vector<std::pair<double, int32_t>> keyed;  // (key, target token), best first
    std::vector<double> log_p;                      // log-probability of each keyed token
    if (sp.temperature == 0.0f) {
        // the top_k logits in one pass (ties to the lower id, as argmax), and the log-softmax's
        // normaliser from the top token's probability (its vectorized exp sum): an expanded node
        // costs a pass over the logits, not a sort of all their ids and a scalar exp each
        const int32_t top = argmax(logits, n_logits);
        const double lse = (double) logits[top] - std::log((double) top_probability(logits, n_logits, top));
        const size_t k = std::min<size_t>((size_t) s.tree_top_k, (size_t) n_logits);
        std::vector<int32_t> best;  // ids, best first
        best.reserve(k + 1);
        for (int32_t i = 0; i < n_logits; ++i) {
            if (best.size() == k && !(logits[i] > logits[best.back()])) continue;
            size_t at = best.size();
            while (at > 0 && logits[i] > logits[best[at - 1]]) --at;  // an equal logit keeps the lower id first
            best.insert(best.begin() + (std::ptrdiff_t) at, i);
            if (best.size() > k) best.pop_back();
        }
        for (const int32_t id : best) {
            keyed.push_back({(double) logits[id], draft.to_target_token(id)});
            log_p.push_back((double) logits[id] - lse);
        }
    } else {
        draft_distribution(ctx, logits, sp, q);
        for (const auto & tp : q) {
            const double u = std::max(ctx.gen.rng.uniform(), 1e-300);
            keyed.push_back({std::log(std::max(tp.p, 1e-30f)) - std::log(-std::log(u)), tp.id});
        }
        std::sort(keyed.begin(), keyed.end(), [](const auto & a, const auto & b) { return a.first > b.first; });
        keyed.resize(std::min<size_t>(keyed.size(), (size_t) s.tree_top_k));
        std::vector<float> dense;
        densify(q, ctx.model->hparams.n_vocab, dense);
        for (const auto & kv : keyed) log_p.push_back(std::log(std::max(dense[kv.second], 1e-30f)));
    }
    for (size_t i = 0; i < keyed.size(); ++i) {
        TreeNode n;
        n.token = keyed[i].second;
        n.parent = parent;
        n.depth = depth;
        n.score = parent_score + log_p[i];
        n.draw_rank = (int32_t) i;
        nodes.push_back(std::move(n));
    }
}

void tree_round(sparrow_context & ctx, std::vector<int32_t> & produced) {
    auto & s = ctx.spec;
    const int64_t room = ctx.cache->capacity() - ctx.cache->size();
    const int32_t max_nodes = (int32_t) std::min<int64_t>(s.tree_total, room) - 1;  // the lead token aside
    // the drafted nodes to verify: the policy sizes the tree (0: a plain step pays better)
    const int32_t n_nodes = s.adaptive ? s.policy.choose_tree(max_nodes) : std::max(max_nodes, 0);
    if (s.adaptive && n_nodes == 0) {
        plain_round(ctx, produced);
        return;
    }
    DraftState & draft = *s.state;
    const int32_t total = n_nodes + 1;  // lead token included
    // no level deeper, and no more nodes expanded per level, than n_nodes can use
    const int32_t depth_limit = std::min(s.tree_depth, n_nodes), expand_limit = std::min(s.tree_top_k, n_nodes);
    const DraftEntry lead = s.pending.back();
    const int32_t first_pos = context_next_pos(ctx);

    // ---- draft the tree, level by level, expanding the top_k best nodes of each level ----
    const double t_draft0 = now_ms();
    std::vector<TreeNode> nodes;
    // the order nodes join the verified set: score, then index (a parent before its children)
    auto verified_before = [&](int32_t a, int32_t b) {
        return nodes[(size_t) a].score > nodes[(size_t) b].score || (nodes[(size_t) a].score == nodes[(size_t) b].score && a < b);
    };
    std::vector<std::vector<TokenProb>> q_at;  // q at the lead (index 0) and at each expanded node (spec_id + 1)
    const bool timed = !s.prompt_pending;
    run_pending(ctx, total > 1);
    if (total > 1) {
        q_at.emplace_back();
        propose_children(ctx, s.scratch_logits.data(), -1, 1, 0.0, nodes, q_at.back());
        size_t level_begin = 0;
        for (int32_t depth = 1; depth < depth_limit; ++depth) {
            const size_t level_end = nodes.size();
            std::vector<int32_t> level((level_end - level_begin));
            std::iota(level.begin(), level.end(), (int32_t) level_begin);
            std::sort(level.begin(), level.end(), [&](int32_t a, int32_t b) { return nodes[a].score > nodes[b].score; });
            level.resize(std::min<size_t>(level.size(), (size_t) expand_limit));
            // A node with n_nodes better ones already (verified_before) has no child among the
            // n_nodes verified: a child scores no higher than its parent and comes after it. Not
            // expanding it changes nothing but the draft's work. With the one-pass top_k above:
            // the real pair's trees of 6 and 8 nodes (f32 file, 2 threads, the same acceptance)
            // drafted in 0.06-0.09 decodes instead of 0.15-0.17.
            if (nodes.size() > (size_t) n_nodes) {
                std::vector<int32_t> all(nodes.size());
                std::iota(all.begin(), all.end(), 0);
                std::nth_element(all.begin(), all.begin() + (n_nodes - 1), all.end(), verified_before);
                const int32_t last_verified = all[(size_t) n_nodes - 1];
                level.erase(std::remove_if(level.begin(), level.end(),
                                           [&](int32_t ni) { return verified_before(last_verified, ni); }),
                            level.end());
            }
            if (level.empty()) break;
            // run the chosen nodes as speculative draft entries, all in one pass
            std::vector<DraftEntry> entries;
            for (int32_t ni : level) {
                const TreeNode & n = nodes[ni];
                DraftEntry e;
                e.token = n.token;
                e.pos = first_pos + n.depth - 1;
                e.speculative = true;
                e.parent = n.parent < 0 ? -1 : nodes[n.parent].spec_id;
                entries.push_back(e);
            }
            const int32_t first_spec = (int32_t) draft.n_speculative();
            std::vector<uint8_t> want(level.size(), 1);
            std::vector<float> logits(level.size() * (size_t) draft.n_logits());
            draft.run_speculative(entries.data(), (int64_t) entries.size(), want.data(), logits.data());
            level_begin = level_end;
            for (size_t i = 0; i < level.size(); ++i) {
                TreeNode & n = nodes[level[i]];
                n.spec_id = first_spec + (int32_t) i;
                q_at.resize((size_t) n.spec_id + 2);
                const double score = n.score;
                propose_children(ctx, logits.data() + i * draft.n_logits(), level[i], depth + 1, score, nodes,
                                 q_at[(size_t) n.spec_id + 1]);
            }
        }
    }
    ctx.stats.draft_kv_entries = (int32_t) std::max<int64_t>(ctx.stats.draft_kv_entries, draft.n_kv_entries());
    draft.drop_speculative();

    // ---- keep the total - 1 best nodes; a node's ancestors always score higher, add them anyway
    std::vector<int32_t> order(nodes.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), verified_before);
    std::vector<uint8_t> chosen(nodes.size(), 0);
    std::vector<int32_t> pick(nodes.size(), -1);  // the order nodes joined the verified set, ancestors first
    int32_t n_chosen = 0;
    for (int32_t ni : order) {
        std::vector<int32_t> chain;
        for (int32_t a = ni; a >= 0 && !chosen[a]; a = nodes[a].parent) chain.push_back(a);
        if (n_chosen + (int32_t) chain.size() > total - 1) continue;
        for (auto a = chain.rbegin(); a != chain.rend(); ++a) {
            chosen[*a] = 1;
            pick[*a] = n_chosen++;
        }
    }
    // verify batch: the lead token, then the chosen nodes by depth (parents before children)
    std::vector<int32_t> selected;
    for (size_t i = 0; i < nodes.size(); ++i) {
        if (chosen[i]) selected.push_back((int32_t) i);
    }
    std::stable_sort(selected.begin(), selected.end(), [&](int32_t a, int32_t b) { return nodes[a].depth < nodes[b].depth; });
    std::vector<int32_t> batch{lead.token}, parents{-1};
    for (int32_t ni : selected) {
        nodes[ni].batch_row = (int32_t) batch.size();
        batch.push_back(nodes[ni].token);
        parents.push_back(nodes[ni].parent < 0 ? 0 : nodes[nodes[ni].parent].batch_row);
    }
    ctx.stats.t_draft_ms += now_ms() - t_draft0;

    // ---- verify the tree in one target forward ----
    const double t_verify0 = now_ms();
    const int64_t n_before = ctx.cache->size();
    verify(ctx, batch, &parents);

    // ---- accept: walk down from the lead ----
    std::vector<int32_t> index_in_batch(nodes.size(), -1);
    std::vector<VerifyNode> tree(selected.size());
    for (size_t i = 0; i < selected.size(); ++i) index_in_batch[(size_t) selected[i]] = (int32_t) i;
    for (size_t i = 0; i < selected.size(); ++i) {
        const TreeNode & n = nodes[(size_t) selected[i]];
        tree[i].token = n.token;
        tree[i].parent = n.parent < 0 ? -1 : index_in_batch[(size_t) n.parent];
        tree[i].draw_rank = n.draw_rank;
        tree[i].children_q = n.spec_id + 1;  // (a node never expanded has no children here)
    }
    const Acceptance acc = accept_drafts(ctx, tree, q_at);
    ctx.stats.n_drafted += (int32_t) selected.size();
    ctx.stats.n_accepted += (int32_t) acc.tokens.size();
    finish_round(ctx, n_before, (int64_t) batch.size(), acc.rows, acc.tokens, acc.bonus, produced);
    const double t_end = now_ms();
    ctx.stats.t_verify_ms += t_end - t_verify0;
    ctx.stats.n_tree_rounds += 1;
    ctx.stats.n_draft_rounds[std::min(n_chosen, 32)] += 1;
    // what the m best nodes alone would have produced: the accepted path up to its first node
    // outside them (the target's verdict on a node does not depend on the rest of the batch)
    std::vector<int32_t> produced_if((size_t) n_nodes + 1, 1);
    for (size_t i = 1; i < acc.rows.size(); ++i) {
        const int32_t first_without = pick[(size_t) selected[(size_t) acc.rows[i] - 1]] + 1;
        for (int32_t m = first_without; m <= n_nodes; ++m) produced_if[(size_t) m] += 1;
    }
    s.policy.record_tree(produced_if.data(), n_nodes, timed ? t_end - t_draft0 : SpecPolicy::kUntimed);
}

}  // namespace

const std::vector<int32_t> & spec_capture_layers(const sparrow_context & ctx) {
    return ctx.spec.draft->draft_hparams.taps;
}

const std::vector<int32_t> & spec_prefill_capture_layers(const sparrow_context & ctx) {
    return ctx.spec.prefill_layers;
}

void spec_prefill_start(sparrow_context & ctx, const int32_t * prompt, int32_t n_prompt) {
    auto & s = ctx.spec;
    const DraftHparams & dh = s.draft->draft_hparams;
    const int64_t H = ctx.model->hparams.n_embd;
    int64_t n_vis = 0;
    for (int32_t p = 0; p < n_prompt; ++p) n_vis += prompt[p] == SPARROW_MEDIA_TOKEN;
    const int64_t n_text = n_prompt - n_vis;
    // G contiguous segments of the visual rows, in temporal (prompt) order
    const int64_t n_seg = dh.n_glimpses > 0 ? std::min<int64_t>(dh.n_glimpses, n_vis) : 0;
    s.glimpse_end.resize((size_t) n_seg);
    s.glimpse_pos.clear();  // filled by spec_begin once the segments are complete
    for (int64_t k = 0; k < n_seg; ++k) s.glimpse_end[k] = (int32_t) ((k + 1) * n_vis / n_seg);
    s.glimpse_sum.assign((size_t) (n_seg * H), 0.0f);
    s.prefill_taps.resize((size_t) (dh.taps.size() * n_text * H));
    s.prefill_text_seen = s.prefill_visual_seen = 0;
}

void spec_prefill_chunk(sparrow_context & ctx, const int32_t * prompt, int32_t first_row, int32_t n_rows,
                        const float * hidden) {
    auto & s = ctx.spec;
    const int64_t H = ctx.model->hparams.n_embd;
    const int64_t n_taps = (int64_t) s.draft->draft_hparams.taps.size();
    const int64_t n_text = (int64_t) s.prefill_taps.size() / (n_taps * H);  // as spec_prefill_start sized it
    const float * ivsb = hidden + (size_t) n_taps * n_rows * H;  // the slot after the taps
    for (int32_t i = 0; i < n_rows; ++i) {
        if (prompt[first_row + i] != SPARROW_MEDIA_TOKEN) {
            const int64_t j = s.prefill_text_seen++;
            for (int64_t t = 0; t < n_taps; ++t) {
                memcpy(&s.prefill_taps[(size_t) ((t * n_text + j) * H)], hidden + (size_t) (t * n_rows + i) * H,
                       H * sizeof(float));
            }
        } else if (const int32_t v = s.prefill_visual_seen++; !s.glimpse_end.empty()) {
            const size_t k = (size_t) (std::upper_bound(s.glimpse_end.begin(), s.glimpse_end.end(), v) - s.glimpse_end.begin());
            float * sum = &s.glimpse_sum[k * H];
            const float * row = ivsb + (size_t) i * H;
            for (int64_t d = 0; d < H; ++d) sum[d] += row[d];
        }
    }
}

int32_t spec_reusable_rows(const sparrow_context & ctx, const int32_t * prompt, int32_t n_prompt, int32_t common) {
    const auto & s = ctx.spec;
    common = std::min(common, s.g_rows);
    int32_t first_visual = 0, n_visual = 0;
    while (first_visual < common && ctx.cache_tokens[first_visual] != SPARROW_MEDIA_TOKEN) ++first_visual;
    if (first_visual == common) return common;  // text only: every kept row has its feature
    // Visual rows feed the draft only through the glimpses, which pool all of a prompt's visual
    // rows: kept ones are reused only when they are exactly the rows the kept glimpses pooled
    // and the new prompt brings no visual rows of its own.
    for (int32_t r = first_visual; r < common; ++r) n_visual += ctx.cache_tokens[r] == SPARROW_MEDIA_TOKEN;
    for (int32_t r = common; r < n_prompt; ++r) {
        if (prompt[r] == SPARROW_MEDIA_TOKEN) return first_visual;
    }
    return n_visual == s.kept_n_visual ? common : first_visual;
}

void spec_begin(sparrow_context & ctx, int32_t n_cached, int32_t n_fed, int32_t first_token) {
    auto & s = ctx.spec;
    const auto & g = ctx.gen;
    const int64_t H = ctx.model->hparams.n_embd;
    const int32_t n_prompt = n_cached + n_fed;
    if (n_cached > s.g_rows) fail(SPARROW_ERR_INTERNAL, "kept rows without their features");
    // text rows become draft entries; visual rows only fed the glimpses
    std::vector<int32_t> text_rows, visual_rows;
    int32_t n_text_cached = 0;
    for (int32_t p = 0; p < n_prompt; ++p) {
        (ctx.cache_tokens[p] == SPARROW_MEDIA_TOKEN ? visual_rows : text_rows).push_back(p);
        n_text_cached += p < n_cached && ctx.cache_tokens[p] != SPARROW_MEDIA_TOKEN;
    }
    // visual rows are either all kept (the kept glimpses pool them) or all prefilled now
    const bool visual_kept = !visual_rows.empty() && visual_rows.front() < n_cached;
    const int64_t n_visual_fed = visual_kept ? 0 : (int64_t) visual_rows.size();
    if ((int64_t) text_rows.size() - n_text_cached != s.prefill_text_seen || n_visual_fed != s.prefill_visual_seen ||
        (visual_kept && (visual_rows.back() >= n_cached || (int32_t) visual_rows.size() != s.kept_n_visual))) {
        fail(SPARROW_ERR_INTERNAL, "the prompt's hand-off does not match its prefill");
    }
    int64_t anchor_start = 0;
    if (!visual_rows.empty()) {
        for (int32_t p : text_rows) anchor_start += p < visual_rows.back();
    }
    s.state->reset(anchor_start);

    // glimpses: the mean of each segment, at the temporal position of its first visual token (or
    // those of the kept visual rows, as they were computed)
    if (visual_kept) {
        s.glimpse_sum = s.kept_glimpse_mean;
        s.glimpse_pos = s.kept_glimpse_pos;
    } else {
        const int64_t n_seg = (int64_t) s.glimpse_end.size();
        s.glimpse_pos.resize((size_t) n_seg);
        for (int64_t k = 0; k < n_seg; ++k) {
            const int32_t b = k == 0 ? 0 : s.glimpse_end[k - 1];
            for (int64_t d = 0; d < H; ++d) s.glimpse_sum[k * H + d] /= (float) (s.glimpse_end[k] - b);
            s.glimpse_pos[k] = g.has_media ? g.prompt_pos[visual_rows[b]] : ctx.cache_pos[visual_rows[b]];
        }
        if (!visual_rows.empty()) {
            s.kept_glimpse_mean = s.glimpse_sum;
            s.kept_glimpse_pos = s.glimpse_pos;
            s.kept_n_visual = (int32_t) visual_rows.size();
        }
    }
    if (!s.glimpse_pos.empty()) s.state->add_glimpses(s.glimpse_sum.data(), s.glimpse_pos.data(), (int64_t) s.glimpse_pos.size());

    // entries: each text row with the token after it (a media row's placeholder token); the
    // kept rows' features as they were, the prefilled rows' fused from their taps
    const int64_t n_text = (int64_t) text_rows.size();
    s.pending.clear();
    s.pending_g.resize((size_t) (n_text * H));
    std::copy(s.text_g.begin(), s.text_g.begin() + (size_t) n_text_cached * H, s.pending_g.begin());
    s.state->fuse_taps(s.prefill_taps.data(), n_text - n_text_cached, s.pending_g.data() + (size_t) n_text_cached * H);
    std::vector<float>().swap(s.prefill_taps);  // the prompt's taps are fused: free them
    s.text_g = s.pending_g;  // every text row's feature is known now
    s.g_rows = n_prompt;
    for (int32_t p : text_rows) {
        DraftEntry e;
        if (p + 1 >= n_prompt) {
            e.token = first_token;
        } else if (ctx.cache_tokens[p + 1] == SPARROW_MEDIA_TOKEN) {
            e.token = g.placeholder[p + 1];
        } else {
            e.token = ctx.cache_tokens[p + 1];
        }
        e.pos = ctx.cache_pos[p];
        s.pending.push_back(e);
    }
    s.prompt_pending = true;
}

void spec_round(sparrow_context & ctx, std::vector<int32_t> & produced) {
    if (ctx.spec.tree) {
        tree_round(ctx, produced);
    } else {
        chain_round(ctx, produced);
    }
}

}  // namespace sparrow
