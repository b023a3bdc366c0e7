// weight_store.cpp - the CPU backend's WeightStore (backend.h): quantized matrices repacked into
// 16-row panels at load (cpu/panels.h), everything else used in place from the mapped file.
//
// The panels are the backend's copy; the file stays the source of truth. Once a matrix is
// packed, its pages of the mapping are handed back to the kernel (MADV_DONTNEED on a read-only
// shared mapping only drops them from this process: a later read faults them in again from the
// page cache), so a model does not sit in memory twice. The panels come one after the other from
// an arena on huge pages (cpu/huge_pages.h): a token streams them in that order.
#include "backend.h"
#include "common.h"
#include "cpu/huge_pages.h"
#include "cpu/panels.h"

#include <sys/mman.h>
#include <unistd.h>

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
        if (!view.data || view.panels || !panels_supported(view.type)) return view;
        const int64_t k = view.cols(), rows = view.rows();
        const size_t bytes = packed_bytes(view.type, k, rows);
        void * p = arena_.alloc(bytes);
        if (!p) fail(SPARROW_ERR_OUT_OF_MEMORY, format("cannot allocate %zu bytes for packed weights", bytes));
        bytes_ += bytes;
        pack_panels(view.type, k, view.data, view.row_bytes(), rows, p);
        if (release_) release_pages(view.data, view.nbytes());
        Tensor t = view;
        t.data = p;
        t.panels = true;
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
