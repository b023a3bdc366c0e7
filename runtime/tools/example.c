/* example.c - the smallest complete program using Sparrow: greedy continuation of a prompt.
 * Build: cc example.c -I runtime/include -L build -lsparrow */
#include "sparrow.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT\n", argv[0]);
        return 2;
    }
    sparrow_model * model = NULL;
    sparrow_context * ctx = NULL;
    if (sparrow_model_load(argv[1], sparrow_model_default_params(), &model) != SPARROW_OK ||
        sparrow_context_init(model, sparrow_context_default_params(), &ctx) != SPARROW_OK) {
        fprintf(stderr, "error: %s\n", sparrow_last_error());
        sparrow_model_free(model);
        return 1;
    }
    sparrow_token tokens[512];
    int32_t n = 0;
    sparrow_generate_params params = sparrow_generate_default_params();
    params.max_tokens = 16;
    if (sparrow_tokenize(model, argv[2], strlen(argv[2]), true, true, tokens, 512, &n) != SPARROW_OK ||
        sparrow_generate_begin(ctx, tokens, n, params) != SPARROW_OK) {
        fprintf(stderr, "error: %s\n", sparrow_last_error());
        sparrow_context_free(ctx);
        sparrow_model_free(model);
        return 1;
    }
    char piece[256];
    size_t len;
    int32_t finish = SPARROW_FINISH_NONE;
    int rc = 0;
    while (finish == SPARROW_FINISH_NONE) {
        if (sparrow_generate_next(ctx, piece, sizeof(piece), &len, &finish, NULL) != SPARROW_OK) {
            fprintf(stderr, "error: %s\n", sparrow_last_error());
            rc = 1;
            break;
        }
        fwrite(piece, 1, len, stdout);
    }
    printf("\n");
    sparrow_context_free(ctx);
    sparrow_model_free(model);
    return rc;
}
