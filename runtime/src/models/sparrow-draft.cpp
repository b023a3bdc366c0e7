// sparrow-draft.cpp - the Sparrow draft of spec v1 (docs/draft.md); mirrors the torch module
// sparrow_py.train.model.SparrowDraft step by step.
//
//   g       = fc(concat(taps))                    taps: target layer inputs at the text position
//   x       = concat(embd_norm(E[y]), hidden_norm(g))
//   r       = g + attn_output(attention(q(x), k(x), v(x)))   VATA visibility, NEOX RoPE
//   h       = r + ffn_down(silu(ffn_gate(ffn_norm(r))) * ffn_up(ffn_norm(r)))
//   h       = r' + ffn'(r'), r' = h + attn'(attn_norm'(h))   each layer above the first, if any
//   logits  = head(output_norm(h))                 the target's head, or output + d2t
// A glimpse enters the KV as x = concat(0, hidden_norm(glimpse_proj(pooled))), and in a layer
// above the first as attn_norm'(glimpse_proj(pooled)). Every layer has its own K/V in the same
// slots, under the same visibility.
//
// KV slots: [glimpses G | anchors S | ring | speculative]. The ring holds W entries plus one
// commit chunk, so that a chunk of entries committed together never overwrites an entry that a
// query of the same chunk still sees. Visibility is decided per (query, slot) by the entry
// indices the slots hold, exactly as vata_visible() in the torch module.
#include "models/draft.h"

#include "common.h"
#include "gguf.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace sparrow {

namespace {

constexpr const char * kArchDraft = "sparrow-draft";
constexpr const char * kArchEagle3 = "eagle3";  // llama.cpp's EAGLE-3 drafts
// entries committed per forward of the draft (the ring keeps W plus this many)
constexpr int64_t kCommitChunk = 64;

std::string key(const char * suffix) { return std::string(kArchDraft) + "." + suffix; }

int32_t read_positive(const GGUFFile & f, const std::string & k, int64_t limit) {
    int64_t v = f.get_int(k);
    if (v <= 0 || v > limit) fail(SPARROW_ERR_FORMAT, format("metadata '%s' = %lld is out of range", k.c_str(), (long long) v));
    return (int32_t) v;
}

int32_t read_count(const GGUFFile & f, const std::string & k, int64_t limit) {
    int64_t v = f.get_int(k);
    if (v < 0 || v > limit) fail(SPARROW_ERR_FORMAT, format("metadata '%s' = %lld is out of range", k.c_str(), (long long) v));
    return (int32_t) v;
}

}  // namespace

bool draft_supports_arch(const std::string & arch) { return arch == kArchDraft || arch == kArchEagle3; }

