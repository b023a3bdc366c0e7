// backend_cpu.cpp - the CPU backend: every op of backend.h on host memory, multithreaded.
//
// This is the reference backend: always built, and what the CUDA ops are tested against.
// The heavy lifting (quantized dot products) lives in quant.h's vec_dot, which picks the best
// SIMD kernel for the CPU at run time; this file decides how work is split across threads.
#include "backend.h"
#include "common.h"
#include "cpu/threadpool.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

namespace sparrow {

namespace {

// Weight rows handled per inner block of a matmul: each block of weight rows is reused for
// every activation row while it is still in cache (what makes a verify batch cheaper than
// that many decodes).
constexpr int64_t kMatmulRowBlock = 16;
// Below this many multiply-adds a matmul runs on the calling thread: waking the pool costs
// more than the work (tiny models, small projections).
constexpr double kMatmulMinParallelWork = 1 << 16;

class CpuBackend final : public Backend {
public:
    explicit CpuBackend(int n_threads) : pool_(n_threads) {}

    const char * name() const override { return "CPU"; }
    int n_threads() const override { return pool_.size(); }
    bool is_host() const override { return true; }

    void * alloc(size_t bytes) override {
        size_t rounded = (bytes + 63) / 64 * 64;
        void * p = std::aligned_alloc(64, rounded ? rounded : 64);
        if (!p) fail(SPARROW_ERR_OUT_OF_MEMORY, format("cannot allocate %zu bytes", bytes));
        memset(p, 0, rounded);
        return p;
    }
    void free(void * ptr) override { std::free(ptr); }
    void to_host(void * dst, const void * src, size_t bytes) override { memcpy(dst, src, bytes); }
    void from_host(void * dst, const void * src, size_t bytes) override { memcpy(dst, src, bytes); }

    void get_rows(const Tensor & table, const int32_t * ids, int64_t n, Tensor & out) override {
        const int64_t d = table.cols();
        for_each_part(n, [&](int ith, int nth) {
            int64_t b, e;
            split_range(n, ith, nth, &b, &e);
            for (int64_t i = b; i < e; ++i) {
                const uint8_t * src = (const uint8_t *) table.data + (size_t) ids[i] * table.row_bytes();
                dequantize_row(table.type, src, out.f32() + i * d, d);
            }
        });
    }

    void gather_rows(const Tensor & x, const int32_t * rows, int64_t n, Tensor & out) override {
        const int64_t d = x.cols();
        for (int64_t i = 0; i < n; ++i) memcpy(out.f32() + i * d, x.f32() + (int64_t) rows[i] * d, d * sizeof(float));
    }

    void matmul(const Tensor & w, const Tensor & x, Tensor & out, const Tensor * bias) override {
        const int64_t k = w.cols(), m = w.rows(), n = x.rows();
        const DType dot_type = traits(w.type).dot_type;
        const size_t x_row_bytes = row_size(dot_type, k);

        // Activations go into the weight type's dot type once, not once per weight row.
        const uint8_t * xq;
        if (dot_type == DType::F32) {
            xq = (const uint8_t *) x.data;
        } else {
            if (scratch_.size() < x_row_bytes * n) scratch_.resize(x_row_bytes * n);
            for_each_part(n, [&](int ith, int nth) {
                int64_t b, e;
                split_range(n, ith, nth, &b, &e);
                for (int64_t i = b; i < e; ++i) quantize_row(dot_type, x.f32() + i * k, scratch_.data() + i * x_row_bytes, k);
            });
            xq = scratch_.data();
        }

        const size_t w_row_bytes = w.row_bytes();
        const int64_t n_blocks = (m + kMatmulRowBlock - 1) / kMatmulRowBlock;
        float * y = out.f32();
        const float * b_data = bias ? bias->f32() : nullptr;
        auto dispatch = [&](const std::function<void(int, int)> & fn) {
            if ((double) m * k * n < kMatmulMinParallelWork) fn(0, 1); else pool_.run(fn);
        };
        dispatch([&](int ith, int nth) {
            int64_t bb, be;
            split_range(n_blocks, ith, nth, &bb, &be);
            for (int64_t blk = bb; blk < be; ++blk) {
                const int64_t j0 = blk * kMatmulRowBlock, j1 = std::min(m, j0 + kMatmulRowBlock);
                for (int64_t i = 0; i < n; ++i) {
                    const uint8_t * xi = xq + i * x_row_bytes;
                    float * yi = y + i * m;
                    for (int64_t j = j0; j < j1; ++j) {
                        float v = vec_dot(w.type, k, (const uint8_t *) w.data + j * w_row_bytes, xi);
                        yi[j] = b_data ? v + b_data[j] : v;
                    }
                }
            }
        });
    }

