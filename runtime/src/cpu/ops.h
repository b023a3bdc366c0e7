// ops.h - the CPU backend's non-matmul kernels that have SIMD versions: fused attention for one
// (query token, KV head) pair and silu(gate) * up.
//
// Like quant.h's kernels, each has a scalar reference (namespace ref, compiled everywhere and
// what tests compare with) and SIMD versions chosen at run time (ops_kernels()).
#pragma once

#include <cstddef>
#include <cstdint>

namespace sparrow {

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
    int64_t n_kv = 0;            // rows [0, n_kv) are candidates
    const uint8_t * mask = nullptr;  // n_kv bytes, non-zero = visible; nullptr = all visible
};

// Floats of scratch attention() needs per thread.
size_t attention_scratch_floats(int n_group, int head_dim);

struct OpsKernels {
    // Streaming (online) softmax over the visible rows, never materialising all scores: rows
    // with no visible key produce zeros.
    void (*attention)(const AttnTask & t, float * scratch);
    // out[i] = gate[i] / (1 + exp(-gate[i])) * up[i]; out may alias gate or up.
    void (*silu_mul)(const float * gate, const float * up, float * out, int64_t n);
    const char * level;
};

const OpsKernels & ops_kernels();  // best for this CPU

namespace ref {
const OpsKernels & ops_kernels();
}

}  // namespace sparrow
