// test_app_callbacks.cpp - what sparrow.h gives an app with a UI ("Apps with a UI" in its header),
// through the C API only:
//   - sparrow_vision_encode_ext: the same embeddings as sparrow_vision_encode; progress after each
//     layer of each frame chunk, non-decreasing, ending at exactly 1; a cancel from another thread
//     (the abort callback reading an atomic flag) stops a long encode with SPARROW_ERR_ABORTED
//     within a bounded time, and the model encodes as before afterwards; a progress callback that
//     returns false cancels too; params.tiles is honoured; the size query calls no callback.
//   - prefill progress (sparrow_generate_params.progress_callback): one report per n_batch chunk of
//     the prompt with the exact fraction done, the last exactly 1, for text and video prompts,
//     plain and speculative; false cancels, the generation ends (SPARROW_ERR_STATE after), and the
//     context generates the usual output afterwards.
//   - cancel from another thread during decoding: a long generation stops within a bounded time.
//   - sparrow_get_stats after every piece: n_generated equals the tokens so far, the pieces so far
//     are a prefix of their text, n_accepted <= n_drafted, the running accepted length and speed.
// Models: the demo's tiny Qwen2-VL target, its draft and its vision file.

#include "demo_models.h"
#include "sparrow.h"
#include "test_util.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace sparrow_test;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

using Models = DemoModels;

constexpr int64_t kPatchFloats = 3 * 2 * 14 * 14;  // the demo tower: 3 channels, temporal patch 2, 14x14 patches

std::vector<float> random_pixels(int64_t n_patches, uint32_t seed) {
    std::vector<float> pixels((size_t) (n_patches * kPatchFloats));
    std::mt19937 r(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto & p : pixels) p = nd(r);
    return pixels;
}

// What the progress callbacks saw.
struct Progress {
    std::vector<float> values;
    std::vector<Clock::time_point> times;
    int stop_at = -1;                    // return false on this call (0-based); -1: never
    std::atomic<bool> * flag = nullptr;  // set on the first call (a worker's "started" signal)
};

bool on_progress(float fraction, void * user) {
    auto * p = static_cast<Progress *>(user);
    p->values.push_back(fraction);
    p->times.push_back(Clock::now());
    if (p->flag) p->flag->store(true);
    return (int) p->values.size() - 1 != p->stop_at;
}

bool read_flag(void * user) { return static_cast<std::atomic<bool> *>(user)->load(); }

bool non_decreasing(const std::vector<float> & v) {
    for (size_t i = 1; i < v.size(); ++i) {
        if (v[i] < v[i - 1]) return false;
    }
    return true;
}

// ---- vision ------------------------------------------------------------------------------------

