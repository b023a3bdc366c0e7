// test_backend_ops.cpp - every op of backend.h, one at a time, against a plain scalar reference.
//
// llama.cpp's test-backend-ops is the model: each op runs on the backend under test with random
// inputs of awkward shapes, and its output is compared with a reference computed here, in double,
// from the definitions in backend.h. The references use nothing of the runtime's arithmetic:
// weight blocks are decoded here from ggml's byte layout, the activation quantization that the
// CPU backend applies before a quantized matmul is redone here from ggml's rules, fp16 goes
// through the compiler's _Float16. What the runtime provides is only the op under test and the
// generator of test weights (test_util.h).
//
// How outputs are compared:
//   - bit for bit, where the result is fixed by the definition: data movement (gather_rows,
//     get_rows of f32/f16/bf16/q8_0/q4_0 tables, concat_cols, store_rows, move_rows), add, the
//     fp16 rounding of KV rows; and batch invariance, which the project promises (lossless
//     speculative decoding rests on it): a row computed alone equals the same row computed in a
//     batch, for every op that works per row and every weight type of matmul, and the queries of
//     a causal batch equal each query decoded alone.
//   - within a bound derived from the data, for everything with float arithmetic. A bound is
//     in units of u = 2^-24 (float's unit roundoff) times the magnitudes that enter the result,
//     and each is justified where it is computed: loose enough for any correct order of float
//     operations, tight enough that one quant step, one key, one pair or one position wrong
//     fails (each check was seen to fail with its reference deliberately broken).
// Every backend buffer carries NaN guard bytes on both sides: an op that writes outside its
// output, or reads outside its inputs into a result, fails. KV cache rows past n_kv hold NaN.
// The test touches backend memory only through from_host / to_host (guard bytes included), so a
// backend whose memory the host cannot read (is_host() false) runs the same checks.
//
// Two backends: the CPU backend and the reference backend (ref/backend-ref.cpp, scalar float
// math in guarded memory that faults outside its ops). Each runs with 1 and 3 threads (3: splits
// that do not divide the work evenly; the ref backend has one thread, so it runs once). On the
// CPU backend a quantized matmul is run both ways the backend supports: on the file's rows and on
// the 16-row panels the weight store repacks them into (cpu/panels.h) where the active SIMD level
// has panel kernels; the ref backend multiplies file rows and its store's copies of them, with
// activations left in float (its matmul references skip the activation quantization). ctest runs
// this at every SIMD level (SPARROW_SIMD, cpu/features.h), which only the CPU backend reads.
//
// Usage: test_backend_ops [repo root, unused]. Exits non-zero with the first failures listed.

#include "backend.h"
#include "common.h"
#include "cpu/features.h"
#include "cpu/ops.h"
#include "quant.h"
#include "test_util.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

using namespace sparrow;

