// speculative.cpp - see speculative.h.
#include "speculative.h"

#include "common.h"
#include "context.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace sparrow {

namespace {

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// A dense copy of a sparse distribution over n ids (zero elsewhere).
void densify(const std::vector<TokenProb> & dist, int32_t n, std::vector<float> & dense) {
    dense.assign((size_t) n, 0.0f);
    for (const auto & tp : dist) dense[tp.id] = tp.p;
}

// The draft's distribution mapped to target ids (a reduced vocabulary maps through d2t).
void draft_distribution(const sparrow_context & ctx, const float * logits, const sparrow_sampler_params & sp,
                        std::vector<TokenProb> & q) {
    const DraftState & d = *ctx.spec.state;
    sampling_distribution(logits, d.n_logits(), sp, q);
    for (auto & tp : q) tp.id = d.to_target_token(tp.id);
}

}  // namespace

const std::vector<int32_t> & spec_capture_layers(const sparrow_context & ctx) {
    return ctx.spec.draft->draft_hparams.taps;
}

void spec_begin(sparrow_context & ctx, int32_t n_prompt, int32_t first_token) {
    auto & s = ctx.spec;
    const int64_t H = ctx.model->hparams.n_embd;
    s.state->reset(0);  // text only: the anchors are the first S text entries
    s.pending.clear();
    s.pending_g.resize((size_t) (n_prompt * H));
    s.state->fuse_taps(ctx.hidden.data(), n_prompt, s.pending_g.data());
    for (int32_t p = 0; p < n_prompt; ++p) {
        DraftEntry e;
        e.token = p + 1 < n_prompt ? ctx.cache_tokens[p + 1] : first_token;
        e.pos = ctx.cache_pos[p];
        s.pending.push_back(e);
    }
}

