// panels.cpp - packing into 16-row panels, activation summaries, and the run-time choice of the
// panel kernels (cpu/panels_avx512.cpp, cpu/panels_avx2.cpp). See panels.h for the layouts.
#include "cpu/panels.h"

#include "common.h"
#include "cpu/features.h"

#include <algorithm>
#include <cstring>

namespace sparrow {

#if defined(__x86_64__) || defined(__i386__)
#define SPARROW_PANEL_KERNELS 1
using PanelKernel = void (*)(const PanelProduct & p, int64_t first_panel, int64_t n_panels, int64_t c0, int64_t nc);
namespace avx512 {
void panel_q8_0(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
void panel_q4_0(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
void panel_q4_1(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
void panel_q4_K(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
void panel_q5_K(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
void panel_q6_K(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
}  // namespace avx512
using FloatPanelKernel = void (*)(int64_t k, const void * packed, size_t ws, int64_t nr, const void * x, size_t xs,
                                  int64_t nc, float * y, int64_t ys);
namespace avx512 {  // cpu/matmul_avx512.cpp
void panel_f16(int64_t k, const void * packed, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y,
               int64_t ys);
void panel_bf16(int64_t k, const void * packed, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y,
                int64_t ys);
}  // namespace avx512
namespace avx512bf16 {  // cpu/matmul_avx512bf16.cpp
void panel_bf16(int64_t k, const void * packed, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y,
                int64_t ys);
}  // namespace avx512bf16
namespace avx2 {
void panel_q8_0(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
void panel_q4_0(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
void panel_q4_1(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
void panel_q4_K(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
void panel_q5_K(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
void panel_q6_K(const PanelProduct &, int64_t, int64_t, int64_t, int64_t);
}  // namespace avx2
#endif

namespace {

// How the bytes of one file block move into a panel block. Groups4: bytes [src, src + bytes)
// of each row become bytes/4 groups, group j of row r at dst + (16 j + r) * 4 (xor'ed with
// flip). Half: the fp16 at src of row r at dst + 2 r. PerRow: byte s of [src, src + bytes) of
// row r at dst + 16 s + r.
enum class Kind { Groups4, Half, PerRow };
struct Field {
    Kind kind;
    bool meta;      // in the scale region (else the quant region)
    size_t src;     // offset in the file block
    size_t bytes;
    size_t dst;     // offset in the panel block's region
    uint8_t flip;
};

struct PanelType {
    panel::Geometry geo;
    Field fields[5];
    int n_fields;
};

const PanelType * panel_type(DType t) {
    static const PanelType q8_0 = {{QK_32, 512, 32},
                                   {{Kind::Groups4, false, 2, 32, 0, 0x80}, {Kind::Half, true, 0, 2, 0, 0}}, 2};
    static const PanelType q4_0 = {{QK_32, 256, 32},
                                   {{Kind::Groups4, false, 2, 16, 0, 0}, {Kind::Half, true, 0, 2, 0, 0}}, 2};
    static const PanelType q4_1 = {{QK_32, 256, 64},
                                   {{Kind::Groups4, false, 4, 16, 0, 0}, {Kind::Half, true, 0, 2, 0, 0},
                                    {Kind::Half, true, 2, 2, 32, 0}}, 3};
    static const PanelType q4_K = {{QK_K, 2048, 256},
                                   {{Kind::Groups4, false, 16, 128, 0, 0}, {Kind::Half, true, 0, 2, 0, 0},
                                    {Kind::Half, true, 2, 2, 32, 0}, {Kind::Groups4, true, 4, 12, 64, 0}}, 4};
    static const PanelType q5_K = {{QK_K, 2560, 256},
                                   {{Kind::Groups4, false, 16, 32, 0, 0}, {Kind::Groups4, false, 48, 128, 512, 0},
                                    {Kind::Half, true, 0, 2, 0, 0}, {Kind::Half, true, 2, 2, 32, 0},
                                    {Kind::Groups4, true, 4, 12, 64, 0}}, 5};
    static const PanelType q6_K = {{QK_K, 3072, 288},
                                   {{Kind::Groups4, false, 0, 128, 0, 0}, {Kind::Groups4, false, 128, 64, 2048, 0},
                                    {Kind::Half, true, 208, 2, 0, 0}, {Kind::PerRow, true, 192, 16, 32, 0}}, 4};
    switch (t) {
        case DType::Q8_0: return &q8_0;
        case DType::Q4_0: return &q4_0;
        case DType::Q4_1: return &q4_1;
        case DType::Q4_K: return &q4_K;
        case DType::Q5_K: return &q5_K;
        case DType::Q6_K: return &q6_K;
        default: return nullptr;
    }
}

// The byte moves of one row's field: fn(offset in the file block, offset in the panel block's
// region, length, flip) for each run of bytes that stays together.
template <typename Fn>
inline void for_each_move(const Field & f, int r, Fn && fn) {
    switch (f.kind) {
        case Kind::Groups4:
            for (size_t g = 0; g < f.bytes / 4; g++) fn(f.src + 4 * g, f.dst + (g * kPanelRows + r) * 4, 4, f.flip);
            break;
        case Kind::Half: fn(f.src, f.dst + (size_t) r * 2, 2, 0); break;
        case Kind::PerRow:
            for (size_t i = 0; i < f.bytes; i++) fn(f.src + i, f.dst + i * kPanelRows + r, 1, 0);
            break;
    }
}

inline void copy_flipped(uint8_t * dst, const uint8_t * src, size_t n, uint8_t flip) {
    if (n == 4) {  // the bulk of every layout: one word (packing a model is a load-time cost)
        uint32_t v;
        std::memcpy(&v, src, 4);
        v ^= 0x01010101u * flip;
        std::memcpy(dst, &v, 4);
        return;
    }
    for (size_t i = 0; i < n; i++) dst[i] = src[i] ^ flip;
}

#if SPARROW_PANEL_KERNELS
struct PanelKernels {
    PanelKernel fn[32] = {};
    FloatPanelKernel f16 = nullptr, bf16 = nullptr;
};

PanelKernels select_panel_kernels() {
    PanelKernels k;
    const SimdLevel level = simd_level_available();
    auto set = [&k](DType t, PanelKernel fn) { k.fn[(size_t) t] = fn; };
    if (level >= SimdLevel::Avx512) {
        set(DType::Q8_0, avx512::panel_q8_0);
        set(DType::Q4_0, avx512::panel_q4_0);
        set(DType::Q4_1, avx512::panel_q4_1);
        set(DType::Q4_K, avx512::panel_q4_K);
        set(DType::Q5_K, avx512::panel_q5_K);
        set(DType::Q6_K, avx512::panel_q6_K);
        k.f16 = avx512::panel_f16;
        k.bf16 = level >= SimdLevel::Avx512Bf16 ? avx512bf16::panel_bf16 : avx512::panel_bf16;
    } else if (level >= SimdLevel::Avx2) {
        set(DType::Q8_0, avx2::panel_q8_0);
        set(DType::Q4_0, avx2::panel_q4_0);
        set(DType::Q4_1, avx2::panel_q4_1);
        set(DType::Q4_K, avx2::panel_q4_K);
        set(DType::Q5_K, avx2::panel_q5_K);
        set(DType::Q6_K, avx2::panel_q6_K);
    }
    return k;
}

const PanelKernels & panel_kernels() {
    static const PanelKernels k = select_panel_kernels();
    return k;
}
#endif

PanelKernel kernel_for(DType t) {
#if SPARROW_PANEL_KERNELS
    const size_t id = (size_t) t;
    return id < 32 ? panel_kernels().fn[id] : nullptr;
#else
    (void) t;
    return nullptr;
#endif
}

FloatPanelKernel float_kernel_for(DType t) {
#if SPARROW_PANEL_KERNELS
    return t == DType::F16 ? panel_kernels().f16 : t == DType::BF16 ? panel_kernels().bf16 : nullptr;
#else
    (void) t;
    return nullptr;
#endif
}

constexpr int kGroupRows = 4;  // f16 / bf16: rows interleaved per group (see panels.h)
int64_t padded_cols(int64_t k) { return (k + 15) / 16 * 16; }
// Where row r's values from column j (a multiple of 16) start in a packed f16 / bf16 matrix, in
// values: its group's, then the 16 columns', then the row's place among the 4.
size_t float_panel_at(int64_t r, int64_t j, int64_t k) {
    return (size_t) ((r / kGroupRows) * kGroupRows * padded_cols(k) + j * kGroupRows + (r % kGroupRows) * 16);
}

}  // namespace

bool is_float_panel_type(DType t) { return t == DType::F16 || t == DType::BF16; }
size_t float_panel_row_stride(int64_t k) { return (size_t) padded_cols(k) * 2; }

void float_panel_mul_mat(DType t, int64_t k, const void * packed, int64_t nr, const void * x, size_t xs, int64_t nc,
                         float * y, int64_t ys) {
    FloatPanelKernel fn = float_kernel_for(t);
    if (!fn) fail(SPARROW_ERR_INTERNAL, format("no panel kernel for %s", traits(t).name));
    fn(k, packed, float_panel_row_stride(k), nr, x, xs, nc, y, ys);
}

namespace panel {
Geometry geometry(DType t) {
    const PanelType * pt = panel_type(t);
    return pt ? pt->geo : Geometry{0, 0, 0};
}
}  // namespace panel

bool panels_supported(DType t) { return kernel_for(t) != nullptr || float_kernel_for(t) != nullptr; }

size_t panel_bytes(DType t, int64_t k) {
    if (is_float_panel_type(t)) return (size_t) kPanelRows * float_panel_row_stride(k);
    const PanelType * pt = panel_type(t);
    if (!pt || k % pt->geo.block != 0) fail(SPARROW_ERR_INTERNAL, "panel_bytes: not a panel type or shape");
    const size_t nb = (size_t) (k / pt->geo.block);
    return (nb * (pt->geo.quant + pt->geo.meta) + 63) / 64 * 64;
}

size_t packed_bytes(DType t, int64_t k, int64_t rows) {
    return panel_bytes(t, k) * (size_t) ((rows + kPanelRows - 1) / kPanelRows);
}

void pack_panels(DType t, int64_t k, const void * src, size_t row_stride, int64_t rows, void * dst) {
    if (is_float_panel_type(t)) {  // padding rows and columns are zeros
        std::memset(dst, 0, packed_bytes(t, k, rows));
        for (int64_t r = 0; r < rows; r++) {
            const uint16_t * row = (const uint16_t *) ((const uint8_t *) src + (size_t) r * row_stride);
            for (int64_t j = 0; j < k; j += 16) {
                std::memcpy((uint16_t *) dst + float_panel_at(r, j, k), row + j, (size_t) std::min<int64_t>(16, k - j) * 2);
            }
        }
        return;
    }
    const PanelType & pt = *panel_type(t);
    const size_t nb = (size_t) (k / pt.geo.block), file_block = traits(t).type_size;
    const size_t pb = panel_bytes(t, k), used = nb * (pt.geo.quant + pt.geo.meta);
    const int64_t n_panels = (rows + kPanelRows - 1) / kPanelRows;
    for (int64_t p = 0; p < n_panels; p++) {
        uint8_t * panel = (uint8_t *) dst + (size_t) p * pb;
        const int n_rows = (int) std::min<int64_t>(kPanelRows, rows - p * kPanelRows);
        // padding rows are zero blocks (scale 0: they add nothing), the tail up to 64 bytes zeros
        if (n_rows < kPanelRows) std::memset(panel, 0, used);
        std::memset(panel + used, 0, pb - used);
        for (int r = 0; r < n_rows; r++) {
            const uint8_t * row = (const uint8_t *) src + (size_t) (p * kPanelRows + r) * row_stride;
            for (size_t b = 0; b < nb; b++) {
                uint8_t * quant = panel + b * pt.geo.quant;
                uint8_t * meta = panel + nb * pt.geo.quant + b * pt.geo.meta;
                const uint8_t * blk = row + b * file_block;
                for (int f = 0; f < pt.n_fields; f++) {
                    uint8_t * region = pt.fields[f].meta ? meta : quant;
                    for_each_move(pt.fields[f], r, [&](size_t at, size_t to, size_t n, uint8_t flip) {
                        copy_flipped(region + to, blk + at, n, flip);
                    });
                }
            }
        }
    }
}

void unpack_panel_row(DType t, int64_t k, const void * packed, int64_t r, void * dst_row) {
    if (is_float_panel_type(t)) {
        for (int64_t j = 0; j < k; j += 16) {
            std::memcpy((uint16_t *) dst_row + j, (const uint16_t *) packed + float_panel_at(r, j, k),
                        (size_t) std::min<int64_t>(16, k - j) * 2);
        }
        return;
    }
    const PanelType & pt = *panel_type(t);
    const size_t nb = (size_t) (k / pt.geo.block), file_block = traits(t).type_size;
    const uint8_t * panel = (const uint8_t *) packed + (size_t) (r / kPanelRows) * panel_bytes(t, k);
    for (size_t b = 0; b < nb; b++) {
        const uint8_t * quant = panel + b * pt.geo.quant;
        const uint8_t * meta = panel + nb * pt.geo.quant + b * pt.geo.meta;
        uint8_t * blk = (uint8_t *) dst_row + b * file_block;
        for (int f = 0; f < pt.n_fields; f++) {
            const uint8_t * region = pt.fields[f].meta ? meta : quant;
            for_each_move(pt.fields[f], (int) (r % kPanelRows), [&](size_t at, size_t from, size_t n, uint8_t flip) {
                copy_flipped(blk + at, region + from, n, flip);
            });
        }
    }
}

size_t summary_bytes(DType t, int64_t k) {
    const DType dt = traits(t).dot_type;
    const int64_t nb = k / traits(dt).block_size;
    if (dt == DType::Q8_K) return (size_t) nb * sizeof(panel::SumQ8_K);
    return (size_t) nb * sizeof(panel::SumQ8_0);
}

void summarize_activations(DType t, int64_t k, const void * x, size_t x_stride, int64_t n, void * summaries) {
    const DType dt = traits(t).dot_type;
    const int64_t nb = k / traits(dt).block_size;
    const size_t row_summary = summary_bytes(t, k);
    for (int64_t c = 0; c < n; c++) {
        const uint8_t * xr = (const uint8_t *) x + (size_t) c * x_stride;
        uint8_t * out = (uint8_t *) summaries + (size_t) c * row_summary;
        if (dt == DType::Q8_K) {
            const BlockQ8_K * xb = (const BlockQ8_K *) xr;
            panel::SumQ8_K * s = (panel::SumQ8_K *) out;
            for (int64_t b = 0; b < nb; b++) {
                s[b].d = xb[b].d;
                for (int j = 0; j < 16; j++) s[b].start16[j] = -32 * xb[b].bsums[j];
                for (int j = 0; j < 8; j++) s[b].dsum32[j] = xb[b].d * (float) (xb[b].bsums[2 * j] + xb[b].bsums[2 * j + 1]);
            }
            continue;
        }
        const BlockQ8_0 * xb = (const BlockQ8_0 *) xr;
        for (int64_t b = 0; b < nb; b++) {
            int32_t sum = 0;
            for (int j = 0; j < QK_32; j++) sum += xb[b].qs[j];
            const float d = fp16_to_fp32(xb[b].d);
            ((panel::SumQ8_0 *) out)[b] = {d, sum, d * (float) sum};
        }
    }
}

void panel_mul_mat(const PanelProduct & p, int64_t first_panel, int64_t n_panels, int64_t c0, int64_t nc) {
    PanelKernel fn = kernel_for(p.type);
    if (!fn) fail(SPARROW_ERR_INTERNAL, format("no panel kernel for %s", traits(p.type).name));
    fn(p, first_panel, n_panels, c0, nc);
}

}  // namespace sparrow
