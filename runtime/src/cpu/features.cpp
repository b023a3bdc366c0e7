// features.cpp - the CPU's SIMD level, capped by SPARROW_SIMD, and its L1 data cache (see features.h).
#include "cpu/features.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace sparrow {

namespace {

constexpr SimdLevel kTopLevel = SimdLevel::Avx512Bf16;  // the cap when SPARROW_SIMD does not lower it

SimdLevel cpu_level() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) {
        return SimdLevel::Scalar;
    }
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni")) {
        return __builtin_cpu_supports("avx512bf16") ? SimdLevel::Avx512Bf16 : SimdLevel::Avx512;
    }
    return SimdLevel::Avx2;
#else
    return SimdLevel::Scalar;
#endif
}

SimdLevel requested_cap() {
    const char * v = std::getenv("SPARROW_SIMD");
    if (!v || !*v) return kTopLevel;
    if (!std::strcmp(v, "scalar")) return SimdLevel::Scalar;
    if (!std::strcmp(v, "avx2")) return SimdLevel::Avx2;
    if (!std::strcmp(v, "avx512")) return SimdLevel::Avx512;
    if (!std::strcmp(v, "avx512bf16")) return SimdLevel::Avx512Bf16;
    // a typo must not silently pick a level: say so once and use the CPU's best
    std::fprintf(stderr, "sparrow: SPARROW_SIMD=%s is not one of scalar, avx2, avx512, avx512bf16; ignored\n", v);
    return kTopLevel;
}

}  // namespace

SimdLevel simd_level_available() {
    static const SimdLevel level = [] {
        const SimdLevel cpu = cpu_level(), cap = requested_cap();
        return (int) cap < (int) cpu ? cap : cpu;
    }();
    return level;
}

bool small_l1_data_cache() {
#if defined(_SC_LEVEL1_DCACHE_SIZE)
    static const bool small = [] {
        const long bytes = sysconf(_SC_LEVEL1_DCACHE_SIZE);
        return bytes > 0 && bytes < 48 * 1024;
    }();
    return small;
#else
    return false;
#endif
}

}  // namespace sparrow
