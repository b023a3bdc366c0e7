// quant.cpp - type traits, fp16/bf16 conversion, scalar reference kernels and the run-time
// dispatch to the SIMD kernels in cpu/quant_*.cpp.
//
// The reference kernels follow ggml's reference code arithmetic step for step (same rounding,
// same order of float operations) so that quantized bytes match llama.cpp's and gguf-py's
// exactly. Dot products accumulate in double: they are the yardstick the SIMD kernels, which
// accumulate in float, are measured against.

#include "quant.h"

#include "common.h"
#include "cpu/features.h"

#include <cassert>
#include <cmath>
#include <cstring>

// Quantizers like "q = (int)(x * id + 8.5f)" must round the product before the add, as ggml's
// reference does; a fused multiply-add (which GCC forms on its own when FMA is enabled, e.g.
// with -march=native) would change a few quantized bytes.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(__x86_64__) || defined(__i386__)
#define SPARROW_HAVE_AVX2_KERNELS 1
#endif

namespace sparrow {

#if SPARROW_HAVE_AVX2_KERNELS
// Defined in cpu/quant_avx2.cpp (compiled with -mavx2 -mfma -mf16c); only called when the CPU
// reports those features. Signatures match the tables below, so a mismatch fails at link time.
namespace avx2 {
float vec_dot_f32(int64_t n, const void * w, const void * x);
float vec_dot_f16(int64_t n, const void * w, const void * x);
float vec_dot_bf16(int64_t n, const void * w, const void * x);
float vec_dot_q8_0(int64_t n, const void * w, const void * x);
float vec_dot_q4_0(int64_t n, const void * w, const void * x);
float vec_dot_q4_1(int64_t n, const void * w, const void * x);
float vec_dot_q4_K(int64_t n, const void * w, const void * x);
float vec_dot_q5_K(int64_t n, const void * w, const void * x);
float vec_dot_q6_K(int64_t n, const void * w, const void * x);
void quantize_row_q8_0(const float * src, void * dst, int64_t n);
void quantize_row_q8_K(const float * src, void * dst, int64_t n);
void quantize_row_f16(const float * src, void * dst, int64_t n);
void quantize_row_bf16(const float * src, void * dst, int64_t n);
void dequantize_row_f16(const void * src, float * dst, int64_t n);
void dequantize_row_bf16(const void * src, float * dst, int64_t n);
void mul_mat_f32(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys);
void mul_mat_f16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys);
void mul_mat_bf16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys);
}  // namespace avx2

// cpu/matmul_avx512.cpp (AVX-512 F/BW/VL/DQ): the float tiles on zmm; vec_dot stays AVX2.
namespace avx512 {
void mul_mat_f32(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys);
void mul_mat_f16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys);
void mul_mat_bf16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys);
}  // namespace avx512

// cpu/matmul_avx512bf16.cpp (AVX-512 with AVX512_BF16): bf16 tiles on vdpbf16ps.
namespace avx512bf16 {
void mul_mat_bf16(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc, float * y, int64_t ys);
}  // namespace avx512bf16
#endif

// ---- fp16 / bf16 -----------------------------------------------------------------------------

static inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1f;
    const uint32_t mantissa = h & 0x3ff;
    if (exponent == 0x1f) {
        // inf, or nan: keep the payload and set the quiet bit, as the F16C instruction does, so
        // scalar and bulk conversion agree bit for bit
        return bits_float(sign | 0x7f800000u | (mantissa ? 0x400000u : 0) | (mantissa << 13));
    }
    if (exponent == 0) {  // zero / subnormal: mantissa * 2^-24 is exact in float
        return bits_float(sign | float_bits((float) mantissa * 5.9604644775390625e-8f));
    }
    // normal: rebias the exponent from 15 to 127
    return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t fp32_to_fp16(float f) {
    const uint32_t u = float_bits(f);
    const uint16_t sign = (uint16_t) ((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7fffffff;
    if (a > 0x7f800000u) {
        // nan: quiet it and keep the top payload bits, as the F16C instruction does
        return (uint16_t) (sign | 0x7e00 | ((a >> 13) & 0x3ff));
    }
    if (a >= 0x477ff000u) {
        // >= 65520, halfway between the largest half (65504) and 65536: rounds to inf (even)
        return (uint16_t) (sign | 0x7c00);
    }
    if (a < 0x38800000u) {
        // below the smallest normal half (2^-14): result is a subnormal count of 2^-24 units.
        // value = significand * 2^(e - 150), so units = significand >> (126 - e), rounded.
        const uint32_t e = a >> 23;
        const int shift = 126 - (int) e;
        if (shift > 24) return sign;  // < 2^-25: rounds to zero
        const uint32_t significand = (a & 0x7fffff) | 0x800000;
        uint32_t q = significand >> shift;
        const uint32_t rest = significand & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rest > half || (rest == half && (q & 1))) q++;  // q == 0x400 is the smallest normal
        return (uint16_t) (sign | q);
    }
    // normal: drop 13 mantissa bits with round-to-nearest-even; a carry into the exponent is
    // the correctly rounded result
    uint32_t h = (a >> 13) - (112u << 10);
    const uint32_t rest = a & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t) (sign | h);
}

