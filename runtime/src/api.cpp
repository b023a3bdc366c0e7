// api.cpp - the C API of sparrow.h.
//
// Every entry point runs its body inside guard(), which turns sparrow::Error, std::bad_alloc
// and anything else thrown into a status code and the thread-local message. Nothing thrown
// inside the runtime can cross the C boundary. The generation state machine behind
// sparrow_generate_begin/_next is generation.cpp's; their entry points here claim the context
// and call it.
#include "sparrow.h"

#include "api-common.h"  // guard(), the thread-local last error, require() and copy_out()
#include "common.h"
#include "context.h"
#include "generation.h"
#include "models/llm.h"
#include "quant.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <new>
#include <thread>

using namespace sparrow;

namespace {

const sparrow_model & model_of(const sparrow_model * model) {
    require(model != nullptr, "model is NULL");
    return *model;
}

const Tokenizer & tokenizer_of(const sparrow_model & m) {
    if (!m.tokenizer) fail(SPARROW_ERR_INVALID_ARGUMENT, "this model has no tokenizer (a draft or vision file): use its language model's");
    return *m.tokenizer;
}

// sparrow.h's contract, checked: a context (or a draft session) serves one call at a time. A
// call that arrives while another is inside it, from another thread or re-entered from an abort
// callback, fails with SPARROW_ERR_STATE rather than racing on the KV cache and the generation.
class CallClaim {
public:
    CallClaim(std::atomic<bool> & in_use, const char * what) : in_use_(in_use) {
        if (in_use_.exchange(true, std::memory_order_acquire)) {
            fail(SPARROW_ERR_STATE, format("the %s is in use by another call: it serves one thread at a time (give each "
                                           "thread its own)", what));
        }
    }
    ~CallClaim() { in_use_.store(false, std::memory_order_release); }
    CallClaim(const CallClaim &) = delete;
    CallClaim & operator=(const CallClaim &) = delete;

private:
    std::atomic<bool> & in_use_;
};

#define CLAIM_CONTEXT(ctx)                  \
    require((ctx) != nullptr, "ctx is NULL"); \
    CallClaim claim_((ctx)->in_use, "context")

void require_weights(const sparrow_model & m) {
    if (m.is_draft) fail(SPARROW_ERR_INVALID_ARGUMENT, "this is a draft model: attach it to a target context with sparrow_context_set_draft");
    if (m.vision) fail(SPARROW_ERR_INVALID_ARGUMENT, "this is a vision (mmproj) file: encode pixels with sparrow_vision_encode");
    if (m.vocab_only) fail(SPARROW_ERR_STATE, "the model was loaded vocab-only; it has no weights to run");
}

// Touch every page of the weights once, reporting progress: it turns the first token's page
// faults into a visible load step and lets the progress callback cancel a long load.
void prefault(const GGUFFile & f, const sparrow_model_params & params) {
    uint64_t total = 0, done = 0;
    for (const auto & t : f.tensors()) total += t.nbytes;
    volatile uint8_t sink = 0;
    for (const auto & t : f.tensors()) {
        const uint8_t * p = f.tensor_data(t);
        for (uint64_t off = 0; off < t.nbytes; off += 4096) sink ^= p[off];
        done += t.nbytes;
        if (params.progress_callback && !params.progress_callback(total ? (float) done / total : 1.0f, params.progress_user_data)) {
            fail(SPARROW_ERR_ABORTED, "loading cancelled by the progress callback");
        }
    }
    (void) sink;
}

}  // namespace

// ---- basics ------------------------------------------------------------------------------

const char * sparrow_last_error(void) { return g_last_error.c_str(); }

