// weight_store.cpp - the CPU backend's WeightStore (backend.h): matrices repacked into panels at
// load (cpu/panels.h) or, for types without panels here (f32; f16 / bf16 below AVX-512), copied as
// they are; every other weight used in place from the mapped file.
//
// The panels and copies are the backend's; the file stays the source of truth. Once a matrix is
// in the store, its pages of the mapping are handed back to the kernel (MADV_DONTNEED on a read-only
// shared mapping only drops them from this process: a later read faults them in again from the
// page cache), so a model does not sit in memory twice. The matrices come one after the other
// from an arena on huge pages (cpu/huge_pages.h): a token streams them in that order. (Rows copied
// rather than read from the mapping's 4 KiB pages: bench_quant model at the AVX2 level, Zen 4, f16
// one row 16.2-18.3 -> 15.0-15.3 ms at 1 thread, six rows 22.7-25.6 -> 17.6-17.8 ms.)
#include "backend.h"
#include "common.h"
#include "cpu/huge_pages.h"
#include "cpu/panels.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

namespace sparrow {

namespace {

class CpuWeightStore final : public WeightStore {
public:
    explicit CpuWeightStore(bool release_mapped_pages) : release_(release_mapped_pages) {}

    Tensor matmul_weight(const Tensor & view) override {
        if (view.data && !mul_mat_supported(view.type)) {
            fail(SPARROW_ERR_UNSUPPORTED, format("tensor '%s' is stored as %s, a type the runtime cannot multiply",
                                                 view.name ? view.name : "?", traits(view.type).name));
        }
        if (!view.data || view.panels) return view;
        const int64_t k = view.cols(), rows = view.rows();
        const bool packed = panels_supported(view.type);
        const size_t bytes = packed ? packed_bytes(view.type, k, rows) : view.nbytes();
        void * p = arena_.alloc(bytes);
        if (!p) fail(SPARROW_ERR_OUT_OF_MEMORY, format("cannot allocate %zu bytes for the weights of '%s'", bytes,
                                                       view.name ? view.name : "?"));
        bytes_ += bytes;
        if (packed) pack_panels(view.type, k, view.data, view.row_bytes(), rows, p);
        else std::memcpy(p, view.data, bytes);
        if (release_) release_pages(view.data, view.nbytes());
        Tensor t = view;
        t.data = p;
        t.panels = packed;
        return t;
    }

    // ops read every other weight straight from the mapped file
    Tensor weight(const Tensor & view) override { return view; }

    size_t bytes() const override { return bytes_; }

private:
    // The whole pages inside [data, data + n) (a neighbour's bytes on a shared edge page stay).
    static void release_pages(const void * data, size_t n) {
        const uintptr_t page = (uintptr_t) sysconf(_SC_PAGESIZE);
        const uintptr_t begin = ((uintptr_t) data + page - 1) / page * page;
        const uintptr_t end = ((uintptr_t) data + n) / page * page;
        if (end > begin) madvise((void *) begin, end - begin, MADV_DONTNEED);
    }

    bool release_;
    StreamedArena arena_;
    size_t bytes_ = 0;
};

}  // namespace

std::unique_ptr<WeightStore> make_cpu_weight_store(bool release_mapped_pages) {
    return std::unique_ptr<WeightStore>(new CpuWeightStore(release_mapped_pages));
}

}  // namespace sparrow
