// vision.cpp - the vision (mmproj) GGUF: keys and tensor names, loading with validation, input
// checks, and dispatch to the family encoders (qwen2vl-vision.cpp, siglip-vision.cpp).
//
// Keys and names are llama.cpp's (clip.* / v.* / mm.*) and mirror sparrow_py/convert/mmproj.py's
// Keys and Tensor tables; docs/mmproj.md documents both. Keys llama.cpp's Qwen converter does
// not write (window size, merge size, the ViT's rope base) take HF's values, as llama.cpp's
// clip code hard-codes them.
#include "models/vision.h"

#include "common.h"
#include "gguf.h"
#include "models/llm.h"

#include <algorithm>
#include <cstring>

namespace sparrow {

namespace {

// ---- GGUF metadata keys --------------------------------------------------------------------
constexpr const char * kKeyGeneralType = "general.type";
constexpr const char * kKeyProjectorType = "clip.projector_type";
constexpr const char * kKeyHasVisionEncoder = "clip.has_vision_encoder";
constexpr const char * kKeyImageSize = "clip.vision.image_size";
constexpr const char * kKeyPatchSize = "clip.vision.patch_size";
constexpr const char * kKeyEmbeddingLength = "clip.vision.embedding_length";
constexpr const char * kKeyBlockCount = "clip.vision.block_count";
constexpr const char * kKeyHeadCount = "clip.vision.attention.head_count";
constexpr const char * kKeyLayerNormEps = "clip.vision.attention.layer_norm_epsilon";
constexpr const char * kKeyProjectionDim = "clip.vision.projection_dim";
constexpr const char * kKeySpatialMergeSize = "clip.vision.spatial_merge_size";
constexpr const char * kKeyWindowSize = "clip.vision.window_size";
constexpr const char * kKeyWaPattern = "clip.vision.n_wa_pattern";
constexpr const char * kKeyFeatureLayer = "clip.vision.feature_layer";
constexpr const char * kKeyFeatureSelectStrategy = "clip.vision.feature_select_strategy";
constexpr const char * kKeyTemporalPatchSize = "clip.vision.temporal_patch_size";  // ours; absent: 2

// ---- tensor names ("%d" = block) -----------------------------------------------------------
constexpr const char * kPatchEmbd = "v.patch_embd.weight";
// Qwen's later temporal slices are kPatchEmbd + ".1", ".2", ...
constexpr const char * kPatchBias = "v.patch_embd.bias";
constexpr const char * kPosEmbd = "v.position_embd.weight";
constexpr const char * kLn1 = "v.blk.%d.ln1.%s";
constexpr const char * kLn2 = "v.blk.%d.ln2.%s";
constexpr const char * kAttnQ = "v.blk.%d.attn_q.%s";
constexpr const char * kAttnK = "v.blk.%d.attn_k.%s";
constexpr const char * kAttnV = "v.blk.%d.attn_v.%s";
constexpr const char * kAttnOut = "v.blk.%d.attn_out.%s";
constexpr const char * kFfnGate = "v.blk.%d.ffn_gate.%s";
constexpr const char * kFfnUp = "v.blk.%d.ffn_up.%s";
constexpr const char * kFfnDown = "v.blk.%d.ffn_down.%s";
constexpr const char * kPostLn = "v.post_ln.%s";
constexpr const char * kMm0 = "mm.0.%s";
constexpr const char * kMm2 = "mm.2.%s";
constexpr const char * kImageNewline = "model.image_newline";

struct ProjectorInfo {
    const char * name;
    ProjectorType type;
};
const ProjectorInfo kProjectors[] = {
    {"qwen2vl_merger", ProjectorType::Qwen2VL},
    {"qwen2.5vl_merger", ProjectorType::Qwen25VL},
    {"llava_onevision", ProjectorType::LlavaOneVision},
};

// Inputs far beyond any real video are refused before anything is sized from them.
constexpr int64_t kMaxGridSide = 1 << 14;     // patches per side
constexpr int64_t kMaxFrames = 1 << 16;
constexpr int64_t kMaxTotalPatches = 1LL << 31;

int32_t positive_key(const GGUFFile & f, const char * key, int64_t limit) {
    const int64_t v = f.get_int(key);
    if (v <= 0 || v > limit) fail(SPARROW_ERR_FORMAT, format("metadata '%s' = %lld is out of range", key, (long long) v));
    return (int32_t) v;
}

std::string name_of(const char * pattern, int block, const char * kind) { return format(pattern, block, kind); }
std::string name_of(const char * pattern, const char * kind) { return format(pattern, kind); }

// A weight matrix: [cols -> rows], rows of whole quantization blocks (matmul needs that).
Tensor bind_matrix(const GGUFFile & f, const std::string & name, int64_t cols, int64_t rows) {
    Tensor t = bind_tensor(f, name, cols, rows, true);
    if (cols % traits(t.type).block_size != 0) {
        fail(SPARROW_ERR_FORMAT, format("tensor '%s' has rows of %lld elements, not whole %s blocks", name.c_str(),
                                        (long long) cols, traits(t.type).name));
    }
    return t;
}

Tensor bind_vector(const GGUFFile & f, const std::string & name, int64_t n, bool required = true) {
    return bind_tensor(f, name, n, 1, required, true);
}

// The rows of a matrix whose row count the file decides (an MLP width), validated.
int64_t rows_of(const GGUFFile & f, const std::string & name, int64_t limit) {
    const GGUFTensorInfo * info = f.find_tensor(name);
    if (!info) fail(SPARROW_ERR_FORMAT, format("missing tensor '%s'", name.c_str()));
    const int64_t rows = info->ne[1] * info->ne[2] * info->ne[3];
    if (rows <= 0 || rows > limit) fail(SPARROW_ERR_FORMAT, format("tensor '%s' has %lld rows", name.c_str(), (long long) rows));
    return rows;
}

// A Conv2D kernel [C_out, C, P, P] (ggml ne = P, P, C, C_out) viewed as the matrix
// [C*P*P -> C_out] a patch's (c, y, x)-ordered pixels multiply. Float types only: a row of
// P*P*C elements is rarely whole quantization blocks, and llama.cpp keeps it f16/f32.
Tensor bind_patch_kernel(const GGUFFile & f, const char * name, int64_t patch, int64_t n_out, int32_t * channels) {
    const GGUFTensorInfo * info = f.find_tensor(name);
    if (!info) fail(SPARROW_ERR_FORMAT, format("missing tensor '%s'", name));
    if (info->ne[0] != patch || info->ne[1] != patch || info->ne[3] != n_out || info->ne[2] <= 0 || info->ne[2] > 16) {
        fail(SPARROW_ERR_FORMAT, format("tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, C, %lld, %lld]", name,
                                        (long long) info->ne[3], (long long) info->ne[2], (long long) info->ne[1],
                                        (long long) info->ne[0], (long long) n_out, (long long) patch, (long long) patch));
    }
    if (*channels != 0 && info->ne[2] != *channels) {
        fail(SPARROW_ERR_FORMAT, format("tensor '%s' has %lld input channels, another kernel %d", name, (long long) info->ne[2], *channels));
    }
    const DType type = (DType) info->type;
    if (type != DType::F32 && type != DType::F16 && type != DType::BF16) {
        fail(SPARROW_ERR_UNSUPPORTED, format("tensor '%s': patch embedding of type %s (f32, f16 or bf16 expected)", name,
                                             type_traits(info->type) ? type_traits(info->type)->name : "unknown"));
    }
    *channels = (int32_t) info->ne[2];
    Tensor t = Tensor::matrix(type, info->ne[2] * patch * patch, n_out, const_cast<uint8_t *>(f.tensor_data(*info)));
    t.name = info->name.c_str();
    return t;
}

void load_qwen(const GGUFFile & f, VisionHparams & hp, VisionWeights & w) {
    const bool v25 = hp.projector == ProjectorType::Qwen25VL;
    const int64_t D = hp.n_embd;
    hp.merge_size = (int32_t) f.get_int(kKeySpatialMergeSize, 2);
    if (hp.merge_size != 2) fail(SPARROW_ERR_UNSUPPORTED, format("spatial_merge_size %d (2 is supported)", hp.merge_size));
    if (hp.head_dim % 4 != 0) fail(SPARROW_ERR_FORMAT, format("head dimension %d is not a multiple of 4 (2D rotary)", hp.head_dim));
    if (v25) {
        hp.window_size = (int32_t) f.get_int(kKeyWindowSize, 112);
        hp.n_wa_pattern = (int32_t) f.get_int(kKeyWaPattern, 0);
        const int64_t unit = (int64_t) hp.patch_size * hp.merge_size;
        if (hp.window_size < unit || hp.window_size % unit != 0) {
            fail(SPARROW_ERR_FORMAT, format("window_size %d is not a multiple of patch_size x merge size (%lld)", hp.window_size,
                                            (long long) unit));
        }
        if (hp.n_wa_pattern < 0 || hp.n_wa_pattern > hp.n_layer) fail(SPARROW_ERR_FORMAT, "n_wa_pattern is out of range");
    }

    const int64_t depth = f.get_int(kKeyTemporalPatchSize, 2);
    if (depth < 2 || depth > kMaxTemporalPatch) {
        fail(SPARROW_ERR_UNSUPPORTED, format("temporal_patch_size %lld (2 to %d are supported)", (long long) depth, kMaxTemporalPatch));
    }
    hp.temporal_patch = (int32_t) depth;
    for (int t = 0; t < hp.temporal_patch; ++t) {
        const std::string name = t == 0 ? std::string(kPatchEmbd) : format("%s.%d", kPatchEmbd, t);
        w.patch_embd[t] = bind_patch_kernel(f, name.c_str(), hp.patch_size, D, &hp.n_channels);
    }
    if (f.find_tensor(format("%s.%d", kPatchEmbd, hp.temporal_patch))) {
        fail(SPARROW_ERR_FORMAT, format("more patch embedding kernels than temporal_patch_size %d", hp.temporal_patch));
    }
    hp.n_ff = (int32_t) rows_of(f, name_of(kFfnUp, 0, "weight"), 1 << 20);
    const int64_t F = hp.n_ff;
    const char * norm_kinds_bias = v25 ? nullptr : "bias";  // RMSNorm (2.5) has no bias
    w.layers.resize((size_t) hp.n_layer);
    for (int i = 0; i < hp.n_layer; ++i) {
        VisionLayer & l = w.layers[(size_t) i];
        l.ln1_w = bind_vector(f, name_of(kLn1, i, "weight"), D);
        l.ln2_w = bind_vector(f, name_of(kLn2, i, "weight"), D);
        if (norm_kinds_bias) {
            l.ln1_b = bind_vector(f, name_of(kLn1, i, "bias"), D);
            l.ln2_b = bind_vector(f, name_of(kLn2, i, "bias"), D);
        }
        l.wq = bind_matrix(f, name_of(kAttnQ, i, "weight"), D, D);
        l.wk = bind_matrix(f, name_of(kAttnK, i, "weight"), D, D);
        l.wv = bind_matrix(f, name_of(kAttnV, i, "weight"), D, D);
        l.wo = bind_matrix(f, name_of(kAttnOut, i, "weight"), D, D);
        l.bq = bind_vector(f, name_of(kAttnQ, i, "bias"), D);
        l.bk = bind_vector(f, name_of(kAttnK, i, "bias"), D);
        l.bv = bind_vector(f, name_of(kAttnV, i, "bias"), D);
        l.bo = bind_vector(f, name_of(kAttnOut, i, "bias"), D);
        if (v25) {
            l.ffn_gate = bind_matrix(f, name_of(kFfnGate, i, "weight"), D, F);
            l.ffn_gate_b = bind_vector(f, name_of(kFfnGate, i, "bias"), F);
        }
        l.ffn_up = bind_matrix(f, name_of(kFfnUp, i, "weight"), D, F);
        l.ffn_up_b = bind_vector(f, name_of(kFfnUp, i, "bias"), F);
        l.ffn_down = bind_matrix(f, name_of(kFfnDown, i, "weight"), F, D);
        l.ffn_down_b = bind_vector(f, name_of(kFfnDown, i, "bias"), D);
    }
    w.post_ln_w = bind_vector(f, name_of(kPostLn, "weight"), D);
    if (norm_kinds_bias) w.post_ln_b = bind_vector(f, name_of(kPostLn, "bias"), D);
    const int64_t merged = D * hp.merge_size * hp.merge_size;
    w.mm0_w = bind_matrix(f, name_of(kMm0, "weight"), merged, merged);
    w.mm0_b = bind_vector(f, name_of(kMm0, "bias"), merged);
    w.mm2_w = bind_matrix(f, name_of(kMm2, "weight"), merged, hp.n_embd_out);
    w.mm2_b = bind_vector(f, name_of(kMm2, "bias"), hp.n_embd_out);
}

void load_siglip(const GGUFFile & f, VisionHparams & hp, VisionWeights & w) {
    const int64_t D = hp.n_embd;
    // SigLIP's Conv2D has stride patch_size and no padding: 384-pixel frames with 14-pixel patches
    // (siglip-so400m, LLaVA-OneVision's tower) give 27 x 27 patches and the last 6 pixels go unread
    if (hp.image_size < hp.patch_size) {
        fail(SPARROW_ERR_FORMAT, format("image_size %d is smaller than patch_size %d", hp.image_size, hp.patch_size));
    }
    const std::string strategy = f.get_string(kKeyFeatureSelectStrategy, "full");
    if (strategy != "full") {
        // "default" drops a CLS token SigLIP does not have; HF's video path cannot pool that either
        fail(SPARROW_ERR_UNSUPPORTED, format("feature_select_strategy '%s' (LLaVA-OneVision uses 'full')", strategy.c_str()));
    }
    std::vector<int64_t> layers = f.has(kKeyFeatureLayer) ? f.get_int_array(kKeyFeatureLayer) : std::vector<int64_t>{-1};
    if (layers.empty() || layers.size() > 64) fail(SPARROW_ERR_FORMAT, "feature_layer must list 1 to 64 layers");
    for (int64_t k : layers) {
        // HF indexes hidden_states: n_layer + 1 entries, 0 = embeddings, negative from the end
        const int64_t resolved = k < 0 ? hp.n_layer + 1 + k : k;
        if (resolved < 0 || resolved > hp.n_layer) {
            fail(SPARROW_ERR_FORMAT, format("feature_layer %lld is outside hidden_states [0, %d]", (long long) k, hp.n_layer));
        }
        hp.feature_layers.push_back((int32_t) resolved);
        hp.n_feature_layers_run = std::max(hp.n_feature_layers_run, (int32_t) resolved);
    }

    w.patch_embd[0] = bind_patch_kernel(f, kPatchEmbd, hp.patch_size, D, &hp.n_channels);
    w.patch_bias = bind_vector(f, kPatchBias, D);
    const int64_t side = hp.image_size / hp.patch_size;
    w.pos_embd = bind_tensor(f, kPosEmbd, D, side * side, true, true);
    hp.n_ff = (int32_t) rows_of(f, name_of(kFfnUp, 0, "weight"), 1 << 20);
    const int64_t F = hp.n_ff;
    w.layers.resize((size_t) hp.n_layer);
    for (int i = 0; i < hp.n_layer; ++i) {
        VisionLayer & l = w.layers[(size_t) i];
        l.ln1_w = bind_vector(f, name_of(kLn1, i, "weight"), D);
        l.ln1_b = bind_vector(f, name_of(kLn1, i, "bias"), D);
        l.ln2_w = bind_vector(f, name_of(kLn2, i, "weight"), D);
        l.ln2_b = bind_vector(f, name_of(kLn2, i, "bias"), D);
        l.wq = bind_matrix(f, name_of(kAttnQ, i, "weight"), D, D);
        l.wk = bind_matrix(f, name_of(kAttnK, i, "weight"), D, D);
        l.wv = bind_matrix(f, name_of(kAttnV, i, "weight"), D, D);
        l.wo = bind_matrix(f, name_of(kAttnOut, i, "weight"), D, D);
        l.bq = bind_vector(f, name_of(kAttnQ, i, "bias"), D);
        l.bk = bind_vector(f, name_of(kAttnK, i, "bias"), D);
        l.bv = bind_vector(f, name_of(kAttnV, i, "bias"), D);
        l.bo = bind_vector(f, name_of(kAttnOut, i, "bias"), D);
        l.ffn_up = bind_matrix(f, name_of(kFfnUp, i, "weight"), D, F);
        l.ffn_up_b = bind_vector(f, name_of(kFfnUp, i, "bias"), F);
        l.ffn_down = bind_matrix(f, name_of(kFfnDown, i, "weight"), F, D);
        l.ffn_down_b = bind_vector(f, name_of(kFfnDown, i, "bias"), D);
    }
    const int64_t E = hp.n_embd_out;
    w.mm0_w = bind_matrix(f, name_of(kMm0, "weight"), D * (int64_t) hp.feature_layers.size(), E);
    w.mm0_b = bind_vector(f, name_of(kMm0, "bias"), E);
    w.mm2_w = bind_matrix(f, name_of(kMm2, "weight"), E, E);
    w.mm2_b = bind_vector(f, name_of(kMm2, "bias"), E);
    w.image_newline = bind_vector(f, kImageNewline, E);
}

}  // namespace

bool vision_supports_arch(const std::string & arch) { return arch == "clip"; }

void vision_load(const GGUFFile & f, VisionModel & m) {
    VisionHparams & hp = m.hp;
    const std::string type = f.get_string(kKeyGeneralType, "mmproj");
    if (type != "mmproj") fail(SPARROW_ERR_UNSUPPORTED, format("a clip file of general.type '%s' (mmproj expected)", type.c_str()));
    if (!f.get_bool(kKeyHasVisionEncoder, true)) fail(SPARROW_ERR_UNSUPPORTED, "the clip file has no vision encoder (audio-only?)");
    hp.projector_name = f.get_string(kKeyProjectorType);
    const ProjectorInfo * info = nullptr;
    for (const auto & p : kProjectors) {
        if (hp.projector_name == p.name) info = &p;
    }
    if (!info) {
        fail(SPARROW_ERR_UNSUPPORTED, format("vision projector '%s' is not supported (qwen2vl_merger, qwen2.5vl_merger, "
                                             "llava_onevision are)", hp.projector_name.c_str()));
    }
    hp.projector = info->type;
    hp.image_size = positive_key(f, kKeyImageSize, 1 << 16);
    hp.patch_size = positive_key(f, kKeyPatchSize, 1024);
    hp.n_embd = positive_key(f, kKeyEmbeddingLength, 1 << 16);
    hp.n_layer = positive_key(f, kKeyBlockCount, 1024);
    hp.n_head = positive_key(f, kKeyHeadCount, 4096);
    hp.n_embd_out = positive_key(f, kKeyProjectionDim, 1 << 17);
    if (hp.n_embd % hp.n_head != 0) fail(SPARROW_ERR_FORMAT, format("embedding_length %d is not a multiple of head_count %d", hp.n_embd, hp.n_head));
    hp.head_dim = hp.n_embd / hp.n_head;
    hp.eps = (float) f.get_float(kKeyLayerNormEps, 1e-6);
    if (!(hp.eps > 0.0f) || hp.eps > 1.0f) fail(SPARROW_ERR_FORMAT, "layer_norm_epsilon is out of range");
    if (hp.projector == ProjectorType::LlavaOneVision) {
        load_siglip(f, hp, m.w);
    } else {
        load_qwen(f, hp, m.w);
    }
}

VisionModel vision_prepare_weights(WeightStore & store, const VisionModel & views) {
    VisionModel m = views;
    VisionWeights & w = m.w;
    for (Tensor & t : w.patch_embd) {
        if (t.data) t = store.matmul_weight(t);
    }
    for (Tensor * t : {&w.mm0_w, &w.mm2_w}) *t = store.matmul_weight(*t);
    for (Tensor * t : {&w.patch_bias, &w.pos_embd, &w.post_ln_w, &w.post_ln_b, &w.mm0_b, &w.mm2_b, &w.image_newline}) {
        *t = store.weight(*t);
    }
    for (VisionLayer & l : w.layers) {
        for (Tensor * t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_gate, &l.ffn_up, &l.ffn_down}) *t = store.matmul_weight(*t);
        for (Tensor * t : {&l.ln1_w, &l.ln1_b, &l.ln2_w, &l.ln2_b, &l.bq, &l.bk, &l.bv, &l.bo, &l.ffn_gate_b, &l.ffn_up_b,
                           &l.ffn_down_b}) {
            *t = store.weight(*t);
        }
    }
    return m;
}

