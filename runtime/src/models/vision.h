// vision.h - vision towers + projectors of the "mmproj" GGUF (general.architecture "clip",
// general.type "mmproj"): what a loaded vision file holds and how it turns pixels into the
// embeddings the language model consumes.
//
//   vision.cpp          the file: keys and tensor names (one table), validation, input checks,
//                       dispatch to the family's encoder
//   qwen2vl-vision.cpp  Qwen2-VL / Qwen2.5-VL ViT + 2x2 patch merger (projector types
//                       qwen2vl_merger, qwen2.5vl_merger; llama.cpp's layout)
//   siglip-vision.cpp   LLaVA-OneVision: SigLIP + 2-layer GELU projector + per-frame bilinear
//                       2x2 pooling + image_newline (projector type llava_onevision; ours, see
//                       docs/mmproj.md)
//
// Pixels arrive preprocessed (sparrow_py.video): Qwen as pixel_values [n_patches, C*T*P*P] in
// the processor's patch order, LLaVA-OneVision as [frames, C, H, W]. One "grid" (t, h, w) is
// one image or video: Qwen's grid_thw; for LLaVA-OneVision (frames, H / patch, W / patch).
#pragma once

#include "backend.h"
#include "common.h"

#include <cstdint>
#include <string>
#include <vector>

