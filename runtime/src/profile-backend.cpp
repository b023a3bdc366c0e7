// profile-backend.cpp - SPARROW_PROFILE=1: every op of a backend timed, by op and by rows per call.
//
// A wrapper around another backend: each op runs on the inner one and its wall time is added to
// a line keyed by what it was (the op; for matmuls the weight, its "blk.N." dropped so that the
// layers add up) and how many activation rows it had. Decoding has 1 row a call, a verify of k
// drafted tokens k + 1: the table shows, op by op, what the extra rows cost. It is printed to
// stderr when the backend is destroyed (a context's, at sparrow_context_free). Ops run eagerly on
// the CPU, so their wall time is their cost; a device backend would need a sync per op here.
#include "backends.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace sparrow {

namespace {

// "blk.12.attn_q.weight" -> "attn_q.weight": one line for every layer's copy of a weight.
std::string weight_kind(const Tensor & w) {
    if (!w.name) return "?";
    const char * s = w.name;
    if (std::strncmp(s, "blk.", 4) == 0) {
        const char * dot = std::strchr(s + 4, '.');
        if (dot) return dot + 1;
    }
    return s;
}

class ProfiledBackend final : public Backend {
public:
    explicit ProfiledBackend(std::unique_ptr<Backend> inner) : in_(std::move(inner)) {}
    ~ProfiledBackend() override { report(); }

    const char * name() const override { return in_->name(); }
    int n_threads() const override { return in_->n_threads(); }
    bool is_host() const override { return in_->is_host(); }
    void * alloc(size_t bytes) override { return in_->alloc(bytes); }
    void free(void * ptr) override { in_->free(ptr); }
    void to_host(void * dst, const void * src, size_t bytes) override {
        timed("to_host", 1, [&] { in_->to_host(dst, src, bytes); });
    }
    void from_host(void * dst, const void * src, size_t bytes) override {
        timed("from_host", 1, [&] { in_->from_host(dst, src, bytes); });
    }
    void get_rows(const Tensor & table, const int32_t * ids, int64_t n, Tensor & out) override {
        timed("get_rows", n, [&] { in_->get_rows(table, ids, n, out); });
    }
    void gather_rows(const Tensor & x, const int32_t * rows, int64_t n, Tensor & out) override {
        timed("gather_rows", n, [&] { in_->gather_rows(x, rows, n, out); });
    }
    void matmul(const Tensor & w, const Tensor & x, Tensor & out, const Tensor * bias) override {
        timed("matmul " + weight_kind(w), x.rows(), [&] { in_->matmul(w, x, out, bias); });
    }
    void matmul_group(const Tensor & x, const MatmulOut * outs, int n) override {
        std::string what = "matmul_group";
        for (int i = 0; i < n; i++) what += (i ? "+" : " ") + weight_kind(*outs[i].w);
        timed(what, x.rows(), [&] { in_->matmul_group(x, outs, n); });
    }
    void rms_norm(const Tensor & x, const Tensor & weight, float eps, Tensor & out) override {
        timed("rms_norm", x.rows(), [&] { in_->rms_norm(x, weight, eps, out); });
    }
    void rope(Tensor & x, int n_head, int head_dim, const int32_t * pos, const RopeParams & p) override {
        timed("rope", x.rows(), [&] { in_->rope(x, n_head, head_dim, pos, p); });
    }
    void store_rows(const Tensor & src, Tensor & cache, int64_t first_row) override {
        timed("store_rows", src.rows(), [&] { in_->store_rows(src, cache, first_row); });
    }
    void move_rows(Tensor & t, const int32_t * src, const int32_t * dst, int64_t n) override {
        timed("move_rows", n, [&] { in_->move_rows(t, src, dst, n); });
    }
    void attention(const Tensor & q, const Tensor & k_cache, const Tensor & v_cache, const AttentionParams & p,
                   Tensor & out) override {
        timed(p.mask ? "attention (masked)" : "attention", q.rows(), [&] { in_->attention(q, k_cache, v_cache, p, out); });
    }
    void swiglu(const Tensor & gate, const Tensor & up, Tensor & out) override {
        timed("swiglu", gate.rows(), [&] { in_->swiglu(gate, up, out); });
    }
    void add(const Tensor & a, const Tensor & b, Tensor & out) override {
        timed("add", a.rows(), [&] { in_->add(a, b, out); });
    }
    void concat_cols(const Tensor & a, const Tensor & b, Tensor & out) override {
        timed("concat_cols", a.rows(), [&] { in_->concat_cols(a, b, out); });
    }
    void layer_norm(const Tensor & x, const Tensor & weight, const Tensor * bias, float eps, Tensor & out) override {
        timed("layer_norm", x.rows(), [&] { in_->layer_norm(x, weight, bias, eps, out); });
    }
    void gelu(const Tensor & x, GeluKind kind, Tensor & out) override {
        timed("gelu", x.rows(), [&] { in_->gelu(x, kind, out); });
    }
    void blend_rows(const Tensor & x, const int32_t * rows, const float * weights, int n_taps, int64_t n_out,
                    Tensor & out) override {
        timed("blend_rows", n_out, [&] { in_->blend_rows(x, rows, weights, n_taps, n_out, out); });
    }

private:
    struct Line {
        int64_t calls = 0;
        double seconds = 0;
    };

    template <typename F>
    void timed(const std::string & what, int64_t rows, F && op) {
        const auto t0 = std::chrono::steady_clock::now();
        op();
        Line & l = lines_[{what, rows}];
        l.calls++;
        l.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }

    // Grouped by rows per call (1: decoding; more: a verify or a prefill), the costliest first.
    void report() const {
        if (lines_.empty()) return;
        std::map<int64_t, std::vector<std::pair<std::string, Line>>> by_rows;
        for (const auto & [key, line] : lines_) by_rows[key.second].push_back({key.first, line});
        std::fprintf(stderr, "sparrow profile (%s backend, %d threads): wall time of each op\n", in_->name(), in_->n_threads());
        for (auto & [rows, ops] : by_rows) {
            std::sort(ops.begin(), ops.end(), [](const auto & a, const auto & b) { return a.second.seconds > b.second.seconds; });
            double total = 0;
            for (const auto & op : ops) total += op.second.seconds;
            std::fprintf(stderr, "  %lld row(s) a call: %.1f ms in all\n", (long long) rows, total * 1e3);
            for (const auto & [what, line] : ops) {
                std::fprintf(stderr, "    %-44s %8lld calls %10.2f ms %8.1f us/call %5.1f%%\n", what.c_str(),
                             (long long) line.calls, line.seconds * 1e3, line.seconds * 1e6 / (double) line.calls,
                             100.0 * line.seconds / total);
            }
        }
    }

    std::unique_ptr<Backend> in_;
    std::map<std::pair<std::string, int64_t>, Line> lines_;
};

}  // namespace

std::unique_ptr<Backend> make_profiled_backend(std::unique_ptr<Backend> inner) {
    return std::unique_ptr<Backend>(new ProfiledBackend(std::move(inner)));
}

}  // namespace sparrow
