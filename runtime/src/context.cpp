// context.cpp - forward passes of a context's target model: chunking, positions, tree masks,
// output rows and hidden-state capture, shared by the C API and the speculative loop.
#include "context.h"

#include "common.h"

#include <algorithm>
#include <cstring>
#include <unordered_map>

namespace sparrow {

namespace {

// For a token tree: check the parent links, and build each token's depth and its attention
// mask over the cache rows before the batch plus the batch itself.
void build_tree(const int32_t * parents, int32_t n, int64_t n_past, std::vector<int32_t> & depth,
                std::vector<uint8_t> & mask) {
    depth.assign(n, 0);
    const int64_t n_kv = n_past + n;
    mask.assign((size_t) n * n_kv, 0);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t p = parents[i];
        if (p < -1 || p >= i) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("parents[%d] = %d: a parent must be -1 or an earlier index", i, p));
        }
        uint8_t * row = mask.data() + (size_t) i * n_kv;
        std::fill(row, row + n_past, 1);
        if (p >= 0) {
            depth[i] = depth[p] + 1;
            // a token sees what its parent sees within the batch, and the parent itself
            const uint8_t * parent_row = mask.data() + (size_t) p * n_kv;
            std::copy(parent_row + n_past, parent_row + n_kv, row + n_past);
        }
        row[n_past + i] = 1;
    }
}

// For a batch of several sequences: each of a chunk's n rows sees the cache rows before the
// chunk that belong to its sequence, and the chunk's rows of its sequence up to itself.
void build_sequence_mask(const std::vector<int32_t> & cache_seq, const int32_t * seq, int32_t n,
                         std::vector<uint8_t> & mask) {
    const int64_t n_past = (int64_t) cache_seq.size(), n_kv = n_past + n;
    mask.assign((size_t) n * n_kv, 0);
    for (int32_t i = 0; i < n; ++i) {
        uint8_t * row = mask.data() + (size_t) i * n_kv;
        for (int64_t c = 0; c < n_past; ++c) row[c] = cache_seq[c] == seq[i];
        for (int32_t j = 0; j <= i; ++j) row[n_past + j] = seq[j] == seq[i];
    }
}

}  // namespace

uint64_t context_row_key(const LMHparams & hp, int32_t token, const float * embd, const int32_t * pos, size_t stride) {
    // 64-bit multiply-xor mixing (FNV-1a's prime); four lanes over an embedding row, so hashing a
    // 25k-row video costs a fraction of a second, nothing beside its prefill
    constexpr uint64_t kPrime = 0x100000001b3ull, kBasis = 0xcbf29ce484222325ull;
    auto mix = [](uint64_t h, uint64_t v) { return (h ^ v) * kPrime; };
    uint64_t h = mix(kBasis, (uint32_t) token);
    if (embd) {
        uint64_t lane[4] = {kBasis, kBasis ^ 1, kBasis ^ 2, kBasis ^ 3};
        const int64_t n = hp.n_embd;
        uint32_t bits;
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) {
            for (int l = 0; l < 4; ++l) {
                std::memcpy(&bits, embd + i + l, 4);
                lane[l] = mix(lane[l], bits);
            }
        }
        for (; i < n; ++i) {
            std::memcpy(&bits, embd + i, 4);
            lane[0] = mix(lane[0], bits);
        }
        for (uint64_t v : lane) h = mix(h, v);
    }
    for (int st = 0; st < std::min(hp.n_pos_streams, 3); ++st) h = mix(h, (uint32_t) pos[(size_t) st * stride]);
    return h;
}

