/*
 * sparrow.h - the public C API of the Sparrow runtime.
 *
 * This header is the only boundary between the runtime and the world: the CLI, the Python
 * bindings (whose cffi declarations are generated from the block between SPARROW_CDEF_BEGIN and
 * SPARROW_CDEF_END below) and any desktop app embedding Sparrow use nothing else.
 *
 * Conventions
 *   - Every fallible call returns a sparrow_status. SPARROW_OK is 0; errors are negative.
 *     On error, sparrow_last_error() returns a human-readable message for the calling thread.
 *   - Objects are opaque handles created by *_load / *_init and released by the matching *_free.
 *     *_free accepts NULL.
 *   - Parameter structs come from *_default_params() by value; change only what you need.
 *   - The runtime never aborts, exits or prints to stdout on bad input.
 *
 * Thread safety
 *   - A sparrow_model is immutable once loaded: any number of contexts, on any threads, may share
 *     it. Free it only after every context created from it has been freed.
 *   - A sparrow_context serves one thread at a time (callers serialise access). A call made
 *     while another call is inside the same context (from another thread, or from its abort
 *     callback) fails with SPARROW_ERR_STATE; it is not queued. Contexts are independent of
 *     each other: one context per thread runs in parallel. Draft sessions likewise.
 *   - sparrow_last_error() is thread-local: it reports the last failure on the calling thread.
 *   - The tokenizer functions only read the model and may be called from any thread.
 *
 * Apps with a UI
 *   Long calls (a vision encode, the first sparrow_generate_next of a long video prompt) run on a
 *   worker thread; the UI thread never calls into the runtime while they run. What it gets:
 *   - Cancel: every long call takes an abort callback (sparrow_context_params.abort_callback,
 *     sparrow_vision_params.abort_callback), which the runtime calls on the worker thread between
 *     layers. To cancel from the UI thread, set an atomic flag there and have the callback return
 *     it: the call then fails with SPARROW_ERR_ABORTED within one layer's time.
 *   - Progress: sparrow_vision_params.progress_callback and sparrow_generate_params.
 *     progress_callback report the fraction done, rising to exactly 1, on the worker thread; the
 *     app hands the number to its UI thread (a queued signal, a message) and returns at once.
 *   - Live statistics: after each piece sparrow_generate_next returns, sparrow_get_stats on the
 *     same thread reads the statistics so far (accepted length, drafted/accepted, tokens/s).
 *   Callbacks must not call into the object running them (SPARROW_ERR_STATE).
 */
#ifndef SPARROW_H
#define SPARROW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(SPARROW_BUILD)
#define SPARROW_API __declspec(dllexport)
#elif defined(_WIN32)
#define SPARROW_API __declspec(dllimport)
#elif defined(__GNUC__)
#define SPARROW_API __attribute__((visibility("default")))
#else
#define SPARROW_API
#endif

/* The version of this header. sparrow_version() returns the library's own, which differs when an
 * app runs with another build than the one it was compiled against. These lines are the project's
 * one record of its version: CMake reads them (the soname, find_package and pkg-config versions). */
#define SPARROW_VERSION_MAJOR 0
#define SPARROW_VERSION_MINOR 1
#define SPARROW_VERSION_PATCH 0
#define SPARROW_VERSION_STRING_(major, minor, patch) #major "." #minor "." #patch
#define SPARROW_VERSION_STRING_X_(major, minor, patch) SPARROW_VERSION_STRING_(major, minor, patch)
#define SPARROW_VERSION_STRING \
    SPARROW_VERSION_STRING_X_(SPARROW_VERSION_MAJOR, SPARROW_VERSION_MINOR, SPARROW_VERSION_PATCH)