const char * sparrow_status_name(sparrow_status status) {
    switch (status) {
        case SPARROW_OK: return "SPARROW_OK";
        case SPARROW_ERR_INVALID_ARGUMENT: return "SPARROW_ERR_INVALID_ARGUMENT";
        case SPARROW_ERR_IO: return "SPARROW_ERR_IO";
        case SPARROW_ERR_FORMAT: return "SPARROW_ERR_FORMAT";
        case SPARROW_ERR_UNSUPPORTED: return "SPARROW_ERR_UNSUPPORTED";
        case SPARROW_ERR_OUT_OF_MEMORY: return "SPARROW_ERR_OUT_OF_MEMORY";
        case SPARROW_ERR_CONTEXT_FULL: return "SPARROW_ERR_CONTEXT_FULL";
        case SPARROW_ERR_ABORTED: return "SPARROW_ERR_ABORTED";
        case SPARROW_ERR_BUFFER_TOO_SMALL: return "SPARROW_ERR_BUFFER_TOO_SMALL";
        case SPARROW_ERR_STATE: return "SPARROW_ERR_STATE";
        case SPARROW_ERR_INTERNAL: return "SPARROW_ERR_INTERNAL";
        default: return "SPARROW_ERR_UNKNOWN";
    }
}

const char * sparrow_version(void) { return SPARROW_VERSION_STRING; }

const char * sparrow_system_info(void) {
    static std::string info = format("backends: %s; simd: %s; threads available: %u", backend_names(), simd_level(),
                                     std::max(1u, std::thread::hardware_concurrency()));
    return info.c_str();
}

// ---- models ------------------------------------------------------------------------------

sparrow_model_params sparrow_model_default_params(void) {
    sparrow_model_params p;
    p.vocab_only = false;
    p.use_mmap = true;
    p.progress_callback = nullptr;
    p.progress_user_data = nullptr;
    p.backend = nullptr;
    return p;
}

sparrow_status sparrow_model_load(const char * path, sparrow_model_params params, sparrow_model ** out_model) {
    return guard([&] {
        require(out_model != nullptr, "out_model is NULL");
        *out_model = nullptr;
        require(path != nullptr, "path is NULL");
        std::unique_ptr<sparrow_model> m(new sparrow_model());
        m->file = GGUFFile::open(path, params.use_mmap);
        m->release_mapped_pages = params.use_mmap;
        m->arch = m->file->get_string("general.architecture", "");
        const std::string backend = params.backend ? params.backend : default_backend_name();
        try {
            if (vision_supports_arch(m->arch)) {  // a vision tower + projector: no tokenizer either
                m->vision.reset(new VisionModel());
                vision_load(*m->file, *m->vision);
                model_weights(*m, backend);
                *out_model = m.release();
                return;
            }
            if (draft_supports_arch(m->arch)) {  // a draft: no tokenizer, it runs on its target's
                m->is_draft = true;
                draft_load(*m->file, m->draft_hparams, m->draft_weights);
                model_weights(*m, backend);
                *out_model = m.release();
                return;
            }
            m->tokenizer = Tokenizer::from_gguf(*m->file);
            m->vocab_only = params.vocab_only;
            if (!m->vocab_only) {
                if (m->file->tensors().empty()) {
                    fail(SPARROW_ERR_INVALID_ARGUMENT, "the file has no tensors (a vocab-only GGUF): load it with vocab_only");
                }
                if (!lm_supports_arch(m->arch)) {
                    fail(SPARROW_ERR_UNSUPPORTED, format("architecture '%s' is not supported (llama, qwen2 and qwen2vl are)",
                                                         m->arch.c_str()));
                }
                lm_load(*m->file, m->hparams, m->weights);
                if (m->tokenizer->n_vocab() > m->hparams.n_vocab) {
                    fail(SPARROW_ERR_FORMAT, format("the tokenizer has %d tokens but the embedding only %d rows",
                                                    m->tokenizer->n_vocab(), m->hparams.n_vocab));
                }
                // fault the pages in first (with progress), then pack: packing reads them once
                // more from memory and hands the packed matrices' pages back
                if (params.use_mmap) prefault(*m->file, params);
                model_weights(*m, backend);
            }
        } catch (const Error & e) {
            fail(e.status(), format("%s: %s", path, e.what()));
        }
        if (params.progress_callback && !params.progress_callback(1.0f, params.progress_user_data)) {
            fail(SPARROW_ERR_ABORTED, "loading cancelled by the progress callback");
        }
        *out_model = m.release();
    });
}

