// backend-ref.cpp - the `ref` backend: every op of backend.h once more, in plain scalar C++.
//
// It has two jobs:
//
//   - Memory that behaves like a device's. Tensors live in guarded memory (ref/guarded-memory.h),
//     which is PROT_NONE except while one of this backend's calls is running. Every op, and
//     to_host / from_host, opens the memory for exactly its own duration, so any other read or
//     write of tensor data (model code peeking at logits, a weight view used straight from the
//     mapped file) faults at once. Running the models on this backend proves that only ops touch
//     tensor memory, as they must for a GPU backend. Ops also refuse tensors that do not live in
//     this memory, so host pointers cannot sneak in either.
//
//   - A second, independent implementation of every op, written from the definitions in
//     backend.h and not from the CPU backend's kernels: one thread, no SIMD, no tiling, no
//     panels, no quantization of activations (a quantized weight row is decoded to float and
//     multiplied with the float activations as they are). When the CPU backend and this one agree
//     within float rounding, neither has a layout or indexing bug the other lacks.
//
// Arithmetic is float throughout, as a device kernel would do it: sums accumulate in float in
// increasing index order, dot products in eight interleaved partial sums (dot() below). That
// fixed order makes every row's result independent of the batch it comes in (a row computed
// alone has the same bits as in a batch; attention's queries likewise, whatever the number of
// queries, the mask or the causal rule), which lossless speculative decoding relies on. The one exception is rope's angle,
// formed in double: position * frequency at long positions would lose the angle's low bits in
// float, and that is a property of the definition, not of a device.
//
// Speed is not a goal. Code is written to be read next to backend.h.
#include "backend.h"
#include "common.h"
#include "quant.h"
#include "ref/guarded-memory.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <vector>