uint16_t fp32_to_bf16(float f) {
    const uint32_t u = float_bits(f);
    if ((u & 0x7fffffff) > 0x7f800000u) {
        return (uint16_t) ((u >> 16) | 0x40);  // nan: force the quiet bit so it stays a nan
    }
    return (uint16_t) ((u + 0x7fff + ((u >> 16) & 1)) >> 16);  // round to nearest even
}

// ---- traits ----------------------------------------------------------------------------------

namespace {

const TypeTraits kTraitsF32 = {"f32", 1, 4, DType::F32};
const TypeTraits kTraitsF16 = {"f16", 1, 2, DType::F32};
// bf16 weights meet bf16 activations, as in ggml: a product of two bf16 values is exact in f32,
// so a CPU with AVX512_BF16 multiplies 32 of them an instruction (vdpbf16ps), twice the fmas of
// f32: batched products take half the instructions (SmolLM2-135M's prefill 1.48x the f16 file's).
const TypeTraits kTraitsBF16 = {"bf16", 1, 2, DType::BF16};
const TypeTraits kTraitsQ4_0 = {"q4_0", QK_32, sizeof(BlockQ4_0), DType::Q8_0};
const TypeTraits kTraitsQ4_1 = {"q4_1", QK_32, sizeof(BlockQ4_1), DType::Q8_0};
const TypeTraits kTraitsQ8_0 = {"q8_0", QK_32, sizeof(BlockQ8_0), DType::Q8_0};
const TypeTraits kTraitsQ4_K = {"q4_K", QK_K, sizeof(BlockQ4_K), DType::Q8_K};
const TypeTraits kTraitsQ5_K = {"q5_K", QK_K, sizeof(BlockQ5_K), DType::Q8_K};
const TypeTraits kTraitsQ6_K = {"q6_K", QK_K, sizeof(BlockQ6_K), DType::Q8_K};
// Q8_K only ever holds activations; it has no vec_dot of its own.
const TypeTraits kTraitsQ8_K = {"q8_K", QK_K, sizeof(BlockQ8_K), DType::Q8_K};

}  // namespace

const TypeTraits * type_traits(uint32_t type) {
    switch (type) {
        case (uint32_t) DType::F32: return &kTraitsF32;
        case (uint32_t) DType::F16: return &kTraitsF16;
        case (uint32_t) DType::BF16: return &kTraitsBF16;
        case (uint32_t) DType::Q4_0: return &kTraitsQ4_0;
        case (uint32_t) DType::Q4_1: return &kTraitsQ4_1;
        case (uint32_t) DType::Q8_0: return &kTraitsQ8_0;
        case (uint32_t) DType::Q4_K: return &kTraitsQ4_K;
        case (uint32_t) DType::Q5_K: return &kTraitsQ5_K;
        case (uint32_t) DType::Q6_K: return &kTraitsQ6_K;
        case (uint32_t) DType::Q8_K: return &kTraitsQ8_K;
        default: return nullptr;  // includes Q8_1: declared for file compatibility, not run
    }
}

static const TypeTraits & checked_traits(DType t, int64_t n, const char * what) {
    const TypeTraits * tt = type_traits((uint32_t) t);
    if (!tt) fail(SPARROW_ERR_UNSUPPORTED, format("%s: unsupported tensor type %u", what, (unsigned) t));
    if (n < 0 || n % tt->block_size != 0) {
        fail(SPARROW_ERR_INVALID_ARGUMENT,
             format("%s: %lld elements is not a whole number of %s blocks (%lld)", what, (long long) n,
                    tt->name, (long long) tt->block_size));
    }
    return *tt;
}