namespace {

// sparrow-draft files of more layers than this are refused (MAX_DRAFT_LAYERS of the trainer and converter)
constexpr int64_t kMaxDraftLayers = 16;

// The decoder layers' count and shape and RoPE, under "<arch>." (the same keys in both formats);
// head_dim defaults to H / heads where attention.key_length is absent. max_layers: 1 for eagle3
// files (llama.cpp's drafts have one), kMaxDraftLayers for ours.
void read_layer_shape(const GGUFFile & f, const char * arch, RopeMode rope_mode, int64_t max_layers, DraftHparams & hp) {
    auto k = [arch](const char * suffix) { return std::string(arch) + "." + suffix; };
    hp.n_embd = read_positive(f, k("embedding_length"), 1 << 16);
    const int64_t n_layer = f.get_int(k("block_count"), 1);
    if (n_layer < 1 || n_layer > max_layers) {
        fail(SPARROW_ERR_UNSUPPORTED, format("%s drafts of %lld layers are not supported (1..%lld are)", arch, (long long) n_layer,
                                             (long long) max_layers));
    }
    hp.n_layer = (int32_t) n_layer;
    hp.n_ff = read_positive(f, k("feed_forward_length"), 1 << 20);
    hp.n_head = read_positive(f, k("attention.head_count"), 4096);
    hp.n_head_kv = read_positive(f, k("attention.head_count_kv"), 4096);
    hp.head_dim = f.has(k("attention.key_length")) ? read_positive(f, k("attention.key_length"), 4096) : hp.n_embd / hp.n_head;
    if (hp.n_head % hp.n_head_kv != 0 || hp.head_dim <= 0 || hp.head_dim % 2 != 0) {
        fail(SPARROW_ERR_FORMAT, "draft attention heads are inconsistent");
    }
    // values and keys share one head size (the runtime's attention assumes it)
    if (f.has(k("attention.value_length")) && f.get_int(k("attention.value_length")) != hp.head_dim) {
        fail(SPARROW_ERR_UNSUPPORTED, "draft attention.value_length differs from its key_length");
    }
    hp.rms_eps = (float) f.get_float(k("attention.layer_norm_rms_epsilon"), 1e-6);
    if (!(hp.rms_eps > 0.0f) || hp.rms_eps > 1.0f) fail(SPARROW_ERR_FORMAT, "draft layer_norm_rms_epsilon is out of range");
    hp.rope.mode = rope_mode;
    hp.rope.n_dims = (int) f.get_int(k("rope.dimension_count"), hp.head_dim);
    hp.rope.freq_base = (float) f.get_float(k("rope.freq_base"), 10000.0);
    if (hp.rope.n_dims != hp.head_dim || !(hp.rope.freq_base > 1.0f) || !std::isfinite(hp.rope.freq_base)) {
        fail(SPARROW_ERR_FORMAT, "draft rope settings are invalid");
    }
}

void read_sparrow_hparams(const GGUFFile & f, DraftHparams & hp) {
    const int64_t spec = f.get_int(key("spec_version"), 1);
    if (spec != 1) fail(SPARROW_ERR_UNSUPPORTED, format("draft spec version %lld is not supported (1 is)", (long long) spec));
    hp.target_arch = f.get_string(key("target.architecture"), "");
    hp.target_n_layer = read_positive(f, key("target.block_count"), 4096);
    hp.target_n_embd = read_positive(f, key("target.embedding_length"), 1 << 16);
    hp.n_vocab = read_positive(f, key("vocab_size"), 1 << 24);
    hp.n_draft_vocab = read_positive(f, key("draft_vocab_size"), hp.n_vocab);
    (void) f.get_int(key("attention.key_length"));  // required here (spec v1 writes it): fails if missing
    read_layer_shape(f, kArchDraft, RopeMode::Neox, kMaxDraftLayers, hp);
    for (int64_t t : f.get_int_array(key("taps"))) {
        if (t < 0 || t > hp.target_n_layer) fail(SPARROW_ERR_FORMAT, format("draft tap %lld is outside 0..%d", (long long) t, hp.target_n_layer));
        hp.taps.push_back((int32_t) t);
    }
    if (hp.taps.empty()) fail(SPARROW_ERR_FORMAT, "the draft lists no taps");
    hp.ivsb_layer = read_count(f, key("ivsb_layer"), hp.target_n_layer - 1);
    hp.n_glimpses = read_count(f, key("glimpses"), 4096);
    hp.n_anchors = read_count(f, key("anchors"), 1 << 20);
    hp.window = read_count(f, key("window"), 1 << 24);
    if (hp.n_embd != hp.target_n_embd) fail(SPARROW_ERR_FORMAT, "draft embedding_length differs from its target's");

}

// llama.cpp's eagle3 drafts (EAGLE-3 heads as its converter writes them) are spec v1 without
// glimpses and without VATA: the same tensors minus glimpse_proj, every committed text entry
// visible (W = 0), RoPE in NORM mode on q/k rows permuted the way llama.cpp permutes Llama's
// (pairs 2i, 2i + 1 rotate together, which on its permuted rows is NEOX on HF's order).
// Metadata under "eagle3.": the usual LM keys, target_layers (the tap layers, whose inputs the
// draft reads) and target_hidden_size; the target's layer count is not recorded, so the taps
// are checked when the draft is attached (draft_check_fits).
void read_eagle3_hparams(const GGUFFile & f, DraftHparams & hp) {
    auto k = [](const char * suffix) { return std::string(kArchEagle3) + "." + suffix; };
    for (const char * variant : {"norm_before_residual", "norm_before_fc"}) {
        if (f.get_bool(k(variant), false)) fail(SPARROW_ERR_UNSUPPORTED, format("eagle3 drafts with %s are not supported", variant));
    }
    hp.target_arch.clear();
    hp.target_n_layer = 0;
    hp.target_n_embd = read_positive(f, k("target_hidden_size"), 1 << 16);
    read_layer_shape(f, kArchEagle3, RopeMode::Norm, 1, hp);
    for (int64_t t : f.get_int_array(k("target_layers"))) {
        if (t < 0 || t > 4096) fail(SPARROW_ERR_FORMAT, format("draft tap %lld is out of range", (long long) t));
        hp.taps.push_back((int32_t) t);
    }
    if (hp.taps.empty()) fail(SPARROW_ERR_FORMAT, "the draft lists no taps");
    // the vocabulary: the key if written, else the tokenizer llama.cpp's converter copies in
    if (f.has(k("vocab_size"))) {
        hp.n_vocab = read_positive(f, k("vocab_size"), 1 << 24);
    } else if (f.has("tokenizer.ggml.tokens")) {
        hp.n_vocab = (int32_t) f.get_string_array("tokenizer.ggml.tokens").size();
    } else {
        fail(SPARROW_ERR_FORMAT, "the eagle3 draft records neither eagle3.vocab_size nor a tokenizer");
    }
    const GGUFTensorInfo * d2t = f.find_tensor("d2t");
    hp.n_draft_vocab = d2t ? (int32_t) std::min<int64_t>(d2t->numel(), hp.n_vocab) : hp.n_vocab;
    hp.ivsb_layer = 0;
    hp.n_glimpses = hp.n_anchors = hp.window = 0;
    if (hp.n_embd != hp.target_n_embd) fail(SPARROW_ERR_FORMAT, "draft embedding_length differs from its target's");
}

}  // namespace

