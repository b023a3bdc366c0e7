// test_quant.cpp - tensor types: SIMD kernels against the scalar reference, the reference
// against plain float math, quantization round-trip bounds, and fp16/bf16 conversion.
//
// Usage: test_quant [repo root, unused]. Prints one line per group and exits non-zero with the
// first failures listed if anything is off.

#include "common.h"
#include "quant.h"
#include "test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace sparrow;

namespace {

using sparrow_test::check;
using sparrow_test::finish;
using sparrow_test::g_failures;

std::mt19937_64 g_rng(20240611);

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g_rng); }
float normal() { return std::normal_distribution<float>(0.0f, 1.0f)(g_rng); }
uint32_t bits32() { return (uint32_t) g_rng(); }

uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ---- input generators ------------------------------------------------------------------------

// Float data with the shapes that stress quantizers: ordinary, all zero, huge (but such that
// q8_0's fp16 scale amax/127 stays finite), tiny (scales underflow fp16), one outlier per 32,
// blocks where +max and -max both occur (the sign of the "first max" matters), and values
// that land exactly halfway between two quants (the rounding rule matters).
enum class FloatKind { Normal, Zeros, Large, Tiny, Outliers, SignTies, HalfSteps };
const FloatKind kFloatKinds[] = {FloatKind::Normal, FloatKind::Zeros,    FloatKind::Large,    FloatKind::Tiny,
                                 FloatKind::Outliers, FloatKind::SignTies, FloatKind::HalfSteps};
const char * kind_name(FloatKind k) {
    switch (k) {
        case FloatKind::Normal: return "normal";
        case FloatKind::Zeros: return "zeros";
        case FloatKind::Large: return "large";
        case FloatKind::Tiny: return "tiny";
        case FloatKind::Outliers: return "outliers";
        case FloatKind::SignTies: return "sign-ties";
        case FloatKind::HalfSteps: return "half-steps";
    }
    return "?";
}

std::vector<float> make_floats(int64_t n, FloatKind kind) {
    std::vector<float> v((size_t) n);
    for (int64_t i = 0; i < n; i++) {
        switch (kind) {
            case FloatKind::Normal: v[i] = normal(); break;
            case FloatKind::Zeros: v[i] = 0.0f; break;
            case FloatKind::Large: v[i] = uniform(-6.0e4f, 6.0e4f); break;  // fits fp16
            case FloatKind::Tiny: v[i] = normal() * 1e-7f; break;
            case FloatKind::Outliers: v[i] = (i % 32 == 5) ? 300.0f * normal() : 0.01f * normal(); break;
            case FloatKind::SignTies: v[i] = (i % 13 == 0) ? 3.0f : (i % 13 == 7 ? -3.0f : uniform(-3.0f, 3.0f)); break;
            case FloatKind::HalfSteps:  // block max 127 -> q8_0/q8_K scale 1: every value is a rounding tie
                v[i] = (i % 32 == 0) ? 127.0f : (float) ((int) (bits32() % 253) - 126) + 0.5f;
                break;
        }
    }
    return v;
}

// A weight row of type t with n elements. Quantizable types come from floats through the
// reference quantizer; k-quant blocks are random bytes (every bit pattern is a valid block)
// with finite fp16 scales, or all-0x00 / all-0xff quants for the saturation corners.
enum class WeightKind { FromFloats, RandomBits, AllZeroBits, AllOneBits };

uint16_t random_fp16_scale(float lo, float hi) { return fp32_to_fp16(uniform(lo, hi)); }