size_t row_size(DType t, int64_t n) {
    const TypeTraits & tt = checked_traits(t, n, "row_size");
    return (size_t) (n / tt.block_size) * tt.type_size;
}

// ---- reference kernels -----------------------------------------------------------------------

namespace ref {
namespace {

// q4_K / q5_K: 8 scales and 8 mins of 6 bits in 12 bytes. Sub-blocks 0..3 keep their scale
// and min in the low 6 bits of bytes 0..3 and 4..7; sub-blocks 4..7 take their low 4 bits from
// the nibbles of bytes 8..11 and their top 2 bits from the spare top bits of bytes 0..7.
inline void unpack_k_scales(const uint8_t * s, uint8_t * scale, uint8_t * min) {
    for (int j = 0; j < 4; j++) {
        scale[j] = s[j] & 63;
        min[j] = s[j + 4] & 63;
    }
    for (int j = 4; j < 8; j++) {
        scale[j] = (uint8_t) ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
        min[j] = (uint8_t) ((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// 6-bit q6_K quant i (0..255) of a block, unsigned (0..63). Each 128 elements use 64 bytes of
// ql and 32 of qh: element l + 32 * g of the half takes a nibble of ql[l + 32 * (g & 1)]
// (low for g < 2) and bits 2g..2g+1 of qh[l].
inline int q6_K_quant(const BlockQ6_K & b, int i) {
    const int half = i / 128, g = (i % 128) / 32, l = i % 32;
    const uint8_t * ql = b.ql + 64 * half;
    const uint8_t * qh = b.qh + 32 * half;
    const int low = g < 2 ? (ql[l + 32 * g] & 0x0f) : (ql[l + 32 * (g - 2)] >> 4);
    const int high = (qh[l] >> (2 * g)) & 3;
    return low | (high << 4);
}

// ggml's q8_K rounding: nearest, ties to even (the default FP environment)
inline int round_nearest_even(float x) { return (int) std::nearbyint(x); }

void quantize_q8_0(const float * x, BlockQ8_0 * y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK_32) {
        float amax = 0.0f;
        for (int j = 0; j < QK_32; j++) amax = std::fmax(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK_32; j++) y[i].qs[j] = (int8_t) std::round(x[j] * id);  // ties away
    }
}

void quantize_q4_0(const float * x, BlockQ4_0 * y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK_32) {
        // the signed value of largest magnitude maps to -8, so the full range -8..7 is used
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK_32; j++) {
            if (std::fabs(x[j]) > amax) {
                amax = std::fabs(x[j]);
                max = x[j];
            }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK_32 / 2; j++) {
            const float v0 = x[j] * id, v1 = x[j + QK_32 / 2] * id;
            const int q0 = std::min(15, (int) (v0 + 8.5f));  // truncation of a positive value
            const int q1 = std::min(15, (int) (v1 + 8.5f));
            y[i].qs[j] = (uint8_t) (q0 | (q1 << 4));
        }
    }
}

void quantize_q4_1(const float * x, BlockQ4_1 * y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK_32) {
        float min = x[0], max = x[0];
        for (int j = 1; j < QK_32; j++) {
            min = std::min(min, x[j]);
            max = std::max(max, x[j]);
        }
        const float d = (max - min) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        y[i].m = fp32_to_fp16(min);
        for (int j = 0; j < QK_32 / 2; j++) {
            const float v0 = (x[j] - min) * id, v1 = (x[j + QK_32 / 2] - min) * id;
            const int q0 = std::min(15, (int) (v0 + 0.5f));
            const int q1 = std::min(15, (int) (v1 + 0.5f));
            y[i].qs[j] = (uint8_t) (q0 | (q1 << 4));
        }
    }
}

void quantize_q8_K(const float * x, BlockQ8_K * y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        // the first value of largest magnitude maps to exactly -127
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            if (std::fabs(x[j]) > amax) {
                amax = std::fabs(x[j]);
                max = x[j];
            }
        }
        if (amax == 0.0f) {
            std::memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) y[i].qs[j] = (int8_t) std::min(127, round_nearest_even(iscale * x[j]));
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += y[i].qs[16 * g + j];
            y[i].bsums[g] = (int16_t) sum;
        }
        y[i].d = 1.0f / iscale;
    }
}

