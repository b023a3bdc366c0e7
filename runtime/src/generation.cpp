// generation.cpp - the generation state machine behind sparrow_generate_begin/_begin_media/_next
// (see generation.h). Runs with the context claimed by the C entry point that calls it.
#include "generation.h"

#include "api-common.h"  // require() and copy_out(), shared with api.cpp
#include "common.h"
#include "context.h"
#include "memory-budget.h"
#include "sampling.h"
#include "speculative.h"
#include "text-stream.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace sparrow {

namespace {

// Drafts longer than this per round buy nothing (acceptance falls geometrically with depth).
constexpr int32_t kMaxDraftTokens = 32;

// Lay out a multimodal prompt: the input embedding of every media row, and the positions of every
// row (3 x n, t/h/w stream-major) as transformers (5.x) get_rope_index computes them for M-RoPE
// models; 1-D models count rows. Generation then continues after the largest prompt position.
void layout_media(const LMHparams & hp, const sparrow_token * prompt, int32_t n, const sparrow_media * media,
                  int32_t n_media, std::vector<float> & embd, std::vector<int32_t> & pos, std::vector<int32_t> & placeholder) {
    const int64_t H = hp.n_embd;
    const bool mrope = hp.n_pos_streams > 1;
    embd.assign((size_t) n * H, 0.0f);
    pos.assign((size_t) 3 * n, 0);
    placeholder.assign((size_t) n, -1);
    int32_t cur = 0, m = 0;
    for (int32_t i = 0; i < n;) {
        if (prompt[i] != SPARROW_MEDIA_TOKEN) {
            for (int st = 0; st < 3; ++st) pos[(size_t) st * n + i] = cur;
            ++cur;
            ++i;
            continue;
        }
        int32_t run = 0;
        while (i + run < n && prompt[i + run] == SPARROW_MEDIA_TOKEN) ++run;
        if (m >= n_media) fail(SPARROW_ERR_INVALID_ARGUMENT, format("the prompt has more media runs than the %d media items given", n_media));
        const sparrow_media & item = media[m];
        if (item.embd == nullptr || item.n_tokens != run) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("media item %d has %d tokens but its run in the prompt has %d", m, item.n_tokens, run));
        }
        // a NaN or an infinity here would turn every logit into NaN: refused, not sampled as token 0
        for (int64_t k = 0; k < (int64_t) run * H; ++k) {
            if (!std::isfinite(item.embd[k])) {
                fail(SPARROW_ERR_INVALID_ARGUMENT, format("media item %d: embedding row %lld holds a NaN or an infinity", m,
                                                          (long long) (k / H)));
            }
        }
        memcpy(&embd[(size_t) i * H], item.embd, (size_t) run * H * sizeof(float));
        for (int32_t k = 0; k < run; ++k) placeholder[i + k] = item.placeholder;
        if (mrope) {
            if (item.grid_t < 1 || item.grid_h < 1 || item.grid_w < 1 || (int64_t) item.grid_t * item.grid_h * item.grid_w != run) {
                fail(SPARROW_ERR_INVALID_ARGUMENT, format("media item %d: grid %dx%dx%d does not hold its %d tokens", m, item.grid_t,
                                                          item.grid_h, item.grid_w, run));
            }
            if (!(item.t_scale >= 0.0f) || !std::isfinite(item.t_scale)) fail(SPARROW_ERR_INVALID_ARGUMENT, "media t_scale must be >= 0");
            // transformers 5 (get_vision_position_ids): t = floor(ti * interval) + cur, h/w = index + cur;
            // the text after the item continues at cur + max(grid_h, grid_w)
            int32_t k = i;
            for (int32_t ti = 0; ti < item.grid_t; ++ti) {
                const int32_t t = cur + (int32_t) std::floor((float) ti * item.t_scale);
                for (int32_t hi = 0; hi < item.grid_h; ++hi) {
                    for (int32_t wi = 0; wi < item.grid_w; ++wi, ++k) {
                        pos[k] = t;
                        pos[(size_t) n + k] = cur + hi;
                        pos[(size_t) 2 * n + k] = cur + wi;
                    }
                }
            }
            cur += std::max(item.grid_h, item.grid_w);
        } else {
            for (int32_t k = 0; k < run; ++k) {
                for (int st = 0; st < 3; ++st) pos[(size_t) st * n + i + k] = cur + k;
            }
            cur += run;
        }
        ++m;
        i += run;
    }
    if (m != n_media) fail(SPARROW_ERR_INVALID_ARGUMENT, format("%d media items were given but the prompt has %d media runs", n_media, m));
}