namespace sparrow {

class GGUFFile;

enum class ProjectorType { Qwen2VL, Qwen25VL, LlavaOneVision };

struct VisionHparams {
    ProjectorType projector = ProjectorType::Qwen2VL;
    std::string projector_name;     // clip.projector_type as written
    int32_t image_size = 0;         // SigLIP: the only frame size (learned positions); Qwen: informative
    int32_t patch_size = 0;
    int32_t n_channels = 0;         // from the patch embedding's shape
    int32_t n_embd = 0;             // tower width
    int32_t n_ff = 0;               // tower MLP width (from the tensors)
    int32_t n_layer = 0;
    int32_t n_head = 0;
    int32_t head_dim = 0;
    int32_t n_embd_out = 0;         // clip.vision.projection_dim: the LM's hidden size
    float eps = 1e-6f;
    // Qwen
    int32_t temporal_patch = 2;     // the Conv3D's depth: frames a patch spans (its kernels in the file)
    int32_t merge_size = 2;         // spatial_merge_size: 2x2 patches -> one LM token
    int32_t window_size = 112;      // Qwen2.5-VL window, in pixels (clip.vision.window_size; HF default)
    int32_t n_wa_pattern = 0;       // Qwen2.5-VL: block i has full attention iff (i + 1) % n == 0; 0 = all full
    float rope_theta = 10000.0f;    // the ViT's axial rope base (HF's vision rope_theta default, as llama.cpp)
    // LLaVA-OneVision
    std::vector<int32_t> feature_layers;  // hidden_states indexes (0 = embeddings), resolved >= 0
    int32_t n_feature_layers_run = 0;     // blocks to run: the deepest feature layer
};

struct VisionLayer {
    Tensor ln1_w, ln1_b, ln2_w, ln2_b;  // *_b empty for RMSNorm (Qwen2.5-VL)
    Tensor wq, bq, wk, bk, wv, bv, wo, bo;
    Tensor ffn_gate, ffn_gate_b;        // Qwen2.5-VL SwiGLU only
    Tensor ffn_up, ffn_up_b, ffn_down, ffn_down_b;
};

// The deepest Conv3D patch embedding read: released Qwen towers have 2 (llama.cpp's two kernels);
// deeper ones are ours (sparrow_py/convert/mmproj.py: a tower that sees a whole short clip at once).
constexpr int kMaxTemporalPatch = 16;

struct VisionWeights {
    Tensor patch_embd[kMaxTemporalPatch];   // [C*P*P -> n_embd] per temporal slice (Qwen: 2 or more; SigLIP: 1)
    Tensor patch_bias;      // SigLIP
    Tensor pos_embd;        // SigLIP: [n_patches, n_embd] f32
    std::vector<VisionLayer> layers;
    Tensor post_ln_w, post_ln_b;   // Qwen merger's ln_q (bias: Qwen2-VL only)
    Tensor mm0_w, mm0_b, mm2_w, mm2_b;
    Tensor image_newline;   // LLaVA-OneVision: [n_embd_out] f32
};

struct VisionModel {
    VisionHparams hp;
    VisionWeights w;
};

struct VisionGrid {
    int64_t t = 0, h = 0, w = 0;
};

// Is this file a vision (mmproj) file?
bool vision_supports_arch(const std::string & arch);
// Read keys and bind weights; validates every shape and type (SPARROW_ERR_FORMAT /
// SPARROW_ERR_UNSUPPORTED).
void vision_load(const GGUFFile & file, VisionModel & m);
// The model with its weights in the store's backend memory, matrices in their matmul form (see
// lm_prepare_weights).
VisionModel vision_prepare_weights(WeightStore & store, const VisionModel & views);

// Checks grids against the model (divisibility, sizes) and the pixel count; returns the number
// of output embeddings (rows of n_embd_out floats). SPARROW_ERR_INVALID_ARGUMENT on bad input.
// tiles: LLaVA-OneVision image tiles, unpooled (sparrow_vision_encode_tiles).
int64_t vision_check_input(const VisionModel & m, const VisionGrid * grids, int32_t n_grids, int64_t n_pixel_floats,
                           bool tiles = false);

// Cancellation and progress of one encode call (sparrow_vision_params). Work is counted in patch
// rows times the steps each row goes through: every block of the tower, then the projector, so a
// video reports (and can be stopped) layer by layer, not only frame chunk by frame chunk.
class VisionMonitor {
public:
    VisionMonitor() = default;
    VisionMonitor(bool (*abort)(void *), void * abort_data, bool (*progress)(float, void *), void * progress_data)
        : abort_(abort), abort_data_(abort_data), progress_(progress), progress_data_(progress_data) {}
    void set_total(int64_t units) { total_ = units; }
    // Throws SPARROW_ERR_ABORTED if the abort callback asks to stop.
    void check() const {
        if (abort_ && abort_(abort_data_)) fail(SPARROW_ERR_ABORTED, "vision encode aborted by the abort callback");
    }
    // units more are done: report the fraction (exactly 1 when all are), then check for abort.
    void advance(int64_t units) {
        done_ += units;
        const float fraction = total_ > 0 && done_ < total_ ? (float) ((double) done_ / (double) total_) : 1.0f;
        if (progress_ && !progress_(fraction, progress_data_)) {
            fail(SPARROW_ERR_ABORTED, "vision encode cancelled by the progress callback");
        }
        if (done_ < total_) check();  // nothing is left to stop after the last step
    }

private:
    bool (*abort_)(void *) = nullptr;
    void * abort_data_ = nullptr;
    bool (*progress_)(float, void *) = nullptr;
    void * progress_data_ = nullptr;
    int64_t total_ = 0, done_ = 0;
};

// The steps each patch row of a grid goes through (VisionMonitor's unit): the blocks run, + 1 for
// the projector.
int64_t vision_steps_per_row(const VisionModel & m);

// Encode checked input; out (host) receives vision_check_input's count of rows. monitor (may be
// null) is asked between frame chunks and layers.
void vision_encode(Backend & be, const VisionModel & m, const float * pixels, const VisionGrid * grids, int32_t n_grids,
                   float * out, bool tiles = false, VisionMonitor * monitor = nullptr);

// The families (inputs already checked). Each returns the output rows written; monitor may be null.
int64_t qwen2vl_encode_grid(Backend & be, const VisionModel & m, const float * pixels, const VisionGrid & grid, float * out,
                            VisionMonitor * monitor = nullptr);
int64_t siglip_encode_grid(Backend & be, const VisionModel & m, const float * pixels, const VisionGrid & grid, float * out,
                           bool pool = true, VisionMonitor * monitor = nullptr);
int64_t qwen2vl_grid_tokens(const VisionModel & m, const VisionGrid & grid);
int64_t siglip_grid_tokens(const VisionModel & m, const VisionGrid & grid, bool pool = true);

// Activation memory of one encode call, freed on scope exit (also when an op throws).
class VisionBuffers {
public:
    explicit VisionBuffers(Backend & be) : be_(be) {}
    ~VisionBuffers() {
        for (void * p : owned_) be_.free(p);
    }
    VisionBuffers(const VisionBuffers &) = delete;
    VisionBuffers & operator=(const VisionBuffers &) = delete;
    Tensor matrix(int64_t cols, int64_t rows) {
        void * p = be_.alloc((size_t) cols * (size_t) rows * sizeof(float));
        owned_.push_back(p);
        return Tensor::matrix(DType::F32, cols, rows, p);
    }

private:
    Backend & be_;
    std::vector<void *> owned_;
};

}  // namespace sparrow