void draft_load(const GGUFFile & f, DraftHparams & hp, DraftWeights & w) {
    hp.arch = f.get_string("general.architecture");
    if (hp.arch == kArchEagle3) {
        read_eagle3_hparams(f, hp);
    } else if (hp.arch == kArchDraft) {
        read_sparrow_hparams(f, hp);
    } else {
        fail(SPARROW_ERR_UNSUPPORTED, format("'%s' is not a draft architecture (sparrow-draft and eagle3 are)", hp.arch.c_str()));
    }
    const int64_t H = hp.n_embd, q_dim = (int64_t) hp.n_head * hp.head_dim, kv_dim = (int64_t) hp.n_head_kv * hp.head_dim;
    w.fc = bind_tensor(f, "fc.weight", (int64_t) hp.taps.size() * H, H, true);
    w.embd_norm = bind_tensor(f, "blk.0.attn_norm.weight", H, 1, true, true);
    w.hidden_norm = bind_tensor(f, "blk.0.attn_norm_2.weight", H, 1, true, true);
    w.layers.resize((size_t) hp.n_layer);
    for (int32_t i = 0; i < hp.n_layer; ++i) {
        DraftLayer & L = w.layers[(size_t) i];
        auto name = [i](const char * suffix) { return format("blk.%d.%s.weight", i, suffix); };
        const int64_t in = i == 0 ? 2 * H : H;  // the first layer reads concat(E[y], g)
        if (i > 0) L.attn_norm = bind_tensor(f, name("attn_norm"), H, 1, true, true);
        L.wq = bind_tensor(f, name("attn_q"), in, q_dim, true);
        L.wk = bind_tensor(f, name("attn_k"), in, kv_dim, true);
        L.wv = bind_tensor(f, name("attn_v"), in, kv_dim, true);
        L.wo = bind_tensor(f, name("attn_output"), q_dim, H, true);
        L.ffn_norm = bind_tensor(f, name("ffn_norm"), H, 1, true, true);
        L.ffn_gate = bind_tensor(f, name("ffn_gate"), H, hp.n_ff, true);
        L.ffn_up = bind_tensor(f, name("ffn_up"), H, hp.n_ff, true);
        L.ffn_down = bind_tensor(f, name("ffn_down"), hp.n_ff, H, true);
    }
    w.output_norm = bind_tensor(f, "output_norm.weight", H, 1, true, true);
    w.glimpse_proj = bind_tensor(f, "glimpse_proj.weight", H, H, hp.n_glimpses > 0);
    const bool reduced = hp.n_draft_vocab < hp.n_vocab;
    w.output = bind_tensor(f, "output.weight", H, hp.n_draft_vocab, reduced);
    const GGUFTensorInfo * d2t = f.find_tensor("d2t");
    if (reduced) {
        if (!d2t || d2t->type != 27 /* I64 */ || d2t->numel() != hp.n_draft_vocab) {
            fail(SPARROW_ERR_FORMAT, format("a reduced draft vocabulary of %d needs an i64 d2t tensor of that length", hp.n_draft_vocab));
        }
        w.d2t = (const int64_t *) f.tensor_data(*d2t);
        for (int32_t i = 0; i < hp.n_draft_vocab; ++i) {
            if (w.d2t[i] < 0 || w.d2t[i] >= hp.n_vocab) fail(SPARROW_ERR_FORMAT, format("d2t[%d] = %lld is not a target token", i, (long long) w.d2t[i]));
        }
    } else if (w.output.data || d2t) {
        fail(SPARROW_ERR_FORMAT, "output.weight and d2t belong to a reduced draft vocabulary, but draft_vocab_size equals vocab_size");
    }
}

