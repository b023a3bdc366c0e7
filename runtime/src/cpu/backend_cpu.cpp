// backend_cpu.cpp - the CPU backend: every op of backend.h on host memory, multithreaded.
//
// Always built; the one backend today. tests/cpp/test_backend_ops.cpp checks each op against
// scalar references written in the test.
// The heavy lifting lives in kernels that pick the best SIMD code for the CPU at run time:
// quant.h's mul_mat (register-tiled matrix products) and cpu/ops.h (fused attention, silu);
// this file decides how work is split across threads. Nothing here allocates once the
// scratch buffers have grown to the largest batch seen, so the decode loop does not.
#include "backend.h"
#include "common.h"
#include "cpu/ops.h"
#include "cpu/panels.h"
#include "cpu/threadpool.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace sparrow {

namespace {

// Below this many multiply-adds a matmul runs on the calling thread: waking the pool costs
// more than the work (tiny models, small projections).
constexpr double kMatmulMinParallelWork = 1 << 16;
// Activation rows of one matmul job are sized to stay in L2 (typically 512 KiB - 2 MiB per
// core) while the job's weight rows stream past them in register tiles.
constexpr size_t kMatmulColChunkBytes = 256 << 10;
// Jobs per thread and column chunk: enough that the threads finish an op together (at decode
// the slower one waits for the last job of the other: 4 jobs per thread left the pool waiting
// 8% of a decode step, 16 about 4%), few enough that handing them out stays negligible.
constexpr int64_t kMatmulJobsPerThread = 16;
// Causal queries per attention task (see attention): enough that a verify batch reads the KV
// cache once, few enough to leave several tasks per thread in a prefill.
constexpr int64_t kAttnQueriesPerTask = 8;
// A chunked attention (cpu/ops.h's kAttnChunkRows) keeps every query's chunk states until they
// are merged, and a masked one each query's list of visible rows: it goes this many queries at a
// time, so that a long prefill in big batches holds 256 x chunks x heads x (head_dim + 2) floats
// (26 MB at 25.6k rows and Qwen2-7B's heads), not n_batch times as many. A query gets the same
// bits in any slab.
constexpr int64_t kAttnSlabQueries = 256;

// The run length, up to kAttnQueriesPerTask, that lets n_threads finish n_q causal queries over
// n_parts (KV heads x row chunks) soonest, counting a task's time as its queries plus one for
// reading its rows: a verify of 6 queries over 3 KV heads on 2 threads is 3 tasks of 6 as runs
// of 8 go (the last thread's 7 units after the others' 14), and 6 tasks of 3 in 4 + 4 + 4 a
// thread. Without the read, a long cache in 13 chunks would go one query a task (33 units
// against 35 for runs of 5) and read the cache once per query: a 5-token verify at 25.6k rows
// and one KV head (2048-row chunks then) took 2.5 ms instead of 1.8. Ties keep the longer run.
int64_t queries_per_task(int64_t n_q, int64_t n_parts, int64_t n_threads) {
    int64_t best = 1, best_time = INT64_MAX;
    for (int64_t run = 1; run <= std::min(n_q, kAttnQueriesPerTask); run++) {
        const int64_t tasks = (n_q + run - 1) / run * n_parts;
        const int64_t time = (tasks + n_threads - 1) / n_threads * (run + 1);
        if (time <= best_time) best = run, best_time = time;
    }
    return best;
}
// Elementwise ops this light (a few adds a value) on fewer values than this run on the calling
// thread: a verify batch's 6 rows of 576 took 3-4 us over two threads, mostly the dispatch.
constexpr int64_t kLightOpSerialValues = 1 << 15;

class CpuBackend final : public Backend {
public:
    explicit CpuBackend(int n_threads) : pool_(n_threads), job_runs_((size_t) pool_.size()) {}

    const char * name() const override { return "cpu"; }
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
        const MatmulOut one{&w, &out, bias};
        if (in_quantized_panels(w)) matmul_panels(x, &one, 1);
        else matmul_rows(x, &one, 1);
    }