namespace sparrow {

namespace {

// ---- helpers ----------------------------------------------------------------------------------
//
// Everything below assumes the caller holds a GuardedAccess: GuardedAccess is not reentrant, so
// ops never call each other, only these plain functions.

// A tensor handed to an op must live in this backend's memory: a host pointer here means the
// caller skipped the weight store or from_host, which a device backend would not survive.
void expect_mine(const Tensor & t, const char * op, const char * arg) {
    if (t.data && !guarded_contains(t.data)) {
        fail(SPARROW_ERR_INTERNAL, format("ref backend: %s's %s%s%s%s is not in the ref backend's memory", op, arg,
                                          t.name ? " ('" : "", t.name ? t.name : "", t.name ? "')" : ""));
    }
}

float * row_f32(const Tensor & t, int64_t i) { return t.f32() + i * t.cols(); }

// One head's slice of a KV cache row, as float (caches are f32 or f16).
void load_head(const Tensor & cache, int64_t row, int head, int head_dim, float * dst) {
    const uint8_t * base = (const uint8_t *) cache.data + (size_t) row * cache.row_bytes();
    if (cache.type == DType::F32) {
        std::memcpy(dst, (const float *) base + (size_t) head * head_dim, (size_t) head_dim * sizeof(float));
    } else if (cache.type == DType::F16) {
        const uint16_t * h = (const uint16_t *) base + (size_t) head * head_dim;
        for (int d = 0; d < head_dim; ++d) dst[d] = fp16_to_fp32(h[d]);
    } else {
        fail(SPARROW_ERR_UNSUPPORTED, format("ref backend: attention over a %s cache", traits(cache.type).name));
    }
}

// Sum of a[j] * b[j] in 8 interleaved partial sums, added up at the end: the same order for a
// given k every time (so results stay batch invariant), and an order the compiler can run as
// vector lanes, which keeps the test suite on this backend within minutes.
float dot(const float * a, const float * b, int64_t k) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        for (int l = 0; l < 8; ++l) part[l] += a[j + l] * b[j + l];
    }
    for (; j < k; ++j) part[j % 8] += a[j] * b[j];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// out[c, r] = w[r] . x[c] (+ bias[r]). Each weight row is decoded to float once (f16 / bf16 to
// f32 is exact; quantized blocks become scale * q - min), then dotted with every activation row.
// The dot of (r, c) is the same sum in the same order whatever n is: batch invariant.
void matmul_one(const Tensor & w, const Tensor & x, Tensor & out, const Tensor * bias, std::vector<float> & w_row) {
    expect_mine(w, "matmul", "weight");
    expect_mine(x, "matmul", "input");
    expect_mine(out, "matmul", "output");
    if (bias) expect_mine(*bias, "matmul", "bias");
    if (w.panels) {
        // panels are the CPU weight store's repacked form; the ref store only ever makes copies
        fail(SPARROW_ERR_INTERNAL, format("ref backend: matmul weight '%s' is in CPU panels", w.name ? w.name : "?"));
    }
    if (!mul_mat_supported(w.type)) {
        fail(SPARROW_ERR_UNSUPPORTED, format("ref backend: cannot multiply a %s weight", traits(w.type).name));
    }
    const int64_t k = w.cols(), m = w.rows(), n = x.rows();
    if (x.cols() != k) {
        fail(SPARROW_ERR_INTERNAL, format("ref backend: matmul of %lld columns with a weight of %lld", (long long) x.cols(), (long long) k));
    }
    w_row.resize((size_t) k);
    const float * b = bias ? bias->f32() : nullptr;
    for (int64_t r = 0; r < m; ++r) {
        ref::dequantize_row(w.type, (const uint8_t *) w.data + (size_t) r * w.row_bytes(), w_row.data(), k);
        for (int64_t c = 0; c < n; ++c) {
            const float * xc = row_f32(x, c);
            float sum = dot(w_row.data(), xc, k);
            if (b) sum += b[r];  // the bias comes after the product, as in the CPU backend
            out.f32()[c * m + r] = sum;
        }
    }
}

// The keys query i may see, in increasing order: those of its segment, those its mask row marks,
// or (causal) rows <= q_first + i; always rows < n_kv.
void visible_keys(const AttentionParams & p, int64_t i, std::vector<int64_t> & keys) {
    keys.clear();
    if (p.segments) {
        int s = 0;
        while (s + 1 < p.n_segments && p.segments[s + 1] <= i) ++s;  // the segment holding row i
        for (int64_t j = p.segments[s]; j < p.segments[s + 1] && j < p.n_kv; ++j) keys.push_back(j);
    } else if (p.mask) {
        for (int64_t j = 0; j < p.n_kv; ++j) {
            if (p.mask[i * p.n_kv + j]) keys.push_back(j);
        }
    } else {
        const int64_t last = std::min(p.n_kv - 1, p.q_first + i);
        for (int64_t j = 0; j <= last; ++j) keys.push_back(j);
    }
}

// Rotates pair (a, b) of every head of one token by theta.
void rotate_pair(float * row, int n_head, int head_dim, int a, int b, double theta) {
    const float c = (float) std::cos(theta), s = (float) std::sin(theta);
    for (int h = 0; h < n_head; ++h) {
        float * v = row + (size_t) h * head_dim;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
    }
}

// ---- the backend ------------------------------------------------------------------------------

class RefBackend final : public Backend {
public:
    const char * name() const override { return "ref"; }
    int n_threads() const override { return 1; }
    bool is_host() const override { return false; }

    // guarded_alloc gives whole pages, zeroed: 64-byte alignment and zeroing come for free
    void * alloc(size_t bytes) override { return guarded_alloc(bytes); }
    void free(void * ptr) override { guarded_free(ptr); }

    void to_host(void * dst, const void * src, size_t bytes) override {
        if (!bytes) return;
        if (!guarded_contains(src)) fail(SPARROW_ERR_INTERNAL, "ref backend: to_host from memory that is not the backend's");
        GuardedAccess open;
        std::memcpy(dst, src, bytes);
    }
    void from_host(void * dst, const void * src, size_t bytes) override {
        if (!bytes) return;
        if (!guarded_contains(dst)) fail(SPARROW_ERR_INTERNAL, "ref backend: from_host into memory that is not the backend's");
        GuardedAccess open;
        std::memcpy(dst, src, bytes);
    }

