// quant.h - tensor types: ggml's block layouts, reference (de)quantization and dot products.
//
// Weights keep the exact byte layout llama.cpp writes (so its GGUFs load unchanged).
// Matrix products quantize the activations once per row into each weight type's "dot type"
// (Q8_0 for q8_0/q4_0/q4_1, Q8_K for the k-quants, F32 for the float types). Float weights then
// run mul_mat's register tiles; the CPU backend multiplies quantized weights in the 16-row
// panels it repacks them into at load (cpu/panels.h), and mul_mat on their rows is vec_dot per
// pair. Both dispatch at run time to the best kernels the CPU supports (cpu/features.h); the
// scalar kernels in namespace ref are compiled everywhere and are what tests compare with.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sparrow {

enum class DType : uint32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q8_1 = 9,
    Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};

struct TypeTraits {
    const char * name;
    int64_t block_size;   // elements per block
    size_t type_size;     // bytes per block
    DType dot_type;       // what activations are converted to for vec_dot
};

// Traits of a type id as found in a file; nullptr for a type the runtime does not support.
const TypeTraits * type_traits(uint32_t type);
inline const TypeTraits & traits(DType t) { return *type_traits((uint32_t) t); }
// Bytes of a row of n elements (n must be a multiple of the block size).
size_t row_size(DType t, int64_t n);

// Convert n elements (n a multiple of the block size) to float.
void dequantize_row(DType t, const void * src, float * dst, int64_t n);
// Convert n floats into type t (supported for the dot types Q8_0, Q8_K and F32/F16/BF16,
// and for Q8_0/Q4_0/Q4_1 weights).
void quantize_row(DType t, const float * src, void * dst, int64_t n);
// Dot product of a weight row of type t with an activation row already in traits(t).dot_type.
float vec_dot(DType t, int64_t n, const void * w, const void * x);
// Can weights of type t be multiplied at all (is there a dot product)? Q8_K, an activation-only
// type, cannot: a file that stores a weight in it is refused at load.
bool mul_mat_supported(DType t);

// A block of a matrix product: y[c * y_stride + r] = dot(w row r, x row c) for r < nr, c < nc.
// Weight rows are w_stride bytes apart, activation rows (already in traits(t).dot_type) x_stride
// bytes apart. For float weights the SIMD kernels register-tile this (several weight rows x
// several activation rows per micro-kernel) so each weight load serves several tokens, with the
// same arithmetic for a (row, activation row) pair whatever the tile; results match nr * nc
// vec_dot calls within float rounding.
void mul_mat(DType t, int64_t k, const void * w, size_t w_stride, int64_t nr, const void * x, size_t x_stride,
             int64_t nc, float * y, int64_t y_stride);

// Name of the SIMD level vec_dot uses on this CPU, e.g. "AVX2" or "scalar".
const char * simd_level();

namespace ref {  // scalar reference kernels
void dequantize_row(DType t, const void * src, float * dst, int64_t n);
void quantize_row(DType t, const float * src, void * dst, int64_t n);
float vec_dot(DType t, int64_t n, const void * w, const void * x);
void mul_mat(DType t, int64_t k, const void * w, size_t w_stride, int64_t nr, const void * x, size_t x_stride,
             int64_t nc, float * y, int64_t y_stride);
}  // namespace ref

// fp16 / bf16 scalar conversion (exact IEEE round-to-nearest-even)
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);
inline float bf16_to_fp32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t) h << 16;
    return v.f;
}
uint16_t fp32_to_bf16(float f);

}  // namespace sparrow

// ---- block layouts ---------------------------------------------------------------------------
// Appended to the interface above because every kernel file (quant.cpp, cpu/quant_avx2.cpp,
// cpu/panels*.cpp) must agree on them byte for byte. They are ggml's layouts: fp16 scales
// are stored as raw uint16_t bits, all structs are packed by construction (no padding), and a
// row of n elements is n / block_size consecutive blocks.
namespace sparrow {

constexpr int64_t QK_32 = 32;    // block size of q8_0, q4_0, q4_1
constexpr int64_t QK_K = 256;    // super-block size of the k-quants
constexpr int K_SCALE_BYTES = 12;  // q4_K/q5_K: 8 six-bit scales + 8 six-bit mins

struct BlockQ8_0 {  // x[i] = d * qs[i]
    uint16_t d;
    int8_t qs[QK_32];
};
struct BlockQ4_0 {  // x[i] = d * (q[i] - 8); qs[j] holds q[j] (low nibble) and q[j + 16] (high)
    uint16_t d;
    uint8_t qs[QK_32 / 2];
};
struct BlockQ4_1 {  // x[i] = d * q[i] + m; nibbles packed as in q4_0
    uint16_t d;
    uint16_t m;
    uint8_t qs[QK_32 / 2];
};
// 8 sub-blocks of 32: x = d * scale[s] * q - dmin * min[s], q in 0..15. Each 64 elements share
// 32 bytes of qs: the low nibbles are the first sub-block, the high nibbles the second.
struct BlockQ4_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[K_SCALE_BYTES];
    uint8_t qs[QK_K / 2];
};
// As q4_K with a fifth bit per quant (q in 0..31): bit (2c) of qh[l] belongs to element
// 64c + l and bit (2c + 1) to element 64c + 32 + l.
struct BlockQ5_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[K_SCALE_BYTES];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
};
// 16 sub-blocks of 16: x = d * scales[s] * (q - 32), q in 0..63 split into 4 low bits (ql) and
// 2 high bits (qh); see ref::dequantize_row for the order.
struct BlockQ6_K {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
};
// Activations for the k-quants: x = d * qs, with the sums of each 16 quants precomputed so the
// kernels can apply per-sub-block offsets (mins, q6_K's -32) without touching qs again.
struct BlockQ8_K {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
};

static_assert(sizeof(BlockQ8_0) == 34, "ggml block_q8_0 layout");
static_assert(sizeof(BlockQ4_0) == 18, "ggml block_q4_0 layout");
static_assert(sizeof(BlockQ4_1) == 20, "ggml block_q4_1 layout");
static_assert(sizeof(BlockQ4_K) == 144, "ggml block_q4_K layout");
static_assert(sizeof(BlockQ5_K) == 176, "ggml block_q5_K layout");
static_assert(sizeof(BlockQ6_K) == 210, "ggml block_q6_K layout");
static_assert(sizeof(BlockQ8_K) == 292, "ggml block_q8_K layout");

}  // namespace sparrow