std::vector<uint8_t> make_weights(DType t, int64_t n, WeightKind kind, FloatKind fkind) {
    const TypeTraits & tt = traits(t);
    std::vector<uint8_t> w(row_size(t, n));
    const int64_t nb = n / tt.block_size;
    if (kind == WeightKind::FromFloats) {
        const std::vector<float> f = make_floats(n, fkind);
        ref::quantize_row(t, f.data(), w.data(), n);
        return w;
    }
    for (auto & b : w) b = kind == WeightKind::RandomBits ? (uint8_t) bits32() : kind == WeightKind::AllOneBits ? 0xff : 0x00;
    // keep the fp16/bf16 scales and values finite
    switch (t) {
        case DType::F32:
            for (int64_t i = 0; i < n; i++) ((float *) w.data())[i] = uniform(-1e3f, 1e3f);
            break;
        case DType::F16:
            for (int64_t i = 0; i < n; i++) {
                uint16_t h = (uint16_t) bits32();
                if ((h & 0x7c00) == 0x7c00) h &= 0xfbff;  // inf/nan -> finite (incl. subnormals)
                ((uint16_t *) w.data())[i] = h;
            }
            break;
        case DType::BF16:
            for (int64_t i = 0; i < n; i++) {
                const uint16_t sign = (uint16_t) (bits32() & 0x8000), mant = (uint16_t) (bits32() & 0x7f);
                const uint16_t exp = (uint16_t) (127 - 30 + bits32() % 50);  // 2^-30 .. 2^19
                ((uint16_t *) w.data())[i] = (uint16_t) (sign | (exp << 7) | mant);
            }
            break;
        case DType::Q8_0:
            for (int64_t i = 0; i < nb; i++) ((BlockQ8_0 *) w.data())[i].d = random_fp16_scale(-0.1f, 0.1f);
            break;
        case DType::Q4_0:
            for (int64_t i = 0; i < nb; i++) ((BlockQ4_0 *) w.data())[i].d = random_fp16_scale(-0.1f, 0.1f);
            break;
        case DType::Q4_1:
            for (int64_t i = 0; i < nb; i++) {
                ((BlockQ4_1 *) w.data())[i].d = random_fp16_scale(0.0f, 0.1f);
                ((BlockQ4_1 *) w.data())[i].m = random_fp16_scale(-1.0f, 1.0f);
            }
            break;
        case DType::Q4_K:
            for (int64_t i = 0; i < nb; i++) {
                ((BlockQ4_K *) w.data())[i].d = random_fp16_scale(0.0f, 0.01f);
                ((BlockQ4_K *) w.data())[i].dmin = random_fp16_scale(0.0f, 0.01f);
            }
            break;
        case DType::Q5_K:
            for (int64_t i = 0; i < nb; i++) {
                ((BlockQ5_K *) w.data())[i].d = random_fp16_scale(0.0f, 0.01f);
                ((BlockQ5_K *) w.data())[i].dmin = random_fp16_scale(0.0f, 0.01f);
            }
            break;
        case DType::Q6_K:
            for (int64_t i = 0; i < nb; i++) ((BlockQ6_K *) w.data())[i].d = random_fp16_scale(-0.01f, 0.01f);
            break;
        default: break;
    }
    return w;
}

// Q8_K activations whose quants all sit at +127 / -127 / alternate: the largest integer sums
// the kernels can meet (quantize_row never produces -128, and the kernels rely on that).
std::vector<uint8_t> make_saturated_q8_K(int64_t n, int pattern) {
    std::vector<uint8_t> x(row_size(DType::Q8_K, n));
    for (int64_t i = 0; i < n / QK_K; i++) {
        BlockQ8_K & b = ((BlockQ8_K *) x.data())[i];
        b.d = 0.01f;
        for (int j = 0; j < QK_K; j++) b.qs[j] = (int8_t) (pattern == 0 ? 127 : pattern == 1 ? -127 : (j & 1 ? 127 : -127));
        for (int g = 0; g < QK_K / 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += b.qs[16 * g + j];
            b.bsums[g] = (int16_t) s;
        }
    }
    return x;
}

// ---- 1 + 2: vec_dot ----------------------------------------------------------------------------

std::vector<int64_t> lengths_for(DType t) {
    const int64_t bs = traits(t).block_size;
    if (bs == 1) return {1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 256, 257, 4096, 4099};
    std::vector<int64_t> blocks = bs == QK_K ? std::vector<int64_t>{1, 2, 3, 7, 17} : std::vector<int64_t>{1, 2, 3, 7, 17, 33, 128, 129};
    for (auto & b : blocks) b *= bs;
    return blocks;
}