    void get_rows(const Tensor & table, const int32_t * ids, int64_t n, Tensor & out) override {
        GuardedAccess open;
        expect_mine(table, "get_rows", "table");
        expect_mine(out, "get_rows", "output");
        const int64_t d = table.cols();
        for (int64_t i = 0; i < n; ++i) {
            // a token id past the table is the caller's bug; catch it here rather than read garbage
            if (ids[i] < 0 || ids[i] >= table.rows()) {
                fail(SPARROW_ERR_INTERNAL, format("ref backend: get_rows id %d outside the %lld rows of '%s'", ids[i],
                                                  (long long) table.rows(), table.name ? table.name : "?"));
            }
            const uint8_t * src = (const uint8_t *) table.data + (size_t) ids[i] * table.row_bytes();
            ref::dequantize_row(table.type, src, row_f32(out, i), d);
        }
    }

    void gather_rows(const Tensor & x, const int32_t * rows, int64_t n, Tensor & out) override {
        GuardedAccess open;
        expect_mine(x, "gather_rows", "input");
        expect_mine(out, "gather_rows", "output");
        const int64_t d = x.cols();
        for (int64_t i = 0; i < n; ++i) std::memcpy(row_f32(out, i), row_f32(x, rows[i]), (size_t) d * sizeof(float));
    }

    void matmul(const Tensor & w, const Tensor & x, Tensor & out, const Tensor * bias) override {
        GuardedAccess open;
        matmul_one(w, x, out, bias, w_row_);
    }

    // No shared pass to make: the group is its products in turn, so each has matmul's exact bits.
    void matmul_group(const Tensor & x, const MatmulOut * outs, int n) override {
        GuardedAccess open;
        for (int i = 0; i < n; ++i) matmul_one(*outs[i].w, x, *outs[i].out, outs[i].bias, w_row_);
    }

    void rms_norm(const Tensor & x, const Tensor & weight, float eps, Tensor & out) override {
        GuardedAccess open;
        expect_mine(x, "rms_norm", "input");
        expect_mine(weight, "rms_norm", "weight");
        expect_mine(out, "rms_norm", "output");
        const int64_t d = x.cols();
        const float * g = weight.f32();
        for (int64_t i = 0; i < x.rows(); ++i) {
            const float * xi = row_f32(x, i);
            float * yi = row_f32(out, i);
            float sum = 0.0f;
            for (int64_t j = 0; j < d; ++j) sum += xi[j] * xi[j];
            const float scale = 1.0f / std::sqrt(sum / (float) d + eps);
            // the whole sum is formed before the first write, so out may alias x
            for (int64_t j = 0; j < d; ++j) yi[j] = xi[j] * scale * g[j];
        }
    }

    void rope(Tensor & x, int n_head, int head_dim, const int32_t * pos, const RopeParams & p) override {
        GuardedAccess open;
        expect_mine(x, "rope", "input");
        const int64_t n = x.rows();
        const int half = p.n_dims / 2;
        const int64_t width = (int64_t) n_head * head_dim;

        if (p.mode == RopeMode::Vision) {
            // Two sections of Neox pairs: the first sections[0] pairs turn with stream 0 (patch
            // row), the next sections[1] with stream 1 (patch column). Each section restarts the
            // frequency ladder: pair j of a section turns at base^(-2j / (n_dims / 2)). Pairs past
            // both sections keep their values; freq_factors are not used by vision towers.
            const int s0 = p.sections[0], s1 = p.sections[1];
            for (int64_t t = 0; t < n; ++t) {
                float * row = x.f32() + t * width;
                for (int i = 0; i < s0 + s1; ++i) {
                    const int stream = i < s0 ? 0 : 1;
                    const int j = i < s0 ? i : i - s0;
                    const double inv_freq = std::pow((double) p.freq_base, -2.0 * j / half);
                    const double theta = (double) pos[stream * n + t] * p.freq_scale * inv_freq;
                    rotate_pair(row, n_head, head_dim, i, i + half, theta);
                }
            }
            return;
        }

        // Norm, Neox, MRope: pair i turns at theta_i = base^(-2i / n_dims), divided by its
        // freq_factor when given. Norm pairs dims (2i, 2i + 1), the others (i, i + n_dims / 2).
        // MRope takes pair i's position from the stream of the section that i mod (sum of
        // sections) falls in (llama.cpp's rule); every other mode reads stream 0.
        int section_end[4];
        for (int s = 0, acc = 0; s < 4; ++s) {
            acc += p.sections[s];
            section_end[s] = acc;
        }
        const int section_total = section_end[3];
        for (int64_t t = 0; t < n; ++t) {
            float * row = x.f32() + t * width;
            for (int i = 0; i < half; ++i) {
                int stream = 0;
                if (p.mode == RopeMode::MRope && section_total > 0) {
                    const int sector = i % section_total;
                    while (stream < 3 && sector >= section_end[stream]) ++stream;
                }
                double inv_freq = std::pow((double) p.freq_base, -2.0 * i / p.n_dims);
                if (p.freq_factors) inv_freq /= p.freq_factors[i];
                const double theta = (double) pos[stream * n + t] * p.freq_scale * inv_freq;
                const int a = p.mode == RopeMode::Norm ? 2 * i : i;
                const int b = p.mode == RopeMode::Norm ? 2 * i + 1 : i + half;
                rotate_pair(row, n_head, head_dim, a, b, theta);
            }
        }
    }

