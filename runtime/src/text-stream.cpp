// text-stream.cpp - see text-stream.h.
#include "text-stream.h"

#include <algorithm>
#include <cstdint>

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

std::string utf8_sanitize(const std::string & s) {
    std::string out;
    out.reserve(s.size());
    const size_t n = s.size();
    size_t i = 0;
    while (i < n) {
        const unsigned char c = (unsigned char) s[i];
        size_t len = 0;
        uint32_t min_cp = 0;
        if (c < 0x80) { len = 1; }
        else if ((c >> 5) == 0x6) { len = 2; min_cp = 0x80; }
        else if ((c >> 4) == 0xE) { len = 3; min_cp = 0x800; }
        else if ((c >> 3) == 0x1E) { len = 4; min_cp = 0x10000; }
        bool ok = len > 0 && i + len <= n;
        uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
        for (size_t k = 1; ok && k < len; ++k) {
            const unsigned char cc = (unsigned char) s[i + k];
            ok = (cc & 0xC0) == 0x80;
            cp = (cp << 6) | (cc & 0x3F);
        }
        // overlong forms, surrogates and code points past U+10FFFF are invalid too
        if (ok && len > 1 && (cp < min_cp || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)) ok = false;
        if (ok) {
            out.append(s, i, len);
            i += len;
        } else {
            out += "\xEF\xBF\xBD";
            i += 1;
        }
    }
    return out;
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
    std::string out = utf8_sanitize(pending_.substr(0, ready_));
    pending_.erase(0, ready_);
    ready_ = 0;
    return out;
}

std::string TextStream::flush() {
    std::string out = utf8_sanitize(pending_.substr(0, utf8_complete_prefix(pending_)));
    if (utf8_complete_prefix(pending_) < pending_.size()) out += "\xEF\xBF\xBD";  // the cut character
    pending_.clear();
    ready_ = 0;
    return out;
}

}  // namespace sparrow