int64_t qwen2vl_grid_tokens(const VisionModel & m, const VisionGrid & g) {
    return g.t * g.h * g.w / ((int64_t) m.hp.merge_size * m.hp.merge_size);
}

int64_t siglip_grid_tokens(const VisionModel & m, const VisionGrid & g, bool pool) {
    if (!pool) return g.t * g.h * g.w;              // image tiles as they are
    return g.t * ((g.h + 1) / 2) * ((g.w + 1) / 2) + 1;  // pooled frames, then one image_newline
}

namespace {

// What differs between the vision families, one row each, so that the functions below have no
// branch per family and a new family is a new row (docs/adding-a-model.md).
struct VisionFamily {
    const char * pixel_layout;  // for errors about the pixel count
    // Refuse a grid this family cannot take (index: its place in the call, for the message).
    void (*check_grid)(const VisionModel & m, const VisionGrid & g, int32_t index);
    int64_t (*grid_floats)(const VisionModel & m, const VisionGrid & g);
    int64_t (*grid_tokens)(const VisionModel & m, const VisionGrid & g, bool tiles);
    int64_t (*steps_per_row)(const VisionModel & m);  // blocks run per patch row, + 1 for the projector
    int64_t (*encode_grid)(Backend & be, const VisionModel & m, const float * pixels, const VisionGrid & g, float * out,
                           bool tiles, VisionMonitor * monitor);
};

// Qwen2-VL / Qwen2.5-VL: any grid of 2x2 merge windows, pre-patchified pixels, every block run.
const VisionFamily kQwenFamily = {
    "n_patches x C*T*P*P",
    [](const VisionModel & m, const VisionGrid & g, int32_t i) {
        if (g.h % m.hp.merge_size != 0 || g.w % m.hp.merge_size != 0) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("grid %d = (%lld, %lld, %lld): h and w must be multiples of the merge size %d",
                                                      i, (long long) g.t, (long long) g.h, (long long) g.w, m.hp.merge_size));
        }
    },
    [](const VisionModel & m, const VisionGrid & g) {
        return g.t * g.h * g.w * m.hp.n_channels * m.hp.temporal_patch * (int64_t) m.hp.patch_size * m.hp.patch_size;
    },
    [](const VisionModel & m, const VisionGrid & g, bool) { return qwen2vl_grid_tokens(m, g); },
    [](const VisionModel & m) { return (int64_t) m.hp.n_layer + 1; },
    [](Backend & be, const VisionModel & m, const float * pixels, const VisionGrid & g, float * out, bool,
       VisionMonitor * monitor) { return qwen2vl_encode_grid(be, m, pixels, g, out, monitor); },
};