    void matmul_group(const Tensor & x, const MatmulOut * outs, int n) override {
        // one pass when every weight is in panels of one dot type (the usual q/k/v, gate/up)
        bool shared = n > 0;
        for (int i = 0; i < n && shared; ++i) {
            shared = in_quantized_panels(*outs[i].w) && traits(outs[i].w->type).dot_type == traits(outs[0].w->type).dot_type;
        }
        if (shared) {
            matmul_panels(x, outs, n);
            return;
        }
        // ... or when none is (f32 / f16 / bf16 files; f16 / bf16 in their panels go by rows too)
        bool rows = n > 0;
        for (int i = 0; i < n && rows; ++i) {
            rows = !in_quantized_panels(*outs[i].w) && traits(outs[i].w->type).dot_type == traits(outs[0].w->type).dot_type;
        }
        if (rows) {
            matmul_rows(x, outs, n);
            return;
        }
        for (int i = 0; i < n; ++i) matmul(*outs[i].w, x, *outs[i].out, outs[i].bias);
    }

    void rms_norm(const Tensor & x, const Tensor & weight, float eps, Tensor & out) override {
        const int64_t d = x.cols(), n = x.rows();
        const float * g = weight.f32();
        const OpsKernels & kernels = ops_kernels();
        // (eight partial sums in the kernels: one chain of dependent double adds made a row of 576
        // cost ~1 us)
        for_rows_light(n, d, [&](int64_t i) { kernels.rms_norm(x.f32() + i * d, g, eps, out.f32() + i * d, d); });
    }