void test_vision_progress(const Models & m) {
    // 40 frames of 16x16 patches: 3 chunks of at most 4096 patches (16 frames), 4 blocks + the merger each
    const int32_t grid[3] = {40, 16, 16};
    const int64_t n_patches = 40 * 16 * 16;
    const std::vector<float> pixels = random_pixels(n_patches, 1);
    const int32_t n_embd = sparrow_vision_n_embd(m.vision);
    const int64_t n_out = n_patches / 4 * n_embd;
    std::vector<float> plain((size_t) n_out), ext((size_t) n_out, -1.0f);
    int64_t n_tokens = 0;
    check(sparrow_vision_encode(m.vision, pixels.data(), (int64_t) pixels.size(), grid, 1, 1, plain.data(), n_out, &n_tokens) ==
              SPARROW_OK, "plain encode");

    Progress progress;
    sparrow_vision_params p = sparrow_vision_default_params();
    check(p.n_threads == 0 && !p.tiles && !p.abort_callback && !p.progress_callback, "default params: no callbacks");
    p.n_threads = 1;
    p.progress_callback = on_progress;
    p.progress_user_data = &progress;
    // the size query: BUFFER_TOO_SMALL with the count, before any work, so no callback
    int64_t needed = 0;
    check(sparrow_vision_encode_ext(m.vision, pixels.data(), (int64_t) pixels.size(), grid, 1, nullptr, 0, &needed, p) ==
              SPARROW_ERR_BUFFER_TOO_SMALL, "size query");
    check(needed == n_patches / 4 && progress.values.empty(), "the size query reports the tokens and calls no callback");

    check(sparrow_vision_encode_ext(m.vision, pixels.data(), (int64_t) pixels.size(), grid, 1, ext.data(), n_out, &n_tokens, p) ==
              SPARROW_OK, std::string("encode_ext: ") + sparrow_last_error());
    check(std::memcmp(plain.data(), ext.data(), plain.size() * sizeof(float)) == 0, "encode_ext gives encode's embeddings");
    // 3 chunks x (4 blocks + merger)
    check(progress.values.size() == 15, "one progress report per block and chunk: " + std::to_string(progress.values.size()));
    check(non_decreasing(progress.values), "progress never goes back");
    check(!progress.values.empty() && progress.values.back() == 1.0f, "progress ends at exactly 1");
    check(!progress.values.empty() && progress.values.front() > 0.0f && progress.values.front() < 0.1f,
          "the first report is one block of the first chunk");
    int ones = 0;
    for (float v : progress.values) ones += v == 1.0f;
    check(ones == 1, "1 is reported once, at the end");

    // two grids: one progress over both
    const int32_t grids2[6] = {2, 8, 8, 4, 8, 8};
    const std::vector<float> px2 = random_pixels(6 * 64, 2);
    std::vector<float> out2((size_t) (6 * 16 * n_embd));
    Progress two;
    p.progress_user_data = &two;
    check(sparrow_vision_encode_ext(m.vision, px2.data(), (int64_t) px2.size(), grids2, 2, out2.data(), (int64_t) out2.size(),
                                    &n_tokens, p) == SPARROW_OK, "two grids");
    check(two.values.size() == 10 && non_decreasing(two.values) && two.values.back() == 1.0f,
          "two grids: 5 reports each, one rising fraction");

    // a progress callback that returns false cancels
    Progress stopper;
    stopper.stop_at = 3;
    p.progress_user_data = &stopper;
    check(sparrow_vision_encode_ext(m.vision, pixels.data(), (int64_t) pixels.size(), grid, 1, ext.data(), n_out, &n_tokens, p) ==
              SPARROW_ERR_ABORTED, "progress returning false: ABORTED");
    check(stopper.values.size() == 4, "no report after the one that cancelled");
    check(std::string(sparrow_last_error()).find("cancel") != std::string::npos, "the message says why");

    // tiles are LLaVA-OneVision's: the flag reaches the runtime
    sparrow_vision_params tp = sparrow_vision_default_params();
    tp.tiles = true;
    check(sparrow_vision_encode_ext(m.vision, pixels.data(), (int64_t) pixels.size(), grid, 1, ext.data(), n_out, &n_tokens, tp) ==
              SPARROW_ERR_INVALID_ARGUMENT, "tiles on a Qwen tower: INVALID_ARGUMENT");
}

