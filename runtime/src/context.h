// context.h - a sparrow_context: one sequence's KV cache, scratch activations, the outputs of
// the last forward pass and the state of a streaming generation.
#pragma once

#include "backend.h"
#include "kv-cache.h"
#include "model.h"
#include "models/draft.h"
#include "sampling.h"
#include "spec-policy.h"
#include "text-stream.h"

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

struct sparrow_context {
    // Set while a C API call is inside the context (api.cpp's CallClaim): a second call that
    // arrives meanwhile fails instead of racing. mutable: the const readers claim it too.
    mutable std::atomic<bool> in_use{false};
    sparrow_model * model = nullptr;
    sparrow_context_params params{};
    std::unique_ptr<sparrow::Backend> backend;
    const sparrow::LMWeights * weights = nullptr;  // the model's, in the backend's memory
    std::unique_ptr<sparrow::KVCache> cache;
    sparrow::LMScratch scratch;

    // tokens and positions held in the cache, row by row (for media rows under M-RoPE, the
    // largest of the t/h/w positions: the text after them continues from it)
    std::vector<int32_t> cache_tokens;
    std::vector<int32_t> cache_pos;
    // what each row was computed from (context_row_key: its token, or for a media row a hash of
    // its input embedding, and its position in every stream): a new prompt keeps the rows whose
    // keys it shares from the start, media included
    std::vector<uint64_t> cache_keys;
    // the sequence each row belongs to (sparrow_batch.seq_ids; 0 unless the caller batches
    // several): a row attends only to the rows of its own sequence
    std::vector<int32_t> cache_seq;

    // outputs of the last forward pass
    std::vector<float> logits;          // n_outputs x n_vocab
    std::vector<float> hidden;          // n_capture x n_hidden_rows x n_embd
    int32_t n_outputs = 0;
    int32_t n_hidden_rows = 0;          // rows of `hidden` per capture slot
    std::vector<int32_t> capture_layers;
    // the captured states of the last forward that kept them in the backend
    // (ForwardOptions::capture_in_backend): [n_capture][rows][n_embd], grown on demand
    sparrow::Tensor hidden_rows;
    std::vector<uint8_t> tree_mask;     // attention mask of the last tree batch
    std::vector<uint8_t> seq_mask;      // attention mask of the last chunk of several sequences

    // streaming generation
    struct Generation {
        bool active = false;
        bool finished = false;
        sparrow_generate_params params{};
        std::vector<std::string> stop_storage;
        std::vector<int32_t> prompt;
        bool has_media = false;
        std::vector<float> prompt_embd;        // media rows' input embeddings, [n_prompt][n_embd]
        std::vector<int32_t> prompt_pos;       // positions, 3 x n_prompt (t/h/w)
        std::vector<int32_t> placeholder;      // per prompt row: the media item's placeholder token, or -1
        bool prompt_done = false;
        int32_t last_token = -1;
        sparrow::TextStream text;
        sparrow::Rng rng;
        std::vector<sparrow::TokenProb> dist;
        std::string outbox;            // text produced but not yet handed out (buffer too small)
        int32_t final_finish = 0;      // finish reason to report once the outbox is empty
    } gen;
    sparrow_stats stats{};
    std::vector<int32_t> generated;    // tokens produced by the current/last generation