// SigLIP (LLaVA-OneVision): fixed-size frames as images, the blocks up to the feature layer;
// video frames are pooled 2x2 (then one newline), anyres tiles kept whole.
const VisionFamily kSiglipFamily = {
    "frames x C x H x W",
    [](const VisionModel & m, const VisionGrid & g, int32_t i) {
        const int64_t P = m.hp.patch_size, side = m.hp.image_size / P;
        if (g.h != side || g.w != side) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("grid %d: %lldx%lld patches, but this tower takes %dx%d frames: %lld x %lld "
                                                      "patches of %lld pixels", i, (long long) g.h, (long long) g.w,
                                                      m.hp.image_size, m.hp.image_size, (long long) side, (long long) side,
                                                      (long long) P));
        }
    },
    [](const VisionModel & m, const VisionGrid & g) {
        return g.t * m.hp.n_channels * (int64_t) m.hp.image_size * m.hp.image_size;
    },
    [](const VisionModel & m, const VisionGrid & g, bool tiles) { return siglip_grid_tokens(m, g, !tiles); },
    [](const VisionModel & m) { return (int64_t) m.hp.n_feature_layers_run + 1; },
    [](Backend & be, const VisionModel & m, const float * pixels, const VisionGrid & g, float * out, bool tiles,
       VisionMonitor * monitor) { return siglip_encode_grid(be, m, pixels, g, out, !tiles, monitor); },
};

