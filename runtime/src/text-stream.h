// text-stream.h - turns the bytes of generated tokens into pieces of valid UTF-8, holding back
// bytes that may still complete a character or begin a stop string. Bytes that can never form
// a character (a random model can emit any byte token) come out as U+FFFD.
#pragma once

#include <string>
#include <vector>

namespace sparrow {

class TextStream {
public:
    void reset(std::vector<std::string> stop_strings);
    // Add a token's bytes. Returns true if a stop string matched: the text before it is then
    // available from take() and nothing after it ever will be.
    bool push(const std::string & bytes);
    // Text safe to emit now.
    std::string take();
    // At the end of generation: everything still held (an incomplete character becomes U+FFFD).
    std::string flush();

private:
    std::vector<std::string> stops_;
    std::string pending_;
    size_t ready_ = 0;  // pending_[0, ready_) may be emitted
};

// s with every invalid UTF-8 sequence (stray or missing continuation bytes, overlong forms,
// surrogates) replaced by U+FFFD, so that what the runtime hands out always decodes.
std::string utf8_sanitize(const std::string & s);

// Length of the longest prefix of s that ends on a complete UTF-8 character.
size_t utf8_complete_prefix(const std::string & s);

}  // namespace sparrow