void sparrow_model_free(sparrow_model * model) { delete model; }

const char * sparrow_model_arch(const sparrow_model * model) { return model ? model->arch.c_str() : ""; }
int32_t sparrow_model_n_vocab(const sparrow_model * model) {
    if (!model) return 0;
    if (model->is_draft) return model->draft_hparams.n_vocab;
    return model->vocab_only ? model->tokenizer->n_vocab() : model->hparams.n_vocab;
}
int32_t sparrow_model_n_embd(const sparrow_model * model) {
    if (!model) return 0;
    return model->is_draft ? model->draft_hparams.n_embd : model->vocab_only ? 0 : model->hparams.n_embd;
}
int32_t sparrow_model_n_layer(const sparrow_model * model) {
    if (!model) return 0;
    return model->is_draft ? 1 : model->vocab_only ? 0 : model->hparams.n_layer;
}
int32_t sparrow_model_n_ctx_train(const sparrow_model * model) { return model && !model->vocab_only ? model->hparams.n_ctx_train : 0; }

sparrow_status sparrow_model_meta_string(const sparrow_model * model, const char * key, char * buf, size_t buf_size,
                                         size_t * out_len) {
    return guard([&] {
        const sparrow_model & m = model_of(model);
        require(key != nullptr, "key is NULL");
        const GGUFValue * v = m.file->find(key);
        if (!v || v->type != GGUFType::STRING) fail(SPARROW_ERR_INVALID_ARGUMENT, format("no string metadata '%s'", key));
        copy_out(v->str, buf, buf_size, out_len, true);
    });
}

sparrow_status sparrow_model_meta_floats(const sparrow_model * model, const char * key, float * out, int32_t n_max,
                                         int32_t * out_n) {
    return guard([&] {
        const sparrow_model & m = model_of(model);
        require(key != nullptr && out_n != nullptr && n_max >= 0 && (out != nullptr || n_max == 0), "bad arguments");
        const GGUFValue * v = m.file->find(key);
        if (!v) fail(SPARROW_ERR_INVALID_ARGUMENT, format("no metadata '%s'", key));
        std::vector<float> values;
        if (v->type == GGUFType::ARRAY) {
            if (v->array_type == GGUFType::FLOAT32 || v->array_type == GGUFType::FLOAT64) {
                values = m.file->get_float_array(key);
            } else {
                for (int64_t x : m.file->get_int_array(key)) values.push_back((float) x);
            }
        } else {
            values.push_back((float) m.file->get_float(key));
        }
        *out_n = (int32_t) values.size();
        std::copy(values.begin(), values.begin() + std::min<size_t>(values.size(), (size_t) n_max), out);
    });
}

int64_t sparrow_model_tensor_numel(const sparrow_model * model, const char * name) {
    if (!model || !name) return -1;
    const GGUFTensorInfo * t = model->file->find_tensor(name);
    return t ? t->numel() : -1;
}

sparrow_status sparrow_model_tensor_f32(const sparrow_model * model, const char * name, float * out, int64_t n_floats) {
    return guard([&] {
        const sparrow_model & m = model_of(model);
        require(name != nullptr && out != nullptr, "name or out is NULL");
        const GGUFTensorInfo * t = m.file->find_tensor(name);
        if (!t) fail(SPARROW_ERR_INVALID_ARGUMENT, format("no tensor '%s'", name));
        if (!type_traits(t->type)) fail(SPARROW_ERR_INVALID_ARGUMENT, format("tensor '%s' holds integers, not floats", name));
        if (n_floats != t->numel()) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("tensor '%s' has %lld elements, not %lld", name, (long long) t->numel(),
                                                      (long long) n_floats));
        }
        const int64_t rows = t->numel() / t->ne[0];
        const size_t rb = row_size((DType) t->type, t->ne[0]);
        for (int64_t r = 0; r < rows; ++r) {
            dequantize_row((DType) t->type, m.file->tensor_data(*t) + r * rb, out + r * t->ne[0], t->ne[0]);
        }
    });
}