// Compares one (weights, activations) pair three ways: SIMD vs reference, and the reference vs
// the double-precision dot of the dequantized rows (what the quantized math means).
void check_dot(DType t, int64_t n, const std::vector<uint8_t> & w, const std::vector<uint8_t> & xq, const std::string & label) {
    const DType dt = traits(t).dot_type;
    std::vector<float> wf((size_t) n), xf((size_t) n);
    ref::dequantize_row(t, w.data(), wf.data(), n);
    ref::dequantize_row(dt, xq.data(), xf.data(), n);
    double exact = 0.0, magnitude = 0.0;
    for (int64_t i = 0; i < n; i++) {
        exact += (double) wf[i] * xf[i];
        magnitude += std::fabs((double) wf[i] * xf[i]);
    }
    const float r = ref::vec_dot(t, n, w.data(), xq.data());
    const float s = vec_dot(t, n, w.data(), xq.data());
    const double slack = 1e-30;  // lets 0 == 0 pass; any real mismatch is far larger
    check(std::fabs((double) s - r) <= 1e-5 * magnitude + slack,
          format("%s: SIMD vec_dot %.9g vs ref %.9g (sum|w*x| %.6g)", label.c_str(), s, r, magnitude));
    check(std::fabs((double) r - exact) <= 1e-6 * magnitude + slack,
          format("%s: ref vec_dot %.9g vs dot of dequantized rows %.9g (sum|w*x| %.6g)", label.c_str(), r, exact, magnitude));
    check(std::isfinite(s) && std::isfinite(r), label + ": non-finite dot");
}

void test_vec_dot(DType t) {
    const DType dt = traits(t).dot_type;
    const char * name = traits(t).name;
    std::vector<WeightKind> wkinds = {WeightKind::FromFloats, WeightKind::RandomBits, WeightKind::AllZeroBits, WeightKind::AllOneBits};
    if (t == DType::Q4_K || t == DType::Q5_K || t == DType::Q6_K) wkinds.erase(wkinds.begin());  // no k-quant quantizer
    if (t == DType::F32 || t == DType::F16 || t == DType::BF16) wkinds.resize(2);  // all-ones bits are nan
    int cases = 0;
    for (int64_t n : lengths_for(t)) {
        for (WeightKind wk : wkinds) {
            for (size_t k = 0; k < std::size(kFloatKinds); k++) {
                // pair each weight data kind with a different activation kind (zero weights
                // with large activations, and so on)
                const FloatKind fk = kFloatKinds[k], xk = kFloatKinds[(k + 1) % std::size(kFloatKinds)];
                const std::vector<uint8_t> w = make_weights(t, n, wk, fk);
                const std::vector<float> x = make_floats(n, xk);
                std::vector<uint8_t> xq(row_size(dt, n)), xq_ref(row_size(dt, n));
                quantize_row(dt, x.data(), xq.data(), n);
                ref::quantize_row(dt, x.data(), xq_ref.data(), n);
                const std::string label = format("%s n=%lld weights=%d/%s activations=%s", name, (long long) n, (int) wk, kind_name(fk), kind_name(xk));
                check(xq == xq_ref, label + ": SIMD quantize_row of the activations differs from ref");
                check_dot(t, n, w, xq_ref, label);
                cases++;
            }
        }
        if (dt == DType::Q8_K) {
            for (WeightKind wk : wkinds) {
                for (int pattern = 0; pattern < 3; pattern++) {
                    check_dot(t, n, make_weights(t, n, wk, FloatKind::Normal), make_saturated_q8_K(n, pattern),
                              format("%s n=%lld weights=%d saturated activations %d", name, (long long) n, (int) wk, pattern));
                    cases++;
                }
            }
        }
    }
    std::printf("  vec_dot %-5s %4d cases\n", name, cases);
}

// ---- 1 + 3: quantize_row -----------------------------------------------------------------------