#ifdef __cplusplus
extern "C" {
#endif

/* SPARROW_CDEF_BEGIN (the cffi bindings parse from here to SPARROW_CDEF_END: plain C only) */

/* ---- status codes ---------------------------------------------------------------------- */
typedef int32_t sparrow_status;

enum {
    SPARROW_OK                  =  0,
    SPARROW_ERR_INVALID_ARGUMENT = -1,  /* a NULL handle, a value out of range, bad UTF-8 ...  */
    SPARROW_ERR_IO              = -2,  /* a file could not be opened, mapped or read           */
    SPARROW_ERR_FORMAT          = -3,  /* a file is malformed (truncated, corrupted, hostile)  */
    SPARROW_ERR_UNSUPPORTED     = -4,  /* a valid file uses an arch/type/vocab we do not run   */
    SPARROW_ERR_OUT_OF_MEMORY   = -5,
    SPARROW_ERR_CONTEXT_FULL    = -6,  /* the tokens do not fit in the context window          */
    SPARROW_ERR_ABORTED         = -7,  /* a progress or abort callback asked to stop           */
    SPARROW_ERR_BUFFER_TOO_SMALL = -8, /* the output buffer is too small; the size is reported */
    SPARROW_ERR_STATE           = -9,  /* the call is not valid in the object's current state  */
    SPARROW_ERR_INTERNAL        = -10
};

/* The message for the last failed call on this thread ("" if none). Valid until the next call. */
SPARROW_API const char * sparrow_last_error(void);
/* A short constant name for a status code, e.g. "SPARROW_ERR_FORMAT". */
SPARROW_API const char * sparrow_status_name(sparrow_status status);
/* The library's version, e.g. "0.1.0" (SPARROW_VERSION_STRING when it matches this header), and a
 * description of the compiled backends / CPU features. */
SPARROW_API const char * sparrow_version(void);
SPARROW_API const char * sparrow_system_info(void);

typedef int32_t sparrow_token;

/* Tensor types, numbered as ggml numbers them (the values appear in GGUF files). */
enum {
    SPARROW_TYPE_F32  = 0,
    SPARROW_TYPE_F16  = 1,
    SPARROW_TYPE_Q4_0 = 2,
    SPARROW_TYPE_Q4_1 = 3,
    SPARROW_TYPE_Q8_0 = 8,
    SPARROW_TYPE_Q4_K = 12,
    SPARROW_TYPE_Q5_K = 13,
    SPARROW_TYPE_Q6_K = 14,
    SPARROW_TYPE_BF16 = 30
};

/* ---- models ---------------------------------------------------------------------------- */
typedef struct sparrow_model sparrow_model;

/* Called during loading with progress in [0, 1]; return false to cancel (SPARROW_ERR_ABORTED). */
typedef bool (*sparrow_progress_callback)(float progress, void * user_data);

typedef struct sparrow_model_params {
    bool vocab_only;                        /* load only the tokenizer (vocab-only GGUFs)   */
    bool use_mmap;                          /* map the file instead of reading it (default) */
    sparrow_progress_callback progress_callback;
    void * progress_user_data;
    /* The backend whose memory the weights are prepared in at load: the one the model's contexts
     * will name (sparrow_context_params.backend). NULL: $SPARROW_BACKEND, else "cpu". A context on
     * another backend still works: it prepares that backend's copy on its first use. */
    const char * backend;
} sparrow_model_params;

SPARROW_API sparrow_model_params sparrow_model_default_params(void);
SPARROW_API sparrow_status sparrow_model_load(const char * path, sparrow_model_params params,
                                              sparrow_model ** out_model);
SPARROW_API void sparrow_model_free(sparrow_model * model);

/* general.architecture, e.g. "qwen2". */
SPARROW_API const char * sparrow_model_arch(const sparrow_model * model);
SPARROW_API int32_t sparrow_model_n_vocab(const sparrow_model * model);
SPARROW_API int32_t sparrow_model_n_embd(const sparrow_model * model);    /* 0 if vocab-only */
SPARROW_API int32_t sparrow_model_n_layer(const sparrow_model * model);   /* 0 if vocab-only */
SPARROW_API int32_t sparrow_model_n_ctx_train(const sparrow_model * model);

/* A string-valued metadata entry (e.g. "tokenizer.chat_template") copied into buf with a NUL.
 * *out_len receives the length without the NUL. SPARROW_ERR_INVALID_ARGUMENT if the key is
 * missing or not a string; SPARROW_ERR_BUFFER_TOO_SMALL if buf cannot hold it. */
SPARROW_API sparrow_status sparrow_model_meta_string(const sparrow_model * model, const char * key,
                                                     char * buf, size_t buf_size, size_t * out_len);

/* A numeric metadata entry (a number or an array of numbers, e.g. "clip.vision.image_mean") as
 * floats: up to n_max values written, *out_n receives how many the entry has.
 * SPARROW_ERR_INVALID_ARGUMENT if the key is missing or not numeric. */
SPARROW_API sparrow_status sparrow_model_meta_floats(const sparrow_model * model, const char * key, float * out,
                                                     int32_t n_max, int32_t * out_n);

/* Dequantize a weight tensor to float32 (for inspection and tests). n_floats must equal the
 * tensor's element count, which sparrow_model_tensor_numel reports (-1 if there is no such
 * tensor). */
SPARROW_API int64_t sparrow_model_tensor_numel(const sparrow_model * model, const char * name);
SPARROW_API sparrow_status sparrow_model_tensor_f32(const sparrow_model * model, const char * name,
                                                    float * out, int64_t n_floats);

/* ---- tokenizer ------------------------------------------------------------------------- */
/* Special tokens; -1 when the model has none. */
SPARROW_API sparrow_token sparrow_token_bos(const sparrow_model * model);
SPARROW_API sparrow_token sparrow_token_eos(const sparrow_model * model);
SPARROW_API sparrow_token sparrow_token_eot(const sparrow_model * model);
/* True for tokens that end generation (eos, eot and other end-of-generation tokens). */
SPARROW_API bool sparrow_token_is_eog(const sparrow_model * model, sparrow_token token);

/* Tokenize UTF-8 text. add_special: prepend BOS where the model asks for it.
 * parse_special: recognise special tokens written in the text (e.g. "<|im_start|>").
 * On SPARROW_ERR_BUFFER_TOO_SMALL, *n_out holds the number of tokens needed. */
SPARROW_API sparrow_status sparrow_tokenize(const sparrow_model * model, const char * text,
                                            size_t text_len, bool add_special, bool parse_special,
                                            sparrow_token * tokens, int32_t n_tokens_max,
                                            int32_t * n_out);

/* The raw bytes of one token (may be part of a UTF-8 character). special: render control
 * tokens as their text instead of nothing. On SPARROW_ERR_BUFFER_TOO_SMALL *out_len holds the
 * size needed. No NUL is written. */
SPARROW_API sparrow_status sparrow_token_to_piece(const sparrow_model * model, sparrow_token token,
                                                  bool special, char * buf, size_t buf_size,
                                                  size_t * out_len);

/* Bytes of a token sequence, concatenated (no NUL). Same size protocol as above. */
SPARROW_API sparrow_status sparrow_detokenize(const sparrow_model * model,
                                              const sparrow_token * tokens, int32_t n_tokens,
                                              bool special, char * buf, size_t buf_size,
                                              size_t * out_len);

/* ---- contexts -------------------------------------------------------------------------- */
typedef struct sparrow_context sparrow_context;

/* Called between steps of long work (before each layer of every forward pass, so also during
 * decoding); return true to abort the current call with SPARROW_ERR_ABORTED. It runs on the
 * thread inside the call; to cancel from another thread (a UI's Stop button), have it return a
 * flag that thread sets (an atomic: it is read while the other thread writes it). The context
 * stays usable: the KV cache keeps the prompt chunks that were complete. An aborted
 * sparrow_generate_next ends its generation (sparrow_generate_next then fails with
 * SPARROW_ERR_STATE; the tokens produced before stay readable); begin a new one to continue. */
typedef bool (*sparrow_abort_callback)(void * user_data);

typedef struct sparrow_context_params {
    int32_t n_ctx;          /* context window in tokens; 0 = the model's training context     */
    int32_t n_batch;        /* most tokens one forward pass processes; longer prompts chunk   */
    int32_t n_threads;      /* CPU threads; 0 = all available cores                           */
    int32_t kv_type;        /* SPARROW_TYPE_F16 (default) or SPARROW_TYPE_F32                  */
    uint64_t seed;          /* default sampling seed                                           */
    sparrow_abort_callback abort_callback;
    void * abort_user_data;
    /* Which backend runs the context: "cpu", or "ref" (plain scalar code whose memory faults on
     * any access from outside its own ops: a check that the runtime would run on a device, and
     * slow). NULL = the SPARROW_BACKEND environment variable if set, else "cpu". The model's
     * weights are copied into the backend's memory on its first context there. */
    const char * backend;
} sparrow_context_params;

SPARROW_API sparrow_context_params sparrow_context_default_params(void);
SPARROW_API sparrow_status sparrow_context_init(sparrow_model * model, sparrow_context_params params,
                                                sparrow_context ** out_ctx);
SPARROW_API void sparrow_context_free(sparrow_context * ctx);
SPARROW_API int32_t sparrow_context_n_ctx(const sparrow_context * ctx);

/* Attach a draft model (a "sparrow-draft" GGUF loaded with sparrow_model_load) for speculative
 * decoding; NULL detaches. A draft made for another target (architecture, hidden size,
 * vocabulary, layer count) is refused with SPARROW_ERR_INVALID_ARGUMENT. The draft model must
 * outlive the context (or be detached first). */
SPARROW_API sparrow_status sparrow_context_set_draft(sparrow_context * ctx, const sparrow_model * draft);

/* ---- low-level forward passes ---------------------------------------------------------- */
/* One forward pass over n_tokens tokens appended to the KV cache.
 *   pos:     position of each token; NULL means consecutive positions after the cache (for a
 *            tree: the position after the cache plus the token's depth in the tree).
 *   outputs: non-zero for each token whose logits (and captured hidden states) are wanted;
 *            NULL means the last token only.
 *   parents: NULL for a sequence (each token sees the cache and the tokens before it). For a
 *            token tree, as speculative verification feeds one: parents[i] is the batch index of
 *            token i's parent (< i), or -1 for a root; a token sees the cache before the batch,
 *            its ancestors and itself. A tree must fit in one forward pass (n_batch tokens).
 *   seq_ids: NULL puts every token in sequence 0. Otherwise the sequence (>= 0) of each token:
 *            one context then holds several independent sequences, interleaved in its cache,
 *            and a token sees only the cache rows and the earlier batch tokens of its own
 *            sequence. So one forward pass advances many sequences (batched generation: the
 *            weights are read once for all of them), and each gets the same logits, bit for
 *            bit, as when decoded alone. With pos NULL a token takes the position after the
 *            last one of its sequence. Not with parents. sparrow_generate_begin keeps cached
 *            rows of sequence 0 only.
 *   capture_all: non-zero captures hidden states (sparrow_set_capture_layers) at every token
 *            of the batch, not only at the output rows; sparrow_get_hidden's i is then the
 *            token's index in the batch. (Featurizing a text for training wants every row's
 *            states and no logits: the head over every row is a fifth of a small model's work.)
 * Results stay valid until the next forward pass on the context. */
typedef struct sparrow_batch {
    const sparrow_token * tokens;
    int32_t n_tokens;
    const int32_t * pos;
    const int8_t * outputs;
    const int32_t * parents;
    const int32_t * seq_ids;
    int8_t capture_all;
} sparrow_batch;

SPARROW_API sparrow_status sparrow_decode(sparrow_context * ctx, sparrow_batch batch);

/* Logits (n_vocab floats) of the i-th output row of the last forward (rows are counted in the
 * order of the tokens flagged in `outputs`). NULL if i is out of range. */
SPARROW_API const float * sparrow_get_logits(sparrow_context * ctx, int32_t i);
SPARROW_API int32_t sparrow_n_outputs(const sparrow_context * ctx);

/* Hidden-state capture, for speculative decoding and inspection. Layer index l captures the
 * input of transformer layer l; l == n_layer captures the final hidden state before the
 * output norm. Captured at output rows only. Pass n_layers = 0 to stop capturing. */
SPARROW_API sparrow_status sparrow_set_capture_layers(sparrow_context * ctx, const int32_t * layers,
                                                      int32_t n_layers);
/* n_embd floats: capture slot k (index into the list given above) at output row i (with
 * capture_all: at batch token i). NULL if i is out of range. */
SPARROW_API const float * sparrow_get_hidden(sparrow_context * ctx, int32_t k, int32_t i);
/* Rows of captured hidden states the last forward pass left per capture slot. */
SPARROW_API int32_t sparrow_n_hidden_rows(const sparrow_context * ctx);

/* Number of tokens in the KV cache, and rollback to the first n_keep of them. */
SPARROW_API int32_t sparrow_kv_size(const sparrow_context * ctx);
SPARROW_API sparrow_status sparrow_kv_truncate(sparrow_context * ctx, int32_t n_keep);
/* Keep the first n_keep cache rows, then the rows listed (increasing, all >= n_keep) moved
 * down to follow them in order; drop the rest. After a tree verification this keeps the
 * accepted path, so the cache is what a plain prefill of the accepted tokens would give. */
SPARROW_API sparrow_status sparrow_kv_compact(sparrow_context * ctx, int32_t n_keep, const int32_t * rows,
                                              int32_t n_rows);

/* ---- sampling and generation ----------------------------------------------------------- */
typedef struct sparrow_sampler_params {
    float temperature;      /* 0 = greedy                                                    */
    int32_t top_k;          /* 0 = off                                                       */
    float top_p;            /* 1 = off                                                       */
    float min_p;            /* 0 = off                                                       */
    uint64_t seed;          /* 0 = the context's seed                                        */
} sparrow_sampler_params;

SPARROW_API sparrow_sampler_params sparrow_sampler_default_params(void);

enum {
    SPARROW_FINISH_NONE   = 0,  /* more pieces follow                          */
    SPARROW_FINISH_EOG    = 1,  /* the model emitted an end-of-generation token */
    SPARROW_FINISH_LENGTH = 2,  /* max_tokens reached                          */
    SPARROW_FINISH_STOP   = 3,  /* a stop string matched (it is not returned)  */
    SPARROW_FINISH_CONTEXT = 4  /* the context window is full                  */
};

/* Speculative decoding modes (need a draft attached with sparrow_context_set_draft). */
enum {
    SPARROW_SPEC_NONE  = 0,  /* plain autoregressive decoding                            */
    SPARROW_SPEC_CHAIN = 1,  /* the draft proposes n_draft tokens, the target verifies them */
    SPARROW_SPEC_TREE  = 2   /* EAGLE-2 dynamic tree: tree_depth levels, tree_top_k children per
                                expanded node, the tree_total_tokens best verified at once      */
};

typedef struct sparrow_generate_params {
    int32_t max_tokens;                 /* < 0: until EOG or the context is full          */
    sparrow_sampler_params sampling;
    const char * const * stop;          /* stop strings (UTF-8), n_stop of them            */
    int32_t n_stop;
    bool ignore_eog;                    /* keep going past end-of-generation tokens        */
    int32_t speculative;                /* SPARROW_SPEC_*; default CHAIN when a draft is attached */
    int32_t n_draft;                    /* tokens drafted per verification (chain), 1..32  */
    float draft_p_min;                  /* chain: stop drafting a round before a token (after its
                                           first) whose draft distribution's likeliest token has a
                                           probability below this (llama.cpp's --draft-p-min), in
                                           the distribution the draft draws from: the softmax of its
                                           logits when greedy, the sampler's when sampling. 0..1,
                                           default 0 (off); adaptive chains also stop where the
                                           draft's confidence no longer pays (spec-policy.h)   */
    int32_t tree_depth;                 /* tree: levels drafted, 1..32                    */
    int32_t tree_top_k;                 /* tree: children per expanded node, 1..16        */
    int32_t tree_total_tokens;          /* tree: tokens verified per target forward (at most,
                                           when adaptive), 2..128                          */
    bool adaptive;                      /* speculation adapts to this machine and this text (default
                                           true): each chain round drafts the number of tokens, up
                                           to n_draft, that maximizes the expected tokens per second
                                           from measured costs and the running acceptance by depth;
                                           0 (a plain decode step) when speculation does not pay.
                                           Tree rounds likewise verify the number of best nodes
                                           that pays most (measured for every size at once), or
                                           give way to plain steps. false: always n_draft (or the
                                           whole tree) */
    /* Progress of the prompt's prefill (a long video takes a while): called after each chunk of
     * n_batch prompt tokens the target has run, with the fraction of the prompt done (tokens reused
     * from the KV cache count as done), non-decreasing, the last call with exactly 1 once the
     * first token is ready (also for a prompt of one chunk). On the thread calling
     * sparrow_generate_next (the first call of a generation runs the prompt); return false to stop
     * with SPARROW_ERR_ABORTED, as the abort callback. NULL (default): none. */
    sparrow_progress_callback progress_callback;
    void * progress_user_data;
} sparrow_generate_params;

SPARROW_API sparrow_generate_params sparrow_generate_default_params(void);

/* Start generating after a prompt. The KV cache keeps its longest common prefix with the
 * prompt, so follow-up prompts that extend the previous text skip work. The prompt is
 * processed by the first sparrow_generate_next call. The stop strings are copied.
 * Rows are compared by token, or for media rows by their embeddings, and by position, so a
 * follow-up about the same image or video keeps its rows too. Speculative generations keep the
 * prefix up to the last row that a speculative generation on this context (with this draft)
 * produced or prefilled, visual rows only if the prompt adds none: the draft is rebuilt from
 * stored features exactly as a fresh prefill would build it. */
SPARROW_API sparrow_status sparrow_generate_begin(sparrow_context * ctx, const sparrow_token * prompt,
                                                  int32_t n_prompt, sparrow_generate_params params);

/* Multimodal prompts. A prompt token equal to SPARROW_MEDIA_TOKEN stands for one visual token;
 * each run of them takes the embeddings of the next media item (sparrow_vision_encode's
 * output), runs and items in order, lengths equal. */
enum { SPARROW_MEDIA_TOKEN = -1 };

typedef struct sparrow_media {
    const float * embd;         /* n_tokens x n_embd (copied by sparrow_generate_begin_media)   */
    int32_t n_tokens;
    int32_t grid_t, grid_h, grid_w; /* the item's token grid in the LM (after the 2x2 merge):
                                       M-RoPE positions; ignored by models with 1-D positions  */
    float t_scale;              /* temporal position step per grid frame: Qwen2.5-VL
                                   second_per_grid_t * tokens_per_second; Qwen2-VL and images 1 */
    sparrow_token placeholder;  /* the token id the model's own prompts use here (e.g. the
                                   video pad token): the draft reads it after the text before */
} sparrow_media;

/* sparrow_generate_begin for a prompt with media. Positions follow the model: M-RoPE as
 * transformers' get_rope_index computes them (text after an item continues from its largest
 * position + 1), 1-D otherwise. The KV cache keeps the rows such a prompt shares with it. */
SPARROW_API sparrow_status sparrow_generate_begin_media(sparrow_context * ctx, const sparrow_token * prompt,
                                                        int32_t n_prompt, const sparrow_media * media, int32_t n_media,
                                                        sparrow_generate_params params);

/* Produce the next piece of text: valid UTF-8 (never a split character), copied into buf
 * (no NUL), its length in *out_len; *out_finish is SPARROW_FINISH_NONE while more follows.
 * A piece may be empty when a token completes nothing yet. buf_size must be at least 256.
 * *out_token receives the last token sampled (may be NULL). */
SPARROW_API sparrow_status sparrow_generate_next(sparrow_context * ctx, char * buf, size_t buf_size,
                                                 size_t * out_len, int32_t * out_finish,
                                                 sparrow_token * out_token);

/* Statistics of the current/last generation. Every sparrow_generate_next updates them, so an
 * app reads the figures so far after each piece (on the generating thread, between calls):
 * n_generated counts the tokens behind the pieces returned, n_accepted <= n_drafted,
 * mean_accepted_length and decode_tokens_per_s are the running values (0 until a decode step). */
typedef struct sparrow_stats {
    int32_t n_prompt;           /* prompt tokens                                              */
    int32_t n_prompt_cached;    /* of which reused from the KV cache                          */
    int32_t n_generated;        /* tokens produced                                            */
    int32_t n_target_forwards;  /* target forward passes after the prompt (decode or verify)  */
    double t_prefill_ms;
    double t_decode_ms;         /* everything after the prompt: drafting + verification       */
    double prefill_tokens_per_s;
    double decode_tokens_per_s; /* tokens produced per second after the prompt                */
    /* speculative decoding */
    int32_t n_drafted;          /* draft tokens proposed                                      */
    int32_t n_accepted;         /* of which the target accepted                               */
    double mean_accepted_length;/* tokens per target forward, the bonus token included        */
    int32_t accepted_by_depth[32]; /* drafts accepted at depth d+1                             */
    int32_t drafted_by_depth[32];  /* drafts proposed at depth d+1                             */
    double t_draft_ms;
    double t_verify_ms;
    int32_t draft_kv_entries;   /* draft KV entries in use (at most G + S + W + the chain)    */
    int32_t n_draft_rounds[33]; /* rounds by the tokens drafted in them (a tree round: the nodes
                                   it verified; capped at 32); [0]: plain decode steps (what
                                   adaptive speculation chose, or the first step, which measures
                                   a decode)                                                  */
    int32_t n_tree_rounds;      /* tree rounds                                                */
} sparrow_stats;

SPARROW_API sparrow_status sparrow_get_stats(const sparrow_context * ctx, sparrow_stats * out);

/* The glimpses the last speculative generation handed its draft (IVSB): each the mean of the
 * target's ivsb-layer outputs over one contiguous segment of the prompt's visual tokens, before
 * the draft's glimpse_proj, at the position of the segment's first visual token (the temporal
 * stream with M-RoPE). *n_out receives the count (0: no visual tokens, or a draft without
 * glimpses); up to max of them are copied to pooled [max][n_embd] and pos [max], either of which
 * may be NULL. For inspection and tests. */
SPARROW_API sparrow_status sparrow_get_glimpses(const sparrow_context * ctx, float * pooled, int32_t * pos,
                                                int32_t max, int32_t * n_out);

/* ---- running a draft on its own (evaluation, tools, tests) ------------------------------ */
/* A draft session runs a draft model outside the speculative loop, on features the caller
 * provides: what the speculative loop does internally, step by step. */
typedef struct sparrow_draft_session sparrow_draft_session;

SPARROW_API sparrow_status sparrow_draft_session_init(const sparrow_model * target, const sparrow_model * draft,
                                                      int32_t n_ctx, int32_t n_threads, sparrow_draft_session ** out);
SPARROW_API void sparrow_draft_session_free(sparrow_draft_session * session);
/* Start a sequence; anchor_start: the draft index of the first text entry after the video. */
SPARROW_API sparrow_status sparrow_draft_session_reset(sparrow_draft_session * session, int32_t anchor_start);
/* g = fc(taps) for n entries; taps row-major [n][n_taps * n_embd] (taps concatenated in the
 * draft's order), g_out [n][n_embd]. */
SPARROW_API sparrow_status sparrow_draft_fuse_taps(sparrow_draft_session * session, const float * taps, int32_t n,
                                                   float * g_out);
/* Enter n pooled glimpse vectors [n][n_embd] (before glimpse_proj) at the given positions. */
SPARROW_API sparrow_status sparrow_draft_add_glimpses(sparrow_draft_session * session, const float * pooled,
                                                      const int32_t * pos, int32_t n);
/* Run n entries: token (the token after the entry's text position), feature g [n][n_embd],
 * RoPE position; parents NULL for committed entries, else per entry -2 (committed), -1 (a
 * speculative root) or the index among the speculative entries of its parent. Writes h_out
 * [n][n_embd] (pre-norm hidden states) and logits_out [n][n_draft_vocab] (may be NULL). */
SPARROW_API sparrow_status sparrow_draft_run(sparrow_draft_session * session, const sparrow_token * tokens,
                                             const float * g, const int32_t * pos, const int32_t * parents,
                                             int32_t n, float * h_out, float * logits_out);
SPARROW_API sparrow_status sparrow_draft_drop_speculative(sparrow_draft_session * session);
/* The draft head's vocabulary size, and KV entries in use. */
SPARROW_API int32_t sparrow_draft_n_vocab(const sparrow_draft_session * session);
SPARROW_API int32_t sparrow_draft_kv_entries(const sparrow_draft_session * session);

/* The tokens produced so far by the current/last generation (end-of-generation token excluded).
 * The array stays valid until the next sparrow_generate_begin on the context. */
SPARROW_API sparrow_status sparrow_generated_tokens(const sparrow_context * ctx, const sparrow_token ** out_tokens,
                                                    int32_t * out_n);

/* ---- vision ---------------------------------------------------------------------------- */
/* A vision file (general.architecture "clip", general.type "mmproj": the vision tower and
 * projector, as llama.cpp's converter writes it) loads with sparrow_model_load like any GGUF;
 * it has no tokenizer and no context. Projector types: qwen2vl_merger, qwen2.5vl_merger
 * (llama.cpp's layout) and llava_onevision (Sparrow's, docs/mmproj.md).
 *
 * sparrow_vision_encode turns preprocessed pixels (sparrow_py.video produces them) into the
 * embeddings the language model consumes, [*out_n_tokens][sparrow_vision_n_embd] floats, to be
 * placed at the video/image placeholder tokens. n_grids images or videos, one after another in
 * pixels and in out; grid_thw holds 3 int32 per grid:
 *   Qwen2-VL / Qwen2.5-VL  pixels = pixel_values [n_patches][C * 2 * P * P] exactly as the HF
 *                          processor makes them (patches in 2x2 merge-block order), grid_thw
 *                          = (t, h, w) as HF's image_grid_thw / video_grid_thw; h and w must be
 *                          even. Output: t * h * w / 4 tokens per grid, frame by frame, each
 *                          frame's 2x2 blocks in raster order (what M-RoPE's (t, h/2, w/2) grid
 *                          numbers).
 *   LLaVA-OneVision        pixels = [frames][C][H][W] (a video; an image is a 1-frame video),
 *                          grid_thw = (frames, H / patch, W / patch) rounded down, H = W = the
 *                          file's image size (SigLIP-so400m: 384 pixels, 27 x 27 patches of
 *                          14). Output per grid: each frame's ceil(h/2) x ceil(w/2) pooled
 *                          tokens in raster order, frames in order, then one image_newline.
 * n_pixel_floats must be exactly what the grids need. n_threads: 0 = all cores. On
 * SPARROW_ERR_BUFFER_TOO_SMALL (n_out_floats < tokens * n_embd; out may then be NULL),
 * *out_n_tokens holds the number of tokens needed. Thread-safe: the model is only read. */
SPARROW_API sparrow_status sparrow_vision_encode(const sparrow_model * mmproj, const float * pixels,
                                                 int64_t n_pixel_floats, const int32_t * grid_thw,
                                                 int32_t n_grids, int32_t n_threads, float * out,
                                                 int64_t n_out_floats, int64_t * out_n_tokens);
/* LLaVA-OneVision still images (anyres): the same input as a LLaVA-OneVision grid, the
 * image's tiles as its frames (the resized whole image first, then the tiles in raster order, as
 * the HF image processor makes them), but each tile's h x w projected patch features come out
 * as they are: no pooling, no image_newline, t * h * w tokens per grid. Arranging them (the
 * tile grid, unpadding, a newline per row) is the caller's: sparrow_py.vision.VisionEncoder.
 * encode_image does it as transformers' pack_image_features. Other projector types:
 * SPARROW_ERR_INVALID_ARGUMENT. Otherwise as sparrow_vision_encode. */
SPARROW_API sparrow_status sparrow_vision_encode_tiles(const sparrow_model * mmproj, const float * pixels,
                                                       int64_t n_pixel_floats, const int32_t * grid_thw,
                                                       int32_t n_grids, int32_t n_threads, float * out,
                                                       int64_t n_out_floats, int64_t * out_n_tokens);
/* sparrow_vision_encode / _tiles with cancellation and progress, for long videos in apps. */
typedef struct sparrow_vision_params {
    int32_t n_threads;          /* 0 = all cores                                               */
    bool tiles;                 /* LLaVA-OneVision image tiles, as sparrow_vision_encode_tiles  */
    /* Called before each frame chunk and each layer of the tower: true stops the encode with
     * SPARROW_ERR_ABORTED (out then holds nothing usable; the model is untouched). */
    sparrow_abort_callback abort_callback;
    void * abort_user_data;
    /* Called after each layer of the tower and after the projector, for each chunk of whole frames
     * (at most 4096 patches at once), with the fraction of the work done, non-decreasing, the last
     * call with exactly 1; false stops with SPARROW_ERR_ABORTED. Both callbacks run on the thread
     * calling the encode. */
    sparrow_progress_callback progress_callback;
    void * progress_user_data;
    const char * backend;       /* as sparrow_context_params.backend (NULL: $SPARROW_BACKEND, else "cpu") */
} sparrow_vision_params;

SPARROW_API sparrow_vision_params sparrow_vision_default_params(void);
/* sparrow_vision_encode (or _tiles, with params.tiles) with params' threads and callbacks; inputs,
 * outputs and the size protocol as sparrow_vision_encode (the size query calls no callback). */
SPARROW_API sparrow_status sparrow_vision_encode_ext(const sparrow_model * mmproj, const float * pixels,
                                                     int64_t n_pixel_floats, const int32_t * grid_thw,
                                                     int32_t n_grids, float * out, int64_t n_out_floats,
                                                     int64_t * out_n_tokens, sparrow_vision_params params);
/* The width of the embeddings a vision file outputs (the language model's hidden size);
 * 0 if mmproj is NULL or not a vision file. */
SPARROW_API int32_t sparrow_vision_n_embd(const sparrow_model * mmproj);

/* SPARROW_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* SPARROW_H */