namespace {

using namespace sparrow_test;

// ---- numerics ---------------------------------------------------------------------------------

constexpr double kU = 1.0 / (1 << 24);  // unit roundoff of float (round to nearest)

// Higham's gamma_n = n u / (1 - n u): the relative bound on a float sum or dot product of n terms,
// in any order (recursive, pairwise or lane-parallel, with or without fused multiply-adds),
// relative to the sum of the terms' magnitudes.
double gamma_n(double n) { return n * kU / (1.0 - n * kU); }

float h2f(uint16_t h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float) v;
}
uint16_t f2h(float f) {  // round to nearest even, overflow to inf, as IEEE conversion does
    const _Float16 v = (_Float16) f;
    uint16_t h;
    std::memcpy(&h, &v, 2);
    return h;
}
float bf2f(uint16_t b) {
    const uint32_t u = (uint32_t) b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
uint16_t rd16(const uint8_t * p) { return (uint16_t) (p[0] | (p[1] << 8)); }  // ggml is little-endian

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

const DType kWeightTypes[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0,
                              DType::Q4_1, DType::Q4_K, DType::Q5_K, DType::Q6_K};

bool is_float_type(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }
const char * tname(DType t) { return traits(t).name; }

// ---- weight blocks, decoded from ggml's layout ---------------------------------------------------
//
// w: the values. absw: a bound on the magnitudes of the terms an implementation may form for the
// value: a quantized weight is scale * (unsigned quant) - offset in every kernel formulation (q4_0's
// -8, q6_K's -32, the +128 bias of the q8_0 panels, the mins of q4_1 / q4_K / q5_K), so
// |scale| * (|q| + |offset|) + |min term| bounds what any of them adds up. exact: the value is one
// correctly rounded operation on exact inputs, so every correct decoder gives the same bits.
struct Decoded {
    std::vector<float> w;
    std::vector<float> absw;
    bool exact = true;
};

// ggml's get_scale_min_k4: 8 six-bit scales and mins packed in 12 bytes.
void k_scale_min(int j, const uint8_t * q, int & sc, int & mn) {
    if (j < 4) {
        sc = q[j] & 63;
        mn = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

void decode_block(DType t, const uint8_t * b, float * w, float * a) {
    switch (t) {
        case DType::Q8_0: {  // d f16, qs int8[32]
            const float d = h2f(rd16(b));
            for (int j = 0; j < 32; j++) {
                const int q = (int8_t) b[2 + j];
                w[j] = d * (float) q;
                a[j] = std::fabs(d) * (float) (std::abs(q) + 128);
            }
            break;
        }
        case DType::Q4_0: {  // d f16, qs[16]: element j in the low nibble of byte j, j + 16 in the high
            const float d = h2f(rd16(b));
            for (int j = 0; j < 16; j++) {
                const int q0 = b[2 + j] & 0xF, q1 = b[2 + j] >> 4;
                w[j] = d * (float) (q0 - 8);
                w[j + 16] = d * (float) (q1 - 8);
                a[j] = std::fabs(d) * (float) (q0 + 8);
                a[j + 16] = std::fabs(d) * (float) (q1 + 8);
            }
            break;
        }
        case DType::Q4_1: {  // d f16, m f16, qs[16] as q4_0; x = d q + m
            const float d = h2f(rd16(b)), m = h2f(rd16(b + 2));
            for (int j = 0; j < 16; j++) {
                const int q0 = b[4 + j] & 0xF, q1 = b[4 + j] >> 4;
                w[j] = d * (float) q0 + m;
                w[j + 16] = d * (float) q1 + m;
                a[j] = std::fabs(d) * (float) q0 + std::fabs(m);
                a[j + 16] = std::fabs(d) * (float) q1 + std::fabs(m);
            }
            break;
        }
        case DType::Q4_K:
        case DType::Q5_K: {
            // d, dmin f16, scales[12], (q5_K: qh[32]), qs[128]. Each 64 elements: 32 qs bytes, low
            // nibbles the first 32 (sub-block 2c), high nibbles the next 32 (sub-block 2c + 1);
            // q5_K's fifth bit of element 64c + l is bit 2c of qh[l], of 64c + 32 + l bit 2c + 1.
            const bool five = t == DType::Q5_K;
            const float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2));
            const uint8_t * scales = b + 4;
            const uint8_t * qh = five ? b + 16 : nullptr;
            const uint8_t * qs = five ? b + 48 : b + 16;
            for (int c = 0; c < 4; c++) {
                int sc0, mn0, sc1, mn1;
                k_scale_min(2 * c, scales, sc0, mn0);
                k_scale_min(2 * c + 1, scales, sc1, mn1);
                const float d0 = d * (float) sc0, m0 = dmin * (float) mn0;
                const float d1 = d * (float) sc1, m1 = dmin * (float) mn1;
                for (int l = 0; l < 32; l++) {
                    int q0 = qs[32 * c + l] & 0xF, q1 = qs[32 * c + l] >> 4;
                    if (five) {
                        q0 += ((qh[l] >> (2 * c)) & 1) << 4;
                        q1 += ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                    w[64 * c + l] = d0 * (float) q0 - m0;
                    w[64 * c + 32 + l] = d1 * (float) q1 - m1;
                    a[64 * c + l] = std::fabs(d0) * (float) q0 + std::fabs(m0);
                    a[64 * c + 32 + l] = std::fabs(d1) * (float) q1 + std::fabs(m1);
                }
            }
            break;
        }
        case DType::Q6_K: {
            // ql[128], qh[64], scales int8[16], d f16. Each 128 elements use 64 ql and 32 qh bytes:
            // element l + 32 g takes a nibble of ql[l + 32 (g & 1)] (low for g < 2) and bits 2g, 2g + 1
            // of qh[l]; sub-blocks of 16 have their own scale. x = d scale (q - 32).
            const uint8_t * ql = b;
            const uint8_t * qh = b + 128;
            const int8_t * sc = (const int8_t *) (b + 192);
            const float d = h2f(rd16(b + 208));
            for (int half = 0; half < 2; half++) {
                for (int l = 0; l < 32; l++) {
                    const int q[4] = {
                        (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4),
                        (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                        (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                    };
                    for (int g = 0; g < 4; g++) {
                        const int e = 128 * half + 32 * g + l;
                        const float ds = d * (float) sc[e / 16];  // sub-blocks of 16 in order
                        w[e] = ds * (float) (q[g] - 32);
                        a[e] = std::fabs(ds) * (float) (q[g] + 32);
                    }
                }
                ql += 64;
                qh += 32;
            }
            break;
        }
        default:
            fail(SPARROW_ERR_INTERNAL, "decode_block: not a block type");
    }
}

Decoded decode_rows(DType t, const uint8_t * data, int64_t rows, int64_t k) {
    Decoded out;
    out.w.resize((size_t) (rows * k));
    out.absw.resize(out.w.size());
    out.exact = is_float_type(t) || t == DType::Q8_0 || t == DType::Q4_0;
    const size_t rb = row_size(t, k);
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t * row = data + r * rb;
        float * w = out.w.data() + r * k;
        float * a = out.absw.data() + r * k;
        for (int64_t j = 0; j < k; j++) {
            if (t == DType::F32) std::memcpy(&w[j], row + 4 * j, 4);
            if (t == DType::F16) w[j] = h2f(rd16(row + 2 * j));
            if (t == DType::BF16) w[j] = bf2f(rd16(row + 2 * j));
        }
        if (is_float_type(t)) {
            for (int64_t j = 0; j < k; j++) a[j] = std::fabs(w[j]);
            continue;
        }
        const int64_t bs = traits(t).block_size;
        for (int64_t i = 0; i < k / bs; i++) decode_block(t, row + i * traits(t).type_size, w + i * bs, a + i * bs);
    }
    return out;
}

// ---- activation quantization (what the CPU backend does to x before a quantized matmul) ------
//
// ggml's rules: q8_0 blocks of 32 with d = amax / 127 stored as fp16 and q = round(x / d), ties
// away from zero; q8_K blocks of 256 with d = 1 / (-127 / max), max the first element of largest
// magnitude, q = nearest-even(-127 / max * x) capped at 127, d kept in float. xq gets the values
// d * q. bound gets, per element, an a-priori bound on |d q - x| that uses only the block's amax,
// not these rules: half a quant step d / 2 (plus the float rounding of x / d, 300 u of a step),
// and for q8_0 the fp16 rounding of d times |q| <= 127 (2^-11 relative for a normal half,
// 2^-25 absolute for a subnormal one).
// bf16 (the dot type of bf16 weights): the nearest value with 8 significant bits, ties to the
// even one (f's significand rounded in double), within 2^-8 |x| (half a unit of the 8th bit).
void quantize_activations(DType dot, const float * x, int64_t k, double * xq, double * bound) {
    if (dot == DType::BF16) {
        for (int64_t j = 0; j < k; j++) {
            int e;
            const double m = std::frexp((double) x[j], &e);
            xq[j] = std::ldexp(std::nearbyint(std::ldexp(m, 8)), e - 8);
            bound[j] = std::ldexp(std::fabs((double) x[j]), -8);
        }
        return;
    }
    const int64_t bs = dot == DType::Q8_0 ? 32 : 256;
    for (int64_t b0 = 0; b0 < k; b0 += bs) {
        const float * xb = x + b0;
        float amax = 0.0f, max = 0.0f;
        for (int64_t j = 0; j < bs; j++) {
            if (std::fabs(xb[j]) > amax) {
                amax = std::fabs(xb[j]);
                max = xb[j];
            }
        }
        const double step = amax / 127.0;
        double err = step * (0.5 + 300 * kU);
        if (dot == DType::Q8_0) {
            err += 127.0 * std::max(step * std::ldexp(1.0, -11), std::ldexp(1.0, -25));
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            const float dh = h2f(f2h(d));
            for (int64_t j = 0; j < bs; j++) xq[b0 + j] = (double) dh * std::round(xb[j] * id);
        } else if (amax == 0.0f) {
            for (int64_t j = 0; j < bs; j++) xq[b0 + j] = 0.0;
        } else {
            const float iscale = -127.0f / max;
            const float d = 1.0f / iscale;
            for (int64_t j = 0; j < bs; j++) xq[b0 + j] = (double) d * std::min(127.0f, std::nearbyint(iscale * xb[j]));
        }
        for (int64_t j = 0; j < bs; j++) bound[b0 + j] = err;
    }
}

// ---- backend memory ------------------------------------------------------------------------------

// A buffer in the backend's memory, with guard bytes of NaN (0xff) on both sides.
class Buf {
public:
    static constexpr size_t kGuard = 128;  // keeps the payload 64-byte aligned
    Buf(Backend & be, size_t bytes) : be_(be), bytes_(bytes) {
        base_ = (uint8_t *) be_.alloc(bytes_ + 2 * kGuard);
        const std::vector<uint8_t> g(kGuard, 0xff);
        be_.from_host(base_, g.data(), kGuard);
        be_.from_host(base_ + kGuard + bytes_, g.data(), kGuard);
    }
    Buf(const Buf &) = delete;
    Buf & operator=(const Buf &) = delete;
    ~Buf() { be_.free(base_); }
    void * ptr() const { return base_ + kGuard; }
    void put(const void * src) { be_.from_host(ptr(), src, bytes_); }
    void fill(uint8_t byte) {
        const std::vector<uint8_t> v(bytes_, byte);
        put(v.data());
    }
    std::vector<uint8_t> bytes() const {
        std::vector<uint8_t> v(bytes_);
        be_.to_host(v.data(), ptr(), bytes_);
        return v;
    }
    std::vector<float> floats() const {
        std::vector<float> v(bytes_ / sizeof(float));
        be_.to_host(v.data(), ptr(), v.size() * sizeof(float));
        return v;
    }
    // The whole padded buffer comes back through to_host (backend memory may not be host memory).
    bool guards_intact() const {
        std::vector<uint8_t> all(bytes_ + 2 * kGuard);
        be_.to_host(all.data(), base_, all.size());
        for (size_t i = 0; i < kGuard; i++) {
            if (all[i] != 0xff || all[kGuard + bytes_ + i] != 0xff) return false;
        }
        return true;
    }
    Tensor tensor(DType t, int64_t cols, int64_t rows) const { return Tensor::matrix(t, cols, rows, ptr()); }

private:
    Backend & be_;
    size_t bytes_;
    uint8_t * base_;
};

std::unique_ptr<Buf> upload(Backend & be, const void * data, size_t bytes) {
    auto b = std::make_unique<Buf>(be, bytes);
    b->put(data);
    return b;
}
std::unique_ptr<Buf> upload(Backend & be, const std::vector<float> & v) { return upload(be, v.data(), v.size() * sizeof(float)); }
std::unique_ptr<Buf> output(Backend & be, size_t n_floats) {
    auto b = std::make_unique<Buf>(be, n_floats * sizeof(float));
    b->fill(0xff);  // NaN: an element the op does not write stays NaN and fails the comparison
    return b;
}

// ---- comparison -----------------------------------------------------------------------------------

int g_checks = 0;

// |got - want| <= tol elementwise (a NaN fails); reports the first offender with its row and column.
bool expect_close(const std::string & what, const std::vector<float> & got, const std::vector<double> & want,
                  const std::vector<double> & tol, int64_t cols) {
    g_checks++;
    if (got.size() != want.size()) {
        check(false, format("%s: %zu values, expected %zu", what.c_str(), got.size(), want.size()));
        return false;
    }
    for (size_t i = 0; i < want.size(); i++) {
        if (!(std::fabs((double) got[i] - want[i]) <= tol[i])) {
            check(false, format("%s: [%lld, %lld] = %.9g, reference %.9g (tolerance %.3g)", what.c_str(),
                                (long long) (i / cols), (long long) (i % cols), got[i], want[i], tol[i]));
            return false;
        }
    }
    return true;
}

bool expect_bits(const std::string & what, const void * got, const void * want, size_t bytes) {
    g_checks++;
    if (std::memcmp(got, want, bytes) == 0) return true;
    size_t i = 0;
    while (((const uint8_t *) got)[i] == ((const uint8_t *) want)[i]) i++;
    check(false, format("%s: differs at byte %zu of %zu", what.c_str(), i, bytes));
    return false;
}
bool expect_bits(const std::string & what, const std::vector<float> & got, const float * want, size_t n) {
    if (got.size() != n) {
        g_checks++;
        check(false, format("%s: %zu values, expected %zu", what.c_str(), got.size(), n));
        return false;
    }
    return expect_bits(what, got.data(), want, n * sizeof(float));
}

void expect_guards(const std::string & what, std::initializer_list<const Buf *> bufs) {
    g_checks++;
    for (const Buf * b : bufs) {
        if (!b->guards_intact()) {
            check(false, what + ": wrote outside its buffer");
            return;
        }
    }
}

std::vector<float> normals(int64_t n, float scale = 1.0f) {
    std::vector<float> v((size_t) n);
    for (auto & x : v) x = scale * normal();
    return v;
}

// A batch op that works row by row must give a row the same bits alone as in the batch: runs
// rows(i, 1) for each i and compares with `full`, the batch's output (d floats a row).
void expect_rows_alone(const std::string & what, const std::vector<float> & full, int64_t n, int64_t d,
                       const std::function<std::vector<float>(int64_t first, int64_t count)> & rows) {
    for (int64_t i = 0; i < n; i++) {
        const std::vector<float> one = rows(i, 1);
        if (!expect_bits(format("%s: row %lld alone vs in the batch", what.c_str(), (long long) i), one,
                         full.data() + i * d, (size_t) d)) {
            return;
        }
    }
}

struct Ctx {
    Backend & be;     // the backend under test
    Backend & be1;    // the same backend with 1 thread: rows computed alone
    std::string tag;  // e.g. "CPU/3t"
    // The backend's weight store, for backends that repack or copy weights (null otherwise).
    WeightStore * store;
    // Does the backend's matmul quantize the activations to the weight type's dot type (quant.h)
    // before a quantized weight, as the CPU backend does? If not, its references use x as it is.
    bool quantizes_activations;
};

std::string prefix(const Ctx & c, const char * op) { return c.tag + " " + op; }

// ---- memory ---------------------------------------------------------------------------------------

void test_memory(Ctx & c) {
    Backend & be = c.be;
    for (size_t n : {(size_t) 1, (size_t) 100, (size_t) 4096 + 3}) {
        void * p = be.alloc(n);
        std::vector<uint8_t> h(n, 0x5a);
        be.to_host(h.data(), p, n);
        check(std::all_of(h.begin(), h.end(), [](uint8_t b) { return b == 0; }), format("%s: alloc(%zu) is not zeroed", prefix(c, "memory").c_str(), n));
        check((uintptr_t) p % 64 == 0, format("%s: alloc(%zu) is not 64-byte aligned", prefix(c, "memory").c_str(), n));
        for (size_t i = 0; i < n; i++) h[i] = (uint8_t) (i * 7 + 1);
        be.from_host(p, h.data(), n);
        std::vector<uint8_t> back(n);
        be.to_host(back.data(), p, n);
        expect_bits(format("%s: from_host / to_host round trip of %zu bytes", prefix(c, "memory").c_str(), n), back.data(), h.data(), n);
        if (n > 10) {  // a copy into the middle leaves the rest alone
            const uint8_t mid[3] = {9, 8, 7};
            be.from_host((uint8_t *) p + 5, mid, 3);
            be.to_host(back.data(), p, n);
            std::memcpy(h.data() + 5, mid, 3);
            expect_bits(prefix(c, "memory") + ": partial from_host", back.data(), h.data(), n);
        }
        be.free(p);
    }
    void * z = be.alloc(0);  // allowed, and freeable
    be.free(z);
}

// ---- get_rows / gather_rows / concat_cols ---------------------------------------------------------

void test_get_rows(Ctx & c) {
    Backend & be = c.be;
    for (DType t : kWeightTypes) {
        const int64_t bs = traits(t).block_size;
        const std::vector<int64_t> ks = is_float_type(t) ? std::vector<int64_t>{1, 7, 64, 100} : bs == 32 ? std::vector<int64_t>{32, 96}
                                                                                                   : std::vector<int64_t>{256, 512};
        for (int64_t k : ks) {
            const int64_t table_rows = 13;
            const std::vector<uint8_t> table = make_weights(t, table_rows, k);
            const Decoded dec = decode_rows(t, table.data(), table_rows, k);
            auto tb = upload(be, table.data(), table.size());
            for (std::vector<int32_t> ids : {std::vector<int32_t>{12}, std::vector<int32_t>{3, 0, 12, 3, 7, 7},
                                             std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 5, 5, 9, 2}}) {
                const int64_t n = (int64_t) ids.size();
                auto out = output(be, (size_t) (n * k));
                Tensor o = out->tensor(DType::F32, k, n);
                be.get_rows(tb->tensor(t, k, table_rows), ids.data(), n, o);
                const std::vector<float> got = out->floats();
                const std::string what = format("%s %s k=%lld n=%lld", prefix(c, "get_rows").c_str(), tname(t), (long long) k, (long long) n);
                expect_guards(what, {out.get(), tb.get()});
                std::vector<float> want((size_t) (n * k));
                std::vector<double> wantd(want.size()), tol(want.size());
                for (int64_t i = 0; i < n; i++) {
                    for (int64_t j = 0; j < k; j++) {
                        const size_t e = (size_t) (ids[i] * k + j);
                        want[i * k + j] = dec.w[e];
                        wantd[i * k + j] = dec.w[e];
                        // two roundings at most (d * scale, then * q - min), or one where fused
                        tol[i * k + j] = 4 * kU * dec.absw[e];
                    }
                }
                if (dec.exact) expect_bits(what, got, want.data(), want.size());
                else expect_close(what, got, wantd, tol, k);
            }
        }
    }
    std::printf("  %s: 9 table types, k 1..512\n", prefix(c, "get_rows").c_str());
}

void test_gather_concat(Ctx & c) {
    Backend & be = c.be;
    for (int64_t d : {1, 5, 64, 131}) {
        const int64_t rows = 11;
        const std::vector<float> x = normals(rows * d);
        auto xb = upload(be, x);
        for (std::vector<int32_t> sel : {std::vector<int32_t>{10}, std::vector<int32_t>{4, 4, 0, 10, 7}, std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}}) {
            const int64_t n = (int64_t) sel.size();
            auto out = output(be, (size_t) (n * d));
            Tensor o = out->tensor(DType::F32, d, n);
            be.gather_rows(xb->tensor(DType::F32, d, rows), sel.data(), n, o);
            std::vector<float> want;
            for (int32_t r : sel) want.insert(want.end(), x.begin() + r * d, x.begin() + (r + 1) * d);
            const std::string what = format("%s d=%lld n=%lld", prefix(c, "gather_rows").c_str(), (long long) d, (long long) n);
            expect_bits(what, out->floats(), want.data(), want.size());
            expect_guards(what, {out.get(), xb.get()});
        }
    }
    for (int64_t da : {1, 3, 64}) {
        for (int64_t db : {1, 17, 128}) {
            for (int64_t n : {1, 6}) {
                const std::vector<float> a = normals(n * da), b = normals(n * db);
                auto ab = upload(be, a), bb = upload(be, b);
                auto out = output(be, (size_t) (n * (da + db)));
                Tensor o = out->tensor(DType::F32, da + db, n);
                be.concat_cols(ab->tensor(DType::F32, da, n), bb->tensor(DType::F32, db, n), o);
                std::vector<float> want;
                for (int64_t i = 0; i < n; i++) {
                    want.insert(want.end(), a.begin() + i * da, a.begin() + (i + 1) * da);
                    want.insert(want.end(), b.begin() + i * db, b.begin() + (i + 1) * db);
                }
                const std::string what = format("%s %lld + %lld cols, %lld rows", prefix(c, "concat_cols").c_str(), (long long) da,
                                                (long long) db, (long long) n);
                expect_bits(what, out->floats(), want.data(), want.size());
                expect_guards(what, {out.get(), ab.get(), bb.get()});
            }
        }
    }
    std::printf("  %s, %s\n", prefix(c, "gather_rows").c_str(), prefix(c, "concat_cols").c_str());
}

// ---- matmul ---------------------------------------------------------------------------------------

// Activations with the features that matter to a quantizing matmul: ordinary rows, a row of zeros
// (q8_K's amax = 0 block), a row 1000x larger and one 1000x smaller, a block of zeros inside a
// row, one outlier that sets a block's scale.
std::vector<float> matmul_activations(int64_t n, int64_t k) {
    std::vector<float> x = normals(n * k);
    for (int64_t c = 0; c < n; c++) {
        float * row = x.data() + c * k;
        if (c % 6 == 2) std::fill(row, row + k, 0.0f);
        if (c % 6 == 3) for (int64_t j = 0; j < k; j++) row[j] *= 1000.0f;
        if (c % 6 == 4) for (int64_t j = 0; j < k; j++) row[j] *= 0.001f;
        if (c % 6 == 5) {
            std::fill(row, row + std::min<int64_t>(k, 32), 0.0f);
            row[k - 1] = 40.0f;
        }
    }
    return x;
}

// The reference for out[c, r] = x[c] . w[r] (+ bias[r]). With quantized weights the backend
// multiplies by its own q8_0 / q8_K quantization of x (dot type of quant.h), so there are two checks:
//   tight: against sum_j w_j xq_j (xq: the activations quantized by ggml's rules, above), within
//     gamma(2 nb + 8) * sum_j absw_j |xq_j|: each block adds at most two float products of exact
//     integer sums (the quant term, the offset / min term), each with two roundings, and the nb
//     block results are summed in float in some order; 8 covers the bias add and the final
//     roundings. One quant step of one element is ~ |w_j| d, far above this.
//   a priori: against sum_j w_j x_j, within the tight bound (with |x_j| + bound_j for |xq_j|) plus
//     sum_j |w_j| bound_j: the error any 8-bit block quantization of x with scale amax / 127 may
//     make, whatever its rounding rules.
// Float weights multiply x as it is (bf16 weights: x rounded to bf16, their exact products
// summed in float, both checks): within gamma(k + 2) * (sum |w_j x_j| + |bias|).
// A backend that does not quantize the activations (quantize_x false) gets that one check for every
// weight type: against sum_j w_j x_j, within gamma(k + 3) * (sum_j |w_j x_j| + |bias|), plus, where
// decoding a block is not exact (q4_1, the k-quants), 4 u sum_j absw_j |x_j|: its decoded weights
// may differ from ours by the roundings of scale * q - min (4 u of absw_j, as get_rows allows), then
// k products are summed in float in some order, and the bias added. One quant step of one element
// (|scale x_j|) is above this at every k but 4096; a wrong layout, scale or min fails at every k.
struct MatmulRef {
    std::vector<double> tight, tight_tol, loose, loose_tol;
    bool quantized = false;
};

MatmulRef matmul_reference(DType t, const Decoded & w, int64_t m, int64_t k, const std::vector<float> & x, int64_t n,
                           const float * bias, bool quantize_x) {
    MatmulRef ref;
    ref.quantized = quantize_x && traits(t).dot_type != DType::F32;
    ref.tight.resize((size_t) (n * m));
    ref.tight_tol.resize(ref.tight.size());
    ref.loose.resize(ref.tight.size());
    ref.loose_tol.resize(ref.tight.size());
    std::vector<double> xq((size_t) k), bound((size_t) k, 0.0);
    const double nb = ref.quantized ? (double) (k / traits(t).block_size) : 0.0;
    for (int64_t c = 0; c < n; c++) {
        const float * xc = x.data() + c * k;
        if (ref.quantized) quantize_activations(traits(t).dot_type, xc, k, xq.data(), bound.data());
        else for (int64_t j = 0; j < k; j++) xq[j] = xc[j];
        for (int64_t r = 0; r < m; r++) {
            const float * wr = w.w.data() + r * k;
            const float * ar = w.absw.data() + r * k;
            double yq = 0, yx = 0, magq = 0, magx = 0, qerr = 0, magw = 0;
            for (int64_t j = 0; j < k; j++) {
                yq += (double) wr[j] * xq[j];
                yx += (double) wr[j] * xc[j];
                magq += (double) ar[j] * std::fabs(xq[j]);
                magx += (double) ar[j] * (std::fabs((double) xc[j]) + bound[j]);
                qerr += std::fabs((double) wr[j]) * bound[j];
                magw += std::fabs((double) wr[j] * xc[j]);
            }
            const double b = bias ? bias[r] : 0.0;
            const size_t o = (size_t) (c * m + r);
            ref.tight[o] = yq + b;
            ref.loose[o] = yx + b;
            if (ref.quantized && is_float_type(t)) {  // bf16 x bf16: exact products summed in float
                ref.tight_tol[o] = gamma_n((double) k + 2) * (magq + std::fabs(b));
                ref.loose_tol[o] = gamma_n((double) k + 2) * (magx + std::fabs(b)) + qerr;
            } else if (ref.quantized) {
                ref.tight_tol[o] = gamma_n(2 * nb + 8) * (magq + std::fabs(b));
                ref.loose_tol[o] = gamma_n(2 * nb + 8) * (magx + std::fabs(b)) + qerr;
            } else if (is_float_type(t)) {
                ref.tight_tol[o] = ref.loose_tol[o] = gamma_n((double) k + 2) * (magq + std::fabs(b));
            } else {  // quantized weights times float activations
                ref.tight_tol[o] = ref.loose_tol[o] = gamma_n((double) k + 3) * (magw + std::fabs(b)) + (w.exact ? 0.0 : 4 * kU * magq);
            }
        }
    }
    return ref;
}

void expect_matmul(const std::string & what, const std::vector<float> & got, const MatmulRef & ref, int64_t m) {
    if (!ref.quantized) {
        expect_close(what, got, ref.tight, ref.tight_tol, m);
        return;
    }
    expect_close(what + " (vs quantized activations)", got, ref.tight, ref.tight_tol, m);
    expect_close(what + " (vs f32 activations)", got, ref.loose, ref.loose_tol, m);
}

// A weight in the forms the backend multiplies: its file rows in backend memory, and (on a backend
// with a store) the store's form, panels where the type and SIMD level have them.
struct Weight {
    DType type;
    int64_t m, k;
    std::vector<uint8_t> bytes;
    Decoded dec;
    std::unique_ptr<Buf> rows_buf;
    Tensor rows;    // file layout, panels = false
    Tensor stored;  // the store's form (== rows without a store)
};

std::unique_ptr<Weight> make_weight(Ctx & c, DType t, int64_t m, int64_t k) {
    auto w = std::make_unique<Weight>();
    w->type = t;
    w->m = m;
    w->k = k;
    w->bytes = make_weights(t, m, k);
    w->dec = decode_rows(t, w->bytes.data(), m, k);
    w->rows_buf = upload(c.be, w->bytes.data(), w->bytes.size());
    w->rows = w->rows_buf->tensor(t, k, m);
    w->stored = c.store ? c.store->matmul_weight(Tensor::matrix(t, k, m, w->bytes.data())) : w->rows;
    return w;
}

std::vector<float> run_matmul(Backend & be, const Tensor & w, const std::vector<float> & x, int64_t first, int64_t n,
                              const Buf * bias, bool * guards_ok = nullptr) {
    const int64_t k = w.cols(), m = w.rows();
    auto xb = upload(be, x.data() + first * k, (size_t) (n * k) * sizeof(float));
    auto out = output(be, (size_t) (n * m));
    Tensor o = out->tensor(DType::F32, m, n);
    Tensor bt;
    if (bias) bt = bias->tensor(DType::F32, m, 1);
    be.matmul(w, xb->tensor(DType::F32, k, n), o, bias ? &bt : nullptr);
    if (guards_ok) *guards_ok = out->guards_intact() && xb->guards_intact();
    return out->floats();
}

int g_panel_cases = 0, g_row_cases = 0;

void matmul_case(Ctx & c, DType t, int64_t m, int64_t k, int64_t n, bool with_bias) {
    auto w = make_weight(c, t, m, k);
    const std::vector<float> x = matmul_activations(n, k);
    const std::vector<float> bias = normals(m);
    std::unique_ptr<Buf> bias_buf = with_bias ? upload(c.be, bias) : nullptr;
    const MatmulRef ref = matmul_reference(t, w->dec, m, k, x, n, with_bias ? bias.data() : nullptr, c.quantizes_activations);
    for (const Tensor * wt : {&w->rows, &w->stored}) {
        // the store's form when it is not the rows again: panels, or a non-host backend's copy
        if (wt == &w->stored && !w->stored.panels && (c.be.is_host() || w->stored.data == w->rows.data)) continue;
        (wt->panels ? g_panel_cases : g_row_cases)++;
        const std::string what = format("%s %s [%lld x %lld] x %lld rows%s%s", prefix(c, "matmul").c_str(), tname(t), (long long) m,
                                        (long long) k, (long long) n, wt->panels ? " panels" : " rows", with_bias ? " +bias" : "");
        bool guards = false;
        const std::vector<float> got = run_matmul(c.be, *wt, x, 0, n, bias_buf.get(), &guards);
        g_checks++;
        check(guards && w->rows_buf->guards_intact() && (!bias_buf || bias_buf->guards_intact()), what + ": wrote outside its buffers");
        expect_matmul(what, got, ref, m);
        // batch invariance: each activation row alone, on one thread
        expect_rows_alone(what, got, n, m, [&](int64_t first, int64_t count) {
            return run_matmul(c.be1, *wt, x, first, count, bias_buf.get());
        });
    }
}

// Shapes (weight rows m, k, batch n): m and n around the 16-row panel and the SIMD tiles (1, 5,
// 16, 17, 33, 203 rows; 1, 3, 7, 16, 17, 37 activation rows), the last two large enough (m k n >>
// 2^16) that the backend splits them over its threads, one with k = 4096 (a model's row: many
// blocks summed). k per kind of type: float rows of any length (1, 13, 40, 100, 257); 32-blocks with
// k not a multiple of 256 (32, 96, 288); k-quants of 1 to 16 super-blocks.
void test_matmul(Ctx & c) {
    struct Shape { int64_t m, k_float, k_32, k_256, n; };
    const Shape shapes[] = {
        {1, 1, 32, 256, 1},     {5, 13, 96, 512, 3},    {17, 40, 288, 768, 7},     {33, 100, 32, 256, 17},
        {16, 13, 96, 512, 16},  {203, 257, 288, 768, 37}, {70, 4096, 4096, 4096, 5},
    };
    for (DType t : kWeightTypes) {
        for (const Shape & s : shapes) {
            const int64_t k = is_float_type(t) ? s.k_float : traits(t).block_size == 32 ? s.k_32 : s.k_256;
            matmul_case(c, t, s.m, k, s.n, s.m % 2 == 1);  // with a bias for odd m
        }
    }
    std::printf("  %s: 9 types, %d cases on rows, %d on panels\n", prefix(c, "matmul").c_str(), g_row_cases, g_panel_cases);
    g_row_cases = g_panel_cases = 0;
}

// matmul_group: each product the same bits as matmul alone, for a group that shares one pass (all
// in panels of one dot type) and a mixed one (rows, panels, another dot type, float weights).
void test_matmul_group(Ctx & c) {
    for (DType t : kWeightTypes) {
        const DType dt = traits(t).dot_type;
        const DType sibling = dt == DType::Q8_0 ? (t == DType::Q4_0 ? DType::Q8_0 : DType::Q4_0)
                            : dt == DType::Q8_K ? (t == DType::Q6_K ? DType::Q4_K : DType::Q6_K)
                            : (t == DType::F16 ? DType::BF16 : DType::F16);
        const int64_t k = is_float_type(t) ? 72 : dt == DType::Q8_0 ? 160 : 512;
        const int64_t n = 9;
        std::vector<std::unique_ptr<Weight>> ws;
        ws.push_back(make_weight(c, t, 45, k));
        ws.push_back(make_weight(c, t, 17, k));
        ws.push_back(make_weight(c, sibling, 24, k));
        ws.push_back(make_weight(c, t, 20, k));
        ws.push_back(make_weight(c, DType::F32, 9, k));
        const std::vector<float> x = matmul_activations(n, k);
        const std::vector<float> bias = normals(45);  // the first m values serve a product of m rows
        auto bias_buf = upload(c.be, bias);
        auto xb = upload(c.be, x);
        Tensor xt = xb->tensor(DType::F32, k, n);
        // (weight, which form, bias?) per group
        struct Item { int w; bool stored; bool bias; };
        const std::vector<std::vector<Item>> groups = {
            {{0, true, true}, {1, true, false}, {2, true, false}},                 // q/k/v-like: one pass
            {{0, true, false}, {3, false, true}, {4, false, false}, {1, true, true}},  // mixed forms and types
            {{1, true, false}},
        };
        for (size_t g = 0; g < groups.size(); g++) {
            std::vector<std::unique_ptr<Buf>> outs;
            std::vector<Tensor> out_t, bias_t;
            std::vector<MatmulOut> mo;
            out_t.reserve(groups[g].size());
            bias_t.reserve(groups[g].size());
            for (const Item & it : groups[g]) {
                const Weight & w = *ws[(size_t) it.w];
                outs.push_back(output(c.be, (size_t) (n * w.m)));
                out_t.push_back(outs.back()->tensor(DType::F32, w.m, n));
                bias_t.push_back(bias_buf->tensor(DType::F32, w.m, 1));
            }
            for (size_t i = 0; i < groups[g].size(); i++) {
                const Item & it = groups[g][i];
                const Weight & w = *ws[(size_t) it.w];
                mo.push_back({it.stored ? &w.stored : &w.rows, &out_t[i], it.bias ? &bias_t[i] : nullptr});
            }
            c.be.matmul_group(xt, mo.data(), (int) mo.size());
            for (size_t i = 0; i < groups[g].size(); i++) {
                const Item & it = groups[g][i];
                const Weight & w = *ws[(size_t) it.w];
                const Tensor & wt = it.stored ? w.stored : w.rows;
                const std::string what = format("%s %s group %zu, product %zu (%s%s)", prefix(c, "matmul_group").c_str(), tname(t), g, i,
                                                tname(w.type), wt.panels ? " panels" : " rows");
                const std::vector<float> got = outs[i]->floats();
                expect_guards(what, {outs[i].get()});
                const std::vector<float> alone = run_matmul(c.be, wt, x, 0, n, mo[i].bias ? bias_buf.get() : nullptr);
                expect_bits(what + " vs matmul alone", got, alone.data(), alone.size());
                if (i == 0) {  // and the products are right (matmul's own check, once more through the group)
                    expect_matmul(what, got, matmul_reference(w.type, w.dec, w.m, k, x, n, mo[i].bias ? bias.data() : nullptr,
                                                            c.quantizes_activations), w.m);
                }
            }
        }
    }
    std::printf("  %s: 9 types, shared pass and mixed groups\n", prefix(c, "matmul_group").c_str());
}

// The weight store: a type without a dot product is refused; an absent weight (no data) passes
// through. Every store copies a float matrix given to matmul_weight() (the CPU's onto huge pages,
// cpu/huge_pages.h): the same type, shape, name and bytes (read back with to_host). On a host
// backend a view given to weight() is used as it is. A non-host backend's store copies that too; a
// view given to both weight() and matmul_weight() (a tied output head) may share one copy, and new
// bytes at a known address get a new copy.
void test_weight_store(Ctx & c) {
    if (!c.store) return;
    const std::string what = prefix(c, "weight store");
    std::vector<float> f = normals(64 * 3);
    Tensor fv = Tensor::matrix(DType::F32, 64, 3, f.data());
    fv.name = "f32 view";
    const Tensor fs = c.store->matmul_weight(fv);
    // the copy holds the view's bytes, with the view's type, shape and name
    auto same_copy = [&](const Tensor & got, const Tensor & view, const char * how) {
        g_checks++;
        bool ok = got.data && got.data != view.data && !got.panels && got.type == view.type && got.name == view.name &&
                  std::equal(got.ne, got.ne + 4, view.ne);
        if (ok) {
            std::vector<uint8_t> back(view.nbytes());
            c.be.to_host(back.data(), got.data, back.size());
            ok = std::memcmp(back.data(), view.data, back.size()) == 0;
        }
        check(ok, format("%s: %s of %s is not a copy of the view", what.c_str(), how, tname(view.type)));
    };
    same_copy(fs, fv, "matmul_weight");
    if (c.be.is_host()) {
        const Tensor ws = c.store->weight(fv);
        g_checks++;
        check(ws.data == fv.data, what + ": weight() does not use the view in place");
    } else {
        // a tied head: one q8_0 view as a table (weight) and as a matmul weight
        const std::vector<uint8_t> q8 = make_weights(DType::Q8_0, 5, 64);
        const Tensor qv = Tensor::matrix(DType::Q8_0, 64, 5, (void *) q8.data());
        const size_t before = c.store->bytes();
        const Tensor qw = c.store->weight(qv), qm = c.store->matmul_weight(qv);
        same_copy(qw, qv, "weight");
        same_copy(qm, qv, "matmul_weight");
        g_checks++;
        check(c.store->bytes() >= before + qv.nbytes() && c.store->bytes() <= before + 2 * qv.nbytes(),
              format("%s: bytes() grew by %zu for a %zu-byte view copied once or twice", what.c_str(), c.store->bytes() - before, qv.nbytes()));
        // the same address with other bytes (a freed host buffer reused): a fresh copy of the new bytes
        for (auto & x : f) x = -x;
        same_copy(c.store->matmul_weight(fv), fv, "matmul_weight of changed bytes at the same address");
    }
    Tensor absent = Tensor::matrix(DType::F32, 64, 3, nullptr);
    g_checks++;
    check(c.store->weight(absent).data == nullptr && c.store->matmul_weight(absent).data == nullptr,
          what + ": an absent weight (no data) does not pass through");
    std::vector<uint8_t> q8k(row_size(DType::Q8_K, 256) * 2);
    bool refused = false;
    try {
        c.store->matmul_weight(Tensor::matrix(DType::Q8_K, 256, 2, q8k.data()));
    } catch (const Error & e) {
        refused = e.status() == SPARROW_ERR_UNSUPPORTED;
    }
    g_checks++;
    check(refused, prefix(c, "weight store") + ": a q8_K weight (no dot product) is not refused");
}

// ---- norms ----------------------------------------------------------------------------------------

// Rows with: ordinary values, a zero row, a large offset (|mean| >> spread: layer_norm's two passes),
// large and tiny magnitudes.
std::vector<float> norm_inputs(int64_t n, int64_t d) {
    std::vector<float> x = normals(n * d);
    for (int64_t i = 0; i < n; i++) {
        float * r = x.data() + i * d;
        if (i % 5 == 1) std::fill(r, r + d, 0.0f);
        if (i % 5 == 2) for (int64_t j = 0; j < d; j++) r[j] = 1000.0f + r[j];
        if (i % 5 == 3) for (int64_t j = 0; j < d; j++) r[j] *= 300.0f;
        if (i % 5 == 4) for (int64_t j = 0; j < d; j++) r[j] *= 1e-3f;
    }
    return x;
}

void test_norms(Ctx & c) {
    Backend & be = c.be;
    for (int64_t d : {1, 7, 64, 129}) {
        for (int64_t n : {1, 3, 17}) {
            for (float eps : {1e-6f, 1e-5f}) {
                const std::vector<float> x = norm_inputs(n, d), g = normals(d), bias = normals(d);
                auto gb = upload(be, g), bb = upload(be, bias);
                // rms_norm: y = x g / sqrt(mean(x^2) + eps). An implementation rounds the scale, x * scale
                // and * g (3 u of |y|), and may sum x^2 in float (gamma(d) relative, half of it after the
                // square root).
                {
                    auto rn = [&](Backend & b, int64_t first, int64_t count, bool in_place) {
                        auto xb = upload(b, x.data() + first * d, (size_t) (count * d) * sizeof(float));
                        auto out = in_place ? nullptr : output(b, (size_t) (count * d));
                        Tensor xt = xb->tensor(DType::F32, d, count);
                        Tensor ot = in_place ? xt : out->tensor(DType::F32, d, count);
                        b.rms_norm(xt, gb->tensor(DType::F32, d, 1), eps, ot);
                        const bool ok = xb->guards_intact() && (in_place || out->guards_intact());
                        std::vector<float> r = in_place ? xb->floats() : out->floats();
                        if (!ok) r.assign(r.size(), NAN);
                        return r;
                    };
                    std::vector<double> want((size_t) (n * d)), tol(want.size());
                    for (int64_t i = 0; i < n; i++) {
                        double ss = 0;
                        for (int64_t j = 0; j < d; j++) ss += (double) x[i * d + j] * x[i * d + j];
                        const double inv = 1.0 / std::sqrt(ss / d + eps);
                        for (int64_t j = 0; j < d; j++) {
                            want[i * d + j] = x[i * d + j] * inv * g[j];
                            tol[i * d + j] = (4 + 0.5 * d) * 1.01 * kU * std::fabs(want[i * d + j]);
                        }
                    }
                    const std::string what = format("%s d=%lld n=%lld eps=%g", prefix(c, "rms_norm").c_str(), (long long) d, (long long) n, eps);
                    const std::vector<float> got = rn(be, 0, n, false);
                    expect_close(what, got, want, tol, d);
                    expect_bits(what + " in place (out = x)", rn(be, 0, n, true), got.data(), got.size());
                    expect_rows_alone(what, got, n, d, [&](int64_t f, int64_t cnt) { return rn(c.be1, f, cnt, false); });
                }
                // layer_norm: y = (x - mean) / sqrt(var + eps) g + b, var the biased one. The mean and the
                // variance, if summed in float, are off by gamma(d) relative to the sums of |x| and of
                // (x - mean)^2: an error in the mean of gamma(d) mean|x| moves every (x - mean); the
                // variance's error changes the scale by half its relative size. The rest is four
                // roundings of |y - b| and one of the sum with b.
                for (bool with_bias : {true, false}) {
                    auto ln = [&](Backend & b, int64_t first, int64_t count) {
                        auto xb = upload(b, x.data() + first * d, (size_t) (count * d) * sizeof(float));
                        auto out = output(b, (size_t) (count * d));
                        Tensor ot = out->tensor(DType::F32, d, count);
                        Tensor bt = bb->tensor(DType::F32, d, 1);
                        b.layer_norm(xb->tensor(DType::F32, d, count), gb->tensor(DType::F32, d, 1), with_bias ? &bt : nullptr, eps, ot);
                        std::vector<float> r = out->floats();
                        if (!out->guards_intact() || !xb->guards_intact()) r.assign(r.size(), NAN);
                        return r;
                    };
                    std::vector<double> want((size_t) (n * d)), tol(want.size());
                    for (int64_t i = 0; i < n; i++) {
                        const float * xi = x.data() + i * d;
                        double mean = 0, mabs = 0;
                        for (int64_t j = 0; j < d; j++) mean += xi[j], mabs += std::fabs(xi[j]);
                        mean /= d;
                        mabs /= d;
                        double var = 0;
                        for (int64_t j = 0; j < d; j++) var += (xi[j] - mean) * (xi[j] - mean);
                        var /= d;
                        const double inv = 1.0 / std::sqrt(var + eps);
                        for (int64_t j = 0; j < d; j++) {
                            const double core = (xi[j] - mean) * inv * g[j];
                            const double b = with_bias ? bias[j] : 0.0;
                            want[i * d + j] = core + b;
                            tol[i * d + j] = (6 + 0.5 * d) * 1.01 * kU * std::fabs(core) + 2 * kU * std::fabs(core + b) +
                                             gamma_n((double) d) * mabs * inv * std::fabs(g[j]);
                        }
                    }
                    const std::string what = format("%s d=%lld n=%lld eps=%g%s", prefix(c, "layer_norm").c_str(), (long long) d,
                                                    (long long) n, eps, with_bias ? " +bias" : "");
                    const std::vector<float> got = ln(be, 0, n);
                    expect_close(what, got, want, tol, d);
                    expect_rows_alone(what, got, n, d, [&](int64_t f, int64_t cnt) { return ln(c.be1, f, cnt); });
                }
            }
        }
    }
    std::printf("  %s, %s: d 1..129, eps 1e-6 / 1e-5, zero / offset / large / tiny rows\n", prefix(c, "rms_norm").c_str(),
                prefix(c, "layer_norm").c_str());
}

// ---- rope -----------------------------------------------------------------------------------------

struct RopeCase {
    const char * name;
    RopeMode mode;
    int n_head, head_dim, n_dims;
    float base, scale;
    int sections[4];
    bool factors;
};

int rope_streams(RopeMode m) { return m == RopeMode::MRope ? 4 : m == RopeMode::Vision ? 2 : 1; }

// The definition (backend.h), in double. Pair i rotates dims (a, b) = (2i, 2i + 1) for Norm and
// (i, i + n_dims / 2) otherwise, by theta = position * freq_scale * base^(-2i / n_dims) / factor_i.
// MRope (llama.cpp's rule): pair i belongs to section s of the sections cycle (i mod their total),
// and takes its position from stream s. Vision: the first sections[0] pairs take stream 0, the next
// sections[1] stream 1, each section with its own ladder base^(-2j / (n_dims / 2)), no factors.
// Dims past the rotated pairs keep their values. theta_out gets |theta| per element, for the bound.
void rope_reference(const RopeCase & rc, const std::vector<float> & x, int64_t n, const std::vector<int32_t> & pos,
                    const std::vector<float> & ff, std::vector<double> & y, std::vector<double> & theta_out) {
    const int hd = rc.head_dim, half = rc.n_dims / 2;
    y.assign(x.begin(), x.end());
    theta_out.assign(x.size(), 0.0);
    int total = 0;
    for (int s = 0; s < 4; s++) total += rc.sections[s];
    for (int64_t t = 0; t < n; t++) {
        for (int i = 0; i < half; i++) {
            int stream = 0;
            double exponent = -2.0 * i / rc.n_dims;
            if (rc.mode == RopeMode::MRope) {
                int sector = i % total, s = 0;
                while (sector >= rc.sections[s]) sector -= rc.sections[s++];
                stream = s;
            }
            if (rc.mode == RopeMode::Vision) {
                if (i >= rc.sections[0] + rc.sections[1]) continue;
                stream = i < rc.sections[0] ? 0 : 1;
                const int j = stream == 0 ? i : i - rc.sections[0];
                exponent = -2.0 * j / half;
            }
            double theta = (double) pos[(size_t) (stream * n + t)] * rc.scale * std::pow((double) rc.base, exponent);
            if (rc.factors && rc.mode != RopeMode::Vision) theta /= ff[(size_t) i];
            const int a = rc.mode == RopeMode::Norm ? 2 * i : i;
            const int b = rc.mode == RopeMode::Norm ? 2 * i + 1 : i + half;
            for (int h = 0; h < rc.n_head; h++) {
                const size_t base = (size_t) (t * rc.n_head * hd + h * hd);
                const double x0 = x[base + a], x1 = x[base + b];
                y[base + a] = x0 * std::cos(theta) - x1 * std::sin(theta);
                y[base + b] = x0 * std::sin(theta) + x1 * std::cos(theta);
                theta_out[base + a] = theta_out[base + b] = std::fabs(theta);
            }
        }
    }
}

void test_rope(Ctx & c) {
    const RopeCase cases[] = {
        {"norm", RopeMode::Norm, 3, 16, 16, 10000.0f, 1.0f, {0, 0, 0, 0}, false},
        {"norm scaled+factors", RopeMode::Norm, 2, 64, 64, 500000.0f, 0.25f, {0, 0, 0, 0}, true},
        {"norm partial", RopeMode::Norm, 2, 12, 8, 10000.0f, 1.0f, {0, 0, 0, 0}, false},
        {"neox", RopeMode::Neox, 2, 64, 64, 1000000.0f, 1.0f, {0, 0, 0, 0}, false},
        {"neox scaled+factors", RopeMode::Neox, 3, 32, 32, 10000.0f, 0.5f, {0, 0, 0, 0}, true},
        {"neox partial", RopeMode::Neox, 1, 48, 32, 10000.0f, 1.0f, {0, 0, 0, 0}, false},
        {"mrope qwen2vl", RopeMode::MRope, 2, 128, 128, 1000000.0f, 1.0f, {16, 24, 24, 0}, false},
        {"mrope cyclic", RopeMode::MRope, 3, 32, 32, 10000.0f, 1.0f, {2, 3, 3, 0}, false},
        {"mrope 4 streams+factors", RopeMode::MRope, 2, 16, 16, 10000.0f, 0.5f, {2, 2, 1, 3}, true},
        {"vision", RopeMode::Vision, 2, 32, 32, 10000.0f, 1.0f, {8, 8, 0, 0}, false},
        {"vision uneven scaled", RopeMode::Vision, 3, 16, 16, 10000.0f, 0.5f, {3, 5, 0, 0}, false},
    };
    for (const RopeCase & rc : cases) {
        for (int64_t n : {1, 7, 33}) {
            const int64_t d = (int64_t) rc.n_head * rc.head_dim;
            const std::vector<float> x = normals(n * d);
            // distinct positions per stream (a pair taking the wrong stream shows), up to 5000
            std::vector<int32_t> pos((size_t) (rope_streams(rc.mode) * n));
            for (size_t i = 0; i < pos.size(); i++) pos[i] = (int32_t) (i % 3 == 0 ? pick(0, 5000) : pick(0, 60));
            if (!pos.empty()) pos[0] = 0;
            std::vector<float> ff((size_t) (rc.n_dims / 2));
            for (auto & f : ff) f = (float) (1.0 + 7.0 * std::fabs(normal()));
            RopeParams p;
            p.mode = rc.mode;
            p.n_dims = rc.n_dims;
            p.freq_base = rc.base;
            p.freq_scale = rc.scale;
            std::copy(rc.sections, rc.sections + 4, p.sections);
            p.freq_factors = rc.factors ? ff.data() : nullptr;
            auto run = [&](Backend & b, int64_t first, int64_t count) {
                // positions of the rows [first, first + count), stream-major as the op reads them
                std::vector<int32_t> ps;
                for (int s = 0; s < rope_streams(rc.mode); s++) {
                    ps.insert(ps.end(), pos.begin() + s * n + first, pos.begin() + s * n + first + count);
                }
                auto xb = upload(b, x.data() + first * d, (size_t) (count * d) * sizeof(float));
                Tensor xt = xb->tensor(DType::F32, d, count);
                b.rope(xt, rc.n_head, rc.head_dim, ps.data(), p);
                std::vector<float> r = xb->floats();
                if (!xb->guards_intact()) r.assign(r.size(), NAN);
                return r;
            };
            std::vector<double> want, theta;
            rope_reference(rc, x, n, pos, ff, want, theta);
            // Each output is x0 c -/+ x1 s: the rounding of cos and sin to float and of the two products
            // and their sum, 4 u of |x0| + |x1| (8 u allowed); theta itself may be formed in float, a few
            // roundings of u |theta| each, which turn the pair by that angle (4 u |theta| allowed).
            std::vector<double> tol(want.size());
            for (int64_t t = 0; t < n; t++) {
                for (int h = 0; h < rc.n_head; h++) {
                    const size_t base = (size_t) (t * d + h * rc.head_dim);
                    for (int e = 0; e < rc.head_dim; e++) {
                        const int half = rc.n_dims / 2;
                        const int pair = rc.mode == RopeMode::Norm ? e / 2 : (e < half ? e : e - half);
                        const int partner = rc.mode == RopeMode::Norm ? (e ^ 1) : (e < half ? e + half : e - half);
                        const bool rotated = e < rc.n_dims &&
                                             (rc.mode != RopeMode::Vision || pair < rc.sections[0] + rc.sections[1]);
                        const double mag = std::fabs(x[base + e]) + (rotated ? std::fabs(x[base + partner]) : 0.0);
                        tol[base + e] = rotated ? (8 + 4 * theta[base + e]) * kU * mag : 0.0;  // the rest keeps its bits
                    }
                }
            }
            const std::string what = format("%s %s n=%lld", prefix(c, "rope").c_str(), rc.name, (long long) n);
            const std::vector<float> got = run(c.be, 0, n);
            expect_close(what, got, want, tol, d);
            expect_rows_alone(what, got, n, d, [&](int64_t f, int64_t cnt) { return run(c.be1, f, cnt); });
        }
    }
    std::printf("  %s: norm / neox / mrope / vision, partial dims, sections, freq_scale, freq_factors\n", prefix(c, "rope").c_str());
}

// ---- KV rows: store_rows, move_rows ---------------------------------------------------------------

void test_store_move(Ctx & c) {
    Backend & be = c.be;
    for (DType ct : {DType::F32, DType::F16}) {
        const int64_t d = 40, cache_rows = 23;
        const size_t rb = row_size(ct, d);
        // store_rows: rows [first, first + n) take the values (fp16: rounded to nearest even, overflow
        // to inf); every other row keeps its bytes
        for (int64_t first : {0, 5, 22}) {
            for (int64_t n : {1, 4, 18}) {
                if (first + n > cache_rows) continue;
                std::vector<float> src = normals(n * d, 10.0f);
                const float specials[] = {65504.0f, 65519.0f, 65520.0f, -1e5f, 6e-8f, 2.9e-8f, 3e-5f, -0.0f, 1.0009765625f, INFINITY};
                for (size_t i = 0; i < sizeof specials / sizeof specials[0] && 3 * i < src.size(); i++) src[i * 3] = specials[i];
                std::vector<uint8_t> before(rb * cache_rows);
                for (auto & b : before) b = (uint8_t) rng()();
                auto cb = upload(be, before.data(), before.size());
                auto sb = upload(be, src);
                Tensor ctn = cb->tensor(ct, d, cache_rows);
                be.store_rows(sb->tensor(DType::F32, d, n), ctn, first);
                std::vector<uint8_t> want = before;
                for (int64_t i = 0; i < n * d; i++) {
                    uint8_t * dst = want.data() + (size_t) first * rb;
                    if (ct == DType::F16) {
                        const uint16_t h = f2h(src[i]);
                        std::memcpy(dst + 2 * i, &h, 2);
                    } else {
                        std::memcpy(dst + 4 * i, &src[i], 4);
                    }
                }
                const std::string what = format("%s %s first=%lld n=%lld", prefix(c, "store_rows").c_str(), tname(ct), (long long) first, (long long) n);
                const std::vector<uint8_t> got = cb->bytes();
                expect_bits(what, got.data(), want.data(), want.size());
                expect_guards(what, {cb.get(), sb.get()});
            }
        }
        // move_rows: in order, row src[i] to row dst[i] (dst[i] <= src[i]): a KV compaction that
        // keeps rows 0..4, 7, 9, 10, 11, 15, 22 (some sources are earlier destinations), rows that stay
        // put, and a single move
        const std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>> moves = {
            {{7, 9, 10, 11, 15, 22}, {5, 6, 7, 8, 9, 10}},
            {{3, 4, 8, 9}, {3, 4, 5, 8}},
            {{22}, {0}},
        };
        for (const auto & mv : moves) {
            std::vector<uint8_t> t(rb * cache_rows);
            for (auto & b : t) b = (uint8_t) rng()();
            auto tb = upload(be, t.data(), t.size());
            Tensor tt = tb->tensor(ct, d, cache_rows);
            be.move_rows(tt, mv.first.data(), mv.second.data(), (int64_t) mv.first.size());
            for (size_t i = 0; i < mv.first.size(); i++) {
                std::memmove(t.data() + mv.second[i] * rb, t.data() + mv.first[i] * rb, rb);
            }
            const std::string what = format("%s %s %zu moves", prefix(c, "move_rows").c_str(), tname(ct), mv.first.size());
            const std::vector<uint8_t> got = tb->bytes();
            expect_bits(what, got.data(), t.data(), t.size());
            expect_guards(what, {tb.get()});
        }
    }
    std::printf("  %s (f32, f16 with rounding edge cases), %s\n", prefix(c, "store_rows").c_str(), prefix(c, "move_rows").c_str());
}

// ---- attention ------------------------------------------------------------------------------------

struct AttnCase {
    const char * name;
    int n_head, n_head_kv, head_dim;
    int64_t n_q, q_first, n_kv;
    enum Kind { Causal, Mask, Segments } kind;
    std::vector<int32_t> segments;  // Segments
};

// KV cache contents for attention: K and V rows (n_head_kv * head_dim each) of type kt / vt, with
// the values the reference reads (fp16 ones decoded) and rows >= n_kv set to NaN: an op that reads
// past n_kv into a result shows.
struct KV {
    DType kt, vt;
    int64_t width, rows;
    std::vector<float> k, v;  // as stored
    std::unique_ptr<Buf> kb, vb;
};

std::unique_ptr<Buf> upload_rows(Backend & be, DType t, const std::vector<float> & f) {
    if (t == DType::F32) return upload(be, f);
    std::vector<uint16_t> h(f.size());
    for (size_t i = 0; i < f.size(); i++) h[i] = f2h(f[i]);
    return upload(be, h.data(), h.size() * 2);
}

KV make_kv(Backend & be, DType kt, DType vt, int64_t width, int64_t n_kv, int64_t rows) {
    KV kv{kt, vt, width, rows, normals(rows * width), normals(rows * width), nullptr, nullptr};
    // a few large keys, so the running maximum of the scores moves within and across blocks
    for (int64_t j = 3; j < n_kv; j += 29) for (int64_t e = 0; e < width; e++) kv.k[j * width + e] *= 5.0f;
    for (int64_t i = n_kv * width; i < rows * width; i++) kv.k[i] = kv.v[i] = NAN;
    for (int64_t i = 0; i < n_kv * width; i++) {
        if (kt == DType::F16) kv.k[i] = h2f(f2h(kv.k[i]));
        if (vt == DType::F16) kv.v[i] = h2f(f2h(kv.v[i]));
    }
    kv.kb = upload_rows(be, kt, kv.k);
    kv.vb = upload_rows(be, vt, kv.v);
    return kv;
}

// softmax(q k^T scale) v over the keys query i may see: with segments those of its segment, with a
// mask those it marks, otherwise j <= q_first + i; always j < n_kv. Query head h reads KV head
// h / (n_head / n_head_kv). A query that sees nothing gets zeros (the CPU backend's rule, ops.h).
//
// The bound, per output element: a score is a dot product of head_dim terms and a scaling, off by at
// most E_j = gamma(head_dim + 2) * scale * sum |q k_j|; perturbing every score by at most E moves
// each weight p_j by at most p_j (exp(2E) - 1). The exponentials (a polynomial in the SIMD kernel,
// a few u relative) and the running rescales of the accumulators and of the normaliser, one per
// visible row at most, each add a relative error of a few u; the final division two more. With
// 12 u per visible row (+ 8) for all of that, |out - ref| <= ((exp(2E) - 1) + 12 u (n_vis + 8)) max_j |v_j|.
void attention_reference(const AttnCase & ac, const std::vector<float> & q, const KV & kv, float scale, const std::vector<uint8_t> & mask,
                         std::vector<double> & out, std::vector<double> & tol) {
    const int hd = ac.head_dim, group = ac.n_head / ac.n_head_kv;
    const int64_t qw = (int64_t) ac.n_head * hd;
    out.assign((size_t) (ac.n_q * qw), 0.0);
    tol.assign(out.size(), 0.0);
    std::vector<double> s((size_t) ac.n_kv), e_abs((size_t) ac.n_kv);
    for (int64_t i = 0; i < ac.n_q; i++) {
        std::vector<int64_t> vis;
        for (int64_t j = 0; j < ac.n_kv; j++) {
            bool ok;
            if (ac.kind == AttnCase::Segments) {
                size_t si = 0;
                while (!(ac.segments[si] <= i && i < ac.segments[si + 1])) si++;
                ok = ac.segments[si] <= j && j < ac.segments[si + 1];
            } else if (ac.kind == AttnCase::Mask) {
                ok = mask[(size_t) (i * ac.n_kv + j)] != 0;
            } else {
                ok = j <= ac.q_first + i;
            }
            if (ok) vis.push_back(j);
        }
        for (int h = 0; h < ac.n_head; h++) {
            const float * qi = q.data() + i * qw + h * hd;
            const int64_t kvo = (int64_t) (h / group) * hd;
            double smax = -INFINITY, emax = 0;
            for (int64_t j : vis) {
                double dot = 0, mag = 0;
                for (int e = 0; e < hd; e++) {
                    dot += (double) qi[e] * kv.k[j * kv.width + kvo + e];
                    mag += std::fabs((double) qi[e] * kv.k[j * kv.width + kvo + e]);
                }
                s[j] = dot * scale;
                emax = std::max(emax, gamma_n(hd + 2.0) * mag * std::fabs(scale));
                smax = std::max(smax, s[j]);
            }
            double l = 0;
            for (int64_t j : vis) l += std::exp(s[j] - smax);
            double * o = out.data() + i * qw + h * hd;
            double * t = tol.data() + i * qw + h * hd;
            for (int e = 0; e < hd; e++) {
                double acc = 0, vmax = 0;
                for (int64_t j : vis) {
                    const double v = kv.v[j * kv.width + kvo + e];
                    acc += std::exp(s[j] - smax) * v;
                    vmax = std::max(vmax, std::fabs(v));
                }
                o[e] = vis.empty() ? 0.0 : acc / l;
                t[e] = (std::expm1(2 * emax) + 12 * kU * ((double) vis.size() + 8)) * vmax;
            }
        }
    }
}

void test_attention(Ctx & c) {
    const int64_t C = kAttnChunkRows;
    const std::vector<AttnCase> cases = {
        {"prefill", 4, 2, 64, 37, 0, 37, AttnCase::Causal, {}},
        {"verify chain", 7, 1, 80, 5, 150, 155, AttnCase::Causal, {}},
        {"decode", 8, 8, 16, 1, 64, 65, AttnCase::Causal, {}},
        {"long verify", 4, 2, 128, 20, 290, 310, AttnCase::Causal, {}},               // several key blocks and runs
        {"cache past the batch", 6, 3, 12, 3, 10, 40, AttnCase::Causal, {}},          // rows > q_first + i unseen
        {"batch past the cache", 2, 1, 32, 6, 20, 23, AttnCase::Causal, {}},          // later queries see all n_kv
        {"mask tree", 4, 2, 64, 6, 64, 70, AttnCase::Mask, {}},
        {"mask free", 8, 2, 128, 9, 0, 75, AttnCase::Mask, {}},                        // sees later rows, one sees none
        {"segments", 3, 3, 12, 50, 0, 50, AttnCase::Segments, {0, 1, 17, 18, 50}},
        {"one segment", 4, 1, 64, 30, 0, 30, AttnCase::Segments, {0, 30}},
        {"frames", 2, 2, 80, 67, 0, 67, AttnCase::Segments, {0, 33, 66, 67}},
        // past the CPU backend's chunks of kAttnChunkRows rows: merged chunk states
        {"chunked decode", 6, 3, 64, 1, 2 * C + 200, 2 * C + 201, AttnCase::Causal, {}},
        {"chunked verify", 4, 2, 64, 6, C - 3, C + 3, AttnCase::Causal, {}},          // 3 queries in one chunk, 3 in two
        {"chunked tree", 4, 2, 32, 6, C + 50, C + 56, AttnCase::Mask, {}},
        {"chunked mask", 2, 1, 64, 6, 0, 3 * C + 300, AttnCase::Mask, {}},            // ~C + 100 rows a query, one sees none
        {"chunked prefill", 2, 1, 32, 300, C - 100, C + 200, AttnCase::Causal, {}},  // more queries than a slab of states
    };
    for (const AttnCase & ac : cases) {
        for (int kvk = 0; kvk < 3; kvk++) {
            // f32 and f16 caches, and (once per case) K and V of different types
            const DType kt = kvk == 1 ? DType::F32 : DType::F16, vt = kvk == 0 ? DType::F16 : DType::F32;
            const int64_t width = (int64_t) ac.n_head_kv * ac.head_dim, qw = (int64_t) ac.n_head * ac.head_dim;
            const int64_t cache_rows = ac.n_kv + 5;
            const KV kv = make_kv(c.be, kt, vt, width, ac.n_kv, cache_rows);
            const std::vector<float> q = normals(ac.n_q * qw);
            std::vector<uint8_t> mask;
            if (ac.kind == AttnCase::Mask) {
                mask.assign((size_t) (ac.n_q * ac.n_kv), 0);
                if (std::string(ac.name).find("tree") != std::string::npos) {  // a prefix, then a draft tree over the batch
                    const int parent[6] = {-1, 0, 0, 1, 1, 2};
                    for (int x = 0; x < 6; x++) {
                        for (int64_t j = 0; j < ac.q_first; j++) mask[(size_t) (x * ac.n_kv + j)] = 1;
                        for (int a = x; a >= 0; a = parent[a]) mask[(size_t) (x * ac.n_kv + ac.q_first + a)] = 1;
                    }
                } else {
                    for (auto & m : mask) m = (uint8_t) (rng()() % 3 == 0);
                    std::fill(mask.begin() + 4 * ac.n_kv, mask.begin() + 5 * ac.n_kv, 0);
                }
            }
            AttentionParams p;
            p.n_head = ac.n_head;
            p.n_head_kv = ac.n_head_kv;
            p.head_dim = ac.head_dim;
            p.scale = 1.0f / std::sqrt((float) ac.head_dim);
            p.n_kv = ac.n_kv;
            p.q_first = ac.q_first;
            p.mask = mask.empty() ? nullptr : mask.data();
            p.segments = ac.segments.empty() ? nullptr : ac.segments.data();
            p.n_segments = ac.segments.empty() ? 0 : (int32_t) ac.segments.size() - 1;
            auto run = [&](Backend & b, int64_t first, int64_t count, const AttentionParams & ap) {
                auto qb = upload(b, q.data() + first * qw, (size_t) (count * qw) * sizeof(float));
                auto out = output(b, (size_t) (count * qw));
                Tensor ot = out->tensor(DType::F32, qw, count);
                b.attention(qb->tensor(DType::F32, qw, count), kv.kb->tensor(kt, width, cache_rows), kv.vb->tensor(vt, width, cache_rows), ap, ot);
                std::vector<float> r = out->floats();
                if (!out->guards_intact() || !qb->guards_intact() || !kv.kb->guards_intact() || !kv.vb->guards_intact()) {
                    r.assign(r.size(), NAN);
                }
                return r;
            };
            std::vector<double> want, tol;
            attention_reference(ac, q, kv, p.scale, mask, want, tol);
            const std::string what = format("%s %s (%d heads / %d kv, hd %d, %lld queries at %lld, n_kv %lld, K %s V %s)",
                                            prefix(c, "attention").c_str(), ac.name, ac.n_head, ac.n_head_kv, ac.head_dim,
                                            (long long) ac.n_q, (long long) ac.q_first, (long long) ac.n_kv, tname(kt), tname(vt));
            const std::vector<float> got = run(c.be, 0, ac.n_q, p);
            expect_close(what, got, want, tol, qw);
            if (ac.kind == AttnCase::Causal) {
                // each query decoded alone: one query at its own position over the rows it sees
                expect_rows_alone(what, got, ac.n_q, qw, [&](int64_t f, int64_t) {
                    AttentionParams one = p;
                    one.q_first = ac.q_first + f;
                    one.n_kv = std::min(ac.n_kv, ac.q_first + f + 1);
                    return run(c.be1, f, 1, one);
                });
            }
        }
    }
    std::printf("  %s: causal / q_first / mask / segments, GQA 1..7, hd 12..128, f32 / f16 / mixed KV\n", prefix(c, "attention").c_str());
}

// ---- elementwise ----------------------------------------------------------------------------------

// Inputs for the activations: ordinary values, and the tails where 1 + erf / 1 + tanh cancel, exp
// over- and underflows, and zero.
std::vector<float> activation_inputs(int64_t n, int64_t d) {
    std::vector<float> x = normals(n * d, 3.0f);
    const float special[] = {0.0f, -0.0f, 1e-3f, -1e-3f, 5.0f, -5.0f, 10.0f, -10.0f, 30.0f, -30.0f, 90.0f, -90.0f, 100.0f, -100.0f};
    for (size_t i = 0; i < sizeof special / sizeof special[0] && 2 * i < x.size(); i++) x[i * 2] = special[i];
    return x;
}

void test_elementwise(Ctx & c) {
    Backend & be = c.be;
    const double sqrt1_2 = std::sqrt(0.5), sqrt2_pi = std::sqrt(2.0 / M_PI);
    for (int64_t d : {1, 7, 8, 64, 257}) {
        for (int64_t n : {1, 5}) {
            const std::vector<float> x = activation_inputs(n, d), y = normals(n * d);
            // gelu. The reference is the formula in double. The float version rounds the argument and
            // gets erf / tanh / exp within a few u; 1 + erf and 1 + tanh cancel for negative x, so the
            // error is a few u of |x| there (8 u of |x| + |y| allowed). quick_gelu's float 1.702f
            // differs from 1.702 by < 2e-8 relative, a shift far inside the same bound.
            for (GeluKind kind : {GeluKind::Erf, GeluKind::Tanh, GeluKind::Quick}) {
                const char * kname = kind == GeluKind::Erf ? "erf" : kind == GeluKind::Tanh ? "tanh" : "quick";
                std::vector<double> want(x.size()), tol(x.size());
                for (size_t i = 0; i < x.size(); i++) {
                    const double v = x[i];
                    double r;
                    if (kind == GeluKind::Erf) r = 0.5 * v * (1.0 + std::erf(v * sqrt1_2));
                    else if (kind == GeluKind::Tanh) r = 0.5 * v * (1.0 + std::tanh(sqrt2_pi * (v + 0.044715 * v * v * v)));
                    else r = v / (1.0 + std::exp(-1.702 * v));
                    want[i] = r;
                    tol[i] = 8 * kU * (std::fabs(v) + std::fabs(r));
                }
                auto run = [&](Backend & b, int64_t first, int64_t count, bool in_place) {
                    auto xb = upload(b, x.data() + first * d, (size_t) (count * d) * sizeof(float));
                    auto out = in_place ? nullptr : output(b, (size_t) (count * d));
                    Tensor xt = xb->tensor(DType::F32, d, count);
                    Tensor ot = in_place ? xt : out->tensor(DType::F32, d, count);
                    b.gelu(xt, kind, ot);
                    std::vector<float> r = in_place ? xb->floats() : out->floats();
                    if (!xb->guards_intact() || (!in_place && !out->guards_intact())) r.assign(r.size(), NAN);
                    return r;
                };
                const std::string what = format("%s %s d=%lld n=%lld", prefix(c, "gelu").c_str(), kname, (long long) d, (long long) n);
                const std::vector<float> got = run(be, 0, n, false);
                expect_close(what, got, want, tol, d);
                expect_bits(what + " in place (out = x)", run(be, 0, n, true), got.data(), got.size());
                expect_rows_alone(what, got, n, d, [&](int64_t f, int64_t cnt) { return run(c.be1, f, cnt, false); });
            }
            // swiglu: silu(g) u = g / (1 + exp(-g)) u. exp within 8 u (the SIMD polynomial), then the
            // add, the division and the product: 16 u of |out| allowed. Where exp(-g) overflows (g < -88)
            // the SIMD exp saturates at exp(88): |out| is then below |g u| 1e-38 either way.
            {
                std::vector<double> want(x.size()), tol(x.size());
                for (size_t i = 0; i < x.size(); i++) {
                    const double g = x[i];
                    want[i] = g / (1.0 + std::exp(-g)) * y[i];
                    tol[i] = 16 * kU * std::fabs(want[i]) + 1e-38 * std::fabs(g * y[i]);
                }
                enum Alias { None, Gate, Up };
                auto run = [&](Backend & b, int64_t first, int64_t count, Alias alias) {
                    auto gb = upload(b, x.data() + first * d, (size_t) (count * d) * sizeof(float));
                    auto ub = upload(b, y.data() + first * d, (size_t) (count * d) * sizeof(float));
                    auto out = alias == None ? output(b, (size_t) (count * d)) : nullptr;
                    Tensor gt = gb->tensor(DType::F32, d, count), ut = ub->tensor(DType::F32, d, count);
                    Tensor ot = alias == Gate ? gt : alias == Up ? ut : out->tensor(DType::F32, d, count);
                    b.swiglu(gt, ut, ot);
                    std::vector<float> r = alias == Gate ? gb->floats() : alias == Up ? ub->floats() : out->floats();
                    if (!gb->guards_intact() || !ub->guards_intact() || (out && !out->guards_intact())) r.assign(r.size(), NAN);
                    return r;
                };
                const std::string what = format("%s d=%lld n=%lld", prefix(c, "swiglu").c_str(), (long long) d, (long long) n);
                const std::vector<float> got = run(be, 0, n, None);
                expect_close(what, got, want, tol, d);
                expect_bits(what + " out = gate", run(be, 0, n, Gate), got.data(), got.size());
                expect_bits(what + " out = up", run(be, 0, n, Up), got.data(), got.size());
                expect_rows_alone(what, got, n, d, [&](int64_t f, int64_t cnt) { return run(c.be1, f, cnt, None); });
            }
            // add: one correctly rounded float add, bit for bit; out may be a or b (the models do both)
            {
                std::vector<float> want(x.size());
                for (size_t i = 0; i < x.size(); i++) want[i] = x[i] + y[i];
                enum Alias { None, A, B };
                auto run = [&](Backend & b, int64_t first, int64_t count, Alias alias) {
                    auto ab = upload(b, x.data() + first * d, (size_t) (count * d) * sizeof(float));
                    auto bb = upload(b, y.data() + first * d, (size_t) (count * d) * sizeof(float));
                    auto out = alias == None ? output(b, (size_t) (count * d)) : nullptr;
                    Tensor at = ab->tensor(DType::F32, d, count), bt = bb->tensor(DType::F32, d, count);
                    Tensor ot = alias == A ? at : alias == B ? bt : out->tensor(DType::F32, d, count);
                    b.add(at, bt, ot);
                    std::vector<float> r = alias == A ? ab->floats() : alias == B ? bb->floats() : out->floats();
                    if (!ab->guards_intact() || !bb->guards_intact() || (out && !out->guards_intact())) r.assign(r.size(), NAN);
                    return r;
                };
                const std::string what = format("%s d=%lld n=%lld", prefix(c, "add").c_str(), (long long) d, (long long) n);
                expect_bits(what, run(be, 0, n, None), want.data(), want.size());
                expect_bits(what + " out = a", run(be, 0, n, A), want.data(), want.size());
                expect_bits(what + " out = b", run(be, 0, n, B), want.data(), want.size());
            }
        }
    }
    std::printf("  %s (erf, tanh, quick), %s, %s: d 1..257, in place / aliased outputs\n", prefix(c, "gelu").c_str(),
                prefix(c, "swiglu").c_str(), prefix(c, "add").c_str());
}

// blend_rows: out[i] = sum_k weights[i, k] x[rows[i, k]], summed in float in some order: within
// gamma(n_taps + 1) of the sum of |w x| (the products and the sums).
void test_blend_rows(Ctx & c) {
    Backend & be = c.be;
    for (int n_taps : {1, 3, 4}) {
        for (int64_t d : {1, 9, 64}) {
            for (int64_t n_out : {1, 7, 20}) {
                const int64_t rows = 13;
                const std::vector<float> x = normals(rows * d);
                std::vector<int32_t> r((size_t) (n_out * n_taps));
                std::vector<float> w(r.size());
                for (size_t i = 0; i < r.size(); i++) {
                    r[i] = (int32_t) pick(0, rows - 1);
                    w[i] = i % 7 == 3 ? 0.0f : normal();
                }
                if (n_taps > 1) r[1] = r[0];  // one row twice in one output
                auto xb = upload(be, x);
                auto run = [&](Backend & b, int64_t first, int64_t count) {
                    auto out = output(b, (size_t) (count * d));
                    Tensor ot = out->tensor(DType::F32, d, count);
                    b.blend_rows(xb->tensor(DType::F32, d, rows), r.data() + first * n_taps, w.data() + first * n_taps, n_taps, count, ot);
                    std::vector<float> res = out->floats();
                    if (!out->guards_intact() || !xb->guards_intact()) res.assign(res.size(), NAN);
                    return res;
                };
                std::vector<double> want((size_t) (n_out * d)), tol(want.size());
                for (int64_t i = 0; i < n_out; i++) {
                    for (int64_t e = 0; e < d; e++) {
                        double s = 0, mag = 0;
                        for (int k = 0; k < n_taps; k++) {
                            const double term = (double) w[i * n_taps + k] * x[r[i * n_taps + k] * d + e];
                            s += term;
                            mag += std::fabs(term);
                        }
                        want[i * d + e] = s;
                        tol[i * d + e] = gamma_n(n_taps + 1.0) * mag;
                    }
                }
                const std::string what = format("%s %d taps d=%lld n_out=%lld", prefix(c, "blend_rows").c_str(), n_taps, (long long) d, (long long) n_out);
                const std::vector<float> got = run(be, 0, n_out);
                expect_close(what, got, want, tol, d);
                expect_rows_alone(what, got, n_out, d, [&](int64_t f, int64_t cnt) { return run(c.be1, f, cnt); });
            }
        }
    }
    std::printf("  %s: 1 / 3 / 4 taps, repeated rows, zero weights\n", prefix(c, "blend_rows").c_str());
}

// ---- the backends ---------------------------------------------------------------------------------

struct BackendKind {
    const char * name;
    std::unique_ptr<Backend> (*make)(int n_threads);
    std::unique_ptr<WeightStore> (*store)();  // null: weights are used as uploaded
    bool quantizes_activations;               // see Ctx
};

std::unique_ptr<WeightStore> cpu_store() { return make_cpu_weight_store(false); }
std::unique_ptr<Backend> ref_backend(int) { return make_ref_backend(); }  // one thread, whatever asked

}  // namespace

