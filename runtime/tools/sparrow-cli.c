/* sparrow-cli - load a model, read a prompt, stream the continuation, print the speed.
 *
 * Uses only sparrow.h, like any app embedding Sparrow. Text goes to stdout; progress, speed and
 * errors go to stderr, so the output can be piped. */
#include "sparrow.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE * out) {
    fprintf(out,
            "usage: sparrow-cli -m MODEL.gguf [-p PROMPT | -f FILE] [options]\n"
            "\n"
            "Streams the model's continuation of a prompt (read from stdin if neither -p nor -f).\n"
            "\n"
            "  -m, --model FILE      GGUF model to run (required)\n"
            "  -p, --prompt TEXT     prompt text\n"
            "  -f, --file FILE       read the prompt from a file\n"
            "  -n, --n-predict N     tokens to generate (default 128; -1 = until end of text)\n"
            "  -c, --ctx-size N      context window (default: the model's, at most 32768)\n"
            "  -b, --batch-size N    prompt tokens per forward pass (default 256)\n"
            "  -t, --threads N       CPU threads (default: all cores)\n"
            "      --temp T          temperature (default 0 = greedy)\n"
            "      --top-k K         top-k filter (default 0 = off)\n"
            "      --top-p P         top-p filter (default 1 = off)\n"
            "      --min-p P         min-p filter (default 0 = off)\n"
            "  -s, --seed N          sampling seed\n"
            "      --no-special      do not parse special tokens written in the prompt\n"
            "      --draft FILE      Sparrow draft GGUF: speculative decoding (the output stays the model's)\n"
            "      --n-draft N       tokens drafted per verification, at most (default 4)\n"
            "      --draft-p-min P   stop a chain before a token whose draft probability is below P\n"
            "                        (its first token is always drafted; default 0 = off)\n"
            "      --tree            draft an EAGLE-2 dynamic tree instead of a chain\n"
            "      --no-adaptive     always draft --n-draft tokens (or the whole tree); by default each\n"
            "                        round drafts what pays on this machine, down to plain decoding\n"
            "  -h, --help            show this help\n");
}

static bool is_flag(const char * arg, const char * short_name, const char * long_name) {
    return (short_name && !strcmp(arg, short_name)) || !strcmp(arg, long_name);
}