void spec_round(sparrow_context & ctx, std::vector<int32_t> & produced) {
    auto & s = ctx.spec;
    auto & g = ctx.gen;
    DraftState & draft = *s.state;
    const LMHparams & hp = ctx.model->hparams;
    const int64_t H = hp.n_embd;
    const int32_t n_vocab = hp.n_vocab;
    const sparrow_sampler_params & sp = g.params.sampling;
    const bool greedy = sp.temperature == 0.0f;

    // room in the target cache: the verify batch is the lead token plus the drafts
    const int64_t room = ctx.cache->capacity() - ctx.cache->size();
    const int32_t k = (int32_t) std::max<int64_t>(0, std::min<int64_t>(s.n_draft, room - 1));
    const DraftEntry lead = s.pending.back();

    // ---- draft: the pending committed entries, then k - 1 speculative ones ----
    const double t_draft0 = now_ms();
    std::vector<int32_t> drafts;
    std::vector<std::vector<TokenProb>> q_dists;
    if (k > 0) {
        const int64_t n_pending = (int64_t) s.pending.size();
        std::vector<uint8_t> want((size_t) n_pending, 0);
        want.back() = 1;
        s.scratch_h.resize((size_t) (n_pending * H));
        s.scratch_logits.resize((size_t) draft.n_logits());
        draft.run(s.pending.data(), n_pending, s.pending_g.data(), want.data(), s.scratch_h.data(), s.scratch_logits.data());
        std::vector<float> g_prev(s.scratch_h.end() - H, s.scratch_h.end());
        for (int32_t i = 1; i <= k; ++i) {
            int32_t token;
            if (greedy) {
                token = draft.to_target_token(argmax(s.scratch_logits.data(), draft.n_logits()));
            } else {
                q_dists.emplace_back();
                draft_distribution(ctx, s.scratch_logits.data(), sp, q_dists.back());
                token = draw(q_dists.back(), g.rng);
            }
            drafts.push_back(token);
            if (i == k) break;
            DraftEntry e;
            e.token = token;
            e.pos = lead.pos + i;
            e.speculative = true;
            e.parent = i - 2;  // a chain: each entry's parent is the previous one
            const uint8_t yes = 1;
            std::vector<float> h_next((size_t) H);
            draft.run(&e, 1, g_prev.data(), &yes, h_next.data(), s.scratch_logits.data());
            g_prev.swap(h_next);
        }
    } else {
        // no room to draft: the target decodes one token; the draft still commits its entries
        const int64_t n_pending = (int64_t) s.pending.size();
        s.scratch_h.resize((size_t) (n_pending * H));
        draft.run(s.pending.data(), n_pending, s.pending_g.data(), nullptr, s.scratch_h.data(), nullptr);
    }
    s.pending.clear();
    ctx.stats.draft_kv_entries = (int32_t) std::max<int64_t>(ctx.stats.draft_kv_entries, draft.n_kv_entries());
    draft.drop_speculative();
    ctx.stats.t_draft_ms += now_ms() - t_draft0;

    // ---- verify: the lead token and the drafts in one target forward ----
    const double t_verify0 = now_ms();
    std::vector<int32_t> batch;
    batch.push_back(lead.token);
    batch.insert(batch.end(), drafts.begin(), drafts.end());
    const int64_t n_before = ctx.cache->size();
    std::vector<int8_t> all((size_t) batch.size(), 1);
    ForwardOptions opt;
    opt.outputs = all.data();
    opt.capture_layers = &spec_capture_layers(ctx);
    opt.capture_all_rows = true;
    context_forward(ctx, batch.data(), (int32_t) batch.size(), opt);
    ctx.stats.n_target_forwards += 1;

    // ---- accept ----
    int32_t accepted = 0, bonus = -1;
    for (int32_t i = 1; i <= k; ++i) {
        const float * logits = ctx.logits.data() + (size_t) (i - 1) * n_vocab;
        const int32_t d = drafts[i - 1];
        ctx.stats.drafted_by_depth[std::min(i, 32) - 1] += 1;
        if (greedy) {
            const int32_t t = argmax(logits, n_vocab);
            if (t != d) {
                bonus = t;
                break;
            }
        } else {
            sampling_distribution(logits, n_vocab, sp, s.p_dist);
            densify(s.p_dist, n_vocab, s.p_dense);
            densify(q_dists[i - 1], n_vocab, s.q_dense);
            const double p = s.p_dense[d], q = s.q_dense[d];
            if (!(g.rng.uniform() < p / q)) {
                // rejected: resample from the residual max(0, p - q), renormalised
                std::vector<TokenProb> residual;
                double total = 0.0;
                for (const auto & tp : s.p_dist) {
                    const double r = tp.p - s.q_dense[tp.id];
                    if (r > 0.0) {
                        residual.push_back({tp.id, (float) r});
                        total += r;
                    }
                }
                if (residual.empty()) {  // p == q up to rounding: any draw from p is exact
                    bonus = draw(s.p_dist, g.rng);
                } else {
                    for (auto & tp : residual) tp.p = (float) (tp.p / total);
                    bonus = draw(residual, g.rng);
                }
                break;
            }
        }
        accepted += 1;
        ctx.stats.accepted_by_depth[std::min(i, 32) - 1] += 1;
    }
    if (bonus < 0) {  // every draft accepted: the target's own next token follows them
        const float * logits = ctx.logits.data() + (size_t) accepted * n_vocab;
        bonus = greedy ? argmax(logits, n_vocab) : (sampling_distribution(logits, n_vocab, sp, s.p_dist), draw(s.p_dist, g.rng));
    }
    ctx.stats.n_drafted += k;
    ctx.stats.n_accepted += accepted;

    // ---- hand-off: keep the accepted tokens; queue their entries for the draft ----
    context_truncate(ctx, (int32_t) (n_before + 1 + accepted));
    const int64_t n_rows = (int64_t) batch.size();
    s.scratch_g.resize((size_t) (n_rows * H));
    draft.fuse_taps(ctx.hidden.data(), n_rows, s.scratch_g.data());
    s.pending.clear();
    s.pending_g.assign(s.scratch_g.begin(), s.scratch_g.begin() + (accepted + 1) * H);
    for (int32_t j = 0; j <= accepted; ++j) {
        DraftEntry e;
        e.token = j < accepted ? drafts[j] : bonus;
        e.pos = lead.pos + 1 + j;
        s.pending.push_back(e);
        produced.push_back(e.token);
    }
    ctx.stats.t_verify_ms += now_ms() - t_verify0;
}

}  // namespace sparrow