DraftWeights draft_prepare_weights(WeightStore & store, const DraftWeights & views) {
    DraftWeights w = views;  // d2t stays a host view into the file: it maps ids on the host
    for (Tensor * t : {&w.fc, &w.output, &w.glimpse_proj}) *t = store.matmul_weight(*t);
    for (Tensor * t : {&w.embd_norm, &w.hidden_norm, &w.output_norm}) *t = store.weight(*t);
    for (DraftLayer & L : w.layers) {
        for (Tensor * t : {&L.wq, &L.wk, &L.wv, &L.wo, &L.ffn_gate, &L.ffn_up, &L.ffn_down}) *t = store.matmul_weight(*t);
        for (Tensor * t : {&L.attn_norm, &L.ffn_norm}) {
            if (t->data) *t = store.weight(*t);  // the first layer has no attn_norm
        }
    }
    return w;
}

void draft_check_fits(const DraftHparams & d, const LMHparams & t) {
    std::string wrong;
    auto mismatch = [&](const char * what, const std::string & target, const std::string & draft) {
        if (!wrong.empty()) wrong += ", ";
        wrong += format("%s %s (the draft expects %s)", what, target.c_str(), draft.c_str());
    };
    if (!d.target_arch.empty() && d.target_arch != t.arch) mismatch("architecture", t.arch, d.target_arch);
    if (d.target_n_embd != t.n_embd) mismatch("hidden size", std::to_string(t.n_embd), std::to_string(d.target_n_embd));
    if (d.n_vocab != t.n_vocab) mismatch("vocabulary", std::to_string(t.n_vocab), std::to_string(d.n_vocab));
    if (d.target_n_layer > 0 && d.target_n_layer != t.n_layer) {  // 0: not recorded (eagle3)
        mismatch("layer count", std::to_string(t.n_layer), std::to_string(d.target_n_layer));
    }
    for (int32_t tap : d.taps) {
        if (tap > t.n_layer) mismatch("layer count", std::to_string(t.n_layer), format("a tap at layer %d", tap));
    }
    if (!wrong.empty()) fail(SPARROW_ERR_INVALID_ARGUMENT, "the draft does not fit this target: " + wrong);
}

DraftState::DraftState(Backend & be, const DraftHparams & hp, const DraftWeights & w, const LMWeights & target,
                       int64_t n_ctx, int32_t max_speculative)
    : be_(be), hp_(hp), w_(w), target_(target) {
    ring_capacity_ = (hp.window > 0 ? std::min<int64_t>(hp.window, n_ctx) : n_ctx) + kCommitChunk;
    spec_capacity_ = std::max(1, max_speculative);
    n_slots_ = hp.n_glimpses + hp.n_anchors + ring_capacity_ + spec_capacity_;
    const int64_t kv_dim = (int64_t) hp.n_head_kv * hp.head_dim;
    const Tensor kv = Tensor::matrix(DType::F32, kv_dim, n_slots_, nullptr);
    k_.assign((size_t) hp.n_layer, kv);
    v_.assign((size_t) hp.n_layer, kv);
    // row 0: the last committed entry's hidden state; row 1 + j: speculative entry j's
    states_ = Tensor::matrix(DType::F32, hp.n_embd, spec_capacity_ + 1, nullptr);
    try {
        for (int32_t l = 0; l < hp.n_layer; ++l) {
            k_[l].data = be_.alloc(k_[l].nbytes());
            v_[l].data = be_.alloc(v_[l].nbytes());
        }
        states_.data = be_.alloc(states_.nbytes());
    } catch (...) {
        free_kv();
        throw;
    }
    reset(0);
}

