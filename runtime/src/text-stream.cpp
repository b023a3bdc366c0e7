// text-stream.cpp - see text-stream.h.
#include "text-stream.h"

#include <algorithm>

namespace sparrow {

size_t utf8_complete_prefix(const std::string & s) {
    // Look back at most 3 bytes for the start of the last character.
    const size_t n = s.size();
    for (size_t back = 1; back <= 4 && back <= n; ++back) {
        const unsigned char c = (unsigned char) s[n - back];
        if ((c & 0xC0) == 0x80) continue;  // continuation byte
        size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
        return back >= need ? n : n - back;
    }
    return n;  // only continuation bytes: invalid, nothing to wait for
}

void TextStream::reset(std::vector<std::string> stop_strings) {
    stops_.clear();
    for (auto & s : stop_strings) {
        if (!s.empty()) stops_.push_back(std::move(s));
    }
    pending_.clear();
    ready_ = 0;
}

bool TextStream::push(const std::string & bytes) {
    pending_ += bytes;
    const size_t complete = utf8_complete_prefix(pending_);
    // A stop string can only be found in text not yet emitted, since text that could start one
    // is held back.
    size_t first_match = std::string::npos;
    for (const auto & stop : stops_) {
        size_t at = pending_.find(stop);
        if (at != std::string::npos && at < first_match) first_match = at;
    }
    if (first_match != std::string::npos) {
        pending_.resize(first_match);
        ready_ = first_match;
        return true;
    }
    // hold back the longest suffix that is a proper prefix of some stop string
    size_t hold = 0;
    for (const auto & stop : stops_) {
        for (size_t k = std::min(stop.size() - 1, complete); k > hold; --k) {
            if (pending_.compare(complete - k, k, stop, 0, k) == 0) {
                hold = k;
                break;
            }
        }
    }
    ready_ = complete - hold;
    return false;
}

std::string TextStream::take() {
    std::string out = pending_.substr(0, ready_);
    pending_.erase(0, ready_);
    ready_ = 0;
    return out;
}

std::string TextStream::flush() {
    std::string out = pending_.substr(0, utf8_complete_prefix(pending_));
    if (out.size() < pending_.size()) out += "\xEF\xBF\xBD";  // U+FFFD for the cut character
    pending_.clear();
    ready_ = 0;
    return out;
}

}  // namespace sparrow