// One piece of sparrow_generate_next: what the outbox still holds, or the next token(s) produced.
void next_piece(sparrow_context & ctx, char * buf, size_t buf_size, size_t * out_len, int32_t * out_finish,
                sparrow_token * out_token) {
    require(buf != nullptr && buf_size >= 256, "buf must hold at least 256 bytes");
    require(out_len != nullptr && out_finish != nullptr, "out_len and out_finish are required");
    if (out_token) *out_token = -1;
    auto & g = ctx.gen;
    if (!g.active && g.outbox.empty()) fail(SPARROW_ERR_STATE, "no generation in progress: call sparrow_generate_begin first");
    // Hand out, at most buf_size bytes at a time and never splitting a character, what an
    // earlier call produced but could not fit.
    auto emit = [&](int32_t finish_when_drained) {
        size_t n = g.outbox.size();
        if (n > buf_size) n = utf8_complete_prefix(g.outbox.substr(0, buf_size));
        copy_out(g.outbox.substr(0, n), buf, buf_size, out_len, false);
        g.outbox.erase(0, n);
        *out_finish = g.outbox.empty() ? finish_when_drained : SPARROW_FINISH_NONE;
    };
    if (!g.outbox.empty()) {
        emit(g.final_finish);
        return;
    }
    const sparrow_model & m = *ctx.model;
    const int32_t n_vocab = m.hparams.n_vocab;
    std::string piece;
    int32_t finish = SPARROW_FINISH_NONE;
    auto finish_with = [&](int32_t reason) {
        finish = reason;
        piece += g.text.flush();
        g.finished = true;
        g.active = false;
    };

    // produce the next token(s): after the prompt, by plain decoding or by a speculative round
    std::vector<int32_t> produced;
    if (!g.prompt_done) {
        const int32_t cached = (int32_t) ctx.cache->size();
        const int32_t fed = (int32_t) g.prompt.size() - cached;
        const double t0 = now_ms();
        ForwardOptions opt;
        if (ctx.spec.active) {
            const int32_t * prompt = g.prompt.data() + cached;
            opt.capture_layers = &spec_prefill_capture_layers(ctx);
            opt.capture_all_rows = true;
            spec_prefill_start(ctx, prompt, fed);
            opt.hidden_sink = [&ctx, prompt](int32_t first, int32_t n, const float * hidden) {
                spec_prefill_chunk(ctx, prompt, first, n, hidden);
            };
        }
        std::vector<int32_t> fed_pos;
        if (g.has_media) {  // the rows after the kept prefix, with their embeddings and positions
            opt.embd = g.prompt_embd.data() + (size_t) cached * ctx.model->hparams.n_embd;
            fed_pos.resize((size_t) 3 * fed);
            for (size_t st = 0; st < 3; ++st) {
                std::copy_n(&g.prompt_pos[st * g.prompt.size() + cached], fed, &fed_pos[st * fed]);
            }
            opt.pos_streams = fed_pos.data();
        }
        const sparrow_progress_callback progress = g.params.progress_callback;
        void * progress_data = g.params.progress_user_data;
        auto report = [&](float fraction) {
            if (progress && !progress(fraction, progress_data)) fail(SPARROW_ERR_ABORTED, "prefill cancelled by the progress callback");
        };
        const int32_t n_prompt = (int32_t) g.prompt.size();
        if (progress) {
            opt.after_chunk = [&](int32_t done) {
                // the last chunk is reported as 1 below, once the first token is ready
                if (done < fed) report((float) ((double) (cached + done) / n_prompt));
            };
        }
        context_forward(ctx, g.prompt.data() + cached, fed, opt);
        g.prompt_done = true;
        if (!(g.params.max_tokens >= 0 && ctx.stats.n_generated >= g.params.max_tokens)) {
            produced.push_back(sample_token(ctx.logits.data(), n_vocab, g.params.sampling, g.rng, g.dist));
            if (ctx.spec.active) spec_begin(ctx, cached, fed, produced.back());
        }
        report(1.0f);
        ctx.stats.t_prefill_ms = now_ms() - t0;
        ctx.stats.prefill_tokens_per_s = ctx.stats.t_prefill_ms > 0 ? fed / (ctx.stats.t_prefill_ms / 1000.0) : 0.0;
    } else if (g.params.max_tokens >= 0 && ctx.stats.n_generated >= g.params.max_tokens) {
        // nothing more to produce
    } else if (ctx.cache->size() >= ctx.cache->capacity()) {
        finish_with(SPARROW_FINISH_CONTEXT);
    } else {
        const double t0 = now_ms();
        if (ctx.spec.active) {
            spec_round(ctx, produced);
        } else {
            context_forward(ctx, &g.last_token, 1, ForwardOptions());
            ctx.stats.n_target_forwards += 1;
            produced.push_back(sample_token(ctx.logits.data(), n_vocab, g.params.sampling, g.rng, g.dist));
        }
        ctx.stats.t_decode_ms += now_ms() - t0;
    }

    // hand the tokens out in order, stopping at the first that ends the generation
    for (int32_t token : produced) {
        if (finish != SPARROW_FINISH_NONE) break;
        if (g.params.max_tokens >= 0 && ctx.stats.n_generated >= g.params.max_tokens) break;
        g.last_token = token;
        if (out_token) *out_token = token;
        if (!g.params.ignore_eog && m.tokenizer->is_eog(token)) {
            finish_with(SPARROW_FINISH_EOG);
            break;
        }
        ctx.stats.n_generated += 1;
        ctx.generated.push_back(token);
        if (g.text.push(m.tokenizer->token_to_piece(token, false))) {
            piece += g.text.take();
            finish_with(SPARROW_FINISH_STOP);
            break;
        }
        piece += g.text.take();
    }
    if (finish == SPARROW_FINISH_NONE && g.params.max_tokens >= 0 && ctx.stats.n_generated >= g.params.max_tokens) {
        finish_with(SPARROW_FINISH_LENGTH);
    }
    if (ctx.stats.n_target_forwards > 0) {  // every forward yields its accepted drafts plus one
        ctx.stats.mean_accepted_length = (double) (ctx.stats.n_accepted + ctx.stats.n_target_forwards) / ctx.stats.n_target_forwards;
    }
    const double decode_s = ctx.stats.t_decode_ms / 1000.0;
    ctx.stats.decode_tokens_per_s = decode_s > 0 ? (ctx.stats.n_generated - 1) / decode_s : 0.0;
    g.outbox = std::move(piece);
    g.final_finish = finish;
    emit(finish);
}

}  // namespace

