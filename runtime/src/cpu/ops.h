// ops.h - the CPU backend's non-matmul kernels that have SIMD versions: fused attention for one
// (query token, KV head) pair and silu(gate) * up.
//
// Like quant.h's kernels, each has a scalar reference (namespace ref, compiled everywhere and
// what tests compare with) and SIMD versions chosen at run time (ops_kernels()).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace sparrow {

// Attention over more cache rows than this goes in chunks of this many rows, each a task of its
// own (AttnTask::row_begin), merged after (attention_merge): with a task per KV head alone, a
// decode at 25k rows has as many tasks as the model has KV heads (2-4), which leaves threads idle
// on any machine with more cores, and one of two idle at 3 heads. A multiple of the kernels'
// 64-row blocks; fixed, never from the thread count, so that a query gets the same bits from any
// number of threads and alone or in a verify batch. 4096 rather than 2048: each chunk's merge and
// cold start cost 2048-row chunks 6% of a decode's attention at 25.6k rows and 2 KV heads on 2
// threads (bench_attention, Qwen2-0.5B shapes), 4096-row ones 3%.
constexpr int64_t kAttnChunkRows = 4096;

// One query token against the cache rows of one KV head, for the group of query heads that
// share that KV head (GQA): out[g] = softmax(q[g] . k[j] * scale over visible j) . v[j].
struct AttnTask {
    const float * q = nullptr;   // n_group rows of head_dim floats, contiguous
    float * out = nullptr;       // same shape as q
    int n_group = 1;
    int head_dim = 0;
    float scale = 1.0f;
    const void * k = nullptr;    // cache row j of this KV head starts at k + j * k_stride bytes
    const void * v = nullptr;
    size_t k_stride = 0, v_stride = 0;
    bool k_f16 = false, v_f16 = false;  // f16 or f32 rows
    // The task attends over n_kv cache rows: rows[0 .. n_kv) (increasing), or [0, n_kv) when
    // rows is null. A masked query (a tree node) passes just the rows it sees, so that its keys
    // go through the blocks in the same groups and order as a query that sees them as one
    // contiguous run: the same bits as decoding that node's path alone (batch invariance).
    int64_t n_kv = 0;
    const int32_t * rows = nullptr;
    int64_t row(int64_t j) const { return rows ? rows[j] : j; }
    // Consecutive queries of a causal batch may share one task, so that each block of keys and
    // values is read once for all of them: query i reads q + i * q_stride, writes out + i *
    // q_stride (floats) and sees rows [0, n_kv + i). Each gets the bits it would get alone.
    // Without a row list only.
    int n_queries = 1;
    size_t q_stride = 0;
    // A task may cover a chunk of the rows its queries see, [row_begin, row_end) (indices j as
    // above; row_begin a multiple of the kernels' 64-row blocks): the backend splits a long cache
    // so that every thread has work, whatever the number of KV heads. With partial set, each
    // query's softmax state goes there unnormalised instead of to out: for query i at partial +
    // i * partial_stride, per head g of the group hd accumulated floats, the running max and the
    // running sum (head_dim + 2 floats a head), for the backend to merge (attention_merge).
    int64_t row_begin = 0, row_end = std::numeric_limits<int64_t>::max();
    float * partial = nullptr;
    size_t partial_stride = 0;
};

// The end of a task for query qi and head g: out = acc / l, or the unnormalised state into
// t.partial. Every kernel finishes through this, so that a whole task and a merge of one
// non-empty chunk give the same bits.
void attention_finish(const AttnTask & t, int qi, int g, const float * acc, float m, float l);

// out[0 .. hd) = the attention of one (query, head) from its chunks' states (n_chunks of them,
// stride floats apart, each hd + 2 floats as attention_finish writes them), merged in order.
// A chunk with nothing visible (sum 0) is skipped, so a query whose rows all fall in one chunk
// gets what an unsplit task gives it.
void attention_merge(const float * states, int n_chunks, size_t stride, int hd, float * out);