void dequantize_q8_0(const BlockQ8_0 * x, float * y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK_32) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK_32; j++) y[j] = d * x[i].qs[j];
    }
}

void dequantize_q4_0(const BlockQ4_0 * x, float * y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK_32) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK_32 / 2; j++) {
            y[j] = d * ((x[i].qs[j] & 0x0f) - 8);
            y[j + QK_32 / 2] = d * ((x[i].qs[j] >> 4) - 8);
        }
    }
}

void dequantize_q4_1(const BlockQ4_1 * x, float * y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK_32) {
        const float d = fp16_to_fp32(x[i].d), m = fp16_to_fp32(x[i].m);
        for (int j = 0; j < QK_32 / 2; j++) {
            y[j] = d * (x[i].qs[j] & 0x0f) + m;
            y[j + QK_32 / 2] = d * (x[i].qs[j] >> 4) + m;
        }
    }
}

// q4_K and q5_K share everything but the fifth bit; qh == nullptr means q4_K.
void dequantize_k4_k5(uint16_t d16, uint16_t dmin16, const uint8_t * scales, const uint8_t * qs,
                      const uint8_t * qh, float * y) {
    const float d = fp16_to_fp32(d16), dmin = fp16_to_fp32(dmin16);
    uint8_t scale[8], min[8];
    unpack_k_scales(scales, scale, min);
    for (int c = 0; c < QK_K / 64; c++) {  // 64 elements = 2 sub-blocks share 32 bytes of qs
        const float d_lo = d * scale[2 * c], m_lo = dmin * min[2 * c];
        const float d_hi = d * scale[2 * c + 1], m_hi = dmin * min[2 * c + 1];
        for (int l = 0; l < 32; l++) {
            int q_lo = qs[32 * c + l] & 0x0f, q_hi = qs[32 * c + l] >> 4;
            if (qh) {
                q_lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                q_hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
            }
            y[64 * c + l] = d_lo * q_lo - m_lo;
            y[64 * c + 32 + l] = d_hi * q_hi - m_hi;
        }
    }
}

void dequantize_q6_K(const BlockQ6_K * x, float * y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK_K) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK_K; j++) y[j] = d * x[i].scales[j / 16] * (q6_K_quant(x[i], j) - 32);
    }
}

void dequantize_q8_K(const BlockQ8_K * x, float * y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK_K) {
        for (int j = 0; j < QK_K; j++) y[j] = x[i].d * x[i].qs[j];
    }
}

float dot_f32(int64_t n, const void * wv, const void * xv) {
    const float * w = (const float *) wv;
    const float * x = (const float *) xv;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double) w[i] * x[i];
    return (float) sum;
}

float dot_f16(int64_t n, const void * wv, const void * xv) {
    const uint16_t * w = (const uint16_t *) wv;
    const float * x = (const float *) xv;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double) fp16_to_fp32(w[i]) * x[i];
    return (float) sum;
}

float dot_bf16(int64_t n, const void * wv, const void * xv) {
    const uint16_t * w = (const uint16_t *) wv;
    const uint16_t * x = (const uint16_t *) xv;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double) bf16_to_fp32(w[i]) * bf16_to_fp32(x[i]);
    return (float) sum;
}

// The quantized dots work like the SIMD ones: integer sums per block (exact), then one float
// scale per block (or per sub-block offset term).
float dot_q8_0(int64_t n, const void * wv, const void * xv) {
    const BlockQ8_0 * w = (const BlockQ8_0 *) wv;
    const BlockQ8_0 * x = (const BlockQ8_0 *) xv;
    double sum = 0.0;
    for (int64_t i = 0; i < n / QK_32; i++) {
        int sumi = 0;
        for (int j = 0; j < QK_32; j++) sumi += w[i].qs[j] * x[i].qs[j];
        sum += (double) (fp16_to_fp32(w[i].d) * fp16_to_fp32(x[i].d)) * sumi;
    }
    return (float) sum;
}

