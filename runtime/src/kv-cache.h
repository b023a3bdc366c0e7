// kv-cache.h - per-layer key/value storage for one sequence, with rollback.
//
// Rows are cache slots in sequence order; row r holds the keys/values of the r-th token fed.
// Truncation just moves the fill mark: speculative decoding rolls back rejected tokens this way.
#pragma once

#include "backend.h"

#include <vector>

namespace sparrow {

class KVCache {
public:
    KVCache(Backend & be, int n_layer, int64_t n_ctx, int64_t kv_dim, DType type);
    ~KVCache();
    KVCache(const KVCache &) = delete;
    KVCache & operator=(const KVCache &) = delete;

    int64_t capacity() const { return n_ctx_; }
    int64_t size() const { return used_; }
    void set_size(int64_t n) { used_ = n; }
    Tensor & k(int layer) { return k_[layer]; }
    Tensor & v(int layer) { return v_[layer]; }
    size_t bytes() const;
    // Move rows src[i] -> dst[i] in every layer (see Backend::move_rows).
    void move_rows(const int32_t * src, const int32_t * dst, int64_t n);

private:
    Backend & be_;
    int64_t n_ctx_;
    int64_t used_ = 0;
    std::vector<Tensor> k_, v_;
};

}  // namespace sparrow