static char * read_all(FILE * f) {
    size_t cap = 4096, len = 0;
    char * buf = malloc(cap);
    if (!buf) return NULL;
    size_t r;
    while ((r = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += r;
        if (cap - len < 2) {
            char * bigger = realloc(buf, cap * 2);
            if (!bigger) { free(buf); return NULL; }
            buf = bigger;
            cap *= 2;
        }
    }
    buf[len] = '\0';
    return buf;
}

static int fail_status(const char * what, sparrow_status st) {
    fprintf(stderr, "sparrow-cli: %s: %s (%s)\n", what, sparrow_last_error(), sparrow_status_name(st));
    return 1;
}

static bool show_progress(float progress, void * user_data) {
    int * last_percent = (int *) user_data;
    int percent = (int) (progress * 100.0f);
    if (percent != *last_percent) {
        fprintf(stderr, "\rloading %3d%%%s", percent, percent == 100 ? "\n" : "");
        *last_percent = percent;
    }
    return true;
}

int main(int argc, char ** argv) {
    const char * model_path = NULL, * prompt_arg = NULL, * prompt_file = NULL, * draft_path = NULL;
    sparrow_context_params cparams = sparrow_context_default_params();
    sparrow_generate_params gparams = sparrow_generate_default_params();
    bool parse_special = true;
    gparams.max_tokens = 128;

    for (int i = 1; i < argc; ++i) {
        const char * a = argv[i];
        const char * v = i + 1 < argc ? argv[i + 1] : NULL;
#define FLAG(short_name, long_name) is_flag(a, short_name, long_name)
#define NEED_VALUE() do { if (!v) { fprintf(stderr, "sparrow-cli: %s needs a value\n", a); return 2; } ++i; } while (0)
        if (FLAG("-h", "--help")) { usage(stdout); return 0; }
        else if (FLAG("-m", "--model")) { NEED_VALUE(); model_path = v; }
        else if (FLAG("-p", "--prompt")) { NEED_VALUE(); prompt_arg = v; }
        else if (FLAG("-f", "--file")) { NEED_VALUE(); prompt_file = v; }
        else if (FLAG("-n", "--n-predict")) { NEED_VALUE(); gparams.max_tokens = atoi(v); }
        else if (FLAG("-c", "--ctx-size")) { NEED_VALUE(); cparams.n_ctx = atoi(v); }
        else if (FLAG("-b", "--batch-size")) { NEED_VALUE(); cparams.n_batch = atoi(v); }
        else if (FLAG("-t", "--threads")) { NEED_VALUE(); cparams.n_threads = atoi(v); }
        else if (FLAG(NULL, "--temp")) { NEED_VALUE(); gparams.sampling.temperature = (float) atof(v); }
        else if (FLAG(NULL, "--top-k")) { NEED_VALUE(); gparams.sampling.top_k = atoi(v); }
        else if (FLAG(NULL, "--top-p")) { NEED_VALUE(); gparams.sampling.top_p = (float) atof(v); }
        else if (FLAG(NULL, "--min-p")) { NEED_VALUE(); gparams.sampling.min_p = (float) atof(v); }
        else if (FLAG("-s", "--seed")) { NEED_VALUE(); cparams.seed = strtoull(v, NULL, 10); }
        else if (FLAG(NULL, "--no-special")) { parse_special = false; }
        else if (FLAG(NULL, "--draft")) { NEED_VALUE(); draft_path = v; }
        else if (FLAG(NULL, "--n-draft")) { NEED_VALUE(); gparams.n_draft = atoi(v); }
        else if (FLAG(NULL, "--draft-p-min")) { NEED_VALUE(); gparams.draft_p_min = (float) atof(v); }
        else if (FLAG(NULL, "--tree")) { gparams.speculative = SPARROW_SPEC_TREE; }
        else if (FLAG(NULL, "--no-adaptive")) { gparams.adaptive = false; }
        else { fprintf(stderr, "sparrow-cli: unknown argument '%s' (see --help)\n", a); return 2; }
#undef FLAG
#undef NEED_VALUE
    }
    if (!model_path) { usage(stderr); return 2; }

    char * prompt = NULL;
    if (prompt_arg) {
        size_t n = strlen(prompt_arg) + 1;
        prompt = malloc(n);
        if (prompt) memcpy(prompt, prompt_arg, n);
    } else {
        FILE * f = prompt_file ? fopen(prompt_file, "rb") : stdin;
        if (!f) { fprintf(stderr, "sparrow-cli: cannot open '%s'\n", prompt_file); return 1; }
        prompt = read_all(f);
        if (prompt_file) fclose(f);
    }
    if (!prompt) { fprintf(stderr, "sparrow-cli: out of memory\n"); return 1; }

    sparrow_model_params mparams = sparrow_model_default_params();
    int last_percent = -1;
    mparams.progress_callback = show_progress;
    mparams.progress_user_data = &last_percent;
    sparrow_model * model = NULL, * draft = NULL;
    sparrow_context * ctx = NULL;
    sparrow_token * tokens = NULL;
    int rc = 1;
    sparrow_status st = sparrow_model_load(model_path, mparams, &model);
    if (st != SPARROW_OK) { rc = fail_status("cannot load the model", st); goto done; }
    st = sparrow_context_init(model, cparams, &ctx);
    if (st != SPARROW_OK) { rc = fail_status("cannot create a context", st); goto done; }
    if (draft_path) {
        st = sparrow_model_load(draft_path, sparrow_model_default_params(), &draft);
        if (st != SPARROW_OK) { rc = fail_status("cannot load the draft", st); goto done; }
        st = sparrow_context_set_draft(ctx, draft);
        if (st != SPARROW_OK) { rc = fail_status("cannot use the draft", st); goto done; }
    } else if (gparams.speculative == SPARROW_SPEC_TREE) {
        fprintf(stderr, "sparrow-cli: --tree needs --draft\n");
        goto done;
    }

    int32_t n_tokens = 0;
    sparrow_tokenize(model, prompt, strlen(prompt), true, parse_special, NULL, 0, &n_tokens);
    tokens = malloc(sizeof(sparrow_token) * (size_t) (n_tokens > 0 ? n_tokens : 1));
    st = sparrow_tokenize(model, prompt, strlen(prompt), true, parse_special, tokens, n_tokens, &n_tokens);
    if (st != SPARROW_OK) { rc = fail_status("cannot tokenize the prompt", st); goto done; }
    st = sparrow_generate_begin(ctx, tokens, n_tokens, gparams);
    if (st != SPARROW_OK) { rc = fail_status("cannot start generating", st); goto done; }

    fputs(prompt, stdout);
    char piece[1024];
    for (;;) {
        size_t len = 0;
        int32_t finish = 0;
        st = sparrow_generate_next(ctx, piece, sizeof(piece), &len, &finish, NULL);
        if (st != SPARROW_OK) { rc = fail_status("generation failed", st); goto done; }
        fwrite(piece, 1, len, stdout);
        fflush(stdout);
        if (finish != SPARROW_FINISH_NONE) break;
    }
    fputc('\n', stdout);

    sparrow_stats stats;
    sparrow_get_stats(ctx, &stats);
    fprintf(stderr, "prompt: %d tokens (%d cached) in %.1f ms, %.1f tokens/s\n", stats.n_prompt, stats.n_prompt_cached,
            stats.t_prefill_ms, stats.prefill_tokens_per_s);
    fprintf(stderr, "decode: %d tokens in %.1f ms, %.1f tokens/s\n", stats.n_generated, stats.t_decode_ms,
            stats.decode_tokens_per_s);
    if (draft) {
        fprintf(stderr, "speculative: mean accepted length %.2f (%d drafted, %d accepted, %d target forwards), "
                        "draft %.1f ms, verify %.1f ms\n",
                stats.mean_accepted_length, stats.n_drafted, stats.n_accepted, stats.n_target_forwards,
                stats.t_draft_ms, stats.t_verify_ms);
        fprintf(stderr, "rounds by tokens drafted:");
        for (int k = 0; k <= 32; k++) {
            if (stats.n_draft_rounds[k]) fprintf(stderr, " %d:%d", k, stats.n_draft_rounds[k]);
        }
        if (stats.n_tree_rounds) fprintf(stderr, " tree:%d", stats.n_tree_rounds);
        fprintf(stderr, " (0: plain decode steps)\n");
    }
    rc = 0;
done:
    free(tokens);
    free(prompt);
    sparrow_context_free(ctx);  /* before the draft: the context holds it */
    sparrow_model_free(draft);
    sparrow_model_free(model);
    return rc;
}