float dot_q4_0(int64_t n, const void * wv, const void * xv) {
    const BlockQ4_0 * w = (const BlockQ4_0 *) wv;
    const BlockQ8_0 * x = (const BlockQ8_0 *) xv;
    double sum = 0.0;
    for (int64_t i = 0; i < n / QK_32; i++) {
        int sumi = 0;
        for (int j = 0; j < QK_32 / 2; j++) {
            sumi += ((w[i].qs[j] & 0x0f) - 8) * x[i].qs[j];
            sumi += ((w[i].qs[j] >> 4) - 8) * x[i].qs[j + QK_32 / 2];
        }
        sum += (double) (fp16_to_fp32(w[i].d) * fp16_to_fp32(x[i].d)) * sumi;
    }
    return (float) sum;
}

// sum_j (d q_j + m) dx y_j = d dx sum_j q_j y_j + m dx sum_j y_j: the min term only needs the
// activation block's quant sum, so q8_0 activations serve q4_1 without ggml's extra q8_1 type.
float dot_q4_1(int64_t n, const void * wv, const void * xv) {
    const BlockQ4_1 * w = (const BlockQ4_1 *) wv;
    const BlockQ8_0 * x = (const BlockQ8_0 *) xv;
    double sum = 0.0;
    for (int64_t i = 0; i < n / QK_32; i++) {
        int sumi = 0, sumx = 0;
        for (int j = 0; j < QK_32 / 2; j++) {
            sumi += (w[i].qs[j] & 0x0f) * x[i].qs[j] + (w[i].qs[j] >> 4) * x[i].qs[j + QK_32 / 2];
            sumx += x[i].qs[j] + x[i].qs[j + QK_32 / 2];
        }
        const float dx = fp16_to_fp32(x[i].d);
        sum += (double) (fp16_to_fp32(w[i].d) * dx) * sumi + (double) (fp16_to_fp32(w[i].m) * dx) * sumx;
    }
    return (float) sum;
}

// q4_K / q5_K: sum_s [d scale_s sum(q y) - dmin min_s sum(y)] * dy, where sum(y) over a
// sub-block of 32 is two of the activation's bsums.
float dot_k4_k5(int64_t n, const void * wv, const void * xv, bool five_bits) {
    const BlockQ8_K * x = (const BlockQ8_K *) xv;
    double sum = 0.0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        uint16_t d16, dmin16;
        const uint8_t *scales, *qs, *qh = nullptr;
        if (five_bits) {
            const BlockQ5_K & b = ((const BlockQ5_K *) wv)[i];
            d16 = b.d, dmin16 = b.dmin, scales = b.scales, qs = b.qs, qh = b.qh;
        } else {
            const BlockQ4_K & b = ((const BlockQ4_K *) wv)[i];
            d16 = b.d, dmin16 = b.dmin, scales = b.scales, qs = b.qs;
        }
        uint8_t scale[8], min[8];
        unpack_k_scales(scales, scale, min);
        int sum_scaled = 0, sum_mins = 0;
        for (int c = 0; c < QK_K / 64; c++) {
            int dot_lo = 0, dot_hi = 0;
            for (int l = 0; l < 32; l++) {
                int q_lo = qs[32 * c + l] & 0x0f, q_hi = qs[32 * c + l] >> 4;
                if (qh) {
                    q_lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                    q_hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                }
                dot_lo += q_lo * x[i].qs[64 * c + l];
                dot_hi += q_hi * x[i].qs[64 * c + 32 + l];
            }
            sum_scaled += scale[2 * c] * dot_lo + scale[2 * c + 1] * dot_hi;
        }
        for (int s = 0; s < 8; s++) sum_mins += min[s] * (x[i].bsums[2 * s] + x[i].bsums[2 * s + 1]);
        sum += (double) (fp16_to_fp32(d16) * x[i].d) * sum_scaled -
               (double) (fp16_to_fp32(dmin16) * x[i].d) * sum_mins;
    }
    return (float) sum;
}

float dot_q4_K(int64_t n, const void * w, const void * x) { return dot_k4_k5(n, w, x, false); }
float dot_q5_K(int64_t n, const void * w, const void * x) { return dot_k4_k5(n, w, x, true); }

float dot_q6_K(int64_t n, const void * wv, const void * xv) {
    const BlockQ6_K * w = (const BlockQ6_K *) wv;
    const BlockQ8_K * x = (const BlockQ8_K *) xv;
    double sum = 0.0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int sumi = 0;
        for (int s = 0; s < QK_K / 16; s++) {
            int dot = 0;
            for (int j = 16 * s; j < 16 * s + 16; j++) dot += (q6_K_quant(w[i], j) - 32) * x[i].qs[j];
            sumi += w[i].scales[s] * dot;
        }
        sum += (double) (fp16_to_fp32(w[i].d) * x[i].d) * sumi;
    }
    return (float) sum;
}