    // speculative decoding
    struct Speculation {
        const sparrow_model * draft = nullptr;
        std::unique_ptr<sparrow::DraftState> state;
        std::vector<int32_t> prefill_layers;     // taps (+ the ivsb layer's output for glimpses)
        // the prompt's hand-off, collected chunk by chunk during prefill (spec_prefill_chunk):
        // taps at the text rows only, and the ivsb outputs at the visual rows summed per glimpse
        // segment, so nothing here grows with the number of visual tokens beyond G x n_embd
        std::vector<float> prefill_taps;         // [n_taps][n_text][n_embd]
        std::vector<float> glimpse_sum;          // [n_segments][n_embd]
        std::vector<int32_t> glimpse_end;        // visual index where each segment ends
        std::vector<int32_t> glimpse_pos;        // after spec_begin: each glimpse's position (glimpse_sum
                                                 // then holds the means)
        int32_t prefill_text_seen = 0, prefill_visual_seen = 0;
        bool active = false;                     // this generation speculates
        bool tree = false;                       // with an EAGLE-2 tree rather than a chain
        int32_t n_draft = 4;
        float draft_p_min = 0.0f;                // sparrow_generate_params.draft_p_min
        int32_t tree_depth = 5, tree_top_k = 4, tree_total = 24;
        bool adaptive = true;                    // rounds sized by the policy (spec-policy.h)
        sparrow::SpecPolicy policy;              // kept across generations: costs carry over
        std::vector<sparrow::DraftEntry> pending;  // committed entries the draft has yet to run
        std::vector<float> pending_g;            // their features, n_embd each
        // the pending entries are the prompt's: the next round's draft catches up on all of it, so
        // that round's time is not what a round costs and the policy is not told it
        bool prompt_pending = false;
        // What rebuilds the draft for rows kept in the target cache (speculative.h): the feature
        // (fused taps, n_embd each) of every text row among cache rows [0, g_rows), in order,
        // and the glimpses of the last prompt that had visual rows (its means and positions, and
        // how many visual rows they pool). A later prompt that shares a prefix with the cache
        // keeps those rows and the draft is rebuilt exactly as a fresh prefill would build it.
        std::vector<float> text_g;
        int32_t g_rows = 0;
        std::vector<float> kept_glimpse_mean;
        std::vector<int32_t> kept_glimpse_pos;
        int32_t kept_n_visual = -1;              // -1: no glimpses kept
        std::vector<float> scratch_logits;
        std::vector<sparrow::TokenProb> p_dist, q_dist;
        std::vector<float> p_dense, q_dense;
    } spec;

    ~sparrow_context() {
        spec.state.reset();
        if (backend && hidden_rows.data) backend->free(hidden_rows.data);
        if (backend) sparrow::lm_scratch_free(*backend, scratch);
    }
};

namespace sparrow {

struct ForwardOptions {
    const int32_t * pos = nullptr;       // positions (NULL: after the cache / by tree depth)
    const int8_t * outputs = nullptr;    // rows whose logits are wanted (NULL: the last)
    const int32_t * parents = nullptr;   // token tree (NULL: a sequence)
    const int32_t * seq_ids = nullptr;   // each token's sequence (NULL: all in sequence 0)
    const std::vector<int32_t> * capture_layers = nullptr;  // NULL: the context's list
    bool capture_all_rows = false;       // capture hidden states at every row, not only outputs
    // With capture_all_rows: the captured states stay in backend memory (ctx.hidden_rows) for
    // the draft to read there; ctx.hidden (and sparrow_get_hidden) then holds none.
    bool capture_in_backend = false;
    // With capture_all_rows: each chunk's captured states go to this sink, (first row, rows,
    // hidden [n_capture][rows][n_embd]), instead of accumulating in ctx.hidden.
    std::function<void(int32_t, int32_t, const float *)> hidden_sink;
    // Multimodal prompts: rows whose token is SPARROW_MEDIA_TOKEN take their input embedding
    // from embd (host [n][n_embd]); pos_streams (host, 3 x n, stream-major t/h/w) overrides the
    // positions for M-RoPE models (1-D models use stream t).
    const float * embd = nullptr;
    const int32_t * pos_streams = nullptr;
    // Called after each chunk has run, with the rows done so far (of n): prompt prefill progress
    // (sparrow_generate_params.progress_callback). It may throw to stop; the cache keeps the chunks.
    std::function<void(int32_t)> after_chunk;
};

// Run tokens through the target in chunks of n_batch, appending them to the KV cache; logits of
// the output rows land in ctx.logits, captured hidden states in ctx.hidden. On abort the cache
// keeps the chunks that completed.
void context_forward(sparrow_context & ctx, const int32_t * tokens, int32_t n, const ForwardOptions & opt);
void context_truncate(sparrow_context & ctx, int32_t n_keep);
// Move cache rows src[i] -> dst[i] (dst increasing, each dst <= its src) with their tokens,
// positions and keys; draft features from the first dst row on are dropped (they do not move).
void context_move_rows(sparrow_context & ctx, const int32_t * src, const int32_t * dst, int64_t n);
// Drop the draft features (spec.text_g) of cache rows n_keep and later, before those rows go.
void context_forget_draft_features(sparrow_context & ctx, int32_t n_keep);
// The key of a row: its token, for a media row (embd non-NULL) a hash of its n_embd input
// floats, and its positions in the model's first min(n_pos_streams, 3) streams (pos[s * stride]).
uint64_t context_row_key(const LMHparams & hp, int32_t token, const float * embd, const int32_t * pos, size_t stride);
// The position the next token appended to the cache gets by default.
int32_t context_next_pos(const sparrow_context & ctx);

}  // namespace sparrow