    void store_rows(const Tensor & src, Tensor & cache, int64_t first_row) override {
        GuardedAccess open;
        expect_mine(src, "store_rows", "input");
        expect_mine(cache, "store_rows", "cache");
        const int64_t d = src.cols();
        for (int64_t i = 0; i < src.rows(); ++i) {
            const float * s = row_f32(src, i);
            uint8_t * dst = (uint8_t *) cache.data + (size_t) (first_row + i) * cache.row_bytes();
            if (cache.type == DType::F32) {
                std::memcpy(dst, s, (size_t) d * sizeof(float));
            } else if (cache.type == DType::F16) {
                // round to nearest even; beyond 65504 + half an ulp becomes inf, as IEEE does
                for (int64_t j = 0; j < d; ++j) ((uint16_t *) dst)[j] = fp32_to_fp16(s[j]);
            } else {
                fail(SPARROW_ERR_UNSUPPORTED, format("ref backend: store_rows into a %s cache", traits(cache.type).name));
            }
        }
    }

    void move_rows(Tensor & t, const int32_t * src, const int32_t * dst, int64_t n) override {
        GuardedAccess open;
        expect_mine(t, "move_rows", "tensor");
        const size_t rb = t.row_bytes();
        uint8_t * base = (uint8_t *) t.data;
        // in the given order: dst[i] <= src[i], so a later source has not been overwritten yet
        for (int64_t i = 0; i < n; ++i) {
            if (src[i] != dst[i]) std::memmove(base + (size_t) dst[i] * rb, base + (size_t) src[i] * rb, rb);
        }
    }

    // The textbook two-pass softmax, one query and one head at a time: all scores of the visible
    // keys, their maximum, then exp(score - max) as weights of the values. The keys go in
    // increasing order and nothing depends on the other queries, so a query gets the same bits
    // alone, in a causal batch or under a mask that shows it the same keys.
    void attention(const Tensor & q, const Tensor & k_cache, const Tensor & v_cache, const AttentionParams & p,
                   Tensor & out) override {
        GuardedAccess open;
        expect_mine(q, "attention", "query");
        expect_mine(k_cache, "attention", "K cache");
        expect_mine(v_cache, "attention", "V cache");
        expect_mine(out, "attention", "output");
        const int hd = p.head_dim;
        const int group = p.n_head / p.n_head_kv;  // query heads per KV head (GQA)
        const int64_t width = (int64_t) p.n_head * hd;
        std::vector<int64_t> keys;
        std::vector<float> scores, k_row((size_t) hd), v_row((size_t) hd), acc((size_t) hd);
        for (int64_t i = 0; i < q.rows(); ++i) {
            visible_keys(p, i, keys);
            scores.resize(keys.size());
            for (int h = 0; h < p.n_head; ++h) {
                const int h_kv = h / group;
                const float * qh = q.f32() + i * width + (int64_t) h * hd;
                float * oh = out.f32() + i * width + (int64_t) h * hd;
                if (keys.empty()) {  // nothing to attend to: zeros, by definition
                    for (int d = 0; d < hd; ++d) oh[d] = 0.0f;
                    continue;
                }
                float max = -INFINITY;
                for (size_t j = 0; j < keys.size(); ++j) {
                    load_head(k_cache, keys[j], h_kv, hd, k_row.data());
                    scores[j] = dot(qh, k_row.data(), hd) * p.scale;
                    max = std::max(max, scores[j]);
                }
                float sum = 0.0f;
                std::fill(acc.begin(), acc.end(), 0.0f);
                for (size_t j = 0; j < keys.size(); ++j) {
                    const float weight = std::exp(scores[j] - max);  // <= 1: no overflow
                    sum += weight;
                    load_head(v_cache, keys[j], h_kv, hd, v_row.data());
                    for (int d = 0; d < hd; ++d) acc[(size_t) d] += weight * v_row[(size_t) d];
                }
                for (int d = 0; d < hd; ++d) oh[d] = acc[(size_t) d] / sum;  // sum >= 1 (the max's own weight)
            }
        }
    }

