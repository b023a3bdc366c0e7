// llm.h - the decoder-only language models (llama, qwen2, qwen2vl): hyperparameters, weights
// and the forward pass, written once against backend.h.
#pragma once

#include "backend.h"

#include <cstdint>
#include <string>
#include <vector>

namespace sparrow {

class GGUFFile;
class KVCache;

struct LMHparams {
    std::string arch;
    int32_t n_vocab = 0;
    int32_t n_embd = 0;
    int32_t n_layer = 0;
    int32_t n_head = 0;
    int32_t n_head_kv = 0;
    int32_t head_dim = 0;
    int32_t n_ff = 0;
    int32_t n_ctx_train = 0;
    float rms_eps = 1e-6f;
    RopeParams rope;
    int32_t n_pos_streams = 1;  // 4 for M-RoPE (t, h, w, extra), 1 otherwise
};

struct LMLayer {
    Tensor attn_norm, wq, wk, wv, bq, bk, bv, wo;
    Tensor ffn_norm, ffn_gate, ffn_up, ffn_down;
    bool has_qkv_bias = false;
};

struct LMWeights {
    Tensor tok_embd, output_norm, output;  // output aliases tok_embd when tied
    std::vector<LMLayer> layers;
};

// A view of a tensor in the mapped file with its shape checked (cols = ne[0], rows = the
// rest); f32_only refuses other types. Missing and not required: an empty Tensor.
Tensor bind_tensor(const GGUFFile & f, const std::string & name, int64_t cols, int64_t rows, bool required,
                   bool f32_only = false);

// Is `arch` a decoder this file runs?
bool lm_supports_arch(const std::string & arch);
// Read hparams and bind weight views into the mapped file; validates every shape and type.
void lm_load(const GGUFFile & file, LMHparams & hp, LMWeights & w);
// The weights as the forward pass reads them, from the store (backend.h WeightStore): every
// matrix it multiplies by in its matmul form, every other tensor in the backend's memory. The
// embedding table is a plain weight (get_rows reads it) also when the output head is tied to it.
LMWeights lm_prepare_weights(WeightStore & store, const LMWeights & views);

// Scratch activations for batches of up to n_batch tokens, allocated once per context.
struct LMScratch {
    int64_t n_batch = 0;
    Tensor x, h, q, k, v, attn, ff_gate, ff_up, out_rows;
    Tensor logits;             // a device backend's staging rows for logits (grown on demand)
    std::vector<int32_t> pos;  // n_pos_streams * n_batch
    std::vector<int32_t> ids;  // token ids with media rows mapped to a valid id
};
void lm_scratch_init(Backend & be, const LMHparams & hp, int64_t n_batch, LMScratch & s);
void lm_scratch_free(Backend & be, LMScratch & s);

// What one forward pass should produce.
struct LMForwardRequest {
    const int32_t * tokens = nullptr;   // SPARROW_MEDIA_TOKEN rows read their input from embd
    const float * embd = nullptr;       // host [n_tokens][n_embd], or null
    int64_t n_tokens = 0;               // <= scratch n_batch
    const int32_t * pos = nullptr;      // n_pos_streams * n_tokens positions (stream-major)
    const int32_t * out_rows = nullptr; // batch rows whose logits are wanted
    int64_t n_out = 0;
    const uint8_t * mask = nullptr;     // n_tokens x (cache rows + n_tokens): tree attention; null = causal
    const int32_t * capture_layers = nullptr;  // layer inputs to record
    int32_t n_capture = 0;
    const int32_t * capture_rows = nullptr;    // rows to record them at (null: out_rows)
    int64_t n_capture_rows = 0;
    float * logits = nullptr;           // host: n_out x n_vocab
    float * hidden = nullptr;           // host: n_capture x n_capture_rows (or n_out) x n_embd
    // Instead of `hidden`: keep the captured rows in backend memory, capture slot c's rows at
    // rows [c * hidden_slot_rows + hidden_first, + n_capture_rows) of this tensor.
    Tensor * hidden_out = nullptr;
    int64_t hidden_slot_rows = 0, hidden_first = 0;
    bool (*abort)(void *) = nullptr;
    void * abort_data = nullptr;
};

// Runs the tokens through the model, appending them to the cache at cache.size().
// Returns false if aborted (the cache is then left as it was).
bool lm_forward(Backend & be, const LMHparams & hp, const LMWeights & w, KVCache & cache,
                LMScratch & s, const LMForwardRequest & req);

}  // namespace sparrow