void quantize_row_f32(const float * src, void * dst, int64_t n) { std::memcpy(dst, src, (size_t) n * sizeof(float)); }
void quantize_row_f16(const float * src, void * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) ((uint16_t *) dst)[i] = fp32_to_fp16(src[i]);
}
void quantize_row_bf16(const float * src, void * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) ((uint16_t *) dst)[i] = fp32_to_bf16(src[i]);
}
void quantize_row_q8_0(const float * src, void * dst, int64_t n) { quantize_q8_0(src, (BlockQ8_0 *) dst, n / QK_32); }
void quantize_row_q4_0(const float * src, void * dst, int64_t n) { quantize_q4_0(src, (BlockQ4_0 *) dst, n / QK_32); }
void quantize_row_q4_1(const float * src, void * dst, int64_t n) { quantize_q4_1(src, (BlockQ4_1 *) dst, n / QK_32); }
void quantize_row_q8_K(const float * src, void * dst, int64_t n) { quantize_q8_K(src, (BlockQ8_K *) dst, n / QK_K); }

void dequantize_row_f32(const void * src, float * dst, int64_t n) { std::memcpy(dst, src, (size_t) n * sizeof(float)); }
void dequantize_row_f16(const void * src, float * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = fp16_to_fp32(((const uint16_t *) src)[i]);
}
void dequantize_row_bf16(const void * src, float * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_fp32(((const uint16_t *) src)[i]);
}
void dequantize_row_q8_0(const void * src, float * dst, int64_t n) { dequantize_q8_0((const BlockQ8_0 *) src, dst, n / QK_32); }
void dequantize_row_q4_0(const void * src, float * dst, int64_t n) { dequantize_q4_0((const BlockQ4_0 *) src, dst, n / QK_32); }
void dequantize_row_q4_1(const void * src, float * dst, int64_t n) { dequantize_q4_1((const BlockQ4_1 *) src, dst, n / QK_32); }
void dequantize_row_q4_K(const void * src, float * dst, int64_t n) {
    const BlockQ4_K * b = (const BlockQ4_K *) src;
    for (int64_t i = 0; i < n / QK_K; i++) dequantize_k4_k5(b[i].d, b[i].dmin, b[i].scales, b[i].qs, nullptr, dst + i * QK_K);
}
void dequantize_row_q5_K(const void * src, float * dst, int64_t n) {
    const BlockQ5_K * b = (const BlockQ5_K *) src;
    for (int64_t i = 0; i < n / QK_K; i++) dequantize_k4_k5(b[i].d, b[i].dmin, b[i].scales, b[i].qs, b[i].qh, dst + i * QK_K);
}
void dequantize_row_q6_K(const void * src, float * dst, int64_t n) { dequantize_q6_K((const BlockQ6_K *) src, dst, n / QK_K); }
void dequantize_row_q8_K(const void * src, float * dst, int64_t n) { dequantize_q8_K((const BlockQ8_K *) src, dst, n / QK_K); }

}  // namespace
}  // namespace ref

// ---- dispatch tables -------------------------------------------------------------------------