// ---- tokenizer ---------------------------------------------------------------------------

sparrow_token sparrow_token_bos(const sparrow_model * model) { return model && model->tokenizer ? model->tokenizer->bos() : -1; }
sparrow_token sparrow_token_eos(const sparrow_model * model) { return model && model->tokenizer ? model->tokenizer->eos() : -1; }
sparrow_token sparrow_token_eot(const sparrow_model * model) { return model && model->tokenizer ? model->tokenizer->eot() : -1; }
bool sparrow_token_is_eog(const sparrow_model * model, sparrow_token token) {
    return model && model->tokenizer && model->tokenizer->is_eog(token);
}

sparrow_status sparrow_tokenize(const sparrow_model * model, const char * text, size_t text_len, bool add_special,
                                bool parse_special, sparrow_token * tokens, int32_t n_tokens_max, int32_t * n_out) {
    return guard([&] {
        const sparrow_model & m = model_of(model);
        require(text != nullptr || text_len == 0, "text is NULL");
        require(n_tokens_max >= 0, "n_tokens_max is negative");
        std::vector<int32_t> ids = tokenizer_of(m).encode(std::string_view(text ? text : "", text_len), add_special, parse_special);
        if (n_out) *n_out = (int32_t) ids.size();
        if ((int64_t) ids.size() > n_tokens_max) {
            fail(SPARROW_ERR_BUFFER_TOO_SMALL, format("%zu tokens do not fit in a buffer of %d", ids.size(), n_tokens_max));
        }
        require(tokens != nullptr || ids.empty(), "tokens is NULL");
        std::copy(ids.begin(), ids.end(), tokens);
    });
}

sparrow_status sparrow_token_to_piece(const sparrow_model * model, sparrow_token token, bool special, char * buf,
                                      size_t buf_size, size_t * out_len) {
    return guard([&] {
        const sparrow_model & m = model_of(model);
        copy_out(tokenizer_of(m).token_to_piece(token, special), buf, buf_size, out_len, false);
    });
}

sparrow_status sparrow_detokenize(const sparrow_model * model, const sparrow_token * tokens, int32_t n_tokens,
                                  bool special, char * buf, size_t buf_size, size_t * out_len) {
    return guard([&] {
        const sparrow_model & m = model_of(model);
        require(n_tokens >= 0 && (tokens != nullptr || n_tokens == 0), "bad token array");
        std::string text;
        const Tokenizer & tok = tokenizer_of(m);
        for (int32_t i = 0; i < n_tokens; ++i) text += tok.token_to_piece(tokens[i], special);
        copy_out(text, buf, buf_size, out_len, false);
    });
}

// ---- contexts ----------------------------------------------------------------------------

sparrow_context_params sparrow_context_default_params(void) {
    sparrow_context_params p;
    p.n_ctx = 0;
    p.n_batch = 256;
    p.n_threads = 0;
    p.kv_type = SPARROW_TYPE_F16;
    p.seed = 0x5EED;
    p.abort_callback = nullptr;
    p.abort_user_data = nullptr;
    p.backend = nullptr;
    return p;
}

sparrow_status sparrow_context_init(sparrow_model * model, sparrow_context_params params, sparrow_context ** out_ctx) {
    return guard([&] {
        require(out_ctx != nullptr, "out_ctx is NULL");
        *out_ctx = nullptr;
        const sparrow_model & m = model_of(model);
        require_weights(m);
        require(params.n_ctx >= 0, "n_ctx must be >= 0");
        require(params.n_batch >= 1 && params.n_batch <= 65536, "n_batch must be in [1, 65536]");
        require(params.n_threads >= 0 && params.n_threads <= 1024, "n_threads must be in [0, 1024]");
        require(params.kv_type == SPARROW_TYPE_F16 || params.kv_type == SPARROW_TYPE_F32,
                "kv_type must be SPARROW_TYPE_F16 or SPARROW_TYPE_F32");
        std::unique_ptr<sparrow_context> ctx(new sparrow_context());
        ctx->model = model;
        ctx->params = params;
        if (ctx->params.n_ctx == 0) ctx->params.n_ctx = std::min(m.hparams.n_ctx_train, 32768);
        const int n_threads = params.n_threads > 0 ? params.n_threads : (int) std::max(1u, std::thread::hardware_concurrency());
        ctx->params.n_threads = n_threads;
        ctx->params.n_batch = std::min(params.n_batch, ctx->params.n_ctx);
        const std::string backend = params.backend ? params.backend : default_backend_name();
        ctx->backend = make_backend(backend, n_threads);
        ctx->weights = model_weights(m, backend).lm.get();
        const LMHparams & hp = m.hparams;
        ctx->cache.reset(new KVCache(*ctx->backend, hp.n_layer, ctx->params.n_ctx, (int64_t) hp.n_head_kv * hp.head_dim,
                                     (DType) params.kv_type));
        lm_scratch_init(*ctx->backend, hp, ctx->params.n_batch, ctx->scratch);
        *out_ctx = ctx.release();
    });
}

