// demo_models.h - the demo's shipped models (tiny Qwen2-VL target, its draft and vision file),
// loaded once by the C API tests that need a real target, draft and tower together, and the
// tokenizer helpers they share.
#pragma once

#include "sparrow.h"
#include "test_util.h"

#include <cstdio>
#include <string>
#include <vector>

namespace sparrow_test {

struct DemoModels {
    sparrow_model * target = nullptr;
    sparrow_model * draft = nullptr;
    sparrow_model * vision = nullptr;

    // Loads root/sparrow_py/demo/data/{target,draft,mmproj}.gguf; false (with the reason printed)
    // when one is missing or refused.
    bool load(const std::string & root) {
        const std::string data = root + "/sparrow_py/demo/data/";
        const sparrow_model_params params = sparrow_model_default_params();
        if (sparrow_model_load((data + "target.gguf").c_str(), params, &target) != SPARROW_OK ||
            sparrow_model_load((data + "draft.gguf").c_str(), params, &draft) != SPARROW_OK ||
            sparrow_model_load((data + "mmproj.gguf").c_str(), params, &vision) != SPARROW_OK) {
            std::fprintf(stderr, "cannot load the demo models: %s\n", sparrow_last_error());
            return false;
        }
        return true;
    }
    ~DemoModels() {
        sparrow_model_free(vision);  // every context using them is freed by now
        sparrow_model_free(draft);
        sparrow_model_free(target);
    }
};

inline std::vector<sparrow_token> tokenize(const sparrow_model * m, const std::string & text) {
    std::vector<sparrow_token> out(text.size() + 8);
    int32_t n = 0;
    if (sparrow_tokenize(m, text.data(), text.size(), false, true, out.data(), (int32_t) out.size(), &n) != SPARROW_OK) {
        check(false, std::string("tokenize: ") + sparrow_last_error());
        return {};
    }
    out.resize((size_t) n);
    return out;
}

inline std::string detokenize(const sparrow_model * m, const std::vector<sparrow_token> & tokens) {
    std::string text(tokens.size() * 32 + 16, '\0');
    size_t len = 0;
    check(sparrow_detokenize(m, tokens.data(), (int32_t) tokens.size(), false, &text[0], text.size(), &len) == SPARROW_OK,
          "detokenize");
    text.resize(len);
    return text;
}

}  // namespace sparrow_test