    // out[i] = f(a[i], b[i]); each input read before its output is written: out may alias a or b
    template <typename F>
    static void elementwise(const char * op, const char * a_name, const Tensor & a, const char * b_name, const Tensor & b,
                            Tensor & out, F f) {
        GuardedAccess open;
        expect_mine(a, op, a_name);
        expect_mine(b, op, b_name);
        expect_mine(out, op, "output");
        const int64_t n = a.cols() * a.rows();
        const float * x = a.f32();
        const float * y = b.f32();
        float * o = out.f32();
        for (int64_t i = 0; i < n; ++i) o[i] = f(x[i], y[i]);
    }

    void swiglu(const Tensor & gate, const Tensor & up, Tensor & out) override {
        elementwise("swiglu", "gate", gate, "up", up, out, [](float g, float u) { return g / (1.0f + std::exp(-g)) * u; });
    }

    void add(const Tensor & a, const Tensor & b, Tensor & out) override {
        elementwise("add", "a", a, "b", b, out, [](float x, float y) { return x + y; });
    }

    void concat_cols(const Tensor & a, const Tensor & b, Tensor & out) override {
        GuardedAccess open;
        expect_mine(a, "concat_cols", "a");
        expect_mine(b, "concat_cols", "b");
        expect_mine(out, "concat_cols", "output");
        const int64_t da = a.cols(), db = b.cols();
        for (int64_t i = 0; i < a.rows(); ++i) {
            float * o = out.f32() + i * (da + db);
            std::memcpy(o, row_f32(a, i), (size_t) da * sizeof(float));
            std::memcpy(o + da, row_f32(b, i), (size_t) db * sizeof(float));
        }
    }

    // Two passes, as torch does: the mean first, then the mean of squared deviations. One pass
    // (E[x^2] - E[x]^2) cancels catastrophically when |mean| >> spread.
    void layer_norm(const Tensor & x, const Tensor & weight, const Tensor * bias, float eps, Tensor & out) override {
        GuardedAccess open;
        expect_mine(x, "layer_norm", "input");
        expect_mine(weight, "layer_norm", "weight");
        if (bias) expect_mine(*bias, "layer_norm", "bias");
        expect_mine(out, "layer_norm", "output");
        const int64_t d = x.cols();
        const float * g = weight.f32();
        const float * b = bias ? bias->f32() : nullptr;
        for (int64_t i = 0; i < x.rows(); ++i) {
            const float * xi = row_f32(x, i);
            float * yi = row_f32(out, i);
            float sum = 0.0f;
            for (int64_t j = 0; j < d; ++j) sum += xi[j];
            const float mean = sum / (float) d;
            float sq = 0.0f;
            for (int64_t j = 0; j < d; ++j) sq += (xi[j] - mean) * (xi[j] - mean);
            const float scale = 1.0f / std::sqrt(sq / (float) d + eps);  // biased variance, as torch's
            for (int64_t j = 0; j < d; ++j) yi[j] = (xi[j] - mean) * scale * g[j] + (b ? b[j] : 0.0f);
        }
    }

