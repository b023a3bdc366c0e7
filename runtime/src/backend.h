// backend.h - the op interface model code is written against.
//
// Model files (models/*.cpp) describe a forward pass as a sequence of these ops on Tensor
// views; a backend executes them: cpu/ (the fast one) and ref/ (plain scalar code whose memory
// faults when touched outside its ops: a stand-in for a device's, so tests prove that model code
// never dereferences tensor data). A device backend plugs in the same way (backends.cpp). Ops run eagerly and in order, like a tape: there is no graph to build, which keeps the
// decode loop free of allocation and makes every op testable on its own (tests/cpp/test_backend_ops.cpp
// checks each against a scalar reference).
//
// Memory: a Tensor's data pointer lives in the executing backend's memory (host memory for the
// CPU backend; guarded pages for ref; device memory for a device backend), weights included (the
// WeightStore puts them there). Only ops, to_host and from_host may touch it. Index arrays (token
// ids, positions, row lists, masks) are host pointers, since they come from the caller. Activations are F32 and contiguous; weights may
// be any supported type (see quant.h). Shapes follow ggml: ne[0] is the contiguous row length,
// ne[1] the number of rows.
#pragma once

#include "quant.h"

#include <cstddef>
#include <cstdint>
#include <memory>

namespace sparrow {

struct Tensor {
    DType type = DType::F32;
    int64_t ne[4] = {1, 1, 1, 1};
    void * data = nullptr;
    // A weight matrix the CPU backend repacked into 16-row panels (cpu/panels.h): data points at
    // the panels, ne is still the logical shape, and only matmul may read it.
    bool panels = false;
    // The file's name for a weight (errors name the tensor); null for activations.
    const char * name = nullptr;

    int64_t cols() const { return ne[0]; }
    int64_t rows() const { return ne[1] * ne[2] * ne[3]; }
    size_t row_bytes() const { return row_size(type, ne[0]); }
    size_t nbytes() const { return row_bytes() * (size_t) rows(); }
    float * f32() const { return (float *) data; }
    // A view of rows [first, first + count) of a 2-D tensor.
    Tensor row_slice(int64_t first, int64_t count) const {
        Tensor t = *this;
        t.ne[1] = count; t.ne[2] = 1; t.ne[3] = 1;
        t.data = (uint8_t *) data + (size_t) first * row_bytes();
        return t;
    }
    static Tensor matrix(DType type, int64_t cols, int64_t rows, void * data) {
        Tensor t;
        t.type = type; t.ne[0] = cols; t.ne[1] = rows; t.data = data;
        return t;
    }
};

enum class RopeMode {
    Norm,   // rotate adjacent pairs (x[2i], x[2i+1]): llama as llama.cpp stores it
    Neox,   // rotate halves (x[i], x[i + n/2]): qwen2, GPT-NeoX
    MRope,  // Neox pairs whose frequency bands take positions from t/h/w/extra sections (qwen2vl)
    // 2D rotary of vision towers (Qwen2-VL / Qwen2.5-VL ViT, llama.cpp's "vision" rope): Neox
    // pairs; the first sections[0] pairs take positions from stream 0 (patch row), the next
    // sections[1] from stream 1 (patch column). The frequencies restart in each section: pair j
    // of a section turns at freq_base^(-2j / (n_dims / 2)), as HF's axial rope (head_dim / 4
    // frequencies, shared by the h and w halves).
    Vision,
};

struct RopeParams {
    RopeMode mode = RopeMode::Neox;
    int n_dims = 0;            // rotated dimensions per head (== head_dim for these models)
    float freq_base = 10000.0f;
    float freq_scale = 1.0f;   // linear position scaling (1 = none)
    // MRope: frequency pairs taking positions from stream s; pair i belongs to the section that
    // i mod (sum of sections) falls in (llama.cpp's rule). Vision: sections[0] and [1], see above.
    int sections[4] = {0, 0, 0, 0};
    // Optional per-pair divisors of the frequencies (n_dims / 2 floats, llama3 rope scaling);
    // a host pointer, like the position arrays.
    const float * freq_factors = nullptr;
};

struct AttentionParams {
    int n_head = 0;
    int n_head_kv = 0;
    int head_dim = 0;
    float scale = 1.0f;
    int64_t n_kv = 0;          // attend over cache rows [0, n_kv)
    int64_t q_first = 0;       // cache row of query 0: causal mask lets query i see rows <= q_first + i
    // Optional extra mask (e.g. a draft tree): n_q x n_kv bytes, non-zero = may attend. When
    // set it replaces the causal rule.
    const uint8_t * mask = nullptr;
    // Optional block-diagonal, non-causal attention (vision encoders): n_segments + 1 increasing
    // row offsets, from 0 to n_kv (HF's cu_seqlens; a host pointer). Query rows and key rows are
    // the same rows (n_q == n_kv); a query sees every key of its segment [seg[s], seg[s+1]) and
    // nothing else. One segment = full bidirectional attention; Qwen2.5-VL's windows and one
    // segment per frame are more. Replaces the causal rule; mask must be null.
    const int32_t * segments = nullptr;
    int32_t n_segments = 0;
};

// Activations of the vision towers' MLPs (all elementwise, f32).
enum class GeluKind {
    Erf,    // 0.5 x (1 + erf(x / sqrt 2)): torch's GELU(), the projectors' and mergers'
    Tanh,   // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): SigLIP's gelu_pytorch_tanh
    Quick,  // x * sigmoid(1.702 x): Qwen2-VL ViT's quick_gelu
};

// One product of a matmul group: out = x . w^T (+ bias).
struct MatmulOut {
    const Tensor * w;
    Tensor * out;
    const Tensor * bias;
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual const char * name() const = 0;
    virtual int n_threads() const = 0;
    // True when tensor data is ordinary host memory (the CPU backend).
    virtual bool is_host() const = 0;

