// model.h - what a loaded sparrow_model holds: the mapped GGUF, its tokenizer and, unless the
// file is vocab-only, the language model's hyperparameters and weight views; or, for a draft
// model, the draft's; or, for a vision (mmproj) file, the vision tower's.
#pragma once

#include "gguf.h"
#include "models/draft.h"
#include "models/llm.h"
#include "models/vision.h"
#include "tokenizer.h"

#include <memory>
#include <string>

struct sparrow_model {
    std::unique_ptr<sparrow::GGUFFile> file;
    // The weights' matmul forms (packed panels), owned here and shared by every context.
    std::unique_ptr<sparrow::WeightStore> store;
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
};