void sparrow_context_free(sparrow_context * ctx) { delete ctx; }

int32_t sparrow_context_n_ctx(const sparrow_context * ctx) { return ctx ? ctx->params.n_ctx : 0; }

// Speculative draft entries at once: a tree expands at most top_k nodes per level.
constexpr int32_t kMaxSpeculativeEntries = 16 * 32;

sparrow_status sparrow_context_set_draft(sparrow_context * ctx, const sparrow_model * draft) {
    return guard([&] {
        CLAIM_CONTEXT(ctx);
        ctx->gen.active = false;
        ctx->spec.state.reset();
        ctx->spec.draft = nullptr;
        std::vector<float>().swap(ctx->spec.text_g);  // features and glimpses are the old draft's
        ctx->spec.g_rows = 0;
        ctx->spec.kept_n_visual = -1;
        if (!draft) return;
        if (!draft->is_draft) fail(SPARROW_ERR_INVALID_ARGUMENT, format("'%s' is not a draft model", draft->arch.c_str()));
        draft_check_fits(draft->draft_hparams, ctx->model->hparams);
        ctx->spec.state.reset(new DraftState(*ctx->backend, draft->draft_hparams,
                                             *model_weights(*draft, ctx->backend->name()).draft, *ctx->weights,
                                             ctx->params.n_ctx, kMaxSpeculativeEntries));
        ctx->spec.draft = draft;
        ctx->spec.policy.reset();  // acceptance and costs are the new draft's to learn
        ctx->spec.prefill_layers = draft->draft_hparams.taps;
        if (draft->draft_hparams.n_glimpses > 0) ctx->spec.prefill_layers.push_back(draft->draft_hparams.ivsb_layer + 1);
    });
}

// ---- forward passes ----------------------------------------------------------------------

sparrow_status sparrow_decode(sparrow_context * ctx, sparrow_batch batch) {
    return guard([&] {
        CLAIM_CONTEXT(ctx);
        require(batch.n_tokens > 0 && batch.tokens != nullptr, "the batch has no tokens");
        ctx->gen.active = false;  // a manual forward ends any generation in progress
        ForwardOptions opt;
        opt.pos = batch.pos;
        opt.outputs = batch.outputs;
        opt.parents = batch.parents;
        opt.seq_ids = batch.seq_ids;
        opt.capture_all_rows = batch.capture_all != 0;
        context_forward(*ctx, batch.tokens, batch.n_tokens, opt);
    });
}

const float * sparrow_get_logits(sparrow_context * ctx, int32_t i) {
    if (!ctx || i < 0 || i >= ctx->n_outputs) return nullptr;
    return ctx->logits.data() + (size_t) i * ctx->model->hparams.n_vocab;
}

int32_t sparrow_n_outputs(const sparrow_context * ctx) { return ctx ? ctx->n_outputs : 0; }

