// qwen2vl-vision.cpp - the Qwen2-VL and Qwen2.5-VL vision transformers and their 2x2 patch
// merger, as transformers computes them (Qwen2VisionTransformerPretrainedModel,
// Qwen2_5_VisionTransformerPretrainedModel), over the ops of backend.h.
//
//   patches   Conv3D (C, T, P, P) with stride = kernel: a matmul per temporal slice (the file
//             holds the slices as v.patch_embd.weight, .weight.1, ...; T = 2 but in our own
//             files), summed; no bias.
//   blocks    x += attn(norm1(x)); x += mlp(norm2(x)). Attention: q/k/v with biases, 2D rotary
//             (axial: patch row / column positions), bidirectional within a frame.
//               Qwen2-VL   LayerNorm (weight + bias), MLP fc2(quick_gelu(fc1)), full attention.
//               Qwen2.5-VL RMSNorm, SwiGLU MLP with biases; blocks with (i + 1) % n_wa_pattern
//                          == 0 attend over the whole frame, the others within windows of
//                          window_size pixels (HF's get_window_index).
//   merger    norm (LayerNorm / RMSNorm) per patch, then each 2x2 block of patches (adjacent
//             rows: the processor emits patches block-major) concatenated -> mm.0, GELU (erf),
//             mm.2 -> one LM embedding.
//
// Attention never crosses frames (HF's cu_seqlens has one segment per temporal slice), so frames
// are encoded in chunks of whole frames: activation memory is bounded by the chunk, not the video.
//
// Qwen2.5-VL's windows: HF reorders the 2x2 merge groups so each window is contiguous, runs all
// blocks in that order (full-attention blocks too: a frame stays contiguous), and undoes the
// order after the merger. We reorder the pixel rows on the host before the patch embedding (the
// embedding is per row, so that is the same), and undo it on the merged rows.
#include "models/vision.h"

#include "common.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace sparrow {

namespace {

// Patch rows per chunk (at least one frame): ~0.25 GB of activations for a 7B-class tower.
constexpr int64_t kChunkPatches = 4096;

// One frame's layout: the order rows are processed in, their 2D positions and attention windows.
struct FrameLayout {
    std::vector<int32_t> order;        // processed row i holds the processor's patch row order[i]
    std::vector<int32_t> h_pos, w_pos; // rotary positions of processed row i
    std::vector<int32_t> windows;      // window lengths in processed rows (Qwen2.5-VL), in order
    std::vector<int32_t> group_order;  // processed merge group g = the processor's group group_order[g]
};

FrameLayout frame_layout(const VisionHparams & hp, int64_t h, int64_t w, bool windowed) {
    const int64_t m = hp.merge_size, unit = m * m;
    const int64_t gh = h / m, gw = w / m;  // merge groups per column / row
    FrameLayout L;
    // HF's get_window_index: windows of ww x ww merge groups in raster order over the group grid
    // (partial windows at the right and bottom edges), groups in raster order inside a window.
    // Without windows: the identity order.
    const int64_t ww = windowed ? hp.window_size / m / hp.patch_size : std::max(gh, gw);
    for (int64_t wy = 0; wy < gh; wy += ww) {
        for (int64_t wx = 0; wx < gw; wx += ww) {
            const int64_t y_end = std::min(gh, wy + ww), x_end = std::min(gw, wx + ww);
            for (int64_t y = wy; y < y_end; ++y) {
                for (int64_t x = wx; x < x_end; ++x) L.group_order.push_back((int32_t) (y * gw + x));
            }
            L.windows.push_back((int32_t) ((y_end - wy) * (x_end - wx) * unit));
        }
    }
    for (int32_t g : L.group_order) {
        // inside a group the processor's rows are the m x m patches in raster order
        const int64_t gy = g / gw, gx = g % gw;
        for (int64_t j = 0; j < unit; ++j) {
            L.order.push_back((int32_t) (g * unit + j));
            L.h_pos.push_back((int32_t) (gy * m + j / m));
            L.w_pos.push_back((int32_t) (gx * m + j % m));
        }
    }
    return L;
}

}  // namespace