    void rms_norm(const Tensor & x, const Tensor & weight, float eps, Tensor & out) override {
        const int64_t d = x.cols(), n = x.rows();
        const float * g = weight.f32();
        for_rows(n, [&](int64_t i) {
            const float * xi = x.f32() + i * d;
            float * yi = out.f32() + i * d;
            double sum = 0.0;
            for (int64_t j = 0; j < d; ++j) sum += (double) xi[j] * xi[j];
            const float scale = (float) (1.0 / std::sqrt(sum / d + eps));
            for (int64_t j = 0; j < d; ++j) yi[j] = xi[j] * scale * g[j];
        });
    }

    void rope(Tensor & x, int n_head, int head_dim, const int32_t * pos, const RopeParams & p) override {
        const int64_t n = x.rows();
        const int half = p.n_dims / 2;
        // inverse frequencies are the same for every token: theta_i = base^(-2i/n_dims)
        if ((int) inv_freq_.size() != half || inv_freq_base_ != p.freq_base || inv_freq_dims_ != p.n_dims) {
            inv_freq_.resize(half);
            for (int i = 0; i < half; ++i) inv_freq_[i] = std::pow(p.freq_base, -2.0 * i / p.n_dims);
            inv_freq_base_ = p.freq_base;
            inv_freq_dims_ = p.n_dims;
        }
        int section_end[4] = {0, 0, 0, 0};
        for (int s = 0, acc = 0; s < 4; ++s) { acc += p.sections[s]; section_end[s] = acc; }
        const int section_total = section_end[3];

        for_rows(n, [&](int64_t t) {
            float * row = x.f32() + t * (int64_t) n_head * head_dim;
            for (int i = 0; i < half; ++i) {
                int stream = 0;
                if (p.mode == RopeMode::MRope && section_total > 0) {
                    const int sector = i % section_total;
                    while (stream < 3 && sector >= section_end[stream]) ++stream;
                }
                const double position = (double) pos[(int64_t) stream * n + t] * p.freq_scale;
                const double theta = position * inv_freq_[i] / (p.freq_factors ? p.freq_factors[i] : 1.0f);
                const float c = (float) std::cos(theta), s = (float) std::sin(theta);
                for (int h = 0; h < n_head; ++h) {
                    float * v = row + h * head_dim;
                    const int a = p.mode == RopeMode::Norm ? 2 * i : i;
                    const int b = p.mode == RopeMode::Norm ? 2 * i + 1 : i + half;
                    const float x0 = v[a], x1 = v[b];
                    v[a] = x0 * c - x1 * s;
                    v[b] = x0 * s + x1 * c;
                }
            }
        });
    }

    void store_rows(const Tensor & src, Tensor & cache, int64_t first_row) override {
        const int64_t d = src.cols(), n = src.rows();
        for (int64_t i = 0; i < n; ++i) {
            void * dst = (uint8_t *) cache.data + (size_t) (first_row + i) * cache.row_bytes();
            quantize_row(cache.type, src.f32() + i * d, dst, d);
        }
    }

    void move_rows(Tensor & t, const int32_t * src, const int32_t * dst, int64_t n) override {
        const size_t rb = t.row_bytes();
        for (int64_t i = 0; i < n; ++i) {
            if (src[i] != dst[i]) memmove((uint8_t *) t.data + (size_t) dst[i] * rb, (uint8_t *) t.data + (size_t) src[i] * rb, rb);
        }
    }

