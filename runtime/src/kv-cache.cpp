// kv-cache.cpp - see kv-cache.h.
#include "kv-cache.h"

#include "common.h"
#include "memory-budget.h"

namespace sparrow {

KVCache::KVCache(Backend & be, int n_layer, int64_t n_ctx, int64_t kv_dim, DType type)
    : be_(be), n_ctx_(n_ctx) {
    if (type != DType::F16 && type != DType::F32) {
        fail(SPARROW_ERR_INVALID_ARGUMENT, "kv_type must be SPARROW_TYPE_F16 or SPARROW_TYPE_F32");
    }
    // refused before any of it is allocated (memory-budget.h: Linux would hand it out lazily)
    require_memory(2 * (int64_t) n_layer * (int64_t) Tensor::matrix(type, kv_dim, n_ctx, nullptr).nbytes(),
                   format("the KV cache for n_ctx %lld", (long long) n_ctx).c_str());
    for (int l = 0; l < n_layer; ++l) {
        Tensor k = Tensor::matrix(type, kv_dim, n_ctx, nullptr);
        Tensor v = k;
        k.data = be_.alloc(k.nbytes());
        k_.push_back(k);
        v.data = be_.alloc(v.nbytes());
        v_.push_back(v);
    }
}

KVCache::~KVCache() {
    for (auto & t : k_) be_.free(t.data);
    for (auto & t : v_) be_.free(t.data);
}

void KVCache::move_rows(const int32_t * src, const int32_t * dst, int64_t n) {
    for (auto & t : k_) be_.move_rows(t, src, dst, n);
    for (auto & t : v_) be_.move_rows(t, src, dst, n);
}

size_t KVCache::bytes() const {
    size_t total = 0;
    for (const auto & t : k_) total += t.nbytes();
    for (const auto & t : v_) total += t.nbytes();
    return total;
}

}  // namespace sparrow
