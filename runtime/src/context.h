// context.h - a sparrow_context: one sequence's KV cache, scratch activations, the outputs of
// the last forward pass and the state of a streaming generation.
#pragma once

#include "backend.h"
#include "kv-cache.h"
#include "model.h"
#include "sampling.h"
#include "text-stream.h"

#include <memory>
#include <string>
#include <vector>

struct sparrow_context {
    sparrow_model * model = nullptr;
    sparrow_context_params params{};
    std::unique_ptr<sparrow::Backend> backend;
    std::unique_ptr<sparrow::KVCache> cache;
    sparrow::LMScratch scratch;

    // tokens and (stream-0) positions held in the cache, row by row
    std::vector<int32_t> cache_tokens;
    std::vector<int32_t> cache_pos;

    // outputs of the last forward pass
    std::vector<float> logits;          // n_outputs x n_vocab
    std::vector<float> hidden;          // n_capture x n_outputs x n_embd
    int32_t n_outputs = 0;
    std::vector<int32_t> capture_layers;
    std::vector<uint8_t> tree_mask;     // attention mask of the last tree batch

    // streaming generation
    struct Generation {
        bool active = false;
        bool finished = false;
        sparrow_generate_params params{};
        std::vector<std::string> stop_storage;
        std::vector<int32_t> prompt;
        bool prompt_done = false;
        bool logits_ready = false;
        int32_t last_token = -1;
        sparrow::TextStream text;
        sparrow::Rng rng;
        std::vector<sparrow::TokenProb> dist;
        std::string outbox;            // text produced but not yet handed out (buffer too small)
        int32_t final_finish = 0;      // finish reason to report once the outbox is empty
    } gen;
    sparrow_stats stats{};

    ~sparrow_context() {
        if (backend) sparrow::lm_scratch_free(*backend, scratch);
    }
};
