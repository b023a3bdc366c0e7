// api-vision.cpp - the "vision" section of sparrow.h: encoding pixels with a loaded vision
// (mmproj) file. Every entry point runs inside guard() (api-common.h), so nothing thrown by the
// encoders crosses the C boundary; the input is checked in full before anything is allocated.
#include "sparrow.h"

#include "api-common.h"
#include "model.h"
#include "models/vision.h"

#include <algorithm>
#include <thread>
#include <vector>

using namespace sparrow;

namespace {

const sparrow_model & vision_file(const sparrow_model * model) {
    if (!model) fail(SPARROW_ERR_INVALID_ARGUMENT, "mmproj is NULL");
    if (!model->vision) {
        fail(SPARROW_ERR_INVALID_ARGUMENT, format("the model (architecture '%s') is not a vision file: load the mmproj GGUF "
                                                  "(architecture 'clip') made for the language model", model->arch.c_str()));
    }
    return *model;
}

sparrow_status encode(const sparrow_model * mmproj, const float * pixels, int64_t n_pixel_floats, const int32_t * grid_thw,
                      int32_t n_grids, int32_t n_threads, float * out, int64_t n_out_floats, int64_t * out_n_tokens,
                      bool tiles, const char * backend_name = nullptr, VisionMonitor * monitor = nullptr) {
    return guard([&] {
        if (out_n_tokens) *out_n_tokens = 0;
        const VisionModel & vm = *vision_file(mmproj).vision;
        if (tiles && vm.hp.projector != ProjectorType::LlavaOneVision) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("image tiles are LLaVA-OneVision's (projector llava_onevision), not %s's",
                                                      vm.hp.projector_name.c_str()));
        }
        if (n_grids <= 0 || n_grids > (1 << 20)) fail(SPARROW_ERR_INVALID_ARGUMENT, format("n_grids is %d: give 1 or more grids", n_grids));
        if (!grid_thw) fail(SPARROW_ERR_INVALID_ARGUMENT, "grid_thw is NULL");
        if (n_threads < 0 || n_threads > 1024) fail(SPARROW_ERR_INVALID_ARGUMENT, "n_threads must be in [0, 1024]");
        if (n_out_floats < 0) fail(SPARROW_ERR_INVALID_ARGUMENT, "n_out_floats is negative");
        std::vector<VisionGrid> grids((size_t) n_grids);
        for (int32_t i = 0; i < n_grids; ++i) {
            grids[(size_t) i].t = grid_thw[3 * i];
            grids[(size_t) i].h = grid_thw[3 * i + 1];
            grids[(size_t) i].w = grid_thw[3 * i + 2];
        }
        const int64_t n_tokens = vision_check_input(vm, grids.data(), n_grids, n_pixel_floats, tiles);
        if (out_n_tokens) *out_n_tokens = n_tokens;
        const int64_t needed = n_tokens * vm.hp.n_embd_out;
        if (n_out_floats < needed) {
            fail(SPARROW_ERR_BUFFER_TOO_SMALL, format("out holds %lld floats; %lld tokens x %d need %lld", (long long) n_out_floats,
                                                      (long long) n_tokens, vm.hp.n_embd_out, (long long) needed));
        }
        if (!pixels) fail(SPARROW_ERR_INVALID_ARGUMENT, "pixels is NULL");
        if (!out) fail(SPARROW_ERR_INVALID_ARGUMENT, "out is NULL");
        const int threads = n_threads > 0 ? n_threads : (int) std::max(1u, std::thread::hardware_concurrency());
        const std::string name = backend_name ? backend_name : default_backend_name();
        const VisionModel & prepared = *model_weights(*mmproj, name).vision;
        BackendLease backend(*mmproj, name, threads);  // the model's idle backends keep their threads
        vision_encode(*backend, prepared, pixels, grids.data(), n_grids, out, tiles, monitor);
    });
}

}  // namespace

sparrow_status sparrow_vision_encode(const sparrow_model * mmproj, const float * pixels, int64_t n_pixel_floats,
                                     const int32_t * grid_thw, int32_t n_grids, int32_t n_threads, float * out,
                                     int64_t n_out_floats, int64_t * out_n_tokens) {
    return encode(mmproj, pixels, n_pixel_floats, grid_thw, n_grids, n_threads, out, n_out_floats, out_n_tokens, false);
}

sparrow_status sparrow_vision_encode_tiles(const sparrow_model * mmproj, const float * pixels, int64_t n_pixel_floats,
                                           const int32_t * grid_thw, int32_t n_grids, int32_t n_threads, float * out,
                                           int64_t n_out_floats, int64_t * out_n_tokens) {
    return encode(mmproj, pixels, n_pixel_floats, grid_thw, n_grids, n_threads, out, n_out_floats, out_n_tokens, true);
}

sparrow_vision_params sparrow_vision_default_params(void) {
    sparrow_vision_params p;
    p.n_threads = 0;
    p.tiles = false;
    p.abort_callback = nullptr;
    p.abort_user_data = nullptr;
    p.progress_callback = nullptr;
    p.progress_user_data = nullptr;
    p.backend = nullptr;
    return p;
}

sparrow_status sparrow_vision_encode_ext(const sparrow_model * mmproj, const float * pixels, int64_t n_pixel_floats,
                                         const int32_t * grid_thw, int32_t n_grids, float * out, int64_t n_out_floats,
                                         int64_t * out_n_tokens, sparrow_vision_params params) {
    VisionMonitor monitor(params.abort_callback, params.abort_user_data, params.progress_callback, params.progress_user_data);
    return encode(mmproj, pixels, n_pixel_floats, grid_thw, n_grids, params.n_threads, out, n_out_floats, out_n_tokens,
                  params.tiles, params.backend, &monitor);
}

int32_t sparrow_vision_n_embd(const sparrow_model * mmproj) {
    return mmproj && mmproj->vision ? mmproj->vision->hp.n_embd_out : 0;
}