// A long encode on a worker thread, cancelled from this thread once it has started.
void test_vision_cancel_from_another_thread(const Models & m) {
    const int32_t grid[3] = {256, 16, 16};  // ~4 s on one thread: far longer than the bound below
    const int64_t n_patches = 256 * 16 * 16;
    const std::vector<float> pixels = random_pixels(n_patches, 3);
    const int32_t n_embd = sparrow_vision_n_embd(m.vision);
    std::vector<float> out((size_t) (n_patches / 4 * n_embd));
    std::atomic<bool> started{false}, stop{false};
    Progress progress;
    progress.flag = &started;
    sparrow_vision_params p = sparrow_vision_default_params();
    p.n_threads = 1;
    p.abort_callback = read_flag;
    p.abort_user_data = &stop;
    p.progress_callback = on_progress;
    p.progress_user_data = &progress;
    sparrow_status status = SPARROW_OK;
    std::string message;
    Clock::time_point began, returned;
    std::thread worker([&] {
        int64_t n = 0;
        began = Clock::now();
        status = sparrow_vision_encode_ext(m.vision, pixels.data(), (int64_t) pixels.size(), grid, 1, out.data(),
                                           (int64_t) out.size(), &n, p);
        message = sparrow_last_error();
        returned = Clock::now();
    });
    const Clock::time_point t0 = Clock::now();
    while (!started.load() && seconds_since(t0) < 30) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const Clock::time_point stop_time = Clock::now();
    stop.store(true);
    worker.join();
    const double latency = std::chrono::duration<double>(returned - stop_time).count();
    check(status == SPARROW_ERR_ABORTED, "the cancelled encode returns ABORTED, not " + std::to_string(status));
    check(message.find("abort") != std::string::npos, "the message says it was aborted: " + message);
    // within about one layer's time: the first report came after the patch embedding and one layer
    // (~40 ms here; sanitizer builds are many times slower, hence the bound in steps)
    const double step = progress.times.empty() ? 0.0 : std::chrono::duration<double>(progress.times[0] - began).count();
    check(latency < 0.5 + 3 * step, "the encode stopped within a layer's time of the cancel (took " +
                                        std::to_string(latency) + " s; one step takes " + std::to_string(step) + " s)");
    check(!progress.values.empty() && progress.values.back() < 0.5f, "it stopped early, not at the end");

    // the model is untouched: the same input encodes as on a fresh call
    const int32_t small[3] = {2, 8, 8};
    const std::vector<float> px = random_pixels(128, 4);
    std::vector<float> a((size_t) (32 * n_embd)), b((size_t) (32 * n_embd));
    int64_t n = 0;
    p.abort_callback = nullptr;
    p.progress_callback = nullptr;
    check(sparrow_vision_encode_ext(m.vision, px.data(), (int64_t) px.size(), small, 1, a.data(), (int64_t) a.size(), &n, p) ==
              SPARROW_OK, "encode after a cancel");
    check(sparrow_vision_encode(m.vision, px.data(), (int64_t) px.size(), small, 1, 1, b.data(), (int64_t) b.size(), &n) ==
              SPARROW_OK, "plain encode after a cancel");
    check(a == b, "the same embeddings after a cancel");
}

// ---- generation --------------------------------------------------------------------------------

// A chat prompt about a video (encoded here) or text only; media filled for the video.
struct Prompt {
    std::vector<sparrow_token> tokens;
    std::vector<float> embd;
    sparrow_media media{};
    bool video = false;
};

Prompt make_prompt(const Models & m, bool video, const std::string & question) {
    Prompt p;
    p.video = video;
    p.tokens = tokenize(m.target, "<|im_start|>user\n");
    if (video) {
        const int32_t grid[3] = {4, 8, 8};
        const std::vector<float> pixels = random_pixels(4 * 64, 5);
        const int32_t n_embd = sparrow_vision_n_embd(m.vision);
        p.embd.resize((size_t) (64 * n_embd));
        int64_t n = 0;
        check(sparrow_vision_encode(m.vision, pixels.data(), (int64_t) pixels.size(), grid, 1, 1, p.embd.data(),
                                    (int64_t) p.embd.size(), &n) == SPARROW_OK, "encode the prompt's video");
        auto open = tokenize(m.target, "<|vision_start|>");
        p.tokens.insert(p.tokens.end(), open.begin(), open.end());
        p.tokens.insert(p.tokens.end(), (size_t) n, SPARROW_MEDIA_TOKEN);
        auto close = tokenize(m.target, "<|vision_end|>");
        p.tokens.insert(p.tokens.end(), close.begin(), close.end());
        p.media.embd = p.embd.data();
        p.media.n_tokens = (int32_t) n;
        p.media.grid_t = 4;
        p.media.grid_h = 4;
        p.media.grid_w = 4;
        p.media.t_scale = 1.0f;
        p.media.placeholder = tokenize(m.target, "<|video_pad|>").at(0);
    }
    auto rest = tokenize(m.target, question + "<|im_end|>\n<|im_start|>assistant\n");
    p.tokens.insert(p.tokens.end(), rest.begin(), rest.end());
    return p;
}

