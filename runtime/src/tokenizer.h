// tokenizer.h - byte-level BPE (tokenizer.ggml.model = "gpt2") with the pre-tokenizers of the
// model families Sparrow runs; encode is identical to Hugging Face tokenizers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sparrow {

class GGUFFile;

// Token types as llama.cpp stores them in tokenizer.ggml.token_type.
enum class TokenType : int32_t {
    UNDEFINED = 0, NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6,
};

class Tokenizer {
public:
    // Reads tokenizer.ggml.* keys; throws sparrow::Error (UNSUPPORTED for a vocab kind or
    // pre-tokenizer we do not implement, FORMAT for inconsistent data).
    static std::unique_ptr<Tokenizer> from_gguf(const GGUFFile & file);
    ~Tokenizer();

    int32_t n_vocab() const;
    int32_t bos() const;   // -1 if none
    int32_t eos() const;
    int32_t eot() const;
    bool add_bos() const;
    bool is_eog(int32_t token) const;

    // add_special: BOS/EOS as the vocab's add_bos/add_eos flags say.
    // parse_special: match control/user-defined tokens written literally in the text.
    std::vector<int32_t> encode(std::string_view text, bool add_special, bool parse_special) const;
    // Raw bytes of a token (byte-level decoding undone). special=false renders control tokens
    // as nothing. Throws INVALID_ARGUMENT for an out-of-range id.
    std::string token_to_piece(int32_t token, bool special) const;

private:
    Tokenizer();
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace sparrow
