// api-common.h - what every file implementing sparrow.h shares (api.cpp, api-vision.cpp,
// generation.cpp): the thread-local last-error message and guard(), which runs an entry point's
// body and turns sparrow::Error, std::bad_alloc and anything else thrown into a status code plus
// that message, and the argument checks and output copies the entry points have in common.
// Nothing thrown inside the runtime crosses the C boundary.
#pragma once

#include "common.h"

#include <cstddef>
#include <cstring>
#include <exception>
#include <new>
#include <string>

namespace sparrow {

// One per thread for the whole library (an inline variable: the same object in every file).
inline thread_local std::string g_last_error;

template <typename F> sparrow_status guard(F && body) {
    try {
        body();
        g_last_error.clear();
        return SPARROW_OK;
    } catch (const Error & e) {
        g_last_error = e.what();
        return e.status();
    } catch (const std::bad_alloc &) {
        g_last_error = "out of memory";
        return SPARROW_ERR_OUT_OF_MEMORY;
    } catch (const std::exception & e) {
        g_last_error = std::string("internal error: ") + e.what();
        return SPARROW_ERR_INTERNAL;
    } catch (...) {
        g_last_error = "internal error";
        return SPARROW_ERR_INTERNAL;
    }
}

inline void require(bool cond, const char * message) {
    if (!cond) fail(SPARROW_ERR_INVALID_ARGUMENT, message);
}

// Copy bytes into a caller buffer with the size protocol of sparrow.h.
inline void copy_out(const std::string & s, char * buf, size_t buf_size, size_t * out_len, bool nul) {
    if (out_len) *out_len = s.size();
    if (s.size() + (nul ? 1 : 0) > buf_size) {
        fail(SPARROW_ERR_BUFFER_TOO_SMALL, format("buffer of %zu bytes is too small for %zu", buf_size, s.size() + (nul ? 1 : 0)));
    }
    require(buf != nullptr || s.empty(), "buf is NULL");
    if (!s.empty()) std::memcpy(buf, s.data(), s.size());
    if (nul) buf[s.size()] = '\0';
}

}  // namespace sparrow
