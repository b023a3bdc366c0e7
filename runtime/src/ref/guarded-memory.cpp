// guarded-memory.cpp - see guarded-memory.h. One reserved range, PROT_NONE while closed; a
// first-fit free list of page runs inside it (the ref backend allocates few, long-lived blocks:
// weights, scratch, caches).
#include "ref/guarded-memory.h"

#include "common.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>

namespace sparrow {

namespace {

// Address space only: MAP_NORESERVE pages cost nothing until an open scope touches them.
constexpr size_t kReserveBytes = (size_t) 1 << 36;  // 64 GiB
constexpr size_t kHugePage = (size_t) 2 << 20;

struct Arena {
    std::mutex alloc_mutex;              // the block lists
    std::mutex access_mutex;             // one open scope at a time
    uint8_t * base = nullptr;
    size_t page = 4096;
    size_t used = 0;                     // bytes [0, used) may hold blocks
    size_t open_bytes = 0;               // bytes [0, open_bytes) are readable now (0: closed)
    std::map<size_t, size_t> free_runs;  // offset -> bytes, below `used`
    std::map<size_t, size_t> blocks;     // offset -> bytes of each live allocation

    Arena() {
        page = (size_t) sysconf(_SC_PAGESIZE);
        // 2 MiB aligned and backed by huge pages where the kernel allows: opening and closing
        // rewrites the protection of every populated page, 512 times fewer entries that way
        void * p = mmap(nullptr, kReserveBytes + kHugePage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return;
        base = (uint8_t *) (((uintptr_t) p + kHugePage - 1) / kHugePage * kHugePage);
#ifdef MADV_HUGEPAGE
        madvise(base, kReserveBytes, MADV_HUGEPAGE);
#endif
    }
};

Arena & arena() {
    static Arena * a = new Arena();  // never destroyed: blocks may be freed by static destructors
    return *a;
}

}  // namespace

void * guarded_alloc(size_t bytes) {
    Arena & a = arena();
    if (!a.base) fail(SPARROW_ERR_OUT_OF_MEMORY, format("the ref backend could not reserve its address range: %s", strerror(errno)));
    const size_t size = std::max<size_t>(a.page, (bytes + a.page - 1) / a.page * a.page);
    std::lock_guard<std::mutex> lock(a.alloc_mutex);
    size_t offset = a.used;
    for (auto it = a.free_runs.begin(); it != a.free_runs.end(); ++it) {
        if (it->second < size) continue;
        offset = it->first;
        const size_t rest = it->second - size;
        a.free_runs.erase(it);
        if (rest) a.free_runs[offset + size] = rest;
        break;
    }
    if (offset == a.used) {
        if (a.used + size > kReserveBytes) {
            fail(SPARROW_ERR_OUT_OF_MEMORY, format("the ref backend's range is full (%zu bytes asked)", bytes));
        }
        a.used += size;
        if (a.open_bytes && a.used > a.open_bytes) {  // allocated inside an open scope: open it too
            mprotect(a.base + a.open_bytes, a.used - a.open_bytes, PROT_READ | PROT_WRITE);
            a.open_bytes = a.used;
        }
    }
    a.blocks[offset] = size;
    return a.base + offset;  // fresh or returned pages: zero either way (see guarded_free)
}

void guarded_free(void * ptr) {
    if (!ptr) return;
    Arena & a = arena();
    std::lock_guard<std::mutex> lock(a.alloc_mutex);
    const size_t offset = (size_t) ((uint8_t *) ptr - a.base);
    auto it = a.blocks.find(offset);
    if (!guarded_contains(ptr) || it == a.blocks.end()) {
        fail(SPARROW_ERR_INTERNAL, "guarded_free of a pointer the ref backend did not allocate");
    }
    const size_t size = it->second;
    a.blocks.erase(it);
    // drops the pages: they read as zero next time, as alloc promises
    madvise(a.base + offset, size, MADV_DONTNEED);
    // merge with the neighbouring free runs
    size_t start = offset, end = offset + size;
    auto next = a.free_runs.lower_bound(start);
    if (next != a.free_runs.end() && next->first == end) {
        end += next->second;
        next = a.free_runs.erase(next);
    }
    if (next != a.free_runs.begin()) {
        auto prev = std::prev(next);
        if (prev->first + prev->second == start) {
            start = prev->first;
            a.free_runs.erase(prev);
        }
    }
    if (end == a.used) {
        a.used = start;  // the top run goes back to the untouched part of the range
    } else {
        a.free_runs[start] = end - start;
    }
}

bool guarded_contains(const void * ptr) {
    const Arena & a = arena();
    return a.base && (const uint8_t *) ptr >= a.base && (const uint8_t *) ptr < a.base + kReserveBytes;
}

GuardedAccess::GuardedAccess() {
    Arena & a = arena();
    a.access_mutex.lock();
    std::lock_guard<std::mutex> lock(a.alloc_mutex);
    // whole huge pages, so that opening never splits one (the rest of the last is unused range)
    const size_t bytes = (a.used + kHugePage - 1) / kHugePage * kHugePage;
    if (bytes && mprotect(a.base, bytes, PROT_READ | PROT_WRITE) != 0) {
        a.access_mutex.unlock();
        fail(SPARROW_ERR_OUT_OF_MEMORY, format("the ref backend could not open its memory: %s", strerror(errno)));
    }
    a.open_bytes = bytes;
}

GuardedAccess::~GuardedAccess() {
    Arena & a = arena();
    {
        std::lock_guard<std::mutex> lock(a.alloc_mutex);
        // all that was opened: blocks freed meanwhile may have lowered `used`
        if (a.open_bytes) mprotect(a.base, a.open_bytes, PROT_NONE);
        a.open_bytes = 0;
    }
    a.access_mutex.unlock();
}

}  // namespace sparrow
