// guarded-memory.h - the `ref` backend's memory: host pages that only its own ops may touch.
//
// A device backend's memory cannot be dereferenced by the host. The ref backend imitates that on
// the CPU so tests can prove the model, speculative and API code never do it: every allocation
// lives in one reserved address range that is PROT_NONE except while a GuardedAccess is alive,
// and only the backend's op calls (and its to_host / from_host copies) open one. Any other read
// or write of a tensor's data faults at once (SIGSEGV), naming the culprit in a debugger.
//
// Opening is process-wide (mprotect works on the address space), so ops of every ref backend in
// the process are serialised by one mutex: the backend is a correctness tool, not a fast path.
#pragma once

#include <cstddef>

namespace sparrow {

// Zeroed, 64-byte aligned memory in the guarded range (inaccessible until opened). Throws
// SPARROW_ERR_OUT_OF_MEMORY when the range is exhausted.
void * guarded_alloc(size_t bytes);
// Gives the pages back (they read as zero when reused). nullptr is ignored.
void guarded_free(void * ptr);
// Is ptr inside the guarded range? (tests; a backend may check its arguments with it)
bool guarded_contains(const void * ptr);

// While one of these is alive (on any thread) the whole range is readable and writable; the
// constructor waits for the process-wide lock, so a second one on another thread blocks.
// Not reentrant on one thread.
class GuardedAccess {
public:
    GuardedAccess();
    ~GuardedAccess();
    GuardedAccess(const GuardedAccess &) = delete;
    GuardedAccess & operator=(const GuardedAccess &) = delete;
};

}  // namespace sparrow