sparrow_status sparrow_set_capture_layers(sparrow_context * ctx, const int32_t * layers, int32_t n_layers) {
    return guard([&] {
        CLAIM_CONTEXT(ctx);
        require(n_layers >= 0 && (layers != nullptr || n_layers == 0), "bad layer list");
        for (int32_t i = 0; i < n_layers; ++i) {
            if (layers[i] < 0 || layers[i] > ctx->model->hparams.n_layer) {
                fail(SPARROW_ERR_INVALID_ARGUMENT, format("capture layer %d is outside [0, %d]", layers[i], ctx->model->hparams.n_layer));
            }
        }
        ctx->capture_layers.assign(layers, layers + n_layers);
        ctx->hidden.clear();
        ctx->n_outputs = 0;
        ctx->n_hidden_rows = 0;
    });
}

const float * sparrow_get_hidden(sparrow_context * ctx, int32_t k, int32_t i) {
    if (!ctx || k < 0 || k >= (int32_t) ctx->capture_layers.size() || i < 0 || i >= ctx->n_hidden_rows) return nullptr;
    const size_t H = ctx->model->hparams.n_embd;
    return ctx->hidden.data() + ((size_t) k * ctx->n_hidden_rows + i) * H;
}

int32_t sparrow_n_hidden_rows(const sparrow_context * ctx) { return ctx ? ctx->n_hidden_rows : 0; }

int32_t sparrow_kv_size(const sparrow_context * ctx) { return ctx ? (int32_t) ctx->cache->size() : 0; }

sparrow_status sparrow_kv_truncate(sparrow_context * ctx, int32_t n_keep) {
    return guard([&] {
        CLAIM_CONTEXT(ctx);
        if (n_keep < 0 || n_keep > ctx->cache->size()) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("n_keep %d is outside [0, %lld]", n_keep, (long long) ctx->cache->size()));
        }
        ctx->gen.active = false;
        context_truncate(*ctx, n_keep);
    });
}

sparrow_status sparrow_kv_compact(sparrow_context * ctx, int32_t n_keep, const int32_t * rows, int32_t n_rows) {
    return guard([&] {
        CLAIM_CONTEXT(ctx);
        const int64_t size = ctx->cache->size();
        if (n_keep < 0 || n_keep > size) fail(SPARROW_ERR_INVALID_ARGUMENT, format("n_keep %d is outside [0, %lld]", n_keep, (long long) size));
        require(n_rows >= 0 && (rows != nullptr || n_rows == 0), "bad row list");
        std::vector<int32_t> dst((size_t) n_rows);
        for (int32_t i = 0; i < n_rows; ++i) {
            if (rows[i] < n_keep || rows[i] >= size || (i > 0 && rows[i] <= rows[i - 1])) {
                fail(SPARROW_ERR_INVALID_ARGUMENT, format("rows must increase within [n_keep, %lld): rows[%d] = %d", (long long) size, i, rows[i]));
            }
            dst[i] = n_keep + i;
        }
        ctx->gen.active = false;
        context_move_rows(*ctx, rows, dst.data(), n_rows);
        context_truncate(*ctx, n_keep + n_rows);
    });
}

// ---- generation --------------------------------------------------------------------------

sparrow_sampler_params sparrow_sampler_default_params(void) {
    sparrow_sampler_params p;
    p.temperature = 0.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.seed = 0;
    return p;
}

sparrow_generate_params sparrow_generate_default_params(void) {
    sparrow_generate_params p;
    p.max_tokens = 256;
    p.sampling = sparrow_sampler_default_params();
    p.stop = nullptr;
    p.n_stop = 0;
    p.ignore_eog = false;
    p.speculative = -1;  // chain when a draft is attached, none otherwise
    p.n_draft = 4;
    p.draft_p_min = 0.0f;
    p.tree_depth = 5;
    p.tree_top_k = 4;
    p.tree_total_tokens = 24;
    p.adaptive = true;
    p.progress_callback = nullptr;
    p.progress_user_data = nullptr;
    return p;
}

sparrow_status sparrow_generate_begin(sparrow_context * ctx, const sparrow_token * prompt, int32_t n_prompt,
                                      sparrow_generate_params params) {
    return guard([&] {
        CLAIM_CONTEXT(ctx);
        generation_begin(*ctx, prompt, n_prompt, nullptr, 0, params);
    });
}

