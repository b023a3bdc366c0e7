// qwen2.cpp - the decoder-only language models of the Qwen2 family and Llama.
//
// llama, qwen2 and qwen2vl are the same pre-norm transformer (RMSNorm, GQA attention with
// rotary positions, SwiGLU MLP); they differ only in rotary layout and q/k/v biases:
//   llama   - NORM rotary (llama.cpp's converter permutes Q/K rows so adjacent pairs rotate)
//   qwen2   - NEOX rotary, q/k/v biases
//   qwen2vl - qwen2 with M-RoPE: frequency bands take t/h/w positions (text: all equal)
// GGUF keys and tensor names are llama.cpp's, listed once in the tables below.
#include "models/llm.h"

#include "common.h"
#include "gguf.h"
#include "kv-cache.h"
#include "quant.h"

#include <cmath>
#include <cstring>

namespace sparrow {

namespace {

struct ArchInfo {
    const char * name;
    RopeMode rope_mode;
    bool qkv_bias;  // expected (qwen2 has them; llama files may carry them optionally)
};

const ArchInfo kArchs[] = {
    {"llama", RopeMode::Norm, false},
    {"qwen2", RopeMode::Neox, true},
    {"qwen2vl", RopeMode::MRope, true},
};

// GGUF metadata keys, "%s" = general.architecture
constexpr const char * kKeyContextLength = "%s.context_length";
constexpr const char * kKeyEmbeddingLength = "%s.embedding_length";
constexpr const char * kKeyBlockCount = "%s.block_count";
constexpr const char * kKeyFeedForwardLength = "%s.feed_forward_length";
constexpr const char * kKeyHeadCount = "%s.attention.head_count";
constexpr const char * kKeyHeadCountKV = "%s.attention.head_count_kv";
constexpr const char * kKeyKeyLength = "%s.attention.key_length";
constexpr const char * kKeyRmsEps = "%s.attention.layer_norm_rms_epsilon";
constexpr const char * kKeyRopeFreqBase = "%s.rope.freq_base";
constexpr const char * kKeyRopeDimCount = "%s.rope.dimension_count";
constexpr const char * kKeyRopeScalingType = "%s.rope.scaling.type";
constexpr const char * kKeyRopeScalingFactor = "%s.rope.scaling.factor";
constexpr const char * kKeyRopeSections = "%s.rope.dimension_sections";

// Tensor names, "%d" = layer index
constexpr const char * kTokEmbd = "token_embd.weight";
constexpr const char * kOutputNorm = "output_norm.weight";
constexpr const char * kOutput = "output.weight";
constexpr const char * kRopeFreqs = "rope_freqs.weight";
constexpr const char * kAttnNorm = "blk.%d.attn_norm.weight";
constexpr const char * kAttnQ = "blk.%d.attn_q.weight";
constexpr const char * kAttnK = "blk.%d.attn_k.weight";
constexpr const char * kAttnV = "blk.%d.attn_v.weight";
constexpr const char * kAttnQBias = "blk.%d.attn_q.bias";
constexpr const char * kAttnKBias = "blk.%d.attn_k.bias";
constexpr const char * kAttnVBias = "blk.%d.attn_v.bias";
constexpr const char * kAttnOut = "blk.%d.attn_output.weight";
constexpr const char * kFfnNorm = "blk.%d.ffn_norm.weight";
constexpr const char * kFfnGate = "blk.%d.ffn_gate.weight";
constexpr const char * kFfnUp = "blk.%d.ffn_up.weight";
constexpr const char * kFfnDown = "blk.%d.ffn_down.weight";

const ArchInfo * find_arch(const std::string & arch) {
    for (const auto & a : kArchs) {
        if (arch == a.name) return &a;
    }
    return nullptr;
}

std::string key(const char * pattern, const std::string & arch) { return format(pattern, arch.c_str()); }

int32_t positive(const GGUFFile & f, const std::string & k, int64_t limit) {
    int64_t v = f.get_int(k);
    if (v <= 0 || v > limit) fail(SPARROW_ERR_FORMAT, format("metadata '%s' = %lld is out of range", k.c_str(), (long long) v));
    return (int32_t) v;
}

}  // namespace

Tensor bind_tensor(const GGUFFile & f, const std::string & name, int64_t cols, int64_t rows, bool required,
                   bool f32_only) {
    const GGUFTensorInfo * info = f.find_tensor(name);
    if (!info) {
        if (required) fail(SPARROW_ERR_FORMAT, format("missing tensor '%s'", name.c_str()));
        return Tensor();
    }
    if (info->ne[0] != cols || info->ne[1] * info->ne[2] * info->ne[3] != rows) {
        fail(SPARROW_ERR_FORMAT, format("tensor '%s' has shape [%lld, %lld], expected [%lld, %lld]", name.c_str(),
                                        (long long) info->ne[0], (long long) (info->ne[1] * info->ne[2] * info->ne[3]),
                                        (long long) cols, (long long) rows));
    }
    if (!type_traits(info->type)) {
        fail(SPARROW_ERR_FORMAT, format("tensor '%s' has integer type %u, expected floats", name.c_str(), info->type));
    }
    if (f32_only && info->type != (uint32_t) DType::F32) {
        fail(SPARROW_ERR_UNSUPPORTED, format("tensor '%s' must be f32 (it is %s)", name.c_str(),
                                             type_traits(info->type)->name));
    }
    Tensor t = Tensor::matrix((DType) info->type, cols, rows, const_cast<uint8_t *>(f.tensor_data(*info)));
    t.name = info->name.c_str();
    // Norm weights and biases scale activations as they are (no quantization between them and
    // the logits), so one NaN in them would turn every logit into NaN: refused here, by name.
    // They are small; the matrices are not scanned.
    if (rows == 1 && (t.type == DType::F32 || t.type == DType::F16)) {
        for (int64_t i = 0; i < cols; ++i) {
            const float v = t.type == DType::F32 ? ((const float *) t.data)[i] : fp16_to_fp32(((const uint16_t *) t.data)[i]);
            if (!std::isfinite(v)) {
                fail(SPARROW_ERR_FORMAT, format("tensor '%s' holds a NaN or an infinity at index %lld", name.c_str(),
                                                (long long) i));
            }
        }
    }
    return t;
}

bool lm_supports_arch(const std::string & arch) { return find_arch(arch) != nullptr; }

void lm_load(const GGUFFile & f, LMHparams & hp, LMWeights & w) {
    hp.arch = f.get_string("general.architecture");
    const ArchInfo * ai = find_arch(hp.arch);
    if (!ai) fail(SPARROW_ERR_UNSUPPORTED, format("architecture '%s' is not supported", hp.arch.c_str()));
    const std::string & a = hp.arch;

    hp.n_embd = positive(f, key(kKeyEmbeddingLength, a), 1 << 16);
    hp.n_layer = positive(f, key(kKeyBlockCount, a), 1024);
    hp.n_ff = positive(f, key(kKeyFeedForwardLength, a), 1 << 20);
    hp.n_head = positive(f, key(kKeyHeadCount, a), 4096);
    hp.n_head_kv = f.has(key(kKeyHeadCountKV, a)) ? positive(f, key(kKeyHeadCountKV, a), 4096) : hp.n_head;
    hp.n_ctx_train = f.has(key(kKeyContextLength, a)) ? positive(f, key(kKeyContextLength, a), 1 << 26) : 4096;
    if (hp.n_head % hp.n_head_kv != 0) {
        fail(SPARROW_ERR_FORMAT, format("head_count %d is not a multiple of head_count_kv %d", hp.n_head, hp.n_head_kv));
    }
    hp.head_dim = f.has(key(kKeyKeyLength, a)) ? positive(f, key(kKeyKeyLength, a), 4096) : hp.n_embd / hp.n_head;
    if (hp.head_dim % 2 != 0 || (!f.has(key(kKeyKeyLength, a)) && hp.n_embd % hp.n_head != 0)) {
        fail(SPARROW_ERR_FORMAT, format("head dimension %d is invalid", hp.head_dim));
    }
    hp.rms_eps = (float) f.get_float(key(kKeyRmsEps, a), 1e-6);
    if (!(hp.rms_eps > 0.0f) || hp.rms_eps > 1.0f) fail(SPARROW_ERR_FORMAT, "layer_norm_rms_epsilon is out of range");

    hp.rope.mode = ai->rope_mode;
    hp.rope.freq_base = (float) f.get_float(key(kKeyRopeFreqBase, a), 10000.0);
    if (!(hp.rope.freq_base > 1.0f) || !std::isfinite(hp.rope.freq_base)) fail(SPARROW_ERR_FORMAT, "rope.freq_base is out of range");
    hp.rope.n_dims = (int) f.get_int(key(kKeyRopeDimCount, a), hp.head_dim);
    if (hp.rope.n_dims != hp.head_dim) {
        fail(SPARROW_ERR_UNSUPPORTED, format("partial rotary (rope.dimension_count %d of head %d) is not supported",
                                             hp.rope.n_dims, hp.head_dim));
    }
    std::string scaling = f.get_string(key(kKeyRopeScalingType, a), "none");
    if (scaling == "linear") {
        double factor = f.get_float(key(kKeyRopeScalingFactor, a), 1.0);
        if (!(factor > 0.0)) fail(SPARROW_ERR_FORMAT, "rope.scaling.factor is out of range");
        hp.rope.freq_scale = (float) (1.0 / factor);
    } else if (scaling != "none") {
        fail(SPARROW_ERR_UNSUPPORTED, format("rope scaling '%s' is not supported", scaling.c_str()));
    }
    if (f.find_tensor(kRopeFreqs)) {  // llama3 rope scaling: per-pair frequency divisors
        Tensor factors = bind_tensor(f, kRopeFreqs, hp.rope.n_dims / 2, 1, true, true);
        hp.rope.freq_factors = factors.f32();
    }
    if (ai->rope_mode == RopeMode::MRope) {
        std::vector<int64_t> sec = f.get_int_array(key(kKeyRopeSections, a));
        if (sec.empty() || sec.size() > 4) fail(SPARROW_ERR_FORMAT, "rope.dimension_sections must have 1 to 4 entries");
        int64_t total = 0;
        for (size_t s = 0; s < sec.size(); ++s) {
            if (sec[s] < 0 || sec[s] > hp.head_dim) fail(SPARROW_ERR_FORMAT, "rope.dimension_sections entry out of range");
            hp.rope.sections[s] = (int) sec[s];
            total += sec[s];
        }
        if (total == 0 || total > hp.head_dim / 2) fail(SPARROW_ERR_FORMAT, "rope.dimension_sections do not fit the head");
        hp.n_pos_streams = 4;
    }

    // Vocabulary size comes from the embedding matrix (the tokenizer may list fewer tokens).
    const GGUFTensorInfo * embd = f.find_tensor(kTokEmbd);
    if (!embd) fail(SPARROW_ERR_FORMAT, format("missing tensor '%s'", kTokEmbd));
    hp.n_vocab = (int32_t) embd->ne[1];

    const int64_t H = hp.n_embd, q_dim = (int64_t) hp.n_head * hp.head_dim, kv_dim = (int64_t) hp.n_head_kv * hp.head_dim;
    w.tok_embd = bind_tensor(f, kTokEmbd, H, hp.n_vocab, true);
    w.output_norm = bind_tensor(f, kOutputNorm, H, 1, true, true);
    w.output = bind_tensor(f, kOutput, H, hp.n_vocab, false);
    if (!w.output.data) w.output = w.tok_embd;  // tied embeddings

    w.layers.resize(hp.n_layer);
    for (int l = 0; l < hp.n_layer; ++l) {
        LMLayer & L = w.layers[l];
        auto name = [l](const char * pattern) { return format(pattern, l); };
        L.attn_norm = bind_tensor(f, name(kAttnNorm), H, 1, true, true);
        L.wq = bind_tensor(f, name(kAttnQ), H, q_dim, true);
        L.wk = bind_tensor(f, name(kAttnK), H, kv_dim, true);
        L.wv = bind_tensor(f, name(kAttnV), H, kv_dim, true);
        L.bq = bind_tensor(f, name(kAttnQBias), q_dim, 1, ai->qkv_bias, true);
        L.bk = bind_tensor(f, name(kAttnKBias), kv_dim, 1, ai->qkv_bias, true);
        L.bv = bind_tensor(f, name(kAttnVBias), kv_dim, 1, ai->qkv_bias, true);
        L.has_qkv_bias = L.bq.data && L.bk.data && L.bv.data;
        if (!L.has_qkv_bias && (L.bq.data || L.bk.data || L.bv.data)) {
            fail(SPARROW_ERR_FORMAT, format("layer %d has some but not all of the q/k/v biases", l));
        }
        L.wo = bind_tensor(f, name(kAttnOut), q_dim, H, true);
        L.ffn_norm = bind_tensor(f, name(kFfnNorm), H, 1, true, true);
        L.ffn_gate = bind_tensor(f, name(kFfnGate), H, hp.n_ff, true);
        L.ffn_up = bind_tensor(f, name(kFfnUp), H, hp.n_ff, true);
        L.ffn_down = bind_tensor(f, name(kFfnDown), hp.n_ff, H, true);
    }
}

LMWeights lm_prepare_weights(WeightStore & store, const LMWeights & views) {
    LMWeights w = views;
    w.tok_embd = store.weight(views.tok_embd);
    w.output_norm = store.weight(views.output_norm);
    w.output = store.matmul_weight(views.output);
    for (LMLayer & L : w.layers) {
        for (Tensor * t : {&L.wq, &L.wk, &L.wv, &L.wo, &L.ffn_gate, &L.ffn_up, &L.ffn_down}) *t = store.matmul_weight(*t);
        for (Tensor * t : {&L.attn_norm, &L.ffn_norm, &L.bq, &L.bk, &L.bv}) *t = store.weight(*t);
    }
    return w;
}

void lm_scratch_init(Backend & be, const LMHparams & hp, int64_t n_batch, LMScratch & s) {
    const int64_t H = hp.n_embd, q_dim = (int64_t) hp.n_head * hp.head_dim, kv_dim = (int64_t) hp.n_head_kv * hp.head_dim;
    auto make = [&](int64_t cols, int64_t rows) {
        Tensor t = Tensor::matrix(DType::F32, cols, rows, nullptr);
        t.data = be.alloc(t.nbytes());
        return t;
    };
    s.n_batch = n_batch;
    s.x = make(H, n_batch);
    s.h = make(std::max(H, q_dim), n_batch);
    s.q = make(q_dim, n_batch);
    s.k = make(kv_dim, n_batch);
    s.v = make(kv_dim, n_batch);
    s.attn = make(q_dim, n_batch);
    s.ff_gate = make(hp.n_ff, n_batch);
    s.ff_up = make(hp.n_ff, n_batch);
    s.out_rows = make(H, n_batch);
    s.pos.resize((size_t) hp.n_pos_streams * n_batch);
}

void lm_scratch_free(Backend & be, LMScratch & s) {
    for (Tensor * t : {&s.x, &s.h, &s.q, &s.k, &s.v, &s.attn, &s.ff_gate, &s.ff_up, &s.out_rows, &s.logits}) {
        if (t->data) be.free(t->data);
        t->data = nullptr;
    }
}

bool lm_forward(Backend & be, const LMHparams & hp, const LMWeights & w, KVCache & cache, LMScratch & s,
                const LMForwardRequest & req) {
    const int64_t n = req.n_tokens;
    const int64_t H = hp.n_embd;
    const int64_t kv_first = cache.size();

    Tensor x = s.x.row_slice(0, n);
    Tensor h = Tensor::matrix(DType::F32, H, n, s.h.data);
    Tensor q = s.q.row_slice(0, n), k = s.k.row_slice(0, n), v = s.v.row_slice(0, n);
    Tensor attn = s.attn.row_slice(0, n);
    Tensor o = Tensor::matrix(DType::F32, H, n, s.h.data);  // reuses h's storage after attention
    Tensor gate = s.ff_gate.row_slice(0, n), up = s.ff_up.row_slice(0, n);
    Tensor sel = s.out_rows.row_slice(0, req.n_out);

    AttentionParams ap;
    ap.n_head = hp.n_head;
    ap.n_head_kv = hp.n_head_kv;
    ap.head_dim = hp.head_dim;
    ap.scale = 1.0f / std::sqrt((float) hp.head_dim);
    ap.n_kv = kv_first + n;
    ap.q_first = kv_first;
    ap.mask = req.mask;

    const int32_t * cap_rows = req.capture_rows ? req.capture_rows : req.out_rows;
    const int64_t n_cap = req.capture_rows ? req.n_capture_rows : req.n_out;
    Tensor cap_sel = s.out_rows.row_slice(0, n_cap);
    auto capture = [&](int32_t layer_index) {
        for (int32_t c = 0; c < req.n_capture; ++c) {
            if (req.capture_layers[c] != layer_index) continue;
            if (req.hidden_out) {
                Tensor dst = req.hidden_out->row_slice(c * req.hidden_slot_rows + req.hidden_first, n_cap);
                be.gather_rows(x, cap_rows, n_cap, dst);
                continue;
            }
            be.gather_rows(x, cap_rows, n_cap, cap_sel);
            be.to_host(req.hidden + (size_t) c * n_cap * H, cap_sel.data, (size_t) n_cap * H * sizeof(float));
        }
    };

    if (req.embd) {
        // media rows: look up a valid id, then overwrite the row with the given embedding
        s.ids.assign(req.tokens, req.tokens + n);
        for (auto & id : s.ids) id = id < 0 ? 0 : id;
        be.get_rows(w.tok_embd, s.ids.data(), n, x);
        // one copy per run of media rows (a frame's rows are consecutive)
        for (int64_t i = 0; i < n;) {
            if (req.tokens[i] >= 0) { ++i; continue; }
            int64_t end = i + 1;
            while (end < n && req.tokens[end] < 0) ++end;
            be.from_host(x.row_slice(i, end - i).data, req.embd + i * H, (size_t) ((end - i) * H) * sizeof(float));
            i = end;
        }
    } else {
        be.get_rows(w.tok_embd, req.tokens, n, x);
    }
    for (int l = 0; l < hp.n_layer; ++l) {
        if (req.abort && req.abort(req.abort_data)) return false;
        const LMLayer & L = w.layers[l];
        capture(l);

        be.rms_norm(x, L.attn_norm, hp.rms_eps, h);
        const bool b = L.has_qkv_bias;
        const MatmulOut qkv[3] = {{&L.wq, &q, b ? &L.bq : nullptr}, {&L.wk, &k, b ? &L.bk : nullptr}, {&L.wv, &v, b ? &L.bv : nullptr}};
        be.matmul_group(h, qkv, 3);
        be.rope(q, hp.n_head, hp.head_dim, req.pos, hp.rope);
        be.rope(k, hp.n_head_kv, hp.head_dim, req.pos, hp.rope);
        be.store_rows(k, cache.k(l), kv_first);
        be.store_rows(v, cache.v(l), kv_first);
        be.attention(q, cache.k(l), cache.v(l), ap, attn);
        be.matmul(L.wo, attn, o, nullptr);
        be.add(x, o, x);

        be.rms_norm(x, L.ffn_norm, hp.rms_eps, h);
        const MatmulOut gate_up[2] = {{&L.ffn_gate, &gate, nullptr}, {&L.ffn_up, &up, nullptr}};
        be.matmul_group(h, gate_up, 2);
        be.swiglu(gate, up, gate);
        be.matmul(L.ffn_down, gate, o, nullptr);
        be.add(x, o, x);
    }
    capture(hp.n_layer);

    if (req.n_out > 0) {
        be.gather_rows(x, req.out_rows, req.n_out, sel);
        be.rms_norm(sel, w.output_norm, hp.rms_eps, sel);
        // a host backend writes logits straight into the caller's buffer; a device backend
        // stages them in its own memory (kept for the next pass) and copies them out once
        Tensor logits = Tensor::matrix(DType::F32, hp.n_vocab, req.n_out, req.logits);
        if (!be.is_host()) {
            if (!s.logits.data || s.logits.rows() < req.n_out) {
                if (s.logits.data) be.free(s.logits.data);
                s.logits = Tensor::matrix(DType::F32, hp.n_vocab, req.n_out, nullptr);
                s.logits.data = be.alloc(s.logits.nbytes());
            }
            logits.data = s.logits.data;
        }
        be.matmul(w.output, sel, logits, nullptr);
        if (!be.is_host()) be.to_host(req.logits, logits.data, logits.nbytes());
    }
    cache.set_size(kv_first + n);
    return true;
}

}  // namespace sparrow
