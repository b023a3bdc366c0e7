// siglip-vision.cpp - LLaVA-OneVision's video features: a SigLIP tower, the 2-layer GELU
// projector, per-frame bilinear 2x2 pooling and the image_newline, as transformers'
// LlavaOnevisionModel.get_video_features computes them, over the ops of backend.h.
//
//   embeddings  Conv2D (C, P, P) stride P with bias: a matmul per patch (raster order), plus the
//               learned position embedding (one row per patch of the fixed image_size frame).
//   blocks      x += out(attn(ln1(x))); x += fc2(gelu_tanh(fc1(ln2(x)))); LayerNorms with bias,
//               q/k/v/out with biases, no rotary, bidirectional attention within a frame.
//   features    hidden_states[k] for each k of clip.vision.feature_layer (0 = embeddings, -1 =
//               the last block's output), concatenated; never post_layernorm.
//   projector   mm.2(gelu_erf(mm.0(features))), per patch.
//   pooling     HF apply_pooling: each frame's h x w grid resized to ceil(h/2) x ceil(w/2) with
//               torch's bilinear interpolation (align_corners=False): a 2x2 average for even sides.
//   newline     the frames' tokens, in frame order, then one image_newline for the whole video.
//
// Still images (anyres): with pool = false the frames are an image's tiles and each comes out
// as its h x w projected patches, without pooling or newline; the tile layout (unpadding, a
// newline per row) is arranged by the caller (sparrow_py.vision).
#include "models/vision.h"

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace sparrow {

namespace {

constexpr int64_t kChunkPatches = 4096;  // patch rows per chunk of whole frames

// torch's upsample_bilinear2d (align_corners=False, output size given) along one axis: for each
// output index, two source indexes and their weights.
struct AxisTaps {
    std::vector<int32_t> i0, i1;
    std::vector<float> w0, w1;
};

AxisTaps bilinear_taps(int64_t in, int64_t out) {
    AxisTaps a;
    const float scale = (float) in / (float) out;
    for (int64_t o = 0; o < out; ++o) {
        float src = scale * ((float) o + 0.5f) - 0.5f;
        if (src < 0.0f) src = 0.0f;
        const int64_t lo = (int64_t) src;
        const int64_t hi = lo + (lo < in - 1 ? 1 : 0);
        const float frac = src - (float) lo;
        a.i0.push_back((int32_t) lo);
        a.i1.push_back((int32_t) hi);
        a.w0.push_back(1.0f - frac);
        a.w1.push_back(frac);
    }
    return a;
}

}  // namespace

int64_t siglip_encode_grid(Backend & be, const VisionModel & model, const float * pixels, const VisionGrid & grid,
                           float * out, bool pool, VisionMonitor * monitor) {
    const VisionHparams & hp = model.hp;
    const VisionWeights & W = model.w;
    const int64_t D = hp.n_embd, F = hp.n_ff, E = hp.n_embd_out;
    const int64_t P = hp.patch_size, C = hp.n_channels;
    const int64_t n_feat = (int64_t) hp.feature_layers.size();
    const int64_t frame_rows = grid.h * grid.w;
    const int64_t width = hp.image_size, height = hp.image_size;  // patches cover the top-left grid.w * P pixels
    const int64_t frames_per_chunk = std::max<int64_t>(1, std::min<int64_t>(grid.t, kChunkPatches / frame_rows));
    const int64_t max_rows = frames_per_chunk * frame_rows;
    const int64_t pooled_h = (grid.h + 1) / 2, pooled_w = (grid.w + 1) / 2, pooled_rows = pooled_h * pooled_w;

    VisionBuffers buf(be);
    Tensor patches = buf.matrix(C * P * P, max_rows);
    Tensor h = buf.matrix(D, max_rows), cur = buf.matrix(D, max_rows), attn = buf.matrix(D, max_rows);
    Tensor q = buf.matrix(D, max_rows), k = buf.matrix(D, max_rows), v = buf.matrix(D, max_rows);
    Tensor ff = buf.matrix(F, max_rows);
    // one buffer per distinct feature layer, then the concatenation (ping-pong as it grows)
    std::vector<int32_t> distinct(hp.feature_layers.begin(), hp.feature_layers.end());
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    std::vector<Tensor> captured;
    for (size_t i = 0; i < distinct.size(); ++i) captured.push_back(buf.matrix(D, max_rows));
    Tensor concat[2];
    if (n_feat > 1) concat[0] = buf.matrix(D * n_feat, max_rows), concat[1] = buf.matrix(D * n_feat, max_rows);
    Tensor proj = buf.matrix(E, max_rows), proj2 = buf.matrix(E, max_rows);
    Tensor pooled = buf.matrix(E, frames_per_chunk * pooled_rows);

    // pooling taps, per frame (chunk-relative rows are added per frame below)
    const AxisTaps ty = bilinear_taps(grid.h, pooled_h), tx = bilinear_taps(grid.w, pooled_w);
    std::vector<int32_t> tap_rows;
    std::vector<float> tap_weights;
    std::vector<float> host_patches((size_t) (max_rows * C * P * P));
    std::vector<int32_t> segments;
    std::vector<int32_t> identity((size_t) max_rows);
    for (int64_t i = 0; i < max_rows; ++i) identity[(size_t) i] = (int32_t) i;
    const float scale = 1.0f / std::sqrt((float) hp.head_dim);

    int64_t written = 0;
    for (int64_t f0 = 0; f0 < grid.t; f0 += frames_per_chunk) {
        const int64_t nf = std::min(frames_per_chunk, grid.t - f0), n = nf * frame_rows;
        auto rows = [&](Tensor t, int64_t count) { return t.row_slice(0, count); };
        if (monitor) monitor->check();

        // patches in raster order, each (c, y, x) as the Conv2D kernel's rows are laid out
        for (int64_t f = 0; f < nf; ++f) {
            const float * frame = pixels + (f0 + f) * C * height * width;
            for (int64_t py = 0; py < grid.h; ++py) {
                for (int64_t px = 0; px < grid.w; ++px) {
                    float * dst = host_patches.data() + ((f * grid.h + py) * grid.w + px) * C * P * P;
                    for (int64_t c = 0; c < C; ++c) {
                        for (int64_t y = 0; y < P; ++y) {
                            const float * src = frame + (c * height + py * P + y) * width + px * P;
                            std::copy(src, src + P, dst + (c * P + y) * P);
                        }
                    }
                }
            }
        }
        be.from_host(patches.data, host_patches.data(), (size_t) (n * C * P * P) * sizeof(float));
        Tensor hn = rows(h, n), curn = rows(cur, n);
        be.matmul(W.patch_embd[0], rows(patches, n), hn, &W.patch_bias);
        segments.assign(1, 0);
        for (int64_t f = 0; f < nf; ++f) {
            Tensor frame_h = hn.row_slice(f * frame_rows, frame_rows);
            be.add(frame_h, W.pos_embd, frame_h);
            segments.push_back((int32_t) ((f + 1) * frame_rows));
        }

        // hidden_states[0] is the embeddings; block il produces hidden_states[il + 1]
        std::vector<Tensor> feature_of(distinct.size());
        auto keep = [&](int32_t hidden_index) {
            for (size_t i = 0; i < distinct.size(); ++i) {
                if (distinct[i] != hidden_index) continue;
                if (hidden_index == hp.n_feature_layers_run) {
                    feature_of[i] = hn;  // the last one needed: no copy, nothing overwrites it
                } else {
                    Tensor dst = rows(captured[i], n);
                    be.gather_rows(hn, identity.data(), n, dst);  // a copy: later blocks overwrite hn
                    feature_of[i] = dst;
                }
            }
        };
        keep(0);
        Tensor qn = rows(q, n), kn = rows(k, n), vn = rows(v, n), an = rows(attn, n), ffn = rows(ff, n);
        for (int32_t il = 0; il < hp.n_feature_layers_run; ++il) {
            const VisionLayer & l = W.layers[(size_t) il];
            be.layer_norm(hn, l.ln1_w, &l.ln1_b, hp.eps, curn);
            be.matmul(l.wq, curn, qn, &l.bq);
            be.matmul(l.wk, curn, kn, &l.bk);
            be.matmul(l.wv, curn, vn, &l.bv);
            AttentionParams ap;
            ap.n_head = ap.n_head_kv = hp.n_head;
            ap.head_dim = hp.head_dim;
            ap.scale = scale;
            ap.n_kv = n;
            ap.segments = segments.data();
            ap.n_segments = (int32_t) segments.size() - 1;
            be.attention(qn, kn, vn, ap, an);
            be.matmul(l.wo, an, curn, &l.bo);
            be.add(hn, curn, hn);
            be.layer_norm(hn, l.ln2_w, &l.ln2_b, hp.eps, curn);
            be.matmul(l.ffn_up, curn, ffn, &l.ffn_up_b);
            be.gelu(ffn, GeluKind::Tanh, ffn);
            be.matmul(l.ffn_down, ffn, curn, &l.ffn_down_b);
            be.add(hn, curn, hn);
            keep(il + 1);
            if (monitor) monitor->advance(n);  // a block of the tower on n patch rows
        }

        // the features in the order feature_layer lists them
        Tensor features;
        for (int64_t i = 0; i < n_feat; ++i) {
            const size_t slot = (size_t) (std::lower_bound(distinct.begin(), distinct.end(), hp.feature_layers[(size_t) i]) - distinct.begin());
            const Tensor & part = feature_of[slot];
            if (i == 0) {
                features = part;
                continue;
            }
            Tensor dst = Tensor::matrix(DType::F32, D * (i + 1), n, concat[i % 2].data);
            be.concat_cols(features, part, dst);
            features = dst;
        }

        Tensor pn = rows(proj, n), p2n = rows(proj2, n);
        be.matmul(W.mm0_w, features, pn, &W.mm0_b);
        be.gelu(pn, GeluKind::Erf, pn);
        be.matmul(W.mm2_w, pn, p2n, &W.mm2_b);
        if (!pool) {
            be.to_host(out + written * E, p2n.data, (size_t) (n * E) * sizeof(float));
            written += n;
            if (monitor) monitor->advance(n);  // the projector
            continue;
        }

        tap_rows.clear();
        tap_weights.clear();
        for (int64_t f = 0; f < nf; ++f) {
            for (int64_t oy = 0; oy < pooled_h; ++oy) {
                for (int64_t ox = 0; ox < pooled_w; ++ox) {
                    const int32_t ys[2] = {ty.i0[(size_t) oy], ty.i1[(size_t) oy]}, xs[2] = {tx.i0[(size_t) ox], tx.i1[(size_t) ox]};
                    const float wy[2] = {ty.w0[(size_t) oy], ty.w1[(size_t) oy]}, wx[2] = {tx.w0[(size_t) ox], tx.w1[(size_t) ox]};
                    for (int a = 0; a < 2; ++a) {
                        for (int b = 0; b < 2; ++b) {
                            tap_rows.push_back((int32_t) (f * frame_rows + ys[a] * grid.w + xs[b]));
                            tap_weights.push_back(wy[a] * wx[b]);
                        }
                    }
                }
            }
        }
        Tensor pooled_n = rows(pooled, nf * pooled_rows);
        be.blend_rows(p2n, tap_rows.data(), tap_weights.data(), 4, nf * pooled_rows, pooled_n);
        be.to_host(out + written * E, pooled_n.data, (size_t) (nf * pooled_rows * E) * sizeof(float));
        written += nf * pooled_rows;
        if (monitor) monitor->advance(n);  // the projector and the pooling
    }
    if (!pool) return written;
    // image_newline is a file tensor (host memory), f32 as bound
    be.to_host(out + written * E, W.image_newline.data, (size_t) E * sizeof(float));
    return written + 1;
}

}  // namespace sparrow
