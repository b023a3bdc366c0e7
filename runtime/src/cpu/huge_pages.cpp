// huge_pages.cpp - huge_pages.h's buffers.
#include "cpu/huge_pages.h"

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparrow {

namespace {

// 2 MiB-aligned memory of bytes rounded up to whole huge pages, advised as huge.
void * alloc_huge_aligned(size_t bytes) {
    const size_t rounded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void * p = nullptr;
    if (posix_memalign(&p, kHugePageBytes, rounded) != 0) return nullptr;
#if defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // refused where THP is off: ordinary pages then
#endif
    return p;
}

}  // namespace

StreamedArena::~StreamedArena() {
    for (void * c : chunks_) std::free(c);
}

void * StreamedArena::alloc(size_t bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    if (rounded > (size_t) (end_ - next_)) {
        if (rounded > kChunkBytes / 2) {  // a large matrix gets a chunk of its own; the current one stays open
            void * own = alloc_huge_aligned(rounded);
            if (own) chunks_.push_back(own);
            return own;
        }
        void * chunk = alloc_huge_aligned(kChunkBytes);
        if (!chunk) return nullptr;
        chunks_.push_back(chunk);
        next_ = (char *) chunk;
        end_ = next_ + kChunkBytes;
    }
    void * p = next_;
    next_ += rounded;
    return p;
}

}  // namespace sparrow