sparrow_status sparrow_generate_begin_media(sparrow_context * ctx, const sparrow_token * prompt, int32_t n_prompt,
                                            const sparrow_media * media, int32_t n_media, sparrow_generate_params params) {
    return guard([&] {
        require(n_media >= 0 && (media != nullptr || n_media == 0), "bad media list");
        CLAIM_CONTEXT(ctx);
        generation_begin(*ctx, prompt, n_prompt, media, n_media, params);
    });
}

sparrow_status sparrow_generate_next(sparrow_context * ctx, char * buf, size_t buf_size, size_t * out_len,
                                     int32_t * out_finish, sparrow_token * out_token) {
    return guard([&] {
        CLAIM_CONTEXT(ctx);
        generation_next(*ctx, buf, buf_size, out_len, out_finish, out_token);
    });
}

sparrow_status sparrow_generated_tokens(const sparrow_context * ctx, const sparrow_token ** out_tokens, int32_t * out_n) {
    return guard([&] {
        CLAIM_CONTEXT(ctx);
        require(out_tokens != nullptr && out_n != nullptr, "an output is NULL");
        *out_tokens = ctx->generated.data();
        *out_n = (int32_t) ctx->generated.size();
    });
}

sparrow_status sparrow_get_stats(const sparrow_context * ctx, sparrow_stats * out) {
    return guard([&] {
        CLAIM_CONTEXT(ctx);
        require(out != nullptr, "out is NULL");
        *out = ctx->stats;
    });
}

sparrow_status sparrow_get_glimpses(const sparrow_context * ctx, float * pooled, int32_t * pos, int32_t max,
                                    int32_t * n_out) {
    return guard([&] {
        CLAIM_CONTEXT(ctx);
        require(n_out != nullptr, "n_out is NULL");
        require(max >= 0, "max must be >= 0");
        const auto & s = ctx->spec;
        const int32_t n = (int32_t) s.glimpse_pos.size();
        const size_t H = (size_t) ctx->model->hparams.n_embd;
        const int32_t copy = std::min(n, max);
        if (pooled && copy > 0) std::memcpy(pooled, s.glimpse_sum.data(), (size_t) copy * H * sizeof(float));
        if (pos && copy > 0) std::memcpy(pos, s.glimpse_pos.data(), (size_t) copy * sizeof(int32_t));
        *n_out = n;
    });
}

// ---- draft sessions ----------------------------------------------------------------------

struct sparrow_draft_session {
    const sparrow_model * target = nullptr;
    const sparrow_model * draft = nullptr;
    std::unique_ptr<Backend> backend;
    std::unique_ptr<DraftState> state;
    std::atomic<bool> in_use{false};  // CallClaim
};

#define CLAIM_SESSION(session)                      \
    require((session) != nullptr, "session is NULL"); \
    CallClaim claim_((session)->in_use, "draft session")

sparrow_status sparrow_draft_session_init(const sparrow_model * target, const sparrow_model * draft, int32_t n_ctx,
                                          int32_t n_threads, sparrow_draft_session ** out) {
    return guard([&] {
        require(out != nullptr, "out is NULL");
        *out = nullptr;
        const sparrow_model & t = model_of(target);
        const sparrow_model & d = model_of(draft);
        require_weights(t);
        if (!d.is_draft) fail(SPARROW_ERR_INVALID_ARGUMENT, format("'%s' is not a draft model", d.arch.c_str()));
        require(n_ctx > 0 && n_ctx <= (1 << 24), "n_ctx must be in [1, 2^24]");
        require(n_threads >= 0 && n_threads <= 1024, "n_threads must be in [0, 1024]");
        draft_check_fits(d.draft_hparams, t.hparams);
        std::unique_ptr<sparrow_draft_session> s(new sparrow_draft_session());
        s->target = target;
        s->draft = draft;
        const std::string backend = default_backend_name();
        s->backend = make_backend(backend, n_threads > 0 ? n_threads : (int) std::max(1u, std::thread::hardware_concurrency()));
        s->state.reset(new DraftState(*s->backend, d.draft_hparams, *model_weights(d, backend).draft, *model_weights(t, backend).lm,
                                      n_ctx, kMaxSpeculativeEntries));
        *out = s.release();
    });
}

