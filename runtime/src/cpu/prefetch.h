// prefetch.h - a software prefetch into L1 or into L2, the level chosen at run time.
//
// Kernels that stream weights or a KV cache prefetch ahead of use, into L1 where the L1 data cache
// is large and into L2 where it is small (cpu/features.h small_l1_data_cache; the measurements
// behind each choice are beside the kernels: cpu/panel_driver.h, cpu/ops.h). x86 only.
#pragma once

#include <immintrin.h>

namespace sparrow {

// The line at p into L1 (into_l1) or L2. Call it inside the loop that walks the lines, the level
// a run-time flag: written as one loop per level with the choice around them, GCC 12 dropped the
// prefetches of both loops (the attention's and the panels' alike); and forced inline, since GCC
// 12 also judged an outlined function of prefetches alone free of effects and deleted its calls.
__attribute__((always_inline)) inline void prefetch_line(const void * p, bool into_l1) {
    if (into_l1) _mm_prefetch((const char *) p, _MM_HINT_T0);
    else _mm_prefetch((const char *) p, _MM_HINT_T1);
}

}  // namespace sparrow