    void gelu(const Tensor & x, GeluKind kind, Tensor & out) override {
        GuardedAccess open;
        expect_mine(x, "gelu", "input");
        expect_mine(out, "gelu", "output");
        const int64_t n = x.cols() * x.rows();
        const float * xi = x.f32();
        float * yi = out.f32();
        for (int64_t i = 0; i < n; ++i) {
            const float v = xi[i];
            switch (kind) {
                case GeluKind::Erf:  // 0.5 x (1 + erf(x / sqrt 2))
                    yi[i] = 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
                    break;
                case GeluKind::Tanh:  // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
                    yi[i] = 0.5f * v * (1.0f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
                    break;
                case GeluKind::Quick:  // x sigmoid(1.702 x)
                    yi[i] = v / (1.0f + std::exp(-1.702f * v));
                    break;
            }
        }
    }

    void blend_rows(const Tensor & x, const int32_t * rows, const float * weights, int n_taps, int64_t n_out,
                    Tensor & out) override {
        GuardedAccess open;
        expect_mine(x, "blend_rows", "input");
        expect_mine(out, "blend_rows", "output");
        const int64_t d = x.cols();
        for (int64_t i = 0; i < n_out; ++i) {
            float * o = row_f32(out, i);
            for (int64_t j = 0; j < d; ++j) {
                float sum = 0.0f;
                for (int k = 0; k < n_taps; ++k) sum += weights[i * n_taps + k] * row_f32(x, rows[i * n_taps + k])[j];
                o[j] = sum;
            }
        }
    }

private:
    std::vector<float> w_row_;  // one decoded weight row of the matmul in flight
};

// ---- the weight store -------------------------------------------------------------------------
//
// Every weight is copied into guarded memory, as a device backend would upload it; matmul forms
// are plain copies too (no repacking: matmul decodes file rows). The same view may come twice (a
// tied output head is both the embedding table, via weight(), and a matmul weight): copies are
// looked up by the view's data pointer, and shared when type, size and bytes all match, so that a
// host buffer freed and reused at the same address (tests do that) never gets a stale copy.
class RefWeightStore final : public WeightStore {
public:
    ~RefWeightStore() override {
        for (auto & it : copies_) guarded_free(it.second.data);
    }

    Tensor matmul_weight(const Tensor & view) override {
        if (view.data && !mul_mat_supported(view.type)) {
            fail(SPARROW_ERR_UNSUPPORTED, format("tensor '%s' is stored as %s, a type the runtime cannot multiply",
                                                 view.name ? view.name : "?", traits(view.type).name));
        }
        if (view.panels) fail(SPARROW_ERR_INTERNAL, "ref weight store: given a weight in CPU panels");
        return copy(view);
    }

    Tensor weight(const Tensor & view) override { return copy(view); }

    size_t bytes() const override { return bytes_; }

private:
    struct Copy {
        DType type;
        size_t nbytes;
        void * data;
    };

    Tensor copy(const Tensor & view) {
        if (!view.data) return view;  // an absent weight stays absent
        const size_t n = view.nbytes();
        Tensor t = view;
        auto range = copies_.equal_range(view.data);
        for (auto it = range.first; it != range.second; ++it) {
            const Copy & c = it->second;
            if (c.type != view.type || c.nbytes != n) continue;
            bool same;
            {
                GuardedAccess open;
                same = std::memcmp(c.data, view.data, n) == 0;
            }
            if (same) {
                t.data = c.data;
                return t;
            }
        }
        void * p = guarded_alloc(n);
        {
            GuardedAccess open;
            std::memcpy(p, view.data, n);
        }
        copies_.emplace(view.data, Copy{view.type, n, p});
        bytes_ += n;
        t.data = p;
        return t;
    }

    std::multimap<const void *, Copy> copies_;  // view data pointer -> its copies
    size_t bytes_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_ref_backend() {
    return std::unique_ptr<Backend>(new RefBackend());
}

std::unique_ptr<WeightStore> make_ref_weight_store() {
    return std::unique_ptr<WeightStore>(new RefWeightStore());
}

}  // namespace sparrow
