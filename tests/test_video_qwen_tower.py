"""The patch layout, proven on the model: a tiny HF Qwen2-VL vision tower gives the same output for
our pixel_values_videos as for the processor's (built from the PIL image processor per frame, see
test_video_preprocess.expected_qwen_video), and a different one when the layout is broken."""

from __future__ import annotations

import numpy as np
import pytest

from sparrow_py.video import qwen

pytest.importorskip("PIL.Image", reason="the reference image processor needs Pillow")
from test_video_preprocess import _smooth_frames, expected_qwen_video, pillow_pass_order  # noqa: E402,F401


@pytest.fixture(scope="module")
def qwen2vl_model(tiny_qwen2vl_dir):
    import torch
    from transformers import Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl_dir).eval()


def _tower(model, pixel_values: np.ndarray, grid_thw) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model.model.get_video_features(torch.from_numpy(np.ascontiguousarray(pixel_values)),
                                             torch.tensor([list(grid_thw)]))
    features = getattr(out, "pooler_output", out)
    if isinstance(features, (list, tuple)):
        features = torch.cat(list(features))
    return features.float().numpy()


@pytest.mark.parametrize("n_frames,size", [(4, (97, 131)), (3, (360, 203))])
def test_tower_output_matches_processor_layout(qwen2vl_model, n_frames, size, pillow_pass_order):
    cfg = qwen.QwenPreprocessConfig.for_videos(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 24)
    frames = _smooth_frames(n_frames, *size, seed=7)
    ours = qwen.preprocess_video(frames, cfg)
    ref_values, ref_grid = expected_qwen_video(frames, cfg)
    assert ours.grid_thw == ref_grid
    got = _tower(qwen2vl_model, ours.pixel_values, ours.grid_thw)
    want = _tower(qwen2vl_model, ref_values, ref_grid)
    assert got.shape == (ours.n_tokens, 64)  # merged tokens x LM hidden size
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))

    # A layout that is merely "the same numbers, rows in raster order" is not what the tower
    # expects: the 2x2 merge windows must be contiguous. The output must change.
    t, h, w = ours.grid_thw
    raster = ours.pixel_values.reshape(t, h // 2, w // 2, 2, 2, -1).transpose(0, 1, 3, 2, 4, 5).reshape(t * h * w, -1)
    broken = _tower(qwen2vl_model, raster, ours.grid_thw)
    assert np.abs(broken - want).max() > 1e-3


def test_static_video_equals_image_through_the_tower(qwen2vl_model):
    import torch
    cfg = qwen.QwenPreprocessConfig.for_images(max_pixels=28 * 28 * 16)
    image = _smooth_frames(1, 90, 150, seed=3)[0]
    as_image = qwen.preprocess_image(image, cfg)
    as_video = qwen.preprocess_video([image, image], cfg)
    with torch.no_grad():
        img = qwen2vl_model.model.get_image_features(torch.from_numpy(as_image.pixel_values),
                                                     torch.tensor([list(as_image.grid_thw)]))
    img = getattr(img, "pooler_output", img)
    img = torch.cat(list(img)).numpy() if isinstance(img, (list, tuple)) else img.numpy()
    np.testing.assert_allclose(_tower(qwen2vl_model, as_video.pixel_values, as_video.grid_thw), img, atol=1e-6)
