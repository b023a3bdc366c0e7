// common.h - error type and small helpers shared by every runtime file.
//
// Inside the runtime, failures are C++ exceptions of type sparrow::Error carrying a public
// status code; api.cpp is the only place that catches them and turns them into a status plus
// the thread-local message. That keeps the model and format code free of error plumbing while
// guaranteeing nothing escapes the C boundary.
#pragma once

#include "sparrow.h"

#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace sparrow {

class Error : public std::runtime_error {
public:
    Error(sparrow_status status, const std::string & message)
        : std::runtime_error(message), status_(status) {}
    sparrow_status status() const { return status_; }

private:
    sparrow_status status_;
};

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
inline std::string format(const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    va_list copy;
    va_copy(copy, args);
    int n = vsnprintf(nullptr, 0, fmt, copy);
    va_end(copy);
    std::string out(n > 0 ? (size_t) n : 0, '\0');
    if (n > 0) vsnprintf(&out[0], (size_t) n + 1, fmt, args);
    va_end(args);
    return out;
}

[[noreturn]] inline void fail(sparrow_status status, const std::string & message) {
    throw Error(status, message);
}

// Milliseconds on a steady clock, for the timings in sparrow_stats and adaptive speculation.
inline double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

}  // namespace sparrow
