// test_ref_backend.cpp - the `ref` backend's guard, and the demo models run on it.
//
// The ref backend exists to prove that only backend ops touch tensor memory (backend.h): its
// memory is PROT_NONE outside its ops (ref/guarded-memory.h). This test shows the guard is real
// (a host read or write of ref memory kills the process with SIGSEGV, checked in a forked child,
// and the same access inside an open scope works), and then runs the demo's target, draft and
// vision file on ref next to cpu through the C API:
//   - vision embeddings and prompt logits agree within float noise (ref computes in float; cpu
//     quantizes activations for quantized weights, hence a tolerance, set from the data);
//   - on ref, greedy chain and tree speculation give plain decoding's tokens exactly, with a video
//     in the prompt, and a follow-up prompt reuses the KV prefix (kv truncate and move paths);
//   - sparrow_kv_compact and sparrow_kv_truncate leave ref and cpu in agreement.
// Any host dereference of ref memory anywhere on these paths would end the test with SIGSEGV.
//
// Usage: test_ref_backend <repo root>

#include "backend.h"
#include "demo_models.h"
#include "ref/guarded-memory.h"
#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace sparrow_test;

namespace {

constexpr int kFaulted = 42;
constexpr int64_t kPatchFloats = 3 * 2 * 14 * 14;  // the demo tower: 3 channels, temporal patch 2, 14x14 patches

void on_segv(int) { _exit(kFaulted); }

// Runs fn in a forked child with a SIGSEGV handler that exits kFaulted; returns the child's exit
// code (-1 if it died otherwise).
template <typename F>
int in_child(F fn) {
    std::fflush(nullptr);
    const pid_t pid = fork();
    if (pid == 0) {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_segv;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
        fn();
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

void test_guard() {
    auto be = sparrow::make_ref_backend();
    const size_t n = 3000;
    float * p = (float *) be->alloc(n * sizeof(float));
    check(sparrow::guarded_contains(p), "ref allocations lie in the guarded range");
    std::vector<float> host(n), back(n, -1.0f);
    be->to_host(back.data(), p, n * sizeof(float));
    check(std::all_of(back.begin(), back.end(), [](float v) { return v == 0.0f; }), "ref alloc is zeroed");
    for (size_t i = 0; i < n; ++i) host[i] = (float) i * 0.5f;
    be->from_host(p, host.data(), n * sizeof(float));
    be->to_host(back.data(), p, n * sizeof(float));
    check(back == host, "from_host / to_host round trip");

    volatile float sink = 0.0f;
    check(in_child([&] { sink = p[7]; }) == kFaulted, "a host read of ref memory faults");
    check(in_child([&] { p[n - 1] = 1.0f; }) == kFaulted, "a host write of ref memory faults");
    // the control: the same read with the memory opened (as the backend's ops do) goes through,
    // so the faults above are the guard's, not a bad pointer's
    check(in_child([&] {
              sparrow::GuardedAccess open;
              sink = p[7];
              if (sink != 3.5f) _exit(3);
          }) == 0,
          "the same read inside an open scope works");

    be->free(p);
    float * q = (float *) be->alloc(n * sizeof(float));  // likely the same pages: zero again
    be->to_host(back.data(), q, n * sizeof(float));
    check(std::all_of(back.begin(), back.end(), [](float v) { return v == 0.0f; }), "reused ref memory is zeroed");
    be->free(q);
    (void) sink;
}

// ---- the demo models on cpu and ref --------------------------------------------------------------

sparrow_context * new_context(const DemoModels & m, const char * backend, bool draft) {
    sparrow_context_params cp = sparrow_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 32;  // several prefill chunks for the video prompt
    cp.n_threads = 2;
    cp.backend = backend;
    sparrow_context * ctx = nullptr;
    if (sparrow_context_init(m.target, cp, &ctx) != SPARROW_OK || (draft && sparrow_context_set_draft(ctx, m.draft) != SPARROW_OK)) {
        check(false, std::string("context on ") + backend + ": " + sparrow_last_error());
        sparrow_context_free(ctx);
        return nullptr;
    }
    return ctx;
}

std::vector<float> encode_video(const DemoModels & m, const char * backend, const std::vector<float> & pixels) {
    const int32_t grid[3] = {4, 8, 8};
    std::vector<float> out((size_t) (64 * sparrow_vision_n_embd(m.vision)));
    sparrow_vision_params vp = sparrow_vision_default_params();
    vp.n_threads = 2;
    vp.backend = backend;
    int64_t n = 0;
    check(sparrow_vision_encode_ext(m.vision, pixels.data(), (int64_t) pixels.size(), grid, 1, out.data(), (int64_t) out.size(),
                                    &n, vp) == SPARROW_OK && n == 64,
          std::string("vision encode on ") + backend);
    return out;
}

struct VideoPrompt {
    std::vector<sparrow_token> tokens;
    std::vector<float> embd;
    sparrow_media media{};
};

VideoPrompt video_prompt(const DemoModels & m, const std::vector<float> & embd, const std::string & question) {
    VideoPrompt p;
    p.embd = embd;
    p.tokens = tokenize(m.target, "<|im_start|>user\n<|vision_start|>");
    p.tokens.insert(p.tokens.end(), 64, SPARROW_MEDIA_TOKEN);
    auto rest = tokenize(m.target, "<|vision_end|>" + question + "<|im_end|>\n<|im_start|>assistant\n");
    p.tokens.insert(p.tokens.end(), rest.begin(), rest.end());
    p.media.embd = p.embd.data();
    p.media.n_tokens = 64;
    p.media.grid_t = 4;
    p.media.grid_h = 4;
    p.media.grid_w = 4;
    p.media.t_scale = 1.0f;
    p.media.placeholder = tokenize(m.target, "<|video_pad|>").at(0);
    return p;
}

std::vector<sparrow_token> generate(sparrow_context * ctx, const VideoPrompt & p, int32_t mode, int32_t n_tokens) {
    sparrow_generate_params gp = sparrow_generate_default_params();
    gp.max_tokens = n_tokens;
    gp.ignore_eog = true;
    gp.speculative = mode;
    gp.adaptive = false;  // every round drafts: the speculative paths run
    check(sparrow_generate_begin_media(ctx, p.tokens.data(), (int32_t) p.tokens.size(), &p.media, 1, gp) == SPARROW_OK,
          std::string("begin: ") + sparrow_last_error());
    char buf[256];
    size_t len = 0;
    int32_t finish = SPARROW_FINISH_NONE;
    while (finish == SPARROW_FINISH_NONE) {
        if (sparrow_generate_next(ctx, buf, sizeof(buf), &len, &finish, nullptr) != SPARROW_OK) {
            check(false, std::string("next: ") + sparrow_last_error());
            return {};
        }
    }
    const sparrow_token * toks = nullptr;
    int32_t n = 0;
    sparrow_generated_tokens(ctx, &toks, &n);
    return std::vector<sparrow_token>(toks, toks + n);
}

// Largest |a - b| relative to the largest |b|.
double rel_diff(const float * a, const float * b, size_t n) {
    double diff = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; ++i) {
        diff = std::max(diff, (double) std::fabs(a[i] - b[i]));
        scale = std::max(scale, (double) std::fabs(b[i]));
    }
    return diff / std::max(scale, 1e-30);
}

// Logits of the last row of `tokens` decoded (text only) from an empty cache.
std::vector<float> last_logits(sparrow_context * ctx, const std::vector<sparrow_token> & tokens, int32_t n_vocab) {
    check(sparrow_kv_truncate(ctx, 0) == SPARROW_OK, "truncate");
    std::vector<int8_t> outputs(tokens.size(), 0);
    outputs.back() = 1;
    sparrow_batch b{};
    b.tokens = tokens.data();
    b.n_tokens = (int32_t) tokens.size();
    b.outputs = outputs.data();
    check(sparrow_decode(ctx, b) == SPARROW_OK, std::string("decode: ") + sparrow_last_error());
    const float * l = sparrow_get_logits(ctx, 0);
    return l ? std::vector<float>(l, l + n_vocab) : std::vector<float>((size_t) n_vocab, NAN);
}

void test_models(const DemoModels & m) {
    const int32_t n_vocab = sparrow_model_n_vocab(m.target);
    std::vector<float> pixels((size_t) (4 * 64 * kPatchFloats));
    for (auto & v : pixels) v = normal();

    // vision: the same embeddings within float noise
    const std::vector<float> embd_cpu = encode_video(m, "cpu", pixels), embd_ref = encode_video(m, "ref", pixels);
    const double d_vision = rel_diff(embd_ref.data(), embd_cpu.data(), embd_cpu.size());
    std::printf("  vision: ref vs cpu max |diff| / max |cpu| = %.2e\n", d_vision);
    check(d_vision < 2e-2, "vision embeddings on ref match cpu");

    sparrow_context * cpu = new_context(m, "cpu", true);
    sparrow_context * ref = new_context(m, "ref", true);
    if (!cpu || !ref) return;

    // text logits from an empty cache, then after a truncate and a compact
    const std::vector<sparrow_token> text = tokenize(m.target, "<|im_start|>user\nWhat happens in the video?<|im_end|>\n");
    const std::vector<float> l_cpu = last_logits(cpu, text, n_vocab), l_ref = last_logits(ref, text, n_vocab);
    const double d_logits = rel_diff(l_ref.data(), l_cpu.data(), (size_t) n_vocab);
    std::printf("  logits: ref vs cpu max |diff| / max |cpu| = %.2e\n", d_logits);
    check(d_logits < 5e-2, "prompt logits on ref match cpu");
    check(std::max_element(l_ref.begin(), l_ref.end()) - l_ref.begin() == std::max_element(l_cpu.begin(), l_cpu.end()) - l_cpu.begin(),
          "the same next token on ref and cpu");

    // kv_compact on both: keep rows 0..3 and 6.. of the prompt, then decode one more token
    for (sparrow_context * ctx : {cpu, ref}) {
        std::vector<int32_t> rows;
        for (int32_t r = 0; r < (int32_t) text.size(); ++r) {
            if (r < 4 || r >= 6) rows.push_back(r);
        }
        check(sparrow_kv_compact(ctx, 0, rows.data(), (int32_t) rows.size()) == SPARROW_OK,
              std::string("kv_compact: ") + sparrow_last_error());
        int8_t out = 1;
        sparrow_batch b{};
        b.tokens = &text.back();
        b.n_tokens = 1;
        b.outputs = &out;
        check(sparrow_decode(ctx, b) == SPARROW_OK, "decode after compact");
    }
    const double d_compact = rel_diff(sparrow_get_logits(ref, 0), sparrow_get_logits(cpu, 0), (size_t) n_vocab);
    std::printf("  after kv_compact: %.2e\n", d_compact);
    check(d_compact < 5e-2, "logits after kv_compact on ref match cpu");

    // ref: speculation is lossless (video prompt, chain and tree), and a follow-up keeps the prefix
    const VideoPrompt first = video_prompt(m, embd_ref, "What happens in the video?");
    const VideoPrompt second = video_prompt(m, embd_ref, "Describe it again.");
    const int32_t n = 48;
    const std::vector<sparrow_token> plain = generate(ref, first, SPARROW_SPEC_NONE, n);
    const std::vector<sparrow_token> chain = generate(ref, first, SPARROW_SPEC_CHAIN, n);
    const std::vector<sparrow_token> tree = generate(ref, first, SPARROW_SPEC_TREE, n);
    check((int32_t) plain.size() == n, "plain generation on ref");
    check(chain == plain, "ref: chain speculation gives plain decoding's tokens");
    check(tree == plain, "ref: tree speculation gives plain decoding's tokens");
    sparrow_stats st{};
    sparrow_get_stats(ref, &st);
    check(st.n_drafted > 0, "ref: the tree round drafted");
    const std::vector<sparrow_token> follow_plain = generate(ref, second, SPARROW_SPEC_NONE, n);
    const std::vector<sparrow_token> follow_chain = generate(ref, second, SPARROW_SPEC_CHAIN, n);
    check(follow_chain == follow_plain, "ref: a follow-up about the same video, chain = plain");
    sparrow_context_free(cpu);
    sparrow_context_free(ref);
}

// sparrow_model_params.backend: the weights are prepared for the named backend at load; a name
// that is not a backend is refused there, naming the ones there are
void test_load_params(const std::string & root) {
    const std::string target = root + "/sparrow_py/demo/data/target.gguf";
    sparrow_model_params mp = sparrow_model_default_params();
    check(mp.backend == nullptr, "the default model params name no backend");
    mp.backend = "ref";
    sparrow_model * m = nullptr;
    check(sparrow_model_load(target.c_str(), mp, &m) == SPARROW_OK, std::string("load for ref: ") + sparrow_last_error());
    sparrow_context_params cp = sparrow_context_default_params();
    cp.backend = "ref";
    sparrow_context * ctx = nullptr;
    check(m && sparrow_context_init(m, cp, &ctx) == SPARROW_OK, "a ref context on a model loaded for ref");
    sparrow_context_free(ctx);
    sparrow_model_free(m);
    mp.backend = "no-such-backend";
    m = nullptr;
    const sparrow_status st = sparrow_model_load(target.c_str(), mp, &m);
    const std::string msg = sparrow_last_error();
    check(st == SPARROW_ERR_INVALID_ARGUMENT && m == nullptr, "an unknown backend name is refused at load");
    check(msg.find("no-such-backend") != std::string::npos && msg.find("ref") != std::string::npos,
          "the message names the backend asked for and the ones there are: " + msg);
}

}  // namespace

int main(int argc, char ** argv) {
    const std::string root = argc > 1 ? argv[1] : ".";
    test_guard();
    test_load_params(root);
    DemoModels m;
    if (!m.load(root)) return 1;
    test_models(m);
    return finish("test_ref_backend");
}