void context_forward(sparrow_context & ctx, const int32_t * tokens, int32_t n, const ForwardOptions & opt) {
    const int32_t * pos_in = opt.pos;
    const int8_t * outputs = opt.outputs;
    const int32_t * parents = opt.parents;
    const std::vector<int32_t> & capture_layers = opt.capture_layers ? *opt.capture_layers : ctx.capture_layers;
    const sparrow_model & m = *ctx.model;
    const LMHparams & hp = m.hparams;
    for (int32_t i = 0; i < n; ++i) {
        if (tokens[i] == SPARROW_MEDIA_TOKEN && opt.embd) continue;
        if (tokens[i] < 0 || tokens[i] >= hp.n_vocab) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("token id %d at index %d is outside the vocabulary [0, %d)", tokens[i], i, hp.n_vocab));
        }
    }
    const int64_t have = ctx.cache->size();
    if (have + n > ctx.cache->capacity()) {
        fail(SPARROW_ERR_CONTEXT_FULL, format("%d tokens do not fit: the context holds %lld of %lld", n, (long long) have,
                                              (long long) ctx.cache->capacity()));
    }
    // Several sequences (given, or already in the cache): every row gets a mask over its own
    // sequence's rows, and without explicit positions continues its own sequence.
    const bool several = opt.seq_ids || std::any_of(ctx.cache_seq.begin(), ctx.cache_seq.end(), [](int32_t s) { return s != 0; });
    std::vector<int32_t> seq, seq_pos;
    if (several) {
        if (parents) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, "a token tree cannot be decoded beside other sequences (seq_ids, or a cache that holds several)");
        }
        seq.assign(n, 0);
        for (int32_t i = 0; i < n && opt.seq_ids; ++i) {
            if (opt.seq_ids[i] < 0) fail(SPARROW_ERR_INVALID_ARGUMENT, format("seq_ids[%d] = %d: sequence ids are >= 0", i, opt.seq_ids[i]));
            seq[i] = opt.seq_ids[i];
        }
        if (!pos_in) {
            std::unordered_map<int32_t, int32_t> next;  // per sequence: the position after its last row
            for (size_t r = 0; r < ctx.cache_seq.size(); ++r) {
                int32_t & v = next[ctx.cache_seq[r]];
                v = std::max(v, ctx.cache_pos[r] + 1);
            }
            seq_pos.resize(n);
            for (int32_t i = 0; i < n; ++i) seq_pos[i] = next[seq[i]]++;
        }
    }
    int32_t n_out = 0;
    for (int32_t i = 0; i < n; ++i) n_out += outputs ? (outputs[i] != 0) : (i == n - 1);
    const size_t n_capture = capture_layers.size();
    // hidden states are captured at the output rows, or at every row when asked
    const bool in_backend = opt.capture_in_backend && opt.capture_all_rows && !opt.hidden_sink;
    const int32_t n_cap_rows = opt.hidden_sink || in_backend ? 0 : opt.capture_all_rows ? n : n_out;
    if (in_backend && (!ctx.hidden_rows.data || ctx.hidden_rows.rows() < (int64_t) n_capture * n)) {
        if (ctx.hidden_rows.data) ctx.backend->free(ctx.hidden_rows.data);
        ctx.hidden_rows = Tensor::matrix(DType::F32, hp.n_embd, (int64_t) n_capture * n, nullptr);
        ctx.hidden_rows.data = ctx.backend->alloc(ctx.hidden_rows.nbytes());
    }
    ctx.logits.resize((size_t) n_out * hp.n_vocab);
    ctx.hidden.resize(n_capture * (size_t) n_cap_rows * hp.n_embd);
    ctx.n_outputs = 0;

    const int32_t n_batch = (int32_t) ctx.scratch.n_batch;
    std::vector<int32_t> depth;
    if (parents) {
        if (n > n_batch) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("a tree of %d tokens must fit in one forward pass (n_batch %d)", n, n_batch));
        }
        build_tree(parents, n, have, depth, ctx.tree_mask);
    }
    std::vector<int32_t> out_rows, all_rows;
    std::vector<float> chunk_hidden;
    int32_t next_pos = context_next_pos(ctx);
    int32_t out_done = 0;
    for (int32_t c0 = 0; c0 < n; c0 += n_batch) {
        const int32_t cn = std::min(n_batch, n - c0);
        out_rows.clear();
        for (int32_t i = 0; i < cn; ++i) {
            const int32_t g = c0 + i;
            if (outputs ? outputs[g] != 0 : g == n - 1) out_rows.push_back(i);
        }
        // positions: text-only, so every M-RoPE stream carries the same value
        int32_t * pos = ctx.scratch.pos.data();
        for (int32_t i = 0; i < cn; ++i) {
            const int32_t p = pos_in ? pos_in[c0 + i] : parents ? next_pos + depth[i] : several ? seq_pos[c0 + i] : next_pos + c0 + i;
            for (int s = 0; s < hp.n_pos_streams; ++s) {
                pos[(size_t) s * cn + i] = s >= 3 ? 0 : opt.pos_streams ? opt.pos_streams[(size_t) s * n + c0 + i] : p;
            }
        }
        LMForwardRequest req;
        req.tokens = tokens + c0;
        req.embd = opt.embd ? opt.embd + (size_t) c0 * hp.n_embd : nullptr;
        req.n_tokens = cn;
        req.pos = pos;
        req.out_rows = out_rows.data();
        req.n_out = (int64_t) out_rows.size();
        if (several) build_sequence_mask(ctx.cache_seq, seq.data() + c0, cn, ctx.seq_mask);
        req.mask = parents ? ctx.tree_mask.data() : several ? ctx.seq_mask.data() : nullptr;
        req.capture_layers = capture_layers.data();
        req.n_capture = (int32_t) n_capture;
        if (opt.capture_all_rows) {
            all_rows.resize(cn);
            for (int32_t i = 0; i < cn; ++i) all_rows[i] = i;
            req.capture_rows = all_rows.data();
            req.n_capture_rows = cn;
        }
        const int64_t cap_rows = opt.capture_all_rows ? cn : (int64_t) out_rows.size();
        req.logits = ctx.logits.data() + (size_t) out_done * hp.n_vocab;
        if (in_backend) {
            req.hidden_out = &ctx.hidden_rows;
            req.hidden_slot_rows = n;
            req.hidden_first = c0;
        } else {
            chunk_hidden.resize(n_capture * cap_rows * hp.n_embd);
            req.hidden = chunk_hidden.data();
        }
        req.abort = ctx.params.abort_callback;
        req.abort_data = ctx.params.abort_user_data;
        if (!lm_forward(*ctx.backend, hp, *ctx.weights, *ctx.cache, ctx.scratch, req)) {
            fail(SPARROW_ERR_ABORTED, "aborted by the abort callback");
        }
        for (int32_t i = 0; i < cn; ++i) {
            const bool media_row = req.embd && tokens[c0 + i] == SPARROW_MEDIA_TOKEN;
            ctx.cache_keys.push_back(context_row_key(hp, tokens[c0 + i], media_row ? req.embd + (size_t) i * hp.n_embd : nullptr,
                                                     pos + i, (size_t) cn));
            ctx.cache_tokens.push_back(tokens[c0 + i]);
            int32_t p = pos[i];
            for (int st = 1; st < std::min(hp.n_pos_streams, 3); ++st) p = std::max(p, pos[(size_t) st * cn + i]);
            ctx.cache_pos.push_back(p);
            ctx.cache_seq.push_back(several ? seq[c0 + i] : 0);
        }
        if (opt.hidden_sink) {
            opt.hidden_sink(c0, cn, chunk_hidden.data());
        } else if (!in_backend) {
            const int64_t cap_done = opt.capture_all_rows ? c0 : out_done;
            for (size_t c = 0; c < n_capture; ++c) {
                memcpy(ctx.hidden.data() + (c * n_cap_rows + cap_done) * hp.n_embd,
                       chunk_hidden.data() + c * cap_rows * hp.n_embd, cap_rows * hp.n_embd * sizeof(float));
            }
        }
        out_done += (int32_t) out_rows.size();
        ctx.n_outputs = out_done;
        ctx.n_hidden_rows = opt.hidden_sink || in_backend ? 0 : opt.capture_all_rows ? c0 + cn : out_done;
        if (opt.after_chunk) opt.after_chunk(c0 + cn);
    }
}