namespace {

using VecDotFn = float (*)(int64_t n, const void * w, const void * x);
using QuantizeFn = void (*)(const float * src, void * dst, int64_t n);
using DequantizeFn = void (*)(const void * src, float * dst, int64_t n);
using MulMatFn = void (*)(int64_t k, const void * w, size_t ws, int64_t nr, const void * x, size_t xs, int64_t nc,
                          float * y, int64_t ys);

constexpr size_t kMaxTypeId = 32;  // type ids index the tables directly

struct Kernels {
    VecDotFn vec_dot[kMaxTypeId] = {};
    QuantizeFn quantize[kMaxTypeId] = {};
    DequantizeFn dequantize[kMaxTypeId] = {};
    // Register tiles for the float types; nullptr (quantized types, whose matrices the backend
    // multiplies in panels, cpu/panels.h): vec_dot per (row, column) pair. The tiles take single
    // activation rows (decode) too: several weight rows' reads in flight where vec_dot keeps one,
    // and the same arithmetic per row as in a batch (batch invariance).
    MulMatFn mul_mat[kMaxTypeId] = {};
    const char * level = "scalar";
};

Kernels make_reference_kernels() {
    Kernels k;
    auto set = [&k](DType t, VecDotFn dot, QuantizeFn quantize, DequantizeFn dequantize) {
        k.vec_dot[(size_t) t] = dot;
        k.quantize[(size_t) t] = quantize;
        k.dequantize[(size_t) t] = dequantize;
    };
    set(DType::F32, ref::dot_f32, ref::quantize_row_f32, ref::dequantize_row_f32);
    set(DType::F16, ref::dot_f16, ref::quantize_row_f16, ref::dequantize_row_f16);
    set(DType::BF16, ref::dot_bf16, ref::quantize_row_bf16, ref::dequantize_row_bf16);
    set(DType::Q8_0, ref::dot_q8_0, ref::quantize_row_q8_0, ref::dequantize_row_q8_0);
    set(DType::Q4_0, ref::dot_q4_0, ref::quantize_row_q4_0, ref::dequantize_row_q4_0);
    set(DType::Q4_1, ref::dot_q4_1, ref::quantize_row_q4_1, ref::dequantize_row_q4_1);
    set(DType::Q4_K, ref::dot_q4_K, nullptr, ref::dequantize_row_q4_K);
    set(DType::Q5_K, ref::dot_q5_K, nullptr, ref::dequantize_row_q5_K);
    set(DType::Q6_K, ref::dot_q6_K, nullptr, ref::dequantize_row_q6_K);
    set(DType::Q8_K, nullptr, ref::quantize_row_q8_K, ref::dequantize_row_q8_K);
    return k;
}

Kernels select_kernels() {
    Kernels k = make_reference_kernels();
#if SPARROW_HAVE_AVX2_KERNELS
    const SimdLevel level = simd_level_available();
    if (level >= SimdLevel::Avx2) {
        k.vec_dot[(size_t) DType::F32] = avx2::vec_dot_f32;
        k.vec_dot[(size_t) DType::F16] = avx2::vec_dot_f16;
        k.vec_dot[(size_t) DType::BF16] = avx2::vec_dot_bf16;
        k.vec_dot[(size_t) DType::Q8_0] = avx2::vec_dot_q8_0;
        k.vec_dot[(size_t) DType::Q4_0] = avx2::vec_dot_q4_0;
        k.vec_dot[(size_t) DType::Q4_1] = avx2::vec_dot_q4_1;
        k.vec_dot[(size_t) DType::Q4_K] = avx2::vec_dot_q4_K;
        k.vec_dot[(size_t) DType::Q5_K] = avx2::vec_dot_q5_K;
        k.vec_dot[(size_t) DType::Q6_K] = avx2::vec_dot_q6_K;
        k.quantize[(size_t) DType::Q8_0] = avx2::quantize_row_q8_0;
        k.quantize[(size_t) DType::Q8_K] = avx2::quantize_row_q8_K;
        k.quantize[(size_t) DType::F16] = avx2::quantize_row_f16;
        k.quantize[(size_t) DType::BF16] = avx2::quantize_row_bf16;
        k.dequantize[(size_t) DType::F16] = avx2::dequantize_row_f16;
        k.dequantize[(size_t) DType::BF16] = avx2::dequantize_row_bf16;
        k.mul_mat[(size_t) DType::F32] = avx2::mul_mat_f32;
        k.mul_mat[(size_t) DType::F16] = avx2::mul_mat_f16;
        k.mul_mat[(size_t) DType::BF16] = avx2::mul_mat_bf16;
        k.level = "AVX2";
    }
    if (level >= SimdLevel::Avx512) {
        k.mul_mat[(size_t) DType::F32] = avx512::mul_mat_f32;
        k.mul_mat[(size_t) DType::F16] = avx512::mul_mat_f16;
        k.mul_mat[(size_t) DType::BF16] = avx512::mul_mat_bf16;
        k.level = "AVX512-VNNI";
    }
    if (level >= SimdLevel::Avx512Bf16) {
        k.mul_mat[(size_t) DType::BF16] = avx512bf16::mul_mat_bf16;
        k.level = "AVX512-VNNI-BF16";
    }
#endif
    return k;
}

// Chosen once, on first use (thread-safe static initialization).
const Kernels & active_kernels() {
    static const Kernels k = select_kernels();
    return k;
}

const Kernels & reference_kernels() {
    static const Kernels k = make_reference_kernels();
    return k;
}

template <typename Fn>
Fn lookup(Fn const (&table)[kMaxTypeId], DType t, const char * what) {
    const size_t id = (size_t) t;
    Fn fn = id < kMaxTypeId ? table[id] : nullptr;
    if (!fn) {
        const TypeTraits * tt = type_traits((uint32_t) t);
        fail(SPARROW_ERR_UNSUPPORTED, format("%s is not supported for type %s", what, tt ? tt->name : "(unknown)"));
    }
    return fn;
}

void run_dequantize(const Kernels & k, DType t, const void * src, float * dst, int64_t n) {
    checked_traits(t, n, "dequantize_row");
    lookup(k.dequantize, t, "dequantize_row")(src, dst, n);
}

void run_quantize(const Kernels & k, DType t, const float * src, void * dst, int64_t n) {
    checked_traits(t, n, "quantize_row");
    lookup(k.quantize, t, "quantize_row")(src, dst, n);
}

float run_vec_dot(const Kernels & k, DType t, int64_t n, const void * w, const void * x) {
    // called once per weight row: only the table lookup, no validation beyond debug builds
    const size_t id = (size_t) t;
    VecDotFn fn = id < kMaxTypeId ? k.vec_dot[id] : nullptr;
    if (!fn) lookup(k.vec_dot, t, "vec_dot");
    assert(n % type_traits((uint32_t) t)->block_size == 0);
    return fn(n, w, x);
}

// The scalar reference of mul_mat is the definition: one vec_dot per (weight row, activation
// row). Types without a tiled kernel take the same path with the SIMD vec_dot.
void run_mul_mat(const Kernels & k, DType t, int64_t n, const void * w, size_t ws, int64_t nr, const void * x,
                 size_t xs, int64_t nc, float * y, int64_t ys) {
    const size_t id = (size_t) t;
    MulMatFn tiled = id < kMaxTypeId ? k.mul_mat[id] : nullptr;
    if (tiled) {
        tiled(n, w, ws, nr, x, xs, nc, y, ys);
        return;
    }
    VecDotFn dot = id < kMaxTypeId ? k.vec_dot[id] : nullptr;
    if (!dot) dot = lookup(k.vec_dot, t, "mul_mat");
    for (int64_t c = 0; c < nc; c++) {
        const uint8_t * xc = (const uint8_t *) x + c * xs;
        for (int64_t r = 0; r < nr; r++) y[c * ys + r] = dot(n, (const uint8_t *) w + r * ws, xc);
    }
}

}  // namespace