sparrow_status begin(sparrow_context * ctx, const Prompt & p, const sparrow_generate_params & params) {
    return p.video ? sparrow_generate_begin_media(ctx, p.tokens.data(), (int32_t) p.tokens.size(), &p.media, 1, params)
                   : sparrow_generate_begin(ctx, p.tokens.data(), (int32_t) p.tokens.size(), params);
}

// Runs a generation to its end; returns its text, or "" with *status on an error.
std::string run(sparrow_context * ctx, const Prompt & p, const sparrow_generate_params & params, sparrow_status * status) {
    *status = begin(ctx, p, params);
    if (*status != SPARROW_OK) return "";
    std::string text;
    char buf[256];
    size_t len = 0;
    int32_t finish = SPARROW_FINISH_NONE;
    while (finish == SPARROW_FINISH_NONE) {
        *status = sparrow_generate_next(ctx, buf, sizeof(buf), &len, &finish, nullptr);
        if (*status != SPARROW_OK) return "";
        text.append(buf, len);
    }
    return text;
}

sparrow_context * new_context(const Models & m, int32_t n_batch, sparrow_abort_callback abort = nullptr, void * user = nullptr) {
    sparrow_context_params cp = sparrow_context_default_params();
    cp.n_ctx = 1024;
    cp.n_batch = n_batch;
    cp.n_threads = 1;
    cp.abort_callback = abort;
    cp.abort_user_data = user;
    sparrow_context * ctx = nullptr;
    if (sparrow_context_init(m.target, cp, &ctx) != SPARROW_OK || sparrow_context_set_draft(ctx, m.draft) != SPARROW_OK) {
        check(false, std::string("context: ") + sparrow_last_error());
        sparrow_context_free(ctx);
        return nullptr;
    }
    return ctx;
}