void generation_begin(sparrow_context & ctx, const sparrow_token * prompt, int32_t n_prompt, const sparrow_media * media,
                      int32_t n_media, sparrow_generate_params params) {
    require(n_prompt > 0 && prompt != nullptr, "the prompt is empty");
    validate_sampler_params(params.sampling);
    require(params.n_stop >= 0 && (params.stop != nullptr || params.n_stop == 0), "bad stop string list");
    const int32_t n_vocab = ctx.model->hparams.n_vocab;
    for (int32_t i = 0; i < n_prompt; ++i) {
        if (prompt[i] == SPARROW_MEDIA_TOKEN && n_media > 0) continue;
        if (prompt[i] < 0 || prompt[i] >= n_vocab) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("prompt token %d at index %d is outside the vocabulary [0, %d)", prompt[i], i, n_vocab));
        }
    }
    if (n_prompt >= ctx.params.n_ctx) {
        fail(SPARROW_ERR_CONTEXT_FULL, format("the prompt has %d tokens but the context holds %d (leave room to generate)",
                                              n_prompt, ctx.params.n_ctx));
    }
    if (params.speculative == -1) params.speculative = ctx.spec.draft ? SPARROW_SPEC_CHAIN : SPARROW_SPEC_NONE;
    if (params.speculative < SPARROW_SPEC_NONE || params.speculative > SPARROW_SPEC_TREE) {
        fail(SPARROW_ERR_INVALID_ARGUMENT, format("speculative mode %d is not supported (none, chain or tree)", params.speculative));
    }
    if (params.speculative == SPARROW_SPEC_TREE) {
        if (params.tree_depth < 1 || params.tree_depth > 32 || params.tree_top_k < 1 || params.tree_top_k > 16 ||
            params.tree_total_tokens < 2 || params.tree_total_tokens > 128) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("tree_depth %d, tree_top_k %d, tree_total_tokens %d: expected 1..32, 1..16, 2..128",
                                                      params.tree_depth, params.tree_top_k, params.tree_total_tokens));
        }
        if (params.tree_total_tokens > ctx.params.n_batch) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("tree_total_tokens %d exceeds the context's n_batch %d", params.tree_total_tokens,
                                                      ctx.params.n_batch));
        }
    }
    if (params.speculative != SPARROW_SPEC_NONE) {
        if (!ctx.spec.draft) fail(SPARROW_ERR_STATE, "speculative decoding needs a draft: attach one with sparrow_context_set_draft");
        if (params.n_draft < 1 || params.n_draft > kMaxDraftTokens) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("n_draft must be in [1, %d] (got %d)", kMaxDraftTokens, params.n_draft));
        }
        if (!(params.draft_p_min >= 0.0f && params.draft_p_min <= 1.0f)) {  // NaN fails too
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("draft_p_min must be in [0, 1] (got %g)", (double) params.draft_p_min));
        }
    }
    if (n_media > 0) {  // the prompt's input embeddings and positions, held until it is prefilled
        require_memory((int64_t) n_prompt * (ctx.model->hparams.n_embd + 4) * 4, format("a media prompt of %d tokens",
                                                                                           n_prompt).c_str());
    }
    auto & g = ctx.gen;
    g = sparrow_context::Generation();
    g.params = params;
    ctx.spec.active = params.speculative != SPARROW_SPEC_NONE;
    const bool tree = params.speculative == SPARROW_SPEC_TREE;
    const bool tree_shape_changed = params.tree_depth != ctx.spec.tree_depth || params.tree_top_k != ctx.spec.tree_top_k ||
                                    params.tree_total_tokens != ctx.spec.tree_total;
    // what adaptive speculation learned of trees holds for trees of one shape
    if (tree && tree_shape_changed) ctx.spec.policy.reset_tree();
    ctx.spec.tree = tree;
    ctx.spec.n_draft = params.n_draft;
    ctx.spec.draft_p_min = params.draft_p_min;
    ctx.spec.tree_depth = params.tree_depth;
    ctx.spec.tree_top_k = params.tree_top_k;
    ctx.spec.tree_total = params.tree_total_tokens;
    ctx.spec.adaptive = params.adaptive;
    ctx.generated.clear();
    for (int32_t i = 0; i < params.n_stop; ++i) {
        require(params.stop[i] != nullptr, "a stop string is NULL");
        g.stop_storage.emplace_back(params.stop[i]);
    }
    g.params.stop = nullptr;
    g.params.n_stop = 0;
    g.text.reset(g.stop_storage);
    g.rng.seed(params.sampling.seed ? params.sampling.seed : ctx.params.seed);
    g.prompt.assign(prompt, prompt + n_prompt);
    g.has_media = n_media > 0;
    if (g.has_media) layout_media(ctx.model->hparams, prompt, n_prompt, media, n_media, g.prompt_embd, g.prompt_pos, g.placeholder);
    g.active = true;

    // Keep the longest cached prefix whose rows were computed from what this prompt's rows hold
    // (token or media embedding, and positions: cache_keys); at least the last prompt token is
    // always fed again, since its logits start the generation. A speculative generation keeps
    // only rows the draft can be rebuilt for (spec_reusable_rows).
    int32_t common = 0;
    const int32_t limit = std::min<int32_t>((int32_t) ctx.cache_keys.size(), n_prompt - 1);
    const int64_t H = ctx.model->hparams.n_embd;
    for (; common < limit; ++common) {
        const int32_t text_pos[3] = {common, common, common};
        const bool media_row = prompt[common] == SPARROW_MEDIA_TOKEN;
        const uint64_t key = g.has_media ? context_row_key(ctx.model->hparams, prompt[common],
                                                           media_row ? &g.prompt_embd[(size_t) common * H] : nullptr,
                                                           &g.prompt_pos[common], (size_t) n_prompt)
                                         : context_row_key(ctx.model->hparams, prompt[common], nullptr, text_pos, 1);
        if (key != ctx.cache_keys[common] || ctx.cache_seq[common] != 0) break;  // other sequences' rows go
    }
    if (ctx.spec.active) common = spec_reusable_rows(ctx, prompt, n_prompt, common);
    context_truncate(ctx, common);
    ctx.stats = sparrow_stats();
    ctx.stats.n_prompt = n_prompt;
    ctx.stats.n_prompt_cached = common;
}

void generation_next(sparrow_context & ctx, char * buf, size_t buf_size, size_t * out_len, int32_t * out_finish,
                     sparrow_token * out_token) {
    try {
        next_piece(ctx, buf, buf_size, out_len, out_finish, out_token);
    } catch (const Error & e) {
        // An abort can land inside a speculative round or a half-run prompt, whose state is not
        // meant to be resumed: the generation ends there (sparrow.h), and the next call says so.
        if (e.status() == SPARROW_ERR_ABORTED) ctx.gen.active = false;
        throw;
    }
}

}  // namespace sparrow