void dequantize_row(DType t, const void * src, float * dst, int64_t n) { run_dequantize(active_kernels(), t, src, dst, n); }
void quantize_row(DType t, const float * src, void * dst, int64_t n) { run_quantize(active_kernels(), t, src, dst, n); }
float vec_dot(DType t, int64_t n, const void * w, const void * x) { return run_vec_dot(active_kernels(), t, n, w, x); }
void mul_mat(DType t, int64_t k, const void * w, size_t w_stride, int64_t nr, const void * x, size_t x_stride,
             int64_t nc, float * y, int64_t y_stride) {
    run_mul_mat(active_kernels(), t, k, w, w_stride, nr, x, x_stride, nc, y, y_stride);
}
const char * simd_level() { return active_kernels().level; }
bool mul_mat_supported(DType t) { return (size_t) t < kMaxTypeId && reference_kernels().vec_dot[(size_t) t] != nullptr; }

namespace ref {
void dequantize_row(DType t, const void * src, float * dst, int64_t n) { run_dequantize(reference_kernels(), t, src, dst, n); }
void quantize_row(DType t, const float * src, void * dst, int64_t n) { run_quantize(reference_kernels(), t, src, dst, n); }
float vec_dot(DType t, int64_t n, const void * w, const void * x) { return run_vec_dot(reference_kernels(), t, n, w, x); }
void mul_mat(DType t, int64_t k, const void * w, size_t w_stride, int64_t nr, const void * x, size_t x_stride,
             int64_t nc, float * y, int64_t y_stride) {
    run_mul_mat(reference_kernels(), t, k, w, w_stride, nr, x, x_stride, nc, y, y_stride);
}
}  // namespace ref

}  // namespace sparrow
