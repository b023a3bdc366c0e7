// model.h - what a loaded sparrow_model holds: the mapped GGUF, its tokenizer and, unless the
// file is vocab-only, the language model's hyperparameters and weight views.
#pragma once

#include "gguf.h"
#include "models/llm.h"
#include "tokenizer.h"

#include <memory>
#include <string>

struct sparrow_model {
    std::unique_ptr<sparrow::GGUFFile> file;
    std::unique_ptr<sparrow::Tokenizer> tokenizer;
    std::string arch;
    bool vocab_only = false;
    sparrow::LMHparams hparams;
    sparrow::LMWeights weights;
};