int64_t qwen2vl_encode_grid(Backend & be, const VisionModel & model, const float * pixels, const VisionGrid & grid,
                            float * out, VisionMonitor * monitor) {
    const VisionHparams & hp = model.hp;
    const VisionWeights & W = model.w;
    const bool v25 = hp.projector == ProjectorType::Qwen25VL;
    const int64_t D = hp.n_embd, F = hp.n_ff, E = hp.n_embd_out;
    const int64_t P = hp.patch_size, C = hp.n_channels, T = hp.temporal_patch;
    const int64_t slice = C * P * P;          // one temporal slice of a patch
    const int64_t patch_floats = slice * T;   // one pixel_values row
    const int64_t unit = (int64_t) hp.merge_size * hp.merge_size;
    const int64_t frame_rows = grid.h * grid.w;
    const int64_t frames_per_chunk = std::max<int64_t>(1, std::min<int64_t>(grid.t, kChunkPatches / frame_rows));
    const int64_t max_rows = frames_per_chunk * frame_rows;

    // With every block on full attention (n_wa_pattern 0 or 1) the window order changes nothing
    // (attention within a frame and the merger are indifferent to the order of groups): skip it.
    const bool windowed = v25 && hp.n_wa_pattern > 1;
    const FrameLayout L = frame_layout(hp, grid.h, grid.w, windowed);
    // inverse of the group order: merged output k (processor order) = processed group inverse[k]
    std::vector<int32_t> inverse(L.group_order.size());
    for (size_t g = 0; g < L.group_order.size(); ++g) inverse[(size_t) L.group_order[g]] = (int32_t) g;
    bool reordered = false;
    for (size_t g = 0; g < inverse.size(); ++g) reordered |= inverse[g] != (int32_t) g;

    VisionBuffers buf(be);
    Tensor x_slice = buf.matrix(slice, max_rows);
    Tensor h = buf.matrix(D, max_rows), cur = buf.matrix(D, max_rows), attn = buf.matrix(D, max_rows);
    Tensor q = buf.matrix(D, max_rows), k = buf.matrix(D, max_rows), v = buf.matrix(D, max_rows);
    Tensor ff = buf.matrix(F, max_rows);
    Tensor ff_up = v25 ? buf.matrix(F, max_rows) : Tensor();
    Tensor merged = buf.matrix(D * unit, max_rows / unit), merged_out = buf.matrix(E, max_rows / unit);
    Tensor unordered = reordered ? buf.matrix(E, max_rows / unit) : Tensor();

    std::vector<float> host_slice((size_t) (slice * max_rows));
    std::vector<int32_t> pos, full_segments, window_segments, out_rows;

    RopeParams rope;
    rope.mode = RopeMode::Vision;
    rope.n_dims = hp.head_dim;
    rope.freq_base = hp.rope_theta;
    rope.sections[0] = rope.sections[1] = hp.head_dim / 4;
    const float scale = 1.0f / std::sqrt((float) hp.head_dim);

    int64_t written = 0;
    for (int64_t f0 = 0; f0 < grid.t; f0 += frames_per_chunk) {
        const int64_t nf = std::min(frames_per_chunk, grid.t - f0), n = nf * frame_rows, n_groups = n / unit;
        auto rows = [&](Tensor t, int64_t count) { return t.row_slice(0, count); };
        if (monitor) monitor->check();

        // patch rows in processing order, one temporal slice at a time, each through its kernel
        // and summed: h = k_0 x_0 + k_1 x_1 + ...
        Tensor hn = rows(h, n), curn = rows(cur, n);
        for (int64_t s = 0; s < T; ++s) {
            for (int64_t f = 0; f < nf; ++f) {
                const float * frame_pixels = pixels + (f0 + f) * frame_rows * patch_floats;
                for (int64_t i = 0; i < frame_rows; ++i) {
                    const float * src = frame_pixels + (int64_t) L.order[(size_t) i] * patch_floats;
                    float * dst = host_slice.data() + (f * frame_rows + i) * slice;
                    for (int64_t c = 0; c < C; ++c) {  // pixel row layout: (c, t, y, x)
                        std::copy(src + (c * T + s) * P * P, src + (c * T + s + 1) * P * P, dst + c * P * P);
                    }
                }
            }
            be.from_host(x_slice.data, host_slice.data(), (size_t) (n * slice) * sizeof(float));
            be.matmul(W.patch_embd[s], rows(x_slice, n), s == 0 ? hn : curn, nullptr);
            if (s > 0) be.add(hn, curn, hn);
        }

        // positions (stream-major: rows, then columns) and attention segments of the chunk
        pos.assign((size_t) (2 * n), 0);
        full_segments.assign(1, 0);
        window_segments.assign(1, 0);
        for (int64_t f = 0; f < nf; ++f) {
            std::copy(L.h_pos.begin(), L.h_pos.end(), pos.begin() + f * frame_rows);
            std::copy(L.w_pos.begin(), L.w_pos.end(), pos.begin() + n + f * frame_rows);
            full_segments.push_back((int32_t) ((f + 1) * frame_rows));
            for (int32_t len : L.windows) window_segments.push_back(window_segments.back() + len);
        }

        Tensor qn = rows(q, n), kn = rows(k, n), vn = rows(v, n), an = rows(attn, n), ffn = rows(ff, n);
        for (int32_t il = 0; il < hp.n_layer; ++il) {
            const VisionLayer & l = W.layers[(size_t) il];
            const bool full = !windowed || (il + 1) % hp.n_wa_pattern == 0;
            if (v25) be.rms_norm(hn, l.ln1_w, hp.eps, curn); else be.layer_norm(hn, l.ln1_w, &l.ln1_b, hp.eps, curn);
            be.matmul(l.wq, curn, qn, &l.bq);
            be.matmul(l.wk, curn, kn, &l.bk);
            be.matmul(l.wv, curn, vn, &l.bv);
            be.rope(qn, hp.n_head, hp.head_dim, pos.data(), rope);
            be.rope(kn, hp.n_head, hp.head_dim, pos.data(), rope);
            AttentionParams ap;
            ap.n_head = ap.n_head_kv = hp.n_head;
            ap.head_dim = hp.head_dim;
            ap.scale = scale;
            ap.n_kv = n;
            const std::vector<int32_t> & seg = full ? full_segments : window_segments;
            ap.segments = seg.data();
            ap.n_segments = (int32_t) seg.size() - 1;
            be.attention(qn, kn, vn, ap, an);
            be.matmul(l.wo, an, curn, &l.bo);
            be.add(hn, curn, hn);

            if (v25) be.rms_norm(hn, l.ln2_w, hp.eps, curn); else be.layer_norm(hn, l.ln2_w, &l.ln2_b, hp.eps, curn);
            if (v25) {
                Tensor upn = rows(ff_up, n);
                be.matmul(l.ffn_gate, curn, ffn, &l.ffn_gate_b);
                be.matmul(l.ffn_up, curn, upn, &l.ffn_up_b);
                be.swiglu(ffn, upn, ffn);
            } else {
                be.matmul(l.ffn_up, curn, ffn, &l.ffn_up_b);
                be.gelu(ffn, GeluKind::Quick, ffn);
            }
            be.matmul(l.ffn_down, ffn, curn, &l.ffn_down_b);
            be.add(hn, curn, hn);
            if (monitor) monitor->advance(n);  // a block of the tower on n patch rows
        }

        // merger: norm per patch, then each group's rows side by side (a reshape, no copy)
        if (v25) be.rms_norm(hn, W.post_ln_w, hp.eps, curn); else be.layer_norm(hn, W.post_ln_w, &W.post_ln_b, hp.eps, curn);
        Tensor grouped = Tensor::matrix(DType::F32, D * unit, n_groups, curn.data);
        Tensor mn = rows(merged, n_groups), on = rows(merged_out, n_groups);
        be.matmul(W.mm0_w, grouped, mn, &W.mm0_b);
        be.gelu(mn, GeluKind::Erf, mn);
        be.matmul(W.mm2_w, mn, on, &W.mm2_b);
        if (reordered) {  // back to the processor's order, frame by frame
            out_rows.resize((size_t) n_groups);
            const int64_t frame_groups = frame_rows / unit;
            for (int64_t g = 0; g < n_groups; ++g) {
                out_rows[(size_t) g] = (int32_t) ((g / frame_groups) * frame_groups + inverse[(size_t) (g % frame_groups)]);
            }
            Tensor un = rows(unordered, n_groups);
            be.gather_rows(on, out_rows.data(), n_groups, un);
            on = un;
        }
        be.to_host(out + written * E, on.data, (size_t) (n_groups * E) * sizeof(float));
        written += n_groups;
        if (monitor) monitor->advance(n);  // the merger
    }
    return written;
}

}  // namespace sparrow