void sparrow_draft_session_free(sparrow_draft_session * session) { delete session; }

sparrow_status sparrow_draft_session_reset(sparrow_draft_session * session, int32_t anchor_start) {
    return guard([&] {
        CLAIM_SESSION(session);
        require(anchor_start >= 0, "anchor_start must be >= 0");
        session->state->reset(anchor_start);
    });
}

sparrow_status sparrow_draft_fuse_taps(sparrow_draft_session * session, const float * taps, int32_t n, float * g_out) {
    return guard([&] {
        CLAIM_SESSION(session);
        require(taps != nullptr && g_out != nullptr && n > 0, "bad arguments");
        const int64_t H = session->draft->draft_hparams.n_embd, nT = (int64_t) session->draft->draft_hparams.taps.size();
        // row-major [n][nT*H] -> the capture-slot-major layout the loop produces
        std::vector<float> slot_major((size_t) (n * nT * H));
        for (int64_t i = 0; i < n; ++i) {
            for (int64_t t = 0; t < nT; ++t) memcpy(&slot_major[(size_t) ((t * n + i) * H)], taps + (i * nT + t) * H, H * sizeof(float));
        }
        session->state->fuse_taps(slot_major.data(), n, g_out);
    });
}

sparrow_status sparrow_draft_add_glimpses(sparrow_draft_session * session, const float * pooled, const int32_t * pos, int32_t n) {
    return guard([&] {
        CLAIM_SESSION(session);
        require(n >= 0 && (n == 0 || (pooled != nullptr && pos != nullptr)), "bad arguments");
        session->state->add_glimpses(pooled, pos, n);
    });
}

sparrow_status sparrow_draft_run(sparrow_draft_session * session, const sparrow_token * tokens, const float * g,
                                 const int32_t * pos, const int32_t * parents, int32_t n, float * h_out, float * logits_out) {
    return guard([&] {
        CLAIM_SESSION(session);
        require(tokens != nullptr && g != nullptr && pos != nullptr && h_out != nullptr && n > 0,
                "bad arguments");
        DraftState & st = *session->state;
        const int32_t n_vocab = session->target->hparams.n_vocab;
        std::vector<DraftEntry> entries((size_t) n);
        int64_t n_spec = st.n_speculative();
        for (int32_t i = 0; i < n; ++i) {
            if (tokens[i] < 0 || tokens[i] >= n_vocab) fail(SPARROW_ERR_INVALID_ARGUMENT, format("token %d is outside the vocabulary", tokens[i]));
            entries[i].token = tokens[i];
            entries[i].pos = pos[i];
            const int32_t p = parents ? parents[i] : -2;
            if (p == -2) {
                if (n_spec > 0) fail(SPARROW_ERR_STATE, "committed entries must come before speculative ones: drop them first");
            } else {
                if (p < -1 || p >= n_spec) fail(SPARROW_ERR_INVALID_ARGUMENT, format("parents[%d] = %d is not an earlier speculative entry", i, p));
                if (n_spec >= kMaxSpeculativeEntries) fail(SPARROW_ERR_INVALID_ARGUMENT, "too many speculative entries");
                entries[i].speculative = true;
                entries[i].parent = p;
                ++n_spec;
            }
        }
        std::vector<uint8_t> want((size_t) n, logits_out ? 1 : 0);
        st.run(entries.data(), n, g, want.data(), h_out, logits_out);
    });
}

sparrow_status sparrow_draft_drop_speculative(sparrow_draft_session * session) {
    return guard([&] {
        CLAIM_SESSION(session);
        session->state->drop_speculative();
    });
}

int32_t sparrow_draft_n_vocab(const sparrow_draft_session * session) { return session ? session->state->n_logits() : 0; }
int32_t sparrow_draft_kv_entries(const sparrow_draft_session * session) {
    return session ? (int32_t) session->state->n_kv_entries() : 0;
}
