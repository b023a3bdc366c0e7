// model.h - what a loaded sparrow_model holds: the mapped GGUF, its tokenizer and, unless the
// file is vocab-only, the language model's hyperparameters and weight views; or, for a draft
// model, the draft's; or, for a vision (mmproj) file, the vision tower's. The views point into
// the file; ops read the copies prepared for their backend (backends.h model_weights).
#pragma once

#include "backends.h"
#include "gguf.h"
#include "models/draft.h"
#include "models/llm.h"
#include "models/vision.h"
#include "tokenizer.h"

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

struct sparrow_model {
    std::unique_ptr<sparrow::GGUFFile> file;
    bool release_mapped_pages = false;  // the CPU store may drop the file's pages it has packed
    std::unique_ptr<sparrow::Tokenizer> tokenizer;
    std::string arch;
    bool vocab_only = false;
    sparrow::LMHparams hparams;
    sparrow::LMWeights weights;
    // a draft model (arch sparrow-draft) has these instead of a tokenizer and LM weights
    bool is_draft = false;
    sparrow::DraftHparams draft_hparams;
    sparrow::DraftWeights draft_weights;
    // a vision file (arch clip, general.type mmproj): tower + projector, no tokenizer
    std::unique_ptr<sparrow::VisionModel> vision;
    // The weights in each backend's memory (packed panels for "cpu"), shared by every context on
    // that backend: made at load for the default backend, on first use for another.
    mutable std::mutex prepared_mutex;
    mutable std::map<std::string, std::unique_ptr<sparrow::PreparedWeights>> prepared;
    // backends a finished call handed back (BackendLease), for the next one
    mutable std::mutex idle_backends_mutex;
    mutable std::vector<sparrow::IdleBackend> idle_backends;
};