    void attention(const Tensor & q, const Tensor & k_cache, const Tensor & v_cache,
                   const AttentionParams & p, Tensor & out) override {
        const int64_t n_q = q.rows();
        const int hd = p.head_dim;
        const int group = p.n_head / p.n_head_kv;
        const int64_t tasks = n_q * p.n_head;
        const size_t k_row = k_cache.row_bytes(), v_row = v_cache.row_bytes();
        const bool k_f16 = k_cache.type == DType::F16, v_f16 = v_cache.type == DType::F16;
        if ((int64_t) attn_scratch_.size() < (int64_t) pool_.size() * 3 * hd) attn_scratch_.resize((size_t) pool_.size() * 3 * hd);

        pool_.run([&](int ith, int nth) {
            float * kbuf = attn_scratch_.data() + (size_t) ith * 3 * hd;
            float * vbuf = kbuf + hd;
            float * acc = vbuf + hd;
            int64_t tb, te;
            split_range(tasks, ith, nth, &tb, &te);
            for (int64_t task = tb; task < te; ++task) {
                const int64_t i = task / p.n_head;
                const int h = (int) (task % p.n_head);
                const int hkv = h / group;
                const float * qv = q.f32() + i * (int64_t) p.n_head * hd + (int64_t) h * hd;
                const int64_t last = p.mask ? p.n_kv - 1 : std::min<int64_t>(p.n_kv - 1, p.q_first + i);
                const uint8_t * mask_row = p.mask ? p.mask + i * p.n_kv : nullptr;
                // streaming softmax: running max and normaliser, never an n_q x n_kv matrix
                float m_run = -INFINITY, l_run = 0.0f;
                std::fill(acc, acc + hd, 0.0f);
                for (int64_t j = 0; j <= last; ++j) {
                    if (mask_row && !mask_row[j]) continue;
                    const uint8_t * kp = (const uint8_t *) k_cache.data + j * k_row + (size_t) hkv * hd * (k_f16 ? 2 : 4);
                    const float * kv = k_f16 ? (dequantize_row(DType::F16, kp, kbuf, hd), kbuf) : (const float *) kp;
                    float s = 0.0f;
                    for (int d = 0; d < hd; ++d) s += qv[d] * kv[d];
                    s *= p.scale;
                    const uint8_t * vp = (const uint8_t *) v_cache.data + j * v_row + (size_t) hkv * hd * (v_f16 ? 2 : 4);
                    const float * vv = v_f16 ? (dequantize_row(DType::F16, vp, vbuf, hd), vbuf) : (const float *) vp;
                    if (s > m_run) {
                        const float correction = std::exp(m_run - s);
                        for (int d = 0; d < hd; ++d) acc[d] *= correction;
                        l_run *= correction;
                        m_run = s;
                    }
                    const float w = std::exp(s - m_run);
                    l_run += w;
                    for (int d = 0; d < hd; ++d) acc[d] += w * vv[d];
                }
                float * o = out.f32() + i * (int64_t) p.n_head * hd + (int64_t) h * hd;
                const float inv = l_run > 0.0f ? 1.0f / l_run : 0.0f;
                for (int d = 0; d < hd; ++d) o[d] = acc[d] * inv;
            }
        });
    }

    void swiglu(const Tensor & gate, const Tensor & up, Tensor & out) override {
        const int64_t d = gate.cols();
        for_rows(gate.rows(), [&](int64_t i) {
            const float * g = gate.f32() + i * d;
            const float * u = up.f32() + i * d;
            float * o = out.f32() + i * d;
            for (int64_t j = 0; j < d; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
        });
    }

    void add(const Tensor & a, const Tensor & b, Tensor & out) override {
        const int64_t d = a.cols();
        for_rows(a.rows(), [&](int64_t i) {
            const float * x = a.f32() + i * d;
            const float * y = b.f32() + i * d;
            float * o = out.f32() + i * d;
            for (int64_t j = 0; j < d; ++j) o[j] = x[j] + y[j];
        });
    }

private:
    // fn(ith, nth) over the pool, or on the caller alone for a single item (decode).
    template <typename F> void for_each_part(int64_t n, F && fn) {
        if (n == 1) fn(0, 1); else pool_.run(fn);
    }

    // Row-parallel loop; single rows (decode) run on the caller to skip the dispatch.
    template <typename F> void for_rows(int64_t n, F && fn) {
        if (n == 1) {
            fn(0);
            return;
        }
        pool_.run([&](int ith, int nth) {
            int64_t b, e;
            split_range(n, ith, nth, &b, &e);
            for (int64_t i = b; i < e; ++i) fn(i);
        });
    }

    ThreadPool pool_;
    std::vector<uint8_t> scratch_;
    std::vector<float> attn_scratch_;
    std::vector<double> inv_freq_;
    float inv_freq_base_ = 0.0f;
    int inv_freq_dims_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int n_threads) {
    return std::unique_ptr<Backend>(new CpuBackend(n_threads));
}

}  // namespace sparrow