void test_prefill_progress(const Models & m) {
    const int32_t n_batch = 16;
    sparrow_context * ctx = new_context(m, n_batch);
    if (!ctx) return;
    sparrow_generate_params defaults = sparrow_generate_default_params();
    check(defaults.progress_callback == nullptr && defaults.progress_user_data == nullptr, "default: no prefill progress");
    for (bool video : {false, true}) {
        for (int32_t mode : {SPARROW_SPEC_NONE, SPARROW_SPEC_CHAIN, SPARROW_SPEC_TREE}) {
            const std::string what = std::string(video ? "video" : "text") + ", speculative mode " + std::to_string(mode);
            const Prompt prompt = make_prompt(m, video, "Describe the video in detail, frame by frame, with every shape and colour.");
            sparrow_generate_params params = sparrow_generate_default_params();
            params.max_tokens = 24;
            params.speculative = mode;
            params.tree_total_tokens = n_batch;  // a tree is verified in one forward pass
            sparrow_status status;
            check(sparrow_kv_truncate(ctx, 0) == SPARROW_OK, "empty cache");
            const std::string expected = run(ctx, prompt, params, &status);
            check(status == SPARROW_OK && !expected.empty(), what + ": a generation without progress");

            Progress progress;
            params.progress_callback = on_progress;
            params.progress_user_data = &progress;
            check(sparrow_kv_truncate(ctx, 0) == SPARROW_OK, "empty cache");
            const std::string got = run(ctx, prompt, params, &status);
            check(status == SPARROW_OK && got == expected, what + ": the same output with a progress callback");
            const int32_t n = (int32_t) prompt.tokens.size();
            const size_t chunks = (size_t) ((n + n_batch - 1) / n_batch);
            check(progress.values.size() == chunks, what + ": one report per prompt chunk (" + std::to_string(progress.values.size()) +
                                                        " for " + std::to_string(chunks) + ")");
            bool exact = true;
            for (size_t k = 0; k + 1 < progress.values.size(); ++k) {
                exact &= progress.values[k] == (float) ((double) ((int32_t) (k + 1) * n_batch) / n);
            }
            check(exact, what + ": each report is the fraction of the prompt done");
            check(non_decreasing(progress.values) && !progress.values.empty() && progress.values.back() == 1.0f,
                  what + ": progress rises to exactly 1");

            // false cancels: the generation ends, the context works
            Progress stopper;
            stopper.stop_at = 1;
            params.progress_user_data = &stopper;
            check(sparrow_kv_truncate(ctx, 0) == SPARROW_OK, "empty cache");
            run(ctx, prompt, params, &status);
            check(status == SPARROW_ERR_ABORTED, what + ": progress returning false: ABORTED");
            check(stopper.values.size() == 2, what + ": no report after the cancel");
            char buf[256];
            size_t len;
            int32_t finish;
            check(sparrow_generate_next(ctx, buf, sizeof(buf), &len, &finish, nullptr) == SPARROW_ERR_STATE,
                  what + ": the cancelled generation is over (STATE)");
            params.progress_callback = nullptr;
            check(run(ctx, prompt, params, &status) == expected && status == SPARROW_OK,
                  what + ": a new generation after the cancel gives the usual output");
        }
    }
    // a prompt mostly reused from the cache: the cached tokens count as done
    {
        const Prompt prompt = make_prompt(m, false, "Which shapes move, and where do they go?");
        sparrow_generate_params params = sparrow_generate_default_params();
        params.max_tokens = 4;
        params.speculative = SPARROW_SPEC_NONE;
        sparrow_status status;
        run(ctx, prompt, params, &status);
        Prompt longer = prompt;
        auto more = tokenize(m.target, " And then?");
        longer.tokens.insert(longer.tokens.end(), more.begin(), more.end());
        Progress progress;
        params.progress_callback = on_progress;
        params.progress_user_data = &progress;
        run(ctx, longer, params, &status);
        sparrow_stats stats;
        check(sparrow_get_stats(ctx, &stats) == SPARROW_OK && stats.n_prompt_cached > 0, "the prompt was reused");
        check(status == SPARROW_OK && progress.values.size() == 1 && progress.values[0] == 1.0f,
              "a prompt whose rest fits one chunk: one report, 1");
    }
    sparrow_context_free(ctx);
}

// A long generation on a worker thread, cancelled from this thread after a few pieces.
void test_generation_cancel_from_another_thread(const Models & m) {
    std::atomic<bool> stop{false};
    sparrow_context * ctx = new_context(m, 256, read_flag, &stop);
    if (!ctx) return;
    const Prompt prompt = make_prompt(m, true, "What happens in this clip?");
    std::atomic<int> pieces{0};
    sparrow_status status = SPARROW_OK;
    Clock::time_point returned;
    std::thread worker([&] {
        sparrow_generate_params params = sparrow_generate_default_params();
        params.max_tokens = 900;  // ends by the cancel, long before
        params.ignore_eog = true;
        params.adaptive = false;
        status = begin(ctx, prompt, params);
        char buf[256];
        size_t len;
        int32_t finish = SPARROW_FINISH_NONE;
        while (status == SPARROW_OK && finish == SPARROW_FINISH_NONE) {
            status = sparrow_generate_next(ctx, buf, sizeof(buf), &len, &finish, nullptr);
            ++pieces;
        }
        returned = Clock::now();
    });
    const Clock::time_point t0 = Clock::now();
    while (pieces.load() < 5 && seconds_since(t0) < 30) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const Clock::time_point stop_time = Clock::now();
    stop.store(true);
    worker.join();
    const double latency = std::chrono::duration<double>(returned - stop_time).count();
    check(status == SPARROW_ERR_ABORTED, "the cancelled generation returns ABORTED, not " + std::to_string(status));
    check(latency < 1.0, "it stopped within 1 s of the cancel (took " + std::to_string(latency) + " s)");
    const sparrow_token * toks = nullptr;
    int32_t n = 0;
    check(sparrow_generated_tokens(ctx, &toks, &n) == SPARROW_OK && n > 0 && n < 900,
          "the tokens produced before the cancel stay readable: " + std::to_string(n));
    stop.store(false);
    sparrow_generate_params params = sparrow_generate_default_params();
    params.max_tokens = 8;
    sparrow_status after;
    run(ctx, prompt, params, &after);
    check(after == SPARROW_OK, "the context generates after the cancel");
    sparrow_context_free(ctx);
}