// Round-trip error bound of one element. Every bound includes the rounding of the stored fp16
// scale: quantization divides by the float scale, dequantization multiplies by the fp16 one.
void test_round_trip(DType t) {
    const char * name = traits(t).name;
    const int64_t bs = traits(t).block_size;
    int cases = 0;
    for (int64_t n : lengths_for(t)) {
        for (FloatKind fk : kFloatKinds) {
            const std::vector<float> x = make_floats(n, fk);
            std::vector<uint8_t> q(row_size(t, n)), q_ref(row_size(t, n));
            std::vector<float> back((size_t) n);
            quantize_row(t, x.data(), q.data(), n);
            ref::quantize_row(t, x.data(), q_ref.data(), n);
            ref::dequantize_row(t, q_ref.data(), back.data(), n);
            const std::string label = format("%s n=%lld data=%s", name, (long long) n, kind_name(fk));
            check(q == q_ref, label + ": SIMD quantize_row differs from ref");
            for (int64_t b = 0; b < n / bs; b++) {
                const float * xb = x.data() + b * bs;
                float amax = 0.0f, max = 0.0f, lo = xb[0], hi = xb[0];
                for (int64_t j = 0; j < bs; j++) {
                    if (std::fabs(xb[j]) > amax) amax = std::fabs(xb[j]), max = xb[j];
                    lo = std::min(lo, xb[j]);
                    hi = std::max(hi, xb[j]);
                }
                for (int64_t j = 0; j < bs; j++) {
                    const double err = std::fabs((double) xb[j] - back[(size_t) (b * bs + j)]);
                    double bound = 0.0;
                    if (t == DType::Q8_0) {
                        const double d = amax / 127.0f, d16 = fp16_to_fp32(((BlockQ8_0 *) q_ref.data())[b].d);
                        bound = 0.5 * d + 127 * std::fabs(d - d16);
                    } else if (t == DType::Q4_0) {
                        // x / d lies in [-8, 8]; values past 7.5 clamp to 7, up to a full step off
                        const double d = max / -8.0f, d16 = fp16_to_fp32(((BlockQ4_0 *) q_ref.data())[b].d);
                        const double steps = d != 0.0 ? xb[j] / d : 0.0;
                        bound = (steps > 7.5 ? 1.0 : 0.5) * std::fabs(d) + 8 * std::fabs(d - d16);
                    } else if (t == DType::Q4_1) {
                        const BlockQ4_1 & blk = ((BlockQ4_1 *) q_ref.data())[b];
                        const double d = (hi - lo) / 15.0f;
                        bound = 0.5 * d + 15 * std::fabs(d - fp16_to_fp32(blk.d)) + std::fabs(lo - fp16_to_fp32(blk.m));
                    } else if (t == DType::Q8_K) {
                        bound = 0.5 * std::fabs(((BlockQ8_K *) q_ref.data())[b].d);
                    } else if (t == DType::F16) {
                        bound = std::fabs(xb[j]) * std::ldexp(1.0, -11) + std::ldexp(1.0, -25);  // half ulp (normal / subnormal)
                    } else if (t == DType::BF16) {
                        bound = std::fabs(xb[j]) * std::ldexp(1.0, -8);
                    }
                    bound = bound * (1 + 1e-6) + 1e-30;
                    if (err > bound) {
                        check(false, format("%s: element %lld: %.9g -> %.9g, error %.3g > bound %.3g", label.c_str(),
                                            (long long) (b * bs + j), xb[j], back[(size_t) (b * bs + j)], err, bound));
                        break;
                    }
                }
            }
            if (t == DType::Q8_K) {  // the bsums must describe the quants
                for (int64_t b = 0; b < n / bs; b++) {
                    const BlockQ8_K & blk = ((BlockQ8_K *) q_ref.data())[b];
                    for (int g = 0; g < QK_K / 16; g++) {
                        int s = 0;
                        for (int j = 0; j < 16; j++) s += blk.qs[16 * g + j];
                        check(s == blk.bsums[g], label + ": q8_K bsums inconsistent");
                    }
                }
            }
            cases++;
        }
    }
    std::printf("  quantize %-5s %4d cases\n", name, cases);
}

// ---- 4: fp16 / bf16 ----------------------------------------------------------------------------

// Independent references: decode every half with double arithmetic, and find the nearest half
// (ties to even) by binary search among all positive finite halves.
double half_value(uint16_t h) {
    const int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    if (exp == 31) return mant ? NAN : (h & 0x8000) ? -INFINITY : INFINITY;
    const double mag = exp == 0 ? std::ldexp((double) mant, -24) : std::ldexp((double) (1024 + mant), exp - 25);
    return (h & 0x8000) ? -mag : mag;
}

uint16_t nearest_half(float f) {
    static std::vector<double> values;  // values[h] for h = 0 .. 0x7bff, increasing
    if (values.empty()) {
        for (uint32_t h = 0; h <= 0x7bff; h++) values.push_back(half_value((uint16_t) h));
    }
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double a = std::fabs((double) f);
    if (a >= 65520.0) return (uint16_t) (sign | 0x7c00);
    const size_t above = (size_t) (std::upper_bound(values.begin(), values.end(), a) - values.begin());
    const size_t below = above - 1;  // values[0] == 0 <= a
    if (above == values.size()) return (uint16_t) (sign | below);
    const double d_below = a - values[below], d_above = values[above] - a;
    const size_t pick = d_below < d_above ? below : d_above < d_below ? above : (below % 2 == 0 ? below : above);
    return (uint16_t) (sign | pick);
}