void DraftState::free_kv() {
    for (std::vector<Tensor> * kv : {&k_, &v_}) {
        for (Tensor & t : *kv) {
            if (t.data) be_.free(t.data);
            t.data = nullptr;
        }
    }
}

DraftState::~DraftState() {
    free_scratch();
    free_kv();
    be_.free(states_.data);
}

void DraftState::reset(int64_t anchor_start) {
    anchor_start_ = anchor_start;
    n_committed_ = 0;
    n_glimpses_ = 0;
    ring_used_ = 0;
    slot_index_.assign((size_t) n_slots_, -1);
    spec_slots_.clear();
    spec_parent_.clear();
    spec_index_.clear();
}

int64_t DraftState::n_kv_entries() const {
    const int64_t anchors = std::min<int64_t>(hp_.n_anchors, std::max<int64_t>(0, n_committed_ - anchor_start_));
    const int64_t ring_entries = ring_used_;
    const int64_t ring_live = hp_.window > 0 ? std::min<int64_t>(ring_entries, hp_.window) : ring_entries;
    return n_glimpses_ + anchors + ring_live + (int64_t) spec_slots_.size();
}

int32_t DraftState::to_target_token(int32_t draft_token) const {
    return w_.d2t ? (int32_t) w_.d2t[draft_token] : draft_token;
}

bool DraftState::visible(int64_t q, int64_t k) const {
    if (k > q) return false;
    const bool anchor = k >= anchor_start_ && k < anchor_start_ + hp_.n_anchors;
    const bool in_window = hp_.window <= 0 || q - k < hp_.window;
    return anchor || in_window;
}

int64_t DraftState::slot_for_committed(int64_t index) {
    const int64_t G = hp_.n_glimpses, S = hp_.n_anchors;
    if (index >= anchor_start_ && index < anchor_start_ + S) return G + (index - anchor_start_);
    return G + S + (ring_used_++ % ring_capacity_);
}

void DraftState::ensure_scratch(int64_t n) {
    if (n <= n_scratch_) return;
    free_scratch();
    const int64_t H = hp_.n_embd, q_dim = (int64_t) hp_.n_head * hp_.head_dim, kv_dim = (int64_t) hp_.n_head_kv * hp_.head_dim;
    auto make = [&](int64_t cols) {
        Tensor t = Tensor::matrix(DType::F32, cols, n, nullptr);
        t.data = be_.alloc(t.nbytes());
        return t;
    };
    x_ = make(2 * H); e_ = make(H); gn_ = make(H); q_ = make(q_dim); k_new_ = make(kv_dim); v_new_ = make(kv_dim);
    attn_ = make(q_dim); r_ = make(H); hn_ = make(H); gate_ = make(hp_.n_ff); up_ = make(hp_.n_ff); h_ = make(H);
    logits_ = make(hp_.n_draft_vocab); g_in_ = make(H); taps_in_ = make((int64_t) hp_.taps.size() * H);
    taps_tmp_ = make((int64_t) hp_.taps.size() * H);
    n_scratch_ = n;
}

void DraftState::free_scratch() {
    for (Tensor * t : {&x_, &e_, &gn_, &q_, &k_new_, &v_new_, &attn_, &r_, &hn_, &gate_, &up_, &h_, &logits_, &g_in_, &taps_in_,
                       &taps_tmp_}) {
        if (t->data) be_.free(t->data);
        t->data = nullptr;
    }
    n_scratch_ = 0;
}

void DraftState::fuse_taps(const float * taps, int64_t n, float * g) {
    const int64_t H = hp_.n_embd, nT = (int64_t) hp_.taps.size();
    for (int64_t c0 = 0; c0 < n; c0 += kCommitChunk) {
        const int64_t cn = std::min(kCommitChunk, n - c0);
        ensure_scratch(cn);
        // capture-slot-major [nT][n][H] -> row-major concat [cn][nT * H]
        std::vector<float> rows((size_t) (cn * nT * H));
        for (int64_t i = 0; i < cn; ++i) {
            for (int64_t t = 0; t < nT; ++t) {
                memcpy(&rows[(size_t) ((i * nT + t) * H)], taps + (size_t) ((t * n + c0 + i) * H), H * sizeof(float));
            }
        }
        Tensor in = taps_in_.row_slice(0, cn), out = g_in_.row_slice(0, cn);
        be_.from_host(in.data, rows.data(), rows.size() * sizeof(float));
        be_.matmul(w_.fc, in, out, nullptr);
        be_.to_host(g + c0 * H, out.data, (size_t) (cn * H) * sizeof(float));
    }
}

