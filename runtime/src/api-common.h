// api-common.h - what every file implementing sparrow.h shares (api.cpp, api-vision.cpp): the
// thread-local last-error message and guard(), which runs an entry point's body and turns
// sparrow::Error, std::bad_alloc and anything else thrown into a status code plus that message.
// Nothing thrown inside the runtime crosses the C boundary.
#pragma once

#include "common.h"

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

}  // namespace sparrow