uint16_t nearest_bf16(float f) {
    const uint32_t u = float_bits(f);
    if (std::isnan(f)) return (uint16_t) ((u >> 16) | 0x40);
    const uint16_t down = (uint16_t) (u >> 16), up = (uint16_t) (down + 1);
    const double d_down = std::fabs((double) f - (double) bf16_to_fp32(down));
    // rounding up past the largest finite bf16 means rounding to 2^128, i.e. to inf
    const double up_value = std::isinf(bf16_to_fp32(up)) ? std::copysign(std::ldexp(1.0, 128), f) : bf16_to_fp32(up);
    const double d_up = std::fabs(up_value - (double) f);
    if (std::isinf(f) || d_down < d_up) return down;
    if (d_up < d_down) return up;
    return (down & 1) ? up : down;
}

// Floats that probe rounding: random bit patterns (all classes) and exact midpoints between
// neighbouring halves, with their float neighbours.
std::vector<float> conversion_probes() {
    std::vector<float> v;
    for (int i = 0; i < 300000; i++) v.push_back(bits_float(bits32()));
    for (int i = 0; i < 300000; i++) v.push_back(uniform(-70000.0f, 70000.0f) * std::ldexp(1.0f, -(int) (bits32() % 40)));
    for (uint32_t h = 0; h < 0x7bff; h += 1 + bits32() % 7) {
        const float mid = (float) ((half_value((uint16_t) h) + half_value((uint16_t) (h + 1))) / 2);  // exact in float
        for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
            v.push_back(f);
            v.push_back(-f);
        }
    }
    for (float f : {0.0f, -0.0f, 65504.0f, 65519.996f, 65520.0f, 65536.0f, 1e-8f, 2.9802322e-8f, 2.98023259e-8f,
                    6.0975552e-5f, 6.1035156e-5f, 3.4028235e38f, INFINITY, -INFINITY, NAN, -NAN, 1.4e-45f}) {
        v.push_back(f);
    }
    return v;
}

void test_fp16_bf16() {
    // every half: decode matches the double reference; encode(decode(h)) == h
    std::vector<uint16_t> all(65536);
    std::vector<float> decoded(65536), decoded_ref(65536);
    for (uint32_t h = 0; h < 65536; h++) all[h] = (uint16_t) h;
    dequantize_row(DType::F16, all.data(), decoded.data(), 65536);  // SIMD bulk path
    ref::dequantize_row(DType::F16, all.data(), decoded_ref.data(), 65536);
    int bad = 0;
    for (uint32_t h = 0; h < 65536 && bad < 5; h++) {
        const float f = fp16_to_fp32((uint16_t) h);
        const bool is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        bool ok = float_bits(decoded[h]) == float_bits(f) && float_bits(decoded_ref[h]) == float_bits(f);
        if (is_nan) {
            ok = ok && std::isnan(f) && fp32_to_fp16(f) == (uint16_t) (h | 0x200);  // quieted, payload kept
        } else {
            ok = ok && (double) f == half_value((uint16_t) h) && std::signbit(f) == ((h & 0x8000) != 0) && fp32_to_fp16(f) == h;
        }
        if (!ok) bad++;
        check(ok, format("fp16 0x%04x: decodes to %.9g (bulk %.9g), re-encodes to 0x%04x", h, f, decoded[h], fp32_to_fp16(f)));
    }

    // rounding of arbitrary floats, scalar and bulk, against the search-based references
    const std::vector<float> probes = conversion_probes();
    const int64_t n = (int64_t) probes.size();
    std::vector<uint16_t> h_bulk((size_t) n), b_bulk((size_t) n);
    quantize_row(DType::F16, probes.data(), h_bulk.data(), n);
    quantize_row(DType::BF16, probes.data(), b_bulk.data(), n);
    int bad_h = 0, bad_b = 0;
    for (int64_t i = 0; i < n; i++) {
        const float f = probes[(size_t) i];
        const uint16_t h = fp32_to_fp16(f), b = fp32_to_bf16(f);
        if (std::isnan(f)) {
            check(std::isnan(fp16_to_fp32(h)) && h == h_bulk[(size_t) i] && (h & 0x8000) == ((float_bits(f) >> 16) & 0x8000),
                  format("fp16 of nan 0x%08x: 0x%04x (bulk 0x%04x)", float_bits(f), h, h_bulk[(size_t) i]));
        } else if (bad_h < 5 && (h != nearest_half(f) || h != h_bulk[(size_t) i])) {
            bad_h++;
            check(false, format("fp32_to_fp16(%.9g = 0x%08x) = 0x%04x, bulk 0x%04x, expected 0x%04x", f, float_bits(f), h,
                                h_bulk[(size_t) i], nearest_half(f)));
        }
        if (bad_b < 5 && (b != nearest_bf16(f) || b != b_bulk[(size_t) i])) {
            bad_b++;
            check(false, format("fp32_to_bf16(%.9g = 0x%08x) = 0x%04x, bulk 0x%04x, expected 0x%04x", f, float_bits(f), b,
                                b_bulk[(size_t) i], nearest_bf16(f)));
        }
    }
    // bf16 decode, bulk vs scalar
    std::vector<float> bf((size_t) 65536);
    dequantize_row(DType::BF16, all.data(), bf.data(), 65536);
    for (uint32_t h = 0; h < 65536; h++) {
        if (float_bits(bf[h]) != (h << 16)) {
            check(false, format("bf16 0x%04x decodes to 0x%08x", h, float_bits(bf[h])));
            break;
        }
    }
    std::printf("  fp16/bf16: 65536 halves, %lld rounding probes\n", (long long) n);
}