const VisionFamily & family_of(const VisionModel & m) {
    switch (m.hp.projector) {
        case ProjectorType::Qwen2VL:
        case ProjectorType::Qwen25VL: return kQwenFamily;
        case ProjectorType::LlavaOneVision: return kSiglipFamily;
    }
    fail(SPARROW_ERR_INTERNAL, "unknown vision projector");
}

}  // namespace

int64_t vision_check_input(const VisionModel & m, const VisionGrid * grids, int32_t n_grids, int64_t n_pixel_floats,
                           bool tiles) {
    if (n_grids <= 0 || !grids) fail(SPARROW_ERR_INVALID_ARGUMENT, "no grids: give at least one (t, h, w)");
    const VisionFamily & family = family_of(m);
    int64_t floats = 0, tokens = 0, patches = 0;
    for (int32_t i = 0; i < n_grids; ++i) {
        const VisionGrid & g = grids[i];
        if (g.t < 1 || g.h < 1 || g.w < 1 || g.t > kMaxFrames || g.h > kMaxGridSide || g.w > kMaxGridSide) {
            fail(SPARROW_ERR_INVALID_ARGUMENT, format("grid %d = (%lld, %lld, %lld) is out of range (t in [1, %lld], h and w in [1, %lld])",
                                                      i, (long long) g.t, (long long) g.h, (long long) g.w, (long long) kMaxFrames,
                                                      (long long) kMaxGridSide));
        }
        patches += g.t * g.h * g.w;
        if (patches > kMaxTotalPatches) fail(SPARROW_ERR_INVALID_ARGUMENT, "the grids hold too many patches");
        family.check_grid(m, g, i);
        floats += family.grid_floats(m, g);
        tokens += family.grid_tokens(m, g, tiles);
    }
    if (n_pixel_floats != floats) {
        fail(SPARROW_ERR_INVALID_ARGUMENT, format("%lld pixel floats given, the grids need %lld (%s, C = %lld channels, patch %lld)",
                                                  (long long) n_pixel_floats, (long long) floats, family.pixel_layout,
                                                  (long long) m.hp.n_channels, (long long) m.hp.patch_size));
    }
    return tokens;
}

int64_t vision_steps_per_row(const VisionModel & m) { return family_of(m).steps_per_row(m); }

void vision_encode(Backend & be, const VisionModel & m, const float * pixels, const VisionGrid * grids, int32_t n_grids,
                   float * out, bool tiles, VisionMonitor * monitor) {
    const VisionFamily & family = family_of(m);
    if (monitor) {
        int64_t total = 0;
        for (int32_t i = 0; i < n_grids; ++i) total += grids[i].t * grids[i].h * grids[i].w * family.steps_per_row(m);
        monitor->set_total(total);
    }
    for (int32_t i = 0; i < n_grids; ++i) {
        const VisionGrid & g = grids[i];
        const int64_t rows = family.encode_grid(be, m, pixels, g, out, tiles, monitor);
        pixels += family.grid_floats(m, g);
        out += rows * m.hp.n_embd_out;
    }
}

}  // namespace sparrow
