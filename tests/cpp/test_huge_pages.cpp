// test_huge_pages.cpp - the CPU weight store's memory (cpu/huge_pages.h): the arena's buffers are
// aligned, disjoint and consecutive, and sit where Linux may back them with 2 MiB pages, as do the
// store's matrices, packed or copied.
//
// The last is read from the kernel: /proc/self/smaps says per mapping whether it is eligible for
// transparent huge pages ("THPeligible"), which it is under THP "madvise" (the usual default) only
// if advised so. Whether the kernel then found free 2 MiB pages depends on the machine's memory,
// so the pages themselves are printed, not checked.

#include "backend.h"
#include "cpu/huge_pages.h"
#include "test_util.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

using namespace sparrow;
using namespace sparrow_test;

namespace {

// The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled ("always", "madvise",
// "never"), or "" where the file is missing.
std::string thp_mode() {
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string line;
    if (!std::getline(f, line)) return "";
    const size_t b = line.find('['), e = line.find(']');
    return b != std::string::npos && e != std::string::npos && e > b ? line.substr(b + 1, e - b - 1) : "";
}

struct MappingInfo {
    bool found = false;
    int thp_eligible = -1;
    long anon_huge_kb = -1;
};

// A mapping's first line in smaps: "lo-hi perms offset dev inode path", the range in hex.
bool parse_range(const std::string & line, uintptr_t * lo, uintptr_t * hi) {
    const std::string first = line.substr(0, line.find(' '));
    const size_t dash = first.find('-');
    if (dash == std::string::npos || first.find_first_not_of("0123456789abcdef-") != std::string::npos) return false;
    *lo = (uintptr_t) std::stoull(first.substr(0, dash), nullptr, 16);
    *hi = (uintptr_t) std::stoull(first.substr(dash + 1), nullptr, 16);
    return true;
}

// The smaps fields of the mapping that holds p.
MappingInfo mapping_of(const void * p) {
    MappingInfo info;
    std::ifstream f("/proc/self/smaps");
    const uintptr_t a = (uintptr_t) p;
    std::string line;
    while (std::getline(f, line)) {
        uintptr_t lo, hi;
        if (parse_range(line, &lo, &hi)) {
            if (info.found) break;  // the next mapping begins
            info.found = a >= lo && a < hi;
        } else if (info.found && line.rfind("THPeligible:", 0) == 0) {
            info.thp_eligible = std::atoi(line.c_str() + 12);
        } else if (info.found && line.rfind("AnonHugePages:", 0) == 0) {
            info.anon_huge_kb = std::atol(line.c_str() + 14);
        }
    }
    return info;
}

// p's mapping is eligible for huge pages exactly where the machine lends them.
void check_huge_eligible(const void * p, const std::string & what) {
#if defined(__linux__)
    const std::string mode = thp_mode();
    const MappingInfo m = mapping_of(p);
    check(m.found && m.thp_eligible >= 0, what + ": its mapping is in /proc/self/smaps with THPeligible");
    if (mode.empty()) {
        std::printf("%s: this kernel has no transparent huge pages; THPeligible %d\n", what.c_str(), m.thp_eligible);
        return;
    }
    const int expected = mode == "never" ? 0 : 1;
    check(m.thp_eligible == expected, what + ": THPeligible " + std::to_string(m.thp_eligible) + " under THP \"" + mode +
                                          "\" (expected " + std::to_string(expected) + ")");
    std::printf("%s: THP \"%s\", eligible %d, %ld KiB of its mapping on huge pages\n", what.c_str(), mode.c_str(),
                m.thp_eligible, m.anon_huge_kb);
#else
    (void) p;
    std::printf("%s: not Linux, huge pages not checked\n", what.c_str());
#endif
}

void test_arena() {
    StreamedArena arena;
    struct Piece {
        uint8_t * p;
        size_t n;
    };
    std::vector<Piece> pieces;
    // small matrices (a model's norms to its projections), a large one that still fits the 64 MiB
    // chunk, one that does not (a new chunk), one over half a chunk that does not (a chunk of its
    // own), then a small one
    const size_t sizes[] = {100, 64, 1, 1769472, 663552, 221184, 40u << 20, 30u << 20, 48u << 20, 7};
    for (const size_t n : sizes) {
        uint8_t * p = (uint8_t *) arena.alloc(n);
        check(p != nullptr, "arena.alloc(" + std::to_string(n) + ") gives memory");
        if (!p) return;
        check((uintptr_t) p % 64 == 0, "arena.alloc(" + std::to_string(n) + ") is 64-byte aligned");
        std::memset(p, (int) (pieces.size() + 1), n);
        pieces.push_back({p, n});
    }
    for (size_t i = 0; i < pieces.size(); i++) {  // no buffer was written over by a later one
        bool kept = true;
        for (size_t j = 0; j < pieces[i].n; j++) kept = kept && pieces[i].p[j] == (uint8_t) (i + 1);
        check(kept, "arena buffer " + std::to_string(i) + " keeps its bytes");
    }
    // buffers follow each other (rounded to 64 bytes) while they fit, as a token reads them
    check(pieces[1].p == pieces[0].p + 128 && pieces[2].p == pieces[1].p + 64 && pieces[3].p == pieces[2].p + 64 &&
              pieces[6].p == pieces[5].p + 221184,
          "consecutive buffers are consecutive in memory");
    check((uintptr_t) pieces[0].p % kHugePageBytes == 0 && (uintptr_t) pieces[7].p % kHugePageBytes == 0 &&
              (uintptr_t) pieces[8].p % kHugePageBytes == 0,
          "chunks start on a huge page");
    check(pieces[9].p == pieces[7].p + (30u << 20), "a buffer with a chunk of its own leaves the current chunk open");
    check_huge_eligible(pieces[3].p, "the arena's first chunk");
    check_huge_eligible(pieces[8].p + (20u << 20), "the arena's own chunk of a large buffer");
}

void test_weight_store() {
    auto store = make_cpu_weight_store(false);
    std::vector<uint8_t> f16 = make_weights(DType::F16, 1536, 576);  // SmolLM2's ffn_up: 1.77 MB
    const Tensor packed = store->matmul_weight(Tensor::matrix(DType::F16, 576, 1536, f16.data()));
    check(packed.panels && packed.data != f16.data(), "an f16 matrix is packed into the store");
    check_huge_eligible(packed.data, "the weight store's packed f16 matrix");
    // f32 has no panels: its rows are copied as they are, onto the same pages
    std::vector<uint8_t> f32 = make_weights(DType::F32, 576, 1536);
    const Tensor copied = store->matmul_weight(Tensor::matrix(DType::F32, 1536, 576, f32.data()));
    check(!copied.panels && copied.data != f32.data() && std::memcmp(copied.data, f32.data(), f32.size()) == 0,
          "an f32 matrix is copied into the store byte for byte");
    check_huge_eligible(copied.data, "the weight store's copied f32 matrix");
}

}  // namespace

int main() {
    test_arena();
    test_weight_store();
    return finish("test_huge_pages");
}