// ---- traits and errors -------------------------------------------------------------------------

void test_traits() {
    // dot: ggml's vec_dot_type, except f16, whose activations stay f32 here (ggml rounds them to
    // f16); bf16 activations are bf16 as in ggml (vdpbf16ps).
    struct Expect { DType t; int64_t block; size_t bytes; DType dot; };
    const Expect expect[] = {
        {DType::F32, 1, 4, DType::F32},         {DType::F16, 1, 2, DType::F32},         {DType::BF16, 1, 2, DType::BF16},
        {DType::Q8_0, 32, 34, DType::Q8_0},     {DType::Q4_0, 32, 18, DType::Q8_0},     {DType::Q4_1, 32, 20, DType::Q8_0},
        {DType::Q4_K, 256, 144, DType::Q8_K},   {DType::Q5_K, 256, 176, DType::Q8_K},   {DType::Q6_K, 256, 210, DType::Q8_K},
        {DType::Q8_K, 256, 292, DType::Q8_K},
    };
    for (const Expect & e : expect) {
        const TypeTraits * tt = type_traits((uint32_t) e.t);
        check(tt && tt->block_size == e.block && tt->type_size == e.bytes && tt->dot_type == e.dot,
              format("traits of type %u", (unsigned) e.t));
    }
    for (uint32_t id : {4u, 5u, 6u, 7u, 9u, 10u, 11u, 16u, 29u, 31u, 32u, 1000u, 0xffffffffu}) {
        check(type_traits(id) == nullptr, format("type_traits(%u) should be nullptr", id));
    }
    check(row_size(DType::Q4_K, 512) == 288 && row_size(DType::F16, 3) == 6, "row_size");
    auto throws = [](const std::function<void()> & fn, sparrow_status expected) {
        try {
            fn();
        } catch (const Error & e) {
            return e.status() == expected;
        }
        return false;
    };
    float f[64] = {};
    uint8_t buf[512] = {};
    check(throws([] { row_size(DType::Q8_0, 33); }, SPARROW_ERR_INVALID_ARGUMENT), "row_size of a partial block throws");
    check(throws([] { row_size((DType) 9, 32); }, SPARROW_ERR_UNSUPPORTED), "row_size of q8_1 throws");
    check(throws([&] { quantize_row(DType::Q4_K, f, buf, 256); }, SPARROW_ERR_UNSUPPORTED), "no q4_K quantizer");
    check(throws([&] { vec_dot(DType::Q8_K, 256, buf, buf); }, SPARROW_ERR_UNSUPPORTED), "no q8_K vec_dot");
    check(throws([&] { dequantize_row((DType) 77, buf, f, 32); }, SPARROW_ERR_UNSUPPORTED), "unknown type throws");
}

}  // namespace

int main(int argc, char ** argv) {
    (void) argc, (void) argv;
    std::printf("test_quant: kernels %s\n", simd_level());
    try {
        test_traits();
        test_fp16_bf16();
        for (DType t : {DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q8_K, DType::F16, DType::BF16}) test_round_trip(t);
        for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4_K,
                        DType::Q5_K, DType::Q6_K}) {
            test_vec_dot(t);
        }
    } catch (const std::exception & e) {
        std::fprintf(stderr, "FAIL: unexpected exception: %s\n", e.what());
        return 1;
    }
    return finish("test_quant");
}