void test_stats_per_piece(const Models & m) {
    sparrow_context * ctx = new_context(m, 256);
    if (!ctx) return;
    for (int32_t mode : {SPARROW_SPEC_NONE, SPARROW_SPEC_CHAIN, SPARROW_SPEC_TREE}) {
        const std::string what = "speculative mode " + std::to_string(mode);
        const Prompt prompt = make_prompt(m, true, "What happens in this clip?");
        sparrow_generate_params params = sparrow_generate_default_params();
        params.max_tokens = 64;
        params.speculative = mode;
        params.adaptive = false;  // every round drafts: the speculative counters move
        check(begin(ctx, prompt, params) == SPARROW_OK, what + ": begin");
        std::string text;
        char buf[256];
        size_t len;
        int32_t finish = SPARROW_FINISH_NONE;
        int32_t last_generated = 0, n_pieces = 0;
        bool ok = true;
        while (finish == SPARROW_FINISH_NONE) {
            if (sparrow_generate_next(ctx, buf, sizeof(buf), &len, &finish, nullptr) != SPARROW_OK) {
                check(false, what + ": generate_next: " + sparrow_last_error());
                break;
            }
            text.append(buf, len);
            ++n_pieces;
            sparrow_stats s;
            const sparrow_token * toks = nullptr;
            int32_t n = 0;
            ok &= sparrow_get_stats(ctx, &s) == SPARROW_OK && sparrow_generated_tokens(ctx, &toks, &n) == SPARROW_OK;
            ok &= s.n_generated == n && n >= last_generated;
            ok &= s.n_accepted >= 0 && s.n_accepted <= s.n_drafted;
            if (mode == SPARROW_SPEC_NONE) ok &= s.n_drafted == 0;
            if (s.n_target_forwards > 0) {
                ok &= std::fabs(s.mean_accepted_length - (double) (s.n_accepted + s.n_target_forwards) / s.n_target_forwards) < 1e-9;
                ok &= s.mean_accepted_length >= 1.0 && s.decode_tokens_per_s > 0.0;
            }
            // the text handed out so far is what the tokens so far spell, or the start of it
            const std::string spelled = detokenize(m.target, std::vector<sparrow_token>(toks, toks + n));
            ok &= spelled.compare(0, text.size(), text) == 0;
            last_generated = n;
        }
        check(ok, what + ": the statistics after every piece agree with the tokens and pieces so far");
        sparrow_stats s;
        const sparrow_token * toks = nullptr;
        int32_t n = 0;
        check(sparrow_get_stats(ctx, &s) == SPARROW_OK && sparrow_generated_tokens(ctx, &toks, &n) == SPARROW_OK, "stats");
        check(text == detokenize(m.target, std::vector<sparrow_token>(toks, toks + n)), what + ": the pieces spell the tokens");
        check(n_pieces > 1 && s.n_generated > 0, what + ": several pieces");
        if (mode != SPARROW_SPEC_NONE) check(s.n_drafted > 0, what + ": the draft proposed tokens");
    }
    sparrow_context_free(ctx);
}

}  // namespace

int main(int argc, char ** argv) {
    const std::string root = argc > 1 ? argv[1] : ".";
    Models m;
    if (!m.load(root)) return 1;
    test_vision_progress(m);
    test_vision_cancel_from_another_thread(m);
    test_prefill_progress(m);
    test_generation_cancel_from_another_thread(m);
    test_stats_per_piece(m);
    return finish("test_app_callbacks");
}