void DraftState::fuse_tap_rows(const Tensor & taps, int64_t n, const int32_t * rows, int64_t n_rows, float * g) {
    const int64_t H = hp_.n_embd, nT = (int64_t) hp_.taps.size();
    std::vector<int32_t> slot_rows;
    for (int64_t c0 = 0; c0 < n_rows; c0 += kCommitChunk) {
        const int64_t cn = std::min(kCommitChunk, n_rows - c0);
        ensure_scratch(cn);
        // concat(taps) row by row, built a capture slot at a time by the backend: slot t's rows
        // are appended to the columns gathered so far (two wide buffers take turns)
        Tensor acc = Tensor::matrix(DType::F32, H, cn, taps_in_.data), other = taps_tmp_;
        Tensor slot = e_.row_slice(0, cn);
        for (int64_t t = 0; t < nT; ++t) {
            slot_rows.resize((size_t) cn);
            for (int64_t i = 0; i < cn; ++i) slot_rows[i] = (int32_t) (t * n + rows[c0 + i]);
            if (t == 0) {
                be_.gather_rows(taps, slot_rows.data(), cn, acc);
                continue;
            }
            be_.gather_rows(taps, slot_rows.data(), cn, slot);
            Tensor wider = Tensor::matrix(DType::F32, (t + 1) * H, cn, other.data);
            be_.concat_cols(acc, slot, wider);
            other.data = acc.data;
            acc = wider;
        }
        Tensor out = g_in_.row_slice(0, cn);
        be_.matmul(w_.fc, acc, out, nullptr);
        be_.to_host(g + c0 * H, out.data, (size_t) (cn * H) * sizeof(float));
    }
}

void DraftState::add_glimpses(const float * pooled, const int32_t * positions, int64_t n) {
    if (n == 0) return;
    if (n_glimpses_ + n > hp_.n_glimpses) fail(SPARROW_ERR_INVALID_ARGUMENT, "more glimpses than the draft has room for");
    if (!w_.glimpse_proj.data) fail(SPARROW_ERR_STATE, "the draft has no glimpse projection");
    const int64_t H = hp_.n_embd;
    ensure_scratch(n);
    Tensor in = g_in_.row_slice(0, n), p = r_.row_slice(0, n), pn = gn_.row_slice(0, n), zero = e_.row_slice(0, n);
    Tensor x = x_.row_slice(0, n), k = k_new_.row_slice(0, n), v = v_new_.row_slice(0, n);
    be_.from_host(in.data, pooled, (size_t) (n * H) * sizeof(float));
    be_.matmul(w_.glimpse_proj, in, p, nullptr);
    be_.rms_norm(p, w_.hidden_norm, hp_.rms_eps, pn);
    std::vector<float> zeros((size_t) (n * H), 0.0f);
    be_.from_host(zero.data, zeros.data(), zeros.size() * sizeof(float));
    be_.concat_cols(zero, pn, x);
    Tensor hn = hn_.row_slice(0, n);
    for (int32_t l = 0; l < hp_.n_layer; ++l) {
        const DraftLayer & L = w_.layers[(size_t) l];
        if (l > 0) be_.rms_norm(p, L.attn_norm, hp_.rms_eps, hn);  // p stands in for a glimpse's state
        const Tensor & in = l == 0 ? x : hn;
        be_.matmul(L.wk, in, k, nullptr);
        be_.matmul(L.wv, in, v, nullptr);
        be_.rope(k, hp_.n_head_kv, hp_.head_dim, positions, hp_.rope);
        be_.store_rows(k, k_[l], n_glimpses_);
        be_.store_rows(v, v_[l], n_glimpses_);
    }
    for (int64_t i = 0; i < n; ++i) slot_index_[n_glimpses_ + i] = -2;  // glimpses: visible to every query
    n_glimpses_ += n;
}

