// memory-budget.h - refusing work that cannot fit in memory before starting it.
//
// Linux hands out memory lazily: an allocation that is too large succeeds, and the process is
// killed later, midway through a prefill, when the pages are touched. So the large allocations
// whose size the caller chooses (the KV cache for n_ctx, a media prompt's embeddings) are
// compared first with the memory the system says is available (MemAvailable), capped by
// SPARROW_MEMORY_LIMIT_MB when set, and refused with SPARROW_ERR_OUT_OF_MEMORY and a message
// that says how much was needed.
#pragma once

#include <cstdint>

namespace sparrow {

// Bytes available to this process now: MemAvailable (Linux), capped by SPARROW_MEMORY_LIMIT_MB;
// -1 when neither is known.
int64_t available_memory_bytes();

// Throws OUT_OF_MEMORY when `bytes` exceed what is available. `what` names the allocation.
void require_memory(int64_t bytes, const char * what);

}  // namespace sparrow