    // Zero-initialised backend memory, 64-byte aligned.
    virtual void * alloc(size_t bytes) = 0;
    virtual void free(void * ptr) = 0;
    virtual void to_host(void * dst, const void * src, size_t bytes) = 0;
    virtual void from_host(void * dst, const void * src, size_t bytes) = 0;

    // out[i, :] = table[ids[i], :] converted to f32.
    virtual void get_rows(const Tensor & table, const int32_t * ids, int64_t n, Tensor & out) = 0;
    // out[i, :] = x[rows[i], :]
    virtual void gather_rows(const Tensor & x, const int32_t * rows, int64_t n, Tensor & out) = 0;
    // out[n, m] = x[n, k] . w[m, k]^T (+ bias[m]); w of any type, x and out f32.
    virtual void matmul(const Tensor & w, const Tensor & x, Tensor & out, const Tensor * bias) = 0;
    // Several products of the same activations (a layer's q/k/v, gate/up): the same results as
    // matmul for each in turn, done with the activations converted once and in one pass over
    // the backend's threads.
    virtual void matmul_group(const Tensor & x, const MatmulOut * outs, int n) = 0;
    // out = x / rms(x) * weight, per row (out may alias x).
    virtual void rms_norm(const Tensor & x, const Tensor & weight, float eps, Tensor & out) = 0;
    // In place on x[n, n_head * head_dim]. pos holds n positions (4 * n for MRope, stream-major:
    // t positions, then h, then w, then extra).
    virtual void rope(Tensor & x, int n_head, int head_dim, const int32_t * pos, const RopeParams & p) = 0;
    // Copy f32 rows into a KV cache (f32 or f16) starting at cache row first_row.
    virtual void store_rows(const Tensor & src, Tensor & cache, int64_t first_row) = 0;
    // Within one tensor, copy row src[i] to row dst[i] for i in order (dst[i] <= src[i], so
    // rows move down and a later source is never overwritten before it is read).
    virtual void move_rows(Tensor & t, const int32_t * src, const int32_t * dst, int64_t n) = 0;
    // out[n_q, n_head * head_dim] = softmax(q k^T * scale + mask) v over cache rows [0, n_kv). A query
    // that may see no row (an all-zero mask row) gets zeros.
    virtual void attention(const Tensor & q, const Tensor & k_cache, const Tensor & v_cache,
                           const AttentionParams & p, Tensor & out) = 0;
    // out = silu(gate) * up (out may alias gate or up)
    virtual void swiglu(const Tensor & gate, const Tensor & up, Tensor & out) = 0;
    // out = a + b (same shapes; out may alias a or b)
    virtual void add(const Tensor & a, const Tensor & b, Tensor & out) = 0;
    // out[i, :] = concat(a[i, :], b[i, :])
    virtual void concat_cols(const Tensor & a, const Tensor & b, Tensor & out) = 0;

    // ---- vision towers ----
    // out = (x - mean(x)) / sqrt(var(x) + eps) * weight (+ bias), per row (LayerNorm; the
    // variance is the biased one, as torch's). bias may be null.
    virtual void layer_norm(const Tensor & x, const Tensor & weight, const Tensor * bias, float eps, Tensor & out) = 0;
    // out = gelu(x) of the given kind, elementwise (out may alias x).
    virtual void gelu(const Tensor & x, GeluKind kind, Tensor & out) = 0;
    // out[i, :] = sum over k < n_taps of weights[i * n_taps + k] * x[rows[i * n_taps + k], :],
    // for i < n_out (rows and weights are host arrays; out must not alias x). Resampling a patch
    // grid (LLaVA-OneVision's bilinear 2x2 pooling) is this with 4 taps per output patch.
    virtual void blend_rows(const Tensor & x, const int32_t * rows, const float * weights, int n_taps, int64_t n_out,
                            Tensor & out) = 0;
};

std::unique_ptr<Backend> make_cpu_backend(int n_threads);
// The reference backend (ref/backend-ref.cpp): plain scalar float math, one thread, written for
// clarity; its memory faults on any access from outside its own ops (ref/guarded-memory.h), so
// running the models on it proves that only ops touch tensor data, as on a device.
std::unique_ptr<Backend> make_ref_backend();

// Weights in the form the backend's matmul reads best, made once at load and shared by every
// context of the model. The CPU store repacks matrices into panels (cpu/panels.h), or copies those
// of types without panels, onto huge pages, and lets the kernel drop the mapped file's pages it no
// longer needs; other views pass through.
class WeightStore {
public:
    virtual ~WeightStore() = default;
    // The matmul form of a weight view into the mapped file (the view itself stays valid).
    virtual Tensor matmul_weight(const Tensor & view) = 0;
    // Any other weight an op reads (norms, biases, embedding tables, patch and position
    // tables), in the backend's memory: the view itself on the CPU, a copy on other backends.
    virtual Tensor weight(const Tensor & view) = 0;
    virtual size_t bytes() const = 0;  // memory the store holds
};

// release_mapped_pages: the views come from a read-only file mapping whose pages may be dropped.
std::unique_ptr<WeightStore> make_cpu_weight_store(bool release_mapped_pages);
// Every weight copied into the ref backend's guarded memory (matmul forms are plain copies).
std::unique_ptr<WeightStore> make_ref_weight_store();

}  // namespace sparrow