#if defined(__x86_64__) || defined(__i386__)
namespace sparrow::avx2 {  // cpu/ops_avx2.cpp, which the AVX-512 silu_mul promises to equal
void silu_mul(const float * gate, const float * up, float * out, int64_t n);
}
#endif

// The per-row kernels of cpu/ops.h that promise the same bits at every SIMD level, compared bit
// for bit with the scalar ones (rope, rms_norm: the scalar operations, none fused) and the
// AVX-512 silu_mul with the AVX2 one (exp16 is exp8 on 16 lanes). Pair counts and lengths with
// tails; adjacent and split-half pairs; partial rotary dims.
void test_kernel_levels() {
    const OpsKernels & k = ops_kernels(), & r = ref::ops_kernels();
    std::uniform_real_distribution<float> angle(-3.2f, 3.2f);
    struct Shape { int head_dim, n_dims; };
    for (const bool adjacent : {false, true}) {
        for (const Shape sh : {Shape{64, 64}, Shape{128, 128}, Shape{64, 32}, Shape{80, 80}, Shape{48, 48}, Shape{16, 16},
                               Shape{8, 8}, Shape{6, 6}, Shape{128, 96}}) {
            const int n_head = 3, half = sh.n_dims / 2;
            std::vector<float> cs((size_t) sh.n_dims);
            for (int i = 0; i < half; i++) {
                const float a = angle(rng());
                cs[(size_t) i] = std::cos(a);
                cs[(size_t) (half + i)] = std::sin(a);
            }
            const std::vector<float> x = normals((int64_t) n_head * sh.head_dim);
            std::vector<float> got = x, want = x;
            k.rope(got.data(), n_head, sh.head_dim, sh.n_dims, adjacent, cs.data());
            r.rope(want.data(), n_head, sh.head_dim, sh.n_dims, adjacent, cs.data());
            check(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0,
                  format("rope kernel (%s) %s head_dim %d n_dims %d: the scalar bits", k.level,
                         adjacent ? "adjacent" : "split", sh.head_dim, sh.n_dims));
        }
    }
    for (const int64_t n : {1, 7, 8, 15, 16, 17, 64, 576, 1000}) {
        const std::vector<float> x = normals(n), g = normals(n);
        std::vector<float> got((size_t) n), want((size_t) n);
        k.rms_norm(x.data(), g.data(), 1e-5f, got.data(), n);
        r.rms_norm(x.data(), g.data(), 1e-5f, want.data(), n);
        check(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0,
              format("rms_norm kernel (%s) n %lld: the scalar bits", k.level, (long long) n));
    }
#if defined(__x86_64__) || defined(__i386__)
    if (simd_level_available() >= SimdLevel::Avx2) {
        for (const int64_t n : {1, 15, 16, 17, 100, 1536}) {
            const std::vector<float> gate = normals(n), up = normals(n);
            std::vector<float> got((size_t) n), want((size_t) n);
            k.silu_mul(gate.data(), up.data(), got.data(), n);
            avx2::silu_mul(gate.data(), up.data(), want.data(), n);
            check(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0,
                  format("silu_mul kernel (%s) n %lld: the AVX2 bits", k.level, (long long) n));
        }
    }
#endif
    std::printf("  kernels %s: rope, rms_norm bit for bit with the scalar ones, silu_mul with AVX2's\n", k.level);
}

