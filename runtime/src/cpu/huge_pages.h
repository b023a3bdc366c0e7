// huge_pages.h - host memory for the weights decoding streams through once a token (the packed
// matrices), backed by 2 MiB pages where the kernel lends them.
//
// Why: with 4 KiB pages a stream crosses a page every 4 KiB, and the hardware prefetchers stop at
// each crossing (they work on physical addresses) while the TLB misses every few of them. On an
// AMD EPYC Zen 4 core the same read loop streams 20-22 GB/s from 4 KiB pages and 27-29 GB/s from
// 2 MiB pages (bench/read_bandwidth.c with and without MADV_HUGEPAGE, 1 thread). Linux hands out
// anonymous huge pages only to ranges advised so (transparent_hugepage "madvise", the common
// default); where it lends none (THP "never", other systems) the advice is refused and the
// memory is ordinary pages: nothing else depends on it.
#pragma once

#include <cstddef>
#include <vector>

namespace sparrow {

constexpr size_t kHugePageBytes = size_t(2) << 20;

// Many buffers that live as long as the arena (a model's packed matrices), handed out one after
// the other from 2 MiB-aligned chunks advised as huge pages: most of a small model's matrices are
// under 2 MiB (SmolLM2-135M's are 0.2-1.8 MB), so only sharing chunks puts them on huge pages, and
// consecutive matrices stay consecutive in memory, as a token reads them. A chunk's pages are only
// backed as they are first written, so an unused tail costs address space, not memory.
//
// (Not the KV cache: each layer's buffer would start on a huge-page boundary, where the same rows
// of every layer likely compete for the same cache sets; bench_attention, Qwen2-7B shapes at 2
// threads, decoding at 256-1,024 rows took 1.5-2x as long with the layers on huge pages.)
class StreamedArena {
public:
    StreamedArena() = default;
    StreamedArena(const StreamedArena &) = delete;
    StreamedArena & operator=(const StreamedArena &) = delete;
    ~StreamedArena();

    // bytes, 64-byte aligned, not zeroed; nullptr when out of memory
    void * alloc(size_t bytes);

private:
    static constexpr size_t kChunkBytes = size_t(64) << 20;
    std::vector<void *> chunks_;
    char * next_ = nullptr;  // the free part of the current chunk: [next_, end_)
    char * end_ = nullptr;
};

}  // namespace sparrow
