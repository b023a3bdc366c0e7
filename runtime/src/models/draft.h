// draft.h - the Sparrow draft model (spec v1, docs/draft.md): weights, its small KV cache and
// the step that runs draft entries, written against backend.h.
//
// The draft never sees visual tokens. Its KV holds at most G glimpses + S anchors + a ring of
// the last W committed text entries + the current speculative tree, so a draft step costs the
// same whatever the length of the video. "eagle3" files (llama.cpp) load as the special case
// G = 0, S = 0, W = unbounded.
#pragma once

#include "backend.h"
#include "models/llm.h"

#include <cstdint>
#include <string>
#include <vector>

namespace sparrow {

class GGUFFile;

struct DraftHparams {
    std::string arch;                // "sparrow-draft" or "eagle3"
    std::string target_arch;         // what it was trained for ("" if the file does not say)
    int32_t target_n_layer = 0;
    int32_t target_n_embd = 0;
    int32_t n_vocab = 0;             // the target's vocabulary
    int32_t n_draft_vocab = 0;       // the draft head's (== n_vocab without d2t)
    int32_t n_embd = 0;
    int32_t n_layer = 1;             // decoder layers (eagle3: 1)
    int32_t n_head = 0, n_head_kv = 0, head_dim = 0, n_ff = 0;
    float rms_eps = 1e-6f;
    RopeParams rope;
    std::vector<int32_t> taps;       // target layer inputs fused by fc (n_layer = final hidden)
    int32_t ivsb_layer = 0;          // target layer whose outputs feed the glimpses
    int32_t n_glimpses = 0, n_anchors = 0, window = 0;  // G, S, W (W = 0: unbounded)
};

// One decoder layer. The first reads concat(embd_norm(E[y]), hidden_norm(g)) (2H wide, no
// attn_norm of its own); each one above reads attn_norm(h) of the layer below's output h.
struct DraftLayer {
    Tensor attn_norm, wq, wk, wv, wo, ffn_norm, ffn_gate, ffn_up, ffn_down;
};

struct DraftWeights {
    Tensor fc, embd_norm, hidden_norm, output_norm;
    std::vector<DraftLayer> layers;  // n_layer of them
    Tensor output;                   // reduced-vocabulary head; empty: the target's head
    Tensor glimpse_proj;             // empty for eagle3 files
    const int64_t * d2t = nullptr;   // draft id -> target id (reduced vocabulary only)
};

bool draft_supports_arch(const std::string & arch);
void draft_load(const GGUFFile & file, DraftHparams & hp, DraftWeights & w);
// The weights in the store's backend memory, matrices in their matmul form (see lm_prepare_weights).
DraftWeights draft_prepare_weights(WeightStore & store, const DraftWeights & views);
// Refuse (SPARROW_ERR_INVALID_ARGUMENT, one clear line) a draft made for another target.
void draft_check_fits(const DraftHparams & draft, const LMHparams & target);

// One draft entry to run: the token after its text position, the feature g it reads, its
// RoPE position, and for speculative entries the speculative parent (-1: the last committed).
struct DraftEntry {
    int32_t token = 0;
    int32_t pos = 0;
    bool speculative = false;
    int32_t parent = -1;             // index into the speculative entries added since the commit
};

class DraftState {
public:
    DraftState(Backend & be, const DraftHparams & hp, const DraftWeights & w, const LMWeights & target,
               int64_t n_ctx, int32_t max_speculative);
    ~DraftState();
    DraftState(const DraftState &) = delete;
    DraftState & operator=(const DraftState &) = delete;

    // Start a new sequence. anchor_start: index of the first text entry after the video (0 if
    // there is none).
    void reset(int64_t anchor_start);
    // g = fc(concat(taps)) for n rows; taps is host [n_taps][n][H] (capture-slot major), g host [n][H].
    void fuse_taps(const float * taps, int64_t n, float * g);
    // The same for rows[0..n_rows) of taps that are in backend memory ([n_taps][n][H], the target's
    // verify capture): only the fused features (host [n_rows][H]) cross to the host.
    void fuse_tap_rows(const Tensor & taps, int64_t n, const int32_t * rows, int64_t n_rows, float * g);
    // Glimpses: n pooled ivsb vectors (host [n][H], before glimpse_proj) at the given positions.
    void add_glimpses(const float * pooled, const int32_t * positions, int64_t n);
    // Run n entries (committed ones first, in order; then speculative ones, parents before
    // children). g is host [n][H]. Writes the pre-norm hidden states h (host [n][H]) and, for
    // entries with want_logits[i], draft-vocabulary logits into logits (host, row by row).
    void run(const DraftEntry * entries, int64_t n, const float * g, const uint8_t * want_logits, float * h,
             float * logits);
    // Run speculative entries whose feature is their parent's hidden state (the last committed
    // entry's for parent -1), as drafting does: those states never leave backend memory; only
    // the wanted logits come back. Parents must have run in an earlier call.
    void run_speculative(const DraftEntry * entries, int64_t n, const uint8_t * want_logits, float * logits);
    // Forget the speculative entries (after verification).
    void drop_speculative();

    int64_t n_committed() const { return n_committed_; }
    int64_t n_speculative() const { return (int64_t) spec_slots_.size(); }
    // KV entries in use: glimpses + anchors + ring + speculative (bounded by G + S + W + spec).
    int64_t n_kv_entries() const;
    int32_t to_target_token(int32_t draft_token) const;
    int32_t n_logits() const { return hp_.n_draft_vocab; }

private:
    int64_t slot_for_committed(int64_t index);
    bool visible(int64_t q_index, int64_t k_index) const;

    Backend & be_;
    const DraftHparams & hp_;
    const DraftWeights & w_;
    const LMWeights & target_;
    int64_t ring_capacity_, spec_capacity_, n_slots_;
    int64_t anchor_start_ = 0, n_committed_ = 0, n_glimpses_ = 0, ring_used_ = 0;
    std::vector<Tensor> k_, v_;              // per layer [n_slots][kv_dim]: glimpses | anchors | ring | speculative
    Tensor states_;                          // [1 + spec capacity][H]: hidden states drafting reads back
    std::vector<int64_t> slot_index_;        // draft entry index held by each slot (-1: empty)
    std::vector<int64_t> spec_slots_;        // slot of each speculative entry
    std::vector<int32_t> spec_parent_;
    std::vector<int64_t> spec_index_;
    // scratch
    int64_t n_scratch_ = 0;
    Tensor x_, e_, gn_, q_, k_new_, v_new_, attn_, r_, hn_, gate_, up_, h_, logits_, g_in_, taps_in_, taps_tmp_;
    std::vector<uint8_t> mask_;
    std::vector<int32_t> pos_, ids_, rows_;
    void run_entries(const DraftEntry * entries, int64_t n, const float * g, const uint8_t * want_logits, float * h,
                     float * logits);
    void ensure_scratch(int64_t n);
    void free_scratch();
    void free_kv();
};

}  // namespace sparrow