// Floats of scratch attention() needs per thread for tasks of up to n_queries queries.
size_t attention_scratch_floats(int n_group, int head_dim, int n_queries = 1);

// Whether the SIMD attention kernels prefetch the cache rows a block ahead into L1 (else into
// L2): a block's working set and the next block's rows are ~32-48 KiB at head_dim 64. On Zen 5's
// 48 KiB L1 prefetching into L1 won (into L2 was slower at every length); on Zen 4's 32 KiB L1
// the prefetched rows were evicted before use, and into L2, bench_attention at SmolLM2-135M's
// shapes, 16k rows, 1 / 2 threads: AVX-512 decode 2.47-2.59 -> 1.20-1.28 / 1.32-1.36 -> 0.71-0.76
// ms a layer, 5-token verify 4.3-4.5 -> 3.1-3.2 at 1 thread (Qwen2-7B's shapes: decode 6.5 ->
// 5.7); the AVX2 kernel's decode 2.0-2.1 -> 1.33-1.48 / 1.10-1.59 -> 0.73-0.74. So the L1 data
// cache's size decides (cpu/features.h small_l1_data_cache): into L2 below 48 KiB.
bool attention_prefetch_into_l1();

// a * b rounded to float on its own, so that the compiler cannot fuse it into the add that
// follows (it may wherever the target has FMA: the AVX2 files, -march=native, ARM): kernels that
// promise the scalar code's bits round each product.
inline float mul_rounded(float a, float b) {
    float p = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    asm("" : "+x"(p));
#elif defined(__GNUC__) && defined(__aarch64__)
    asm("" : "+w"(p));
#else
    volatile float v = p;
    p = v;
#endif
    return p;
}

// rms_norm's scale, 1 / sqrt(mean(x^2) + eps), from the eight partial sums of squares of
// x[0, j) (lane u holding the x[i] with i = u mod 8), the rest of x added here in the same lanes:
// the one place that fixes the sum's order for every level.
inline float rms_scale(double part[8], const float * x, int64_t j, int64_t n, float eps) {
    for (; j < n; ++j) part[j % 8] += (double) x[j] * x[j];
    const double sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    return (float) (1.0 / std::sqrt(sum / (double) n + eps));
}

struct OpsKernels {
    // Streaming (online) softmax over the visible rows, never materialising all scores: rows
    // with no visible key produce zeros.
    void (*attention)(const AttnTask & t, float * scratch);
    // out[i] = gate[i] / (1 + exp(-gate[i])) * up[i]; out may alias gate or up.
    void (*silu_mul)(const float * gate, const float * up, float * out, int64_t n);
    // Rotary embedding of one row of n_head heads (head_dim floats each, back to back): the first
    // n_dims of each head, pair i of n_dims / 2 turned by the angle whose cosine and sine are
    // cs[i] and cs[n_dims / 2 + i]. Pairs are (2i, 2i + 1) when adjacent (RopeMode::Norm), else
    // (i, i + n_dims / 2). Every level computes x0 c - x1 s and x0 s + x1 c as two products and
    // an add, never fused: the same bits.
    void (*rope)(float * x, int n_head, int head_dim, int n_dims, bool adjacent, const float * cs);
    // y = x / sqrt(mean(x^2) + eps) * g over n floats, the sum of squares in double in eight
    // partial sums (lane u takes x[j] for j = u mod 8), added in a fixed tree: the same bits at
    // every level.
    void (*rms_norm)(const float * x, const float * g, float eps, float * y, int64_t n);
    const char * level;
};

const OpsKernels & ops_kernels();  // best for this CPU

// For kernels that take one query at a time: runs single() on each query of t.
void attention_one_query_at_a_time(const AttnTask & t, float * scratch, void (*single)(const AttnTask &, float *));

namespace ref {
const OpsKernels & ops_kernels();
}

}  // namespace sparrow