int main(int argc, char ** argv) {
    (void) argc, (void) argv;
    std::printf("test_backend_ops: kernels %s\n", simd_level());
    test_kernel_levels();
    const BackendKind kinds[] = {
        {"CPU", make_cpu_backend, cpu_store, true},
        {"ref", ref_backend, make_ref_weight_store, false},
    };
    const auto t0 = std::chrono::steady_clock::now();
    try {
        for (const BackendKind & kind : kinds) {
            const auto k0 = std::chrono::steady_clock::now();
            const int checks0 = g_checks, failures0 = g_failures;
            auto be1 = kind.make(1);
            for (int threads : {1, 3}) {
                auto be = kind.make(threads);
                if (be->n_threads() != threads) continue;  // a single-threaded backend: 1 thread only
                auto store = kind.store ? kind.store() : nullptr;
                Ctx c{*be, *be1, format("%s/%dt", kind.name, threads), store.get(), kind.quantizes_activations};
                test_memory(c);
                test_get_rows(c);
                test_gather_concat(c);
                test_matmul(c);
                test_matmul_group(c);
                test_weight_store(c);
                test_norms(c);
                test_rope(c);
                test_store_move(c);
                test_attention(c);
                test_elementwise(c);
                test_blend_rows(c);
            }
            std::printf("test_backend_ops: %s backend: %d checks, %d failures in %.1f s\n", kind.name, g_checks - checks0,
                        g_failures - failures0, std::chrono::duration<double>(std::chrono::steady_clock::now() - k0).count());
        }
    } catch (const std::exception & e) {
        std::fprintf(stderr, "FAIL: unexpected exception: %s\n", e.what());
        return 1;
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("test_backend_ops: %d checks in %.1f s\n", g_checks, secs);
    return finish("test_backend_ops");
}