    void rope(Tensor & x, int n_head, int head_dim, const int32_t * pos, const RopeParams & p) override {
        if (p.mode == RopeMode::Vision) {
            rope_vision(x, n_head, head_dim, pos, p);
            return;
        }
        const int64_t n = x.rows();
        const float * cs = rope_angles(n, pos, p);
        const OpsKernels & kernels = ops_kernels();
        for_rows_light(n, (int64_t) n_head * head_dim, [&](int64_t t) {
            kernels.rope(x.f32() + t * (int64_t) n_head * head_dim, n_head, head_dim, p.n_dims, p.mode == RopeMode::Norm,
                         cs + t * p.n_dims);
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
        // causal queries share tasks in runs of up to kAttnQueriesPerTask (each K/V block read
        // once for the run); masked (tree) and segmented queries go one by one
        const bool runs = !p.mask && !p.segments && n_q > 1 && p.q_first + n_q <= p.n_kv;
        // the most rows a query sees (a masked query sees at most n_kv), in chunks
        const int64_t max_rows = p.segments ? 0 : p.mask ? p.n_kv : std::min(p.n_kv, p.q_first + n_q);
        const int64_t n_chunks = std::max<int64_t>(1, (max_rows + kAttnChunkRows - 1) / kAttnChunkRows);
        // chunk states: [chunk][query of the slab][head][head_dim + 2]
        const size_t state_floats = (size_t) hd + 2, query_states = (size_t) p.n_head * state_floats;
        const int64_t slab = n_chunks > 1 || p.mask ? std::min(n_q, kAttnSlabQueries) : n_q;
        if (n_chunks > 1 && attn_states_.size() < (size_t) n_chunks * slab * query_states)
            attn_states_.resize((size_t) n_chunks * slab * query_states);
        const int64_t max_per_task = runs ? kAttnQueriesPerTask : 1;
        const bool k_f16 = k_cache.type == DType::F16, v_f16 = v_cache.type == DType::F16;
        const size_t per_thread = attention_scratch_floats(group, hd, (int) max_per_task);
        if (attn_scratch_.size() < per_thread * pool_.size()) attn_scratch_.resize(per_thread * pool_.size());
        // a masked query's visible rows, listed once for all its tasks (KV heads x chunks)
        if (p.mask) {
            if (attn_rows_.size() < (size_t) (slab * p.n_kv)) attn_rows_.resize((size_t) (slab * p.n_kv));
            if (attn_row_counts_.size() < (size_t) slab) attn_row_counts_.resize((size_t) slab);
        }
        const OpsKernels & kernels = ops_kernels();

        // Queries [s0, s0 + sn): one task = a run of query tokens x one KV head (its whole GQA
        // group of query heads, so each key/value row is loaded once for the group) x one chunk
        // of rows. Handed out dynamically, latest queries first: under the causal mask those see
        // the most rows, so the longest tasks start early and the short ones fill in at the end.
        auto attend = [&](int64_t s0, int64_t sn) {
            const int64_t per_task = runs ? queries_per_task(sn, p.n_head_kv * n_chunks, pool_.size()) : 1;
            const int64_t n_runs = (sn + per_task - 1) / per_task;
            const int64_t tasks = n_runs * n_chunks * p.n_head_kv;
            if (p.mask) {
                for_rows_light(sn, p.n_kv, [&](int64_t r) {  // the rows query s0 + r sees, in order (AttnTask::rows)
                    const uint8_t * mask = p.mask + (s0 + r) * p.n_kv;
                    int32_t * rows = attn_rows_.data() + r * p.n_kv;
                    int64_t n = 0;
                    for (int64_t j = 0; j < p.n_kv; ++j) {
                        if (mask[j]) rows[n++] = (int32_t) j;
                    }
                    attn_row_counts_[(size_t) r] = n;
                });
            }
            auto run_task = [&](int64_t task, float * scratch) {
                const int64_t i = s0 + (n_runs - 1 - task / (p.n_head_kv * n_chunks)) * per_task;  // the run's first query
                const int64_t chunk = task / p.n_head_kv % n_chunks;
                const int hkv = (int) (task % p.n_head_kv);
                AttnTask t;
                const size_t head_offset = (size_t) i * p.n_head * hd + (size_t) hkv * group * hd;
                t.q = q.f32() + head_offset;
                t.out = out.f32() + head_offset;
                t.n_queries = (int) std::min<int64_t>(per_task, s0 + sn - i);
                t.q_stride = (size_t) p.n_head * hd;
                t.n_group = group;
                t.head_dim = hd;
                t.scale = p.scale;
                t.k = (const uint8_t *) k_cache.data + (size_t) hkv * hd * (k_f16 ? 2 : 4);
                t.v = (const uint8_t *) v_cache.data + (size_t) hkv * hd * (v_f16 ? 2 : 4);
                t.k_stride = k_cache.row_bytes();
                t.v_stride = v_cache.row_bytes();
                t.k_f16 = k_f16;
                t.v_f16 = v_f16;
                t.n_kv = std::min<int64_t>(p.n_kv, p.q_first + i + 1);
                if (p.mask) {  // masked queries go one a task
                    t.rows = attn_rows_.data() + (i - s0) * p.n_kv;
                    t.n_kv = attn_row_counts_[(size_t) (i - s0)];
                }
                if (p.segments) {  // block-diagonal: the keys of query i's segment, all of them
                    const int32_t * seg = std::upper_bound(p.segments, p.segments + p.n_segments + 1, (int32_t) i) - 1;
                    t.k = (const uint8_t *) t.k + (size_t) seg[0] * t.k_stride;
                    t.v = (const uint8_t *) t.v + (size_t) seg[0] * t.v_stride;
                    t.n_kv = seg[1] - seg[0];
                }
                if (n_chunks > 1) {
                    t.row_begin = chunk * kAttnChunkRows;
                    t.row_end = t.row_begin + kAttnChunkRows;
                    t.partial = attn_states_.data() + ((size_t) (chunk * sn + i - s0)) * query_states + (size_t) hkv * group * state_floats;
                    t.partial_stride = query_states;
                }
                kernels.attention(t, scratch);
            };
            if (tasks == 1) {
                run_task(0, attn_scratch_.data());
            } else {
                next_job_.store(0, std::memory_order_relaxed);
                pool_.run([&](int ith, int) {
                    float * scratch = attn_scratch_.data() + per_thread * ith;
                    for (int64_t task; (task = next_job_.fetch_add(1, std::memory_order_relaxed)) < tasks;) run_task(task, scratch);
                });
            }
            if (n_chunks == 1) return;
            for_rows_light(sn, n_chunks * p.n_head * hd, [&](int64_t r) {  // query s0 + r, every head
                const int64_t i = s0 + r;
                for (int h = 0; h < p.n_head; h++) {
                    attention_merge(attn_states_.data() + (size_t) r * query_states + (size_t) h * state_floats, (int) n_chunks,
                                    (size_t) sn * query_states, hd, out.f32() + (size_t) i * p.n_head * hd + (size_t) h * hd);
                }
            });
        };
        for (int64_t s0 = 0; s0 < n_q; s0 += slab) attend(s0, std::min(slab, n_q - s0));
    }

    void swiglu(const Tensor & gate, const Tensor & up, Tensor & out) override {
        const int64_t d = gate.cols();
        const OpsKernels & kernels = ops_kernels();
        for_rows(gate.rows(), [&](int64_t i) { kernels.silu_mul(gate.f32() + i * d, up.f32() + i * d, out.f32() + i * d, d); });
    }

    void add(const Tensor & a, const Tensor & b, Tensor & out) override {
        const int64_t d = a.cols();
        for_rows_light(a.rows(), d, [&](int64_t i) {
            const float * x = a.f32() + i * d;
            const float * y = b.f32() + i * d;
            float * o = out.f32() + i * d;
            for (int64_t j = 0; j < d; ++j) o[j] = x[j] + y[j];
        });
    }

    void concat_cols(const Tensor & a, const Tensor & b, Tensor & out) override {
        const int64_t da = a.cols(), db = b.cols();
        for (int64_t i = 0; i < a.rows(); ++i) {
            memcpy(out.f32() + i * (da + db), a.f32() + i * da, da * sizeof(float));
            memcpy(out.f32() + i * (da + db) + da, b.f32() + i * db, db * sizeof(float));
        }
    }

    void layer_norm(const Tensor & x, const Tensor & weight, const Tensor * bias, float eps, Tensor & out) override {
        const int64_t d = x.cols();
        const float * g = weight.f32();
        const float * b = bias ? bias->f32() : nullptr;
        for_rows(x.rows(), [&](int64_t i) {
            const float * xi = x.f32() + i * d;
            float * yi = out.f32() + i * d;
            double sum = 0.0;
            for (int64_t j = 0; j < d; ++j) sum += xi[j];
            const double mean = sum / d;
            double sq = 0.0;  // two passes: no cancellation when |mean| >> spread
            for (int64_t j = 0; j < d; ++j) sq += ((double) xi[j] - mean) * ((double) xi[j] - mean);
            const float scale = (float) (1.0 / std::sqrt(sq / d + eps));
            for (int64_t j = 0; j < d; ++j) yi[j] = (float) (xi[j] - mean) * scale * g[j] + (b ? b[j] : 0.0f);
        });
    }

    void gelu(const Tensor & x, GeluKind kind, Tensor & out) override {
        const int64_t d = x.cols();
        for_rows(x.rows(), [&](int64_t i) {
            const float * xi = x.f32() + i * d;
            float * yi = out.f32() + i * d;
            switch (kind) {
                case GeluKind::Erf:
                    for (int64_t j = 0; j < d; ++j) yi[j] = 0.5f * xi[j] * (1.0f + std::erf(xi[j] * 0.70710678118654752f));
                    break;
                case GeluKind::Tanh:
                    for (int64_t j = 0; j < d; ++j) {
                        const float v = xi[j];
                        yi[j] = 0.5f * v * (1.0f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
                    }
                    break;
                case GeluKind::Quick:
                    for (int64_t j = 0; j < d; ++j) yi[j] = xi[j] / (1.0f + std::exp(-1.702f * xi[j]));
                    break;
            }
        });
    }

    void blend_rows(const Tensor & x, const int32_t * rows, const float * weights, int n_taps, int64_t n_out,
                    Tensor & out) override {
        const int64_t d = x.cols();
        for_rows(n_out, [&](int64_t i) {
            float * o = out.f32() + i * d;
            std::fill(o, o + d, 0.0f);
            for (int k = 0; k < n_taps; ++k) {
                const float w = weights[i * n_taps + k];
                const float * xr = x.f32() + (int64_t) rows[i * n_taps + k] * d;
                for (int64_t j = 0; j < d; ++j) o[j] += w * xr[j];
            }
        });
    }

private:
    // Quantized weights in panels go through matmul_panels; every other matrix, f16 / bf16 panels
    // included (their activations f32 / bf16, with no block summaries), through matmul_rows.
    static bool in_quantized_panels(const Tensor & w) { return w.panels && !is_float_panel_type(w.type); }

    // x's rows in the dot type of weights of type wt (in scratch_; x itself for f32 dot types),
    // and with summarize, their per-block summaries for the panel kernels (in sums_). Each row
    // is converted on its own, so a row's bytes do not depend on the batch it came in.
    const uint8_t * quantize_activations(DType wt, const Tensor & x, bool summarize) {
        const int64_t k = x.cols(), n = x.rows();
        const DType dot_type = traits(wt).dot_type;
        if (dot_type == DType::F32) return (const uint8_t *) x.data;
        const size_t row_bytes = row_size(dot_type, k), sum_bytes = summarize ? summary_bytes(wt, k) : 0;
        if (scratch_.size() < row_bytes * n) scratch_.resize(row_bytes * n);
        if (sums_.size() < sum_bytes * n) sums_.resize(sum_bytes * n);
        for_each_part(n, [&](int ith, int nth) {
            int64_t b, e;
            split_range(n, ith, nth, &b, &e);
            for (int64_t i = b; i < e; ++i) {
                uint8_t * row = scratch_.data() + i * row_bytes;
                quantize_row(dot_type, x.f32() + i * k, row, k);
                if (summarize) summarize_activations(wt, k, row, row_bytes, 1, sums_.data() + i * sum_bytes);
            }
        });
        return scratch_.data();
    }

    // Products of one activation matrix with row-major weights (float files; quantized types
    // without panels) of one dot type: the activations are converted once, and the jobs of every
    // product, (block of weight rows) x (chunk of activation rows), go out in one pass over the
    // threads, chunk-major so that all threads work on the same activation rows (shared in L3)
    // while the weights stream by; within a job the tiled kernel reuses every weight load across
    // the chunk's rows. A group (q, k, v; gate, up) waits for its slowest thread once, not per
    // product. A row's result does not depend on which job, thread or block computed it.
    void matmul_rows(const Tensor & x, const MatmulOut * outs, int n_outs) {
        const int64_t k = x.cols(), n = x.rows();
        const DType wt = outs[0].w->type;
        const size_t x_row_bytes = row_size(traits(wt).dot_type, k);
        int64_t total_rows = 0;
        for (int i = 0; i < n_outs; ++i) total_rows += outs[i].w->rows();
        const bool parallel = (double) total_rows * k * n >= kMatmulMinParallelWork && pool_.size() > 1;
        const uint8_t * xq = quantize_activations(wt, x, false);  // once, not once per weight row
        const int nth = parallel ? pool_.size() : 1;
        const int64_t col_chunk = std::min<int64_t>(n, std::max<int64_t>(16, (int64_t) (kMatmulColChunkBytes / x_row_bytes)));
        int64_t row_block = (total_rows + nth * kMatmulJobsPerThread - 1) / (nth * kMatmulJobsPerThread);
        row_block = std::max<int64_t>(16, (row_block + 15) / 16 * 16);  // whole register tiles
        jobs_.clear();
        for (int64_t c0 = 0; c0 < n; c0 += col_chunk) {
            for (int i = 0; i < n_outs; ++i) {
                const int64_t m = outs[i].w->rows();
                for (int64_t r0 = 0; r0 < m; r0 += row_block) {
                    jobs_.push_back({i, r0, std::min(row_block, m - r0), c0, std::min(col_chunk, n - c0)});
                }
            }
        }
        run_jobs(nth, [&](const ProductJob & job) {
            const MatmulOut & o = outs[job.out];
            const int64_t m = o.w->rows();
            float * y = o.out->f32() + job.c0 * m;
            if (o.w->panels) {  // f16 / bf16 in groups of 4 rows; a job's first row is a multiple of 16
                const uint8_t * w = (const uint8_t *) o.w->data + (size_t) job.first * float_panel_row_stride(k);
                float_panel_mul_mat(o.w->type, k, w, job.count, xq + job.c0 * x_row_bytes, x_row_bytes, job.nc, y + job.first, m);
            } else {
                const size_t w_row_bytes = o.w->row_bytes();
                mul_mat(o.w->type, k, (const uint8_t *) o.w->data + job.first * w_row_bytes, w_row_bytes, job.count,
                        xq + job.c0 * x_row_bytes, x_row_bytes, job.nc, y + job.first, m);
            }
            if (o.bias) add_bias(y, m, job.nc, o.bias->f32(), job.first, job.first + job.count);
        });
    }

    // Products of one activation matrix with weights packed into panels (cpu/panels.h), all of one
    // dot type (their activation summaries are the same too): the activations are converted once,
    // and the jobs of every product, (run of panels) x (chunk of activation rows), go out in one
    // pass over the threads (run_jobs). A row's result does not depend on which job, thread or
    // chunk computed it.
    void matmul_panels(const Tensor & x, const MatmulOut * outs, int n_outs) {
        const int64_t k = x.cols(), n = x.rows();
        const DType wt = outs[0].w->type;
        const uint8_t * xq = quantize_activations(wt, x, true);
        const size_t x_stride = row_size(traits(wt).dot_type, k);
        int64_t work = 0, total_panels = 0;
        for (int i = 0; i < n_outs; ++i) {
            work += outs[i].w->rows() * k * n;
            total_panels += (outs[i].w->rows() + kPanelRows - 1) / kPanelRows;
        }
        const int nth = (double) work >= kMatmulMinParallelWork ? pool_.size() : 1;
        const int64_t col_chunk = std::min<int64_t>(n, std::max<int64_t>(16, (int64_t) (kMatmulColChunkBytes / x_stride)));
        // an even number: the kernels take panels two at a time where the rows are few
        int64_t panels_per_job = std::max<int64_t>(1, (total_panels + nth * kMatmulJobsPerThread - 1) / (nth * kMatmulJobsPerThread));
        panels_per_job += panels_per_job % 2;
        jobs_.clear();
        for (int64_t c0 = 0; c0 < n; c0 += col_chunk) {
            for (int i = 0; i < n_outs; ++i) {
                const int64_t n_panels = (outs[i].w->rows() + kPanelRows - 1) / kPanelRows;
                for (int64_t p0 = 0; p0 < n_panels; p0 += panels_per_job) {
                    jobs_.push_back({i, p0, std::min(panels_per_job, n_panels - p0), c0, std::min(col_chunk, n - c0)});
                }
            }
        }
        run_jobs(nth, [&](const ProductJob & job) {  // first, count: panels
            const MatmulOut & o = outs[job.out];
            const int64_t m = o.w->rows();
            PanelProduct p{o.w->type, k, (const uint8_t *) o.w->data, m, xq, x_stride, sums_.data(), o.out->f32(), m};
            panel_mul_mat(p, job.first, job.count, job.c0, job.nc);
            if (o.bias) {
                add_bias(p.y + job.c0 * m, m, job.nc, o.bias->f32(), job.first * kPanelRows,
                         std::min(m, (job.first + job.count) * kPanelRows));
            }
        });
    }

    // Every job of jobs_ through run_job: in order on one thread; over several, where there is one
    // chunk of activation rows (decode, a verify, a short prompt), each thread takes its own run of
    // the jobs from the front, then the other runs' last jobs; otherwise (a long prefill) they are
    // handed out one at a time. A run of neighbouring jobs is one stream of weight rows per thread,
    // which the prefetchers follow from job to job: handed out in turn, each thread's stream broke at
    // every job and its prefetches ran into the other thread's rows (Zen 5, 2 threads: bench_quant f16
    // 3072 x 576, GB/s of weights at one row, 44-56 -> 45-72; SmolLM2 in f16, plain decoding 183-192
    // -> 218-232 tokens/s and speculative 247-282 -> 344-383; in q8_0 294-316 -> 335-364 and 363-389
    // -> 474-484). Taking the others' leftovers keeps the threads finishing together when one is
    // slowed.
    template <typename F> void run_jobs(int nth, F && run_job) {
        const int64_t n_jobs = (int64_t) jobs_.size();
        if (nth == 1 || n_jobs == 1) {
            for (const ProductJob & job : jobs_) run_job(job);
            return;
        }
        if (jobs_.back().c0 == 0) {
            for (int t = 0; t < nth; ++t) {
                int64_t b, e;
                split_range(n_jobs, t, nth, &b, &e);
                job_runs_[(size_t) t].jobs.store((uint64_t) b << 32 | (uint64_t) e, std::memory_order_relaxed);
            }
            pool_.run([&](int ith, int nth_run) {
                for (int64_t j; (j = job_runs_[(size_t) ith].take(true)) >= 0;) run_job(jobs_[(size_t) j]);
                for (int d = 1; d < nth_run; ++d) {
                    JobRun & other = job_runs_[(size_t) ((ith + d) % nth_run)];
                    for (int64_t j; (j = other.take(false)) >= 0;) run_job(jobs_[(size_t) j]);
                }
            });
            return;
        }
        next_job_.store(0, std::memory_order_relaxed);
        pool_.run([&](int, int) {
            for (int64_t j; (j = next_job_.fetch_add(1, std::memory_order_relaxed)) < n_jobs;) run_job(jobs_[(size_t) j]);
        });
    }

    // y (nc rows of m outputs) += bias at the outputs [r0, r1)
    static void add_bias(float * y, int64_t m, int64_t nc, const float * bias, int64_t r0, int64_t r1) {
        for (int64_t c = 0; c < nc; ++c) {
            for (int64_t r = r0; r < r1; ++r) y[c * m + r] += bias[r];
        }
    }

    // cos and sin of every (row, pair) rotation angle for these positions: per row the half
    // cosines, then the half sines (OpsKernels::rope). A forward pass ropes q and k of every
    // layer at the same positions: the angles are computed on the first of those calls and
    // reused while the positions and parameters are the same (the trigonometry in double was
    // most of a rope call: 60 calls a token for a 30-layer model). The values are those the
    // per-call computation gave, bit for bit.
    const float * rope_angles(int64_t n, const int32_t * pos, const RopeParams & p) {
        const int half = p.n_dims / 2;
        const size_t n_pos = (size_t) n * (p.mode == RopeMode::MRope ? 4 : 1);
        const bool same = rope_.mode == p.mode && rope_.n_dims == p.n_dims &&
                          rope_.freq_base == p.freq_base && rope_.freq_scale == p.freq_scale &&
                          std::equal(p.sections, p.sections + 4, rope_.sections) &&
                          rope_.factors.size() == (p.freq_factors ? (size_t) half : 0) &&
                          (!p.freq_factors || std::equal(rope_.factors.begin(), rope_.factors.end(), p.freq_factors)) &&
                          rope_.pos.size() == n_pos && std::equal(rope_.pos.begin(), rope_.pos.end(), pos);
        if (same) return rope_.cs.data();
        rope_.mode = p.mode;
        rope_.n_dims = p.n_dims;
        rope_.freq_base = p.freq_base;
        rope_.freq_scale = p.freq_scale;
        std::copy(p.sections, p.sections + 4, rope_.sections);
        rope_.factors.assign(p.freq_factors, p.freq_factors ? p.freq_factors + half : p.freq_factors);
        rope_.pos.assign(pos, pos + n_pos);
        // inverse frequencies are the same for every token: theta_i = base^(-2i/n_dims)
        std::vector<double> inv_freq((size_t) half);
        for (int i = 0; i < half; ++i) inv_freq[(size_t) i] = std::pow(p.freq_base, -2.0 * i / p.n_dims);
        int section_end[4] = {0, 0, 0, 0};
        for (int s = 0, acc = 0; s < 4; ++s) { acc += p.sections[s]; section_end[s] = acc; }
        const int section_total = section_end[3];
        rope_.cs.resize((size_t) n * 2 * half);
        for_rows(n, [&](int64_t t) {
            float * cs_t = rope_.cs.data() + t * 2 * half, * sn_t = cs_t + half;
            for (int i = 0; i < half; ++i) {
                int stream = 0;
                if (p.mode == RopeMode::MRope && section_total > 0) {
                    const int sector = i % section_total;
                    while (stream < 3 && sector >= section_end[stream]) ++stream;
                }
                const double position = (double) pos[(int64_t) stream * n + t] * p.freq_scale;
                const double theta = position * inv_freq[(size_t) i] / (p.freq_factors ? p.freq_factors[i] : 1.0f);
                cs_t[i] = (float) std::cos(theta);
                sn_t[i] = (float) std::sin(theta);
            }
        });
        return rope_.cs.data();
    }

    // RopeMode::Vision (see backend.h): two sections of pairs, each with its own position
    // stream and its own frequency ladder base^(-2j / (n_dims / 2)).
    void rope_vision(Tensor & x, int n_head, int head_dim, const int32_t * pos, const RopeParams & p) {
        const int64_t n = x.rows();
        const int half = p.n_dims / 2;
        const int section_len[2] = {p.sections[0], p.sections[1]};
        std::vector<double> inv_freq((size_t) std::max(section_len[0], section_len[1]));
        for (size_t j = 0; j < inv_freq.size(); ++j) inv_freq[j] = std::pow((double) p.freq_base, -2.0 * (double) j / half);
        for_rows(n, [&](int64_t t) {
            float * row = x.f32() + t * (int64_t) n_head * head_dim;
            for (int i = 0; i < section_len[0] + section_len[1]; ++i) {
                const int stream = i < section_len[0] ? 0 : 1;
                const int j = stream == 0 ? i : i - section_len[0];
                const double theta = (double) pos[(int64_t) stream * n + t] * p.freq_scale * inv_freq[j];
                const float c = (float) std::cos(theta), s = (float) std::sin(theta);
                for (int h = 0; h < n_head; ++h) {
                    float * v = row + h * head_dim;
                    const float x0 = v[i], x1 = v[i + half];
                    v[i] = x0 * c - x1 * s;
                    v[i + half] = x0 * s + x1 * c;
                }
            }
        });
    }

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

    // for_rows for a light elementwise op: on the caller when it has few values in all.
    template <typename F> void for_rows_light(int64_t n, int64_t values_per_row, F && fn) {
        if (n * values_per_row < kLightOpSerialValues) {
            for (int64_t i = 0; i < n; ++i) fn(i);
            return;
        }
        for_rows(n, fn);
    }

    ThreadPool pool_;
    std::atomic<int64_t> next_job_{0};  // dynamic work counter of the op in flight
    // A thread's run of jobs [front, back) (run_jobs), both in one word so that its owner taking
    // the front and another thread taking the back never both get the last job.
    struct alignas(64) JobRun {
        std::atomic<uint64_t> jobs{0};  // front << 32 | back
        int64_t take(bool front) {
            uint64_t cur = jobs.load(std::memory_order_relaxed);
            for (;;) {
                const uint64_t f = cur >> 32, b = cur & 0xffffffffu;
                if (f >= b) return -1;
                const uint64_t next = front ? (f + 1) << 32 | b : f << 32 | (b - 1);
                if (jobs.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return (int64_t) (front ? f : b - 1);
            }
        }
    };
    std::vector<JobRun> job_runs_;  // one per thread
    std::vector<uint8_t> scratch_;  // quantized activations of the matmul in flight
    std::vector<uint8_t> sums_;     // and their block summaries (panel matmuls)
    struct ProductJob {
        int out;               // which product of the group
        int64_t first, count;  // its weight rows [first, first + count) (panels, for panel products)
        int64_t c0, nc;        // activation rows [c0, c0 + nc)
    };
    std::vector<ProductJob> jobs_;  // the matmul in flight's
    std::vector<float> attn_scratch_;
    std::vector<float> attn_states_;  // chunks' softmax states of the attention in flight (kAttnChunkRows)
    std::vector<int32_t> attn_rows_;        // per masked query of the slab: the cache rows it sees
    std::vector<int64_t> attn_row_counts_;  // and how many
    struct RopeAngles {  // rope_angles: what the table in cs was computed for
        RopeMode mode = RopeMode::Neox;
        int n_dims = 0;
        float freq_base = 0.0f, freq_scale = 0.0f;
        int sections[4] = {0, 0, 0, 0};
        std::vector<float> factors;
        std::vector<int32_t> pos;
        std::vector<float> cs;
    } rope_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int n_threads) {
    return std::unique_ptr<Backend>(new CpuBackend(n_threads));
}

}  // namespace sparrow