void DraftState::drop_speculative() {
    for (int64_t s : spec_slots_) slot_index_[s] = -1;
    spec_slots_.clear();
    spec_parent_.clear();
    spec_index_.clear();
}

void DraftState::run(const DraftEntry * entries, int64_t n, const float * g, const uint8_t * want_logits, float * h,
                     float * logits) {
    run_entries(entries, n, g, want_logits, h, logits);
}

void DraftState::run_speculative(const DraftEntry * entries, int64_t n, const uint8_t * want_logits, float * logits) {
    for (int64_t i = 0; i < n; ++i) {
        if (!entries[i].speculative) fail(SPARROW_ERR_INTERNAL, "draft: run_speculative with a committed entry");
    }
    run_entries(entries, n, nullptr, want_logits, nullptr, logits);
}

void DraftState::run_entries(const DraftEntry * entries, int64_t n, const float * g, const uint8_t * want_logits, float * h,
                             float * logits) {
    const int64_t H = hp_.n_embd;
    int64_t logits_done = 0;
    for (int64_t c0 = 0; c0 < n; c0 += kCommitChunk) {
        const int64_t cn = std::min(kCommitChunk, n - c0);
        const DraftEntry * chunk = entries + c0;
        ensure_scratch(cn);

        // where each entry goes and which draft index it gets
        std::vector<int64_t> slot((size_t) cn), index((size_t) cn);
        std::vector<int32_t> spec_id((size_t) cn, -1);
        for (int64_t i = 0; i < cn; ++i) {
            if (!chunk[i].speculative) {
                if (!spec_slots_.empty()) fail(SPARROW_ERR_INTERNAL, "draft: committed entry after speculative ones");
                index[i] = n_committed_;
                slot[i] = slot_for_committed(n_committed_);
                n_committed_ += 1;
            } else {
                const int32_t parent = chunk[i].parent;
                if (parent < -1 || parent >= (int32_t) spec_slots_.size()) fail(SPARROW_ERR_INTERNAL, "draft: bad speculative parent");
                if ((int64_t) spec_slots_.size() >= spec_capacity_) fail(SPARROW_ERR_INTERNAL, "draft: speculative capacity exceeded");
                index[i] = parent < 0 ? n_committed_ : spec_index_[parent] + 1;
                slot[i] = hp_.n_glimpses + hp_.n_anchors + ring_capacity_ + (int64_t) spec_slots_.size();
                spec_id[i] = (int32_t) spec_slots_.size();
                spec_slots_.push_back(slot[i]);
                spec_parent_.push_back(parent);
                spec_index_.push_back(index[i]);
            }
            slot_index_[slot[i]] = index[i];
        }

        // x = concat(embd_norm(E[y]), hidden_norm(g))
        ids_.resize((size_t) cn);
        pos_.resize((size_t) cn);
        for (int64_t i = 0; i < cn; ++i) {
            ids_[i] = chunk[i].token;
            pos_[i] = chunk[i].pos;
        }
        Tensor e = e_.row_slice(0, cn), gin = g_in_.row_slice(0, cn), gn = gn_.row_slice(0, cn), x = x_.row_slice(0, cn);
        be_.get_rows(target_.tok_embd, ids_.data(), cn, e);
        be_.rms_norm(e, w_.embd_norm, hp_.rms_eps, e);
        if (g) {
            be_.from_host(gin.data, g + c0 * H, (size_t) (cn * H) * sizeof(float));
        } else {  // each entry reads its parent's hidden state, computed by an earlier run
            rows_.resize((size_t) cn);
            for (int64_t i = 0; i < cn; ++i) rows_[i] = chunk[i].parent + 1;  // -1 (the lead) -> row 0
            be_.gather_rows(states_, rows_.data(), cn, gin);
        }
        be_.rms_norm(gin, w_.hidden_norm, hp_.rms_eps, gn);
        be_.concat_cols(e, gn, x);

        // visibility of every slot for every query of the chunk (the same in every layer)
        const int64_t spec_base = hp_.n_glimpses + hp_.n_anchors + ring_capacity_;
        mask_.assign((size_t) (cn * n_slots_), 0);
        for (int64_t i = 0; i < cn; ++i) {
            uint8_t * row = mask_.data() + i * n_slots_;
            for (int64_t s = 0; s < spec_base; ++s) {
                const int64_t idx = slot_index_[s];
                row[s] = idx == -2 || (idx >= 0 && visible(index[i], idx));
            }
            // speculative slots: the entry itself and its ancestors
            for (int32_t a = spec_id[i]; a >= 0; a = spec_parent_[a]) {
                row[spec_slots_[a]] = visible(index[i], spec_index_[a]);
            }
        }
        AttentionParams ap;
        ap.n_head = hp_.n_head;
        ap.n_head_kv = hp_.n_head_kv;
        ap.head_dim = hp_.head_dim;
        ap.scale = 1.0f / std::sqrt((float) hp_.head_dim);
        ap.n_kv = n_slots_;
        ap.mask = mask_.data();

        Tensor q = q_.row_slice(0, cn), k = k_new_.row_slice(0, cn), v = v_new_.row_slice(0, cn);
        Tensor attn = attn_.row_slice(0, cn), r = r_.row_slice(0, cn), hn = hn_.row_slice(0, cn);
        Tensor gate = gate_.row_slice(0, cn), up = up_.row_slice(0, cn), hh = h_.row_slice(0, cn);
        for (int32_t l = 0; l < hp_.n_layer; ++l) {
            const DraftLayer & L = w_.layers[(size_t) l];
            // the first layer reads x with g as its residual stream; the others attn_norm(h), h
            if (l > 0) be_.rms_norm(hh, L.attn_norm, hp_.rms_eps, hn);
            const Tensor & in = l == 0 ? x : hn;
            const Tensor & resid = l == 0 ? gin : hh;
            const MatmulOut qkv[3] = {{&L.wq, &q, nullptr}, {&L.wk, &k, nullptr}, {&L.wv, &v, nullptr}};
            be_.matmul_group(in, qkv, 3);
            be_.rope(q, hp_.n_head, hp_.head_dim, pos_.data(), hp_.rope);
            be_.rope(k, hp_.n_head_kv, hp_.head_dim, pos_.data(), hp_.rope);
            for (int64_t i = 0; i < cn; ++i) {
                be_.store_rows(k.row_slice(i, 1), k_[l], slot[i]);
                be_.store_rows(v.row_slice(i, 1), v_[l], slot[i]);
            }
            be_.attention(q, k_[l], v_[l], ap, attn);
            be_.matmul(L.wo, attn, r, nullptr);
            be_.add(resid, r, r);
            be_.rms_norm(r, L.ffn_norm, hp_.rms_eps, hn);
            const MatmulOut gate_up[2] = {{&L.ffn_gate, &gate, nullptr}, {&L.ffn_up, &up, nullptr}};
            be_.matmul_group(hn, gate_up, 2);
            be_.swiglu(gate, up, gate);
            be_.matmul(L.ffn_down, gate, hh, nullptr);
            be_.add(r, hh, hh);
        }
        if (h) be_.to_host(h + c0 * H, hh.data, (size_t) (cn * H) * sizeof(float));
        // keep the states later speculative entries read: the last committed one's, every
        // speculative one's (they stay in backend memory)
        for (int64_t i = 0; i < cn; ++i) {
            const bool last_committed = !chunk[i].speculative && (c0 + i + 1 == n || entries[c0 + i + 1].speculative);
            if (last_committed) be_.store_rows(hh.row_slice(i, 1), states_, 0);
            if (chunk[i].speculative) be_.store_rows(hh.row_slice(i, 1), states_, 1 + spec_id[i]);
        }

        if (want_logits) {
            std::vector<int32_t> rows;
            for (int64_t i = 0; i < cn; ++i) {
                if (want_logits[c0 + i]) rows.push_back((int32_t) i);
            }
            if (!rows.empty()) {
                const int64_t nr = (int64_t) rows.size();
                Tensor sel = hn_.row_slice(0, nr), out = logits_.row_slice(0, nr);
                be_.gather_rows(hh, rows.data(), nr, sel);
                be_.rms_norm(sel, w_.output_norm, hp_.rms_eps, sel);
                be_.matmul(w_.output.data ? w_.output : target_.output, sel, out, nullptr);
                be_.to_host(logits + logits_done * hp_.n_draft_vocab, out.data, (size_t) (nr * hp_.n_draft_vocab) * sizeof(float));
                logits_done += nr;
            }
        }
    }
}

}  // namespace sparrow