void context_move_rows(sparrow_context & ctx, const int32_t * src, const int32_t * dst, int64_t n) {
    if (n == 0) return;
    context_forget_draft_features(ctx, dst[0]);
    ctx.cache->move_rows(src, dst, n);
    for (int64_t i = 0; i < n; ++i) {
        ctx.cache_tokens[dst[i]] = ctx.cache_tokens[src[i]];
        ctx.cache_pos[dst[i]] = ctx.cache_pos[src[i]];
        ctx.cache_keys[dst[i]] = ctx.cache_keys[src[i]];
        ctx.cache_seq[dst[i]] = ctx.cache_seq[src[i]];
    }
}

void context_forget_draft_features(sparrow_context & ctx, int32_t n_keep) {
    auto & sp = ctx.spec;
    if (sp.g_rows <= n_keep) return;
    const size_t H = (size_t) ctx.model->hparams.n_embd;
    size_t n_text = sp.text_g.size() / H;
    for (int32_t r = n_keep; r < sp.g_rows; ++r) n_text -= ctx.cache_tokens[r] != SPARROW_MEDIA_TOKEN;
    sp.text_g.resize(n_text * H);
    sp.g_rows = n_keep;
}

int32_t context_next_pos(const sparrow_context & ctx) {
    // M-RoPE: generated text continues after the largest position of the prompt, which after a
    // video need not be the last row's
    return ctx.cache_pos.empty() ? 0 : *std::max_element(ctx.cache_pos.begin(), ctx.cache_pos.end()) + 1;
}

void context_truncate(sparrow_context & ctx, int32_t n_keep) {
    ctx.cache->set_size(n_keep);
    context_forget_draft_features(ctx, n_keep);
    ctx.cache_tokens.resize(n_keep);
    ctx.cache_pos.resize(n_keep);
    ctx.cache_keys.resize(n_keep);
    ctx.cache_seq.resize(n_keep);
}

}  // namespace sparrow
