// memory-budget.cpp - see memory-budget.h.
#include "memory-budget.h"

#include "common.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace sparrow {

int64_t available_memory_bytes() {
    int64_t available = -1;
    if (FILE * f = std::fopen("/proc/meminfo", "r")) {
        char line[256];
        long long kb = 0;
        while (std::fgets(line, sizeof(line), f)) {
            if (std::sscanf(line, "MemAvailable: %lld kB", &kb) == 1) {
                available = (int64_t) kb * 1024;
                break;
            }
        }
        std::fclose(f);
    }
    if (const char * limit = std::getenv("SPARROW_MEMORY_LIMIT_MB")) {
        char * end = nullptr;
        const long long mb = std::strtoll(limit, &end, 10);
        if (end != limit && *end == '\0' && mb >= 0) {
            const int64_t cap = (int64_t) mb * 1024 * 1024;
            available = available < 0 ? cap : std::min(available, cap);
        }
    }
    return available;
}

void require_memory(int64_t bytes, const char * what) {
    const int64_t available = available_memory_bytes();
    if (available >= 0 && bytes > available) {
        fail(SPARROW_ERR_OUT_OF_MEMORY, format("%s needs %.0f MiB but only %.0f MiB are available", what,
                                               (double) bytes / (1 << 20), (double) available / (1 << 20)));
    }
}

}  // namespace sparrow
