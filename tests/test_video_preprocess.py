"""Video/image preprocessing (sparrow_py.video) against transformers' processors and Pillow.

References: Pillow's Image.resize for the resampler; transformers' PIL image processors
(Qwen2VLImageProcessorPil, SiglipImageProcessorPil) frame by frame; transformers' smart_resize;
torch's arange for Qwen's frame indices; torch's uint8 antialiased bicubic (the kernel
torchvision's resize runs for the video processors). transformers' video processors need
torchvision, which is not installed here, so the expected pixel_values_videos is built by hand
from the image processor's per-frame output using the video processor's documented layout
(permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9) of [B, t, tp, C, h/m, m, p, w/m, m, p]).
"""

from __future__ import annotations

import numpy as np
import pytest

from sparrow_py.video import llava_onevision, qwen, sampling
from sparrow_py.video.frames import VideoInputError
from sparrow_py.video.resize import resize_bicubic, smart_resize

PIL = pytest.importorskip("PIL.Image", reason="Pillow is the reference resampler (test-only dependency)")

# Pillow 13 chooses which pass runs first (its pull request 9549), by a rule resize.py reproduces
# only in part; the order changes the rounding and clipping of the uint8 intermediate. The
# resampler tests show that Pillow's result is bit-exactly ours in one of the two orders; the
# pipeline tests then use, per frame, the order the installed Pillow took (asked of Pillow
# itself), so that everything else in the pipeline is compared exactly.
def _pillow_order_resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    expected = np.asarray(PIL.fromarray(frame).resize((width, height), resample=PIL.BICUBIC, reducing_gap=None))
    for vertical_first in (False, True):
        out = resize_bicubic(frame, height, width, vertical_first=vertical_first)
        if np.array_equal(out, expected):
            return out
    raise AssertionError(f"Pillow's {frame.shape[:2]} -> {(height, width)} resize matches neither pass order")


@pytest.fixture
def pillow_pass_order(monkeypatch):
    monkeypatch.setattr(qwen, "resize_bicubic", _pillow_order_resize)
    monkeypatch.setattr(llava_onevision, "resize_bicubic", _pillow_order_resize)


def assert_close_to_reference(ours: np.ndarray, ref: np.ndarray, std: float = 0.26130258) -> None:
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)

# (height, width): odd aspect ratios, sizes below min_pixels, sizes needing up- and downscaling
SIZES = [(97, 131), (360, 203), (50, 60), (23, 301), (448, 448), (241, 427)]


def _smooth_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random but spatially correlated uint8 frames (pure noise would make every resampler look alike
    at edges and hide nothing; gradients plus noise exercise both)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[None, :, None, None]
    x = np.linspace(0, 1, width)[None, None, :, None]
    t = np.arange(n)[:, None, None, None] / max(n, 1)
    base = 127 + 100 * np.sin(6 * x + 4 * y + t + np.arange(3) * 2.1)
    return np.clip(base + rng.normal(0, 25, (n, height, width, 3)), 0, 255).astype(np.uint8)


# --- resampler and size rule -----------------------------------------------------------------

@pytest.mark.parametrize("src,dst", [((97, 131), (56, 84)), ((480, 640), (224, 308)), ((50, 60), (112, 140)),
                                     ((360, 203), (392, 224)), ((1, 7), (3, 5)), ((31, 29), (31, 57)),
                                     ((360, 203), (360, 57)), ((41, 300), (12, 300)), ((480, 640), (476, 644)),
                                     ((720, 1280), (252, 448)), ((1080, 1920), (384, 384)), ((97, 131), (84, 140))])
def test_resize_bicubic_is_bit_exact_with_pillow(src, dst):
    """Upscaling, one-axis resizes, height shrinking while width grows, and common video shapes
    are bit-exact with Pillow in our default pass order."""
    frame = _smooth_frames(1, *src)[0]
    expected = np.asarray(PIL.fromarray(frame).resize((dst[1], dst[0]), resample=PIL.BICUBIC, reducing_gap=None))
    np.testing.assert_array_equal(resize_bicubic(frame, *dst), expected)


@pytest.mark.parametrize("src,dst", [((360, 203), (56, 56)), ((1080, 1920), (252, 448)), ((241, 427), (84, 140)),
                                     ((500, 90), (140, 28)), ((145, 189), (118, 174)), ((40, 11), (34, 9))])
def test_resize_bicubic_shrinking_is_bit_exact_in_pillows_pass_order(src, dst):
    """Shrinking both axes: Pillow's result is exactly ours in one of the two pass orders."""
    frame = _smooth_frames(1, *src)[0]
    expected = np.asarray(PIL.fromarray(frame).resize((dst[1], dst[0]), resample=PIL.BICUBIC, reducing_gap=None))
    candidates = [resize_bicubic(frame, *dst, vertical_first=v) for v in (False, True)]
    assert any(np.array_equal(c, expected) for c in candidates)


def test_resize_close_to_torchvision_uint8_kernel():
    """The video processors resize with torchvision, whose uint8 CPU kernel ports Pillow's with other
    fixed-point precision (measured: under 1% of values differ, by 1 level, a handful by 2 when
    upscaling)."""
    import torch
    frames = _smooth_frames(2, 241, 427)
    ours = np.stack([resize_bicubic(f, 252, 448) for f in frames]).astype(int)
    t = torch.from_numpy(frames).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(t, size=(252, 448), mode="bicubic", antialias=True)
    ref = ref.permute(0, 2, 3, 1).numpy().astype(int)
    diff = np.abs(ours - ref)
    assert diff.max() <= 2
    assert (diff > 0).mean() < 0.01
    assert (diff > 1).mean() < 1e-4


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    for h in (10, 28, 57, 97, 360, 721, 1080, 2000):
        for w in (14, 29, 131, 203, 640, 1920):
            for lo, hi in ((56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 28 * 28 * 768), (3136, 200704)):
                if max(h, w) / min(h, w) > 200:
                    continue
                assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


# --- Qwen images -----------------------------------------------------------------------------

def _hf_qwen_image_processor(cfg: qwen.QwenPreprocessConfig):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
                                    image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))


@pytest.mark.parametrize("size", SIZES)
def test_qwen_image_matches_image_processor(size, pillow_pass_order):
    cfg = qwen.QwenPreprocessConfig.for_images(max_pixels=28 * 28 * 64)  # small, so the test is fast
    image = _smooth_frames(1, *size, seed=sum(size))[0]
    ours = qwen.preprocess_image(image, cfg)
    ref = _hf_qwen_image_processor(cfg)(images=[image], return_tensors="np")
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert ours.pixel_values.dtype == np.float32
    assert_close_to_reference(ours.pixel_values, ref["pixel_values"])


def test_qwen_image_config_from_folder(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, '
        '"temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}')
    cfg = qwen.QwenPreprocessConfig.for_images(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.image_mean, cfg.image_std) == (3136, 12845056, (0.5,) * 3, (0.25,) * 3)
    video_cfg = qwen.QwenPreprocessConfig.for_videos(tmp_path)  # older checkpoints: one file for both
    assert video_cfg.max_pixels == 12845056


# --- Qwen videos -----------------------------------------------------------------------------

def expected_qwen_video(frames: np.ndarray, cfg: qwen.QwenPreprocessConfig):
    """pixel_values_videos built from the PIL image processor's per-frame output."""
    proc = _hf_qwen_image_processor(cfg)
    p, tp = cfg.patch_size, cfg.temporal_patch_size
    if pad := -len(frames) % tp:  # the video processor repeats the last frame
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    per_frame = []
    for frame in frames:
        out = proc(images=[frame], return_tensors="np")
        n = out["pixel_values"].shape[0]
        # an image row is (C, tp, p, p) with the frame repeated over tp: keep one copy
        per_frame.append(out["pixel_values"].reshape(n, 3, tp, p, p)[:, :, 0])
        _, gh, gw = out["image_grid_thw"][0].tolist()
    rows = []
    for g in range(len(frames) // tp):
        group = np.stack(per_frame[g * tp:(g + 1) * tp], axis=2)  # [n, C, tp, p, p]
        rows.append(group.reshape(group.shape[0], -1))
    return np.concatenate(rows), (len(frames) // tp, gh, gw)


@pytest.mark.parametrize("n_frames,size", [(4, (97, 131)), (5, (360, 203)), (2, (50, 60)), (6, (23, 301))])
def test_qwen_video_matches_image_processor_frames(n_frames, size, pillow_pass_order):
    cfg = qwen.QwenPreprocessConfig.for_videos(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 48)
    frames = _smooth_frames(n_frames, *size, seed=n_frames)
    ours = qwen.preprocess_video(list(frames), cfg, source_fps=10.0)
    pixel_values, grid = expected_qwen_video(frames, cfg)
    assert ours.grid_thw == grid
    assert_close_to_reference(ours.pixel_values, pixel_values)
    # all frames used, so the clip runs at the source rate: 2 frames per temporal patch at 10 fps
    assert ours.second_per_grid_ts == pytest.approx(0.2)
    assert ours.n_tokens == grid[0] * grid[1] * grid[2] // 4


def test_qwen_video_sampling_by_fps():
    cfg = qwen.QwenPreprocessConfig.for_videos(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    frames = _smooth_frames(30, 60, 80)
    ours = qwen.preprocess_video(frames, cfg, fps=2.0, source_fps=6.0)  # 5 s -> 10 frames
    assert len(ours.frame_indices) == 10
    # torch.arange(0, total, total / n).int(), as transformers' Qwen2VLVideoProcessor.sample_frames
    import torch
    np.testing.assert_array_equal(ours.frame_indices, torch.arange(0, 30, 30 / 10).int().numpy())
    assert ours.second_per_grid_ts == pytest.approx(2 / 2.0)
    direct = qwen.preprocess_frames(frames[ours.frame_indices], cfg)
    np.testing.assert_array_equal(ours.pixel_values, direct.pixel_values)


def test_qwen_video_of_a_repeated_image_equals_the_image():
    cfg = qwen.QwenPreprocessConfig.for_images(max_pixels=28 * 28 * 16)
    image = _smooth_frames(1, 77, 120)[0]
    as_image = qwen.preprocess_image(image, cfg)
    as_video = qwen.preprocess_video([image, image], cfg)
    assert as_video.grid_thw == as_image.grid_thw
    np.testing.assert_array_equal(as_video.pixel_values, as_image.pixel_values)


# --- frame sampling rules --------------------------------------------------------------------

def test_qwen_frame_indices_match_torch_arange():
    import torch
    for total in range(2, 400, 7):
        for n in range(2, min(total, 60) + 1, 2):
            ours = sampling.qwen_select_frames(total, num_frames=n).indices
            ref = torch.arange(0, total, total / n).int().numpy()[:n]
            np.testing.assert_array_equal(ours, ref, err_msg=f"total={total} n={n}")


@pytest.mark.parametrize("total,source_fps,fps", [(300, 30.0, 2.0), (11, 30.0, 2.0), (5000, 25.0, 2.0),
                                                  (90, 29.97, 1.0), (7, 1.0, 2.0), (2000, 10.0, 4.0)])
def test_qwen_frame_count_rule(total, source_fps, fps):
    n = sampling.qwen_frame_count(total, fps=fps, source_fps=source_fps)
    assert n % 2 == 0 and 2 <= n <= min(total, 768)
    wanted = total / source_fps * fps
    # the rule: clamp to [4, min(768, total) floored to even], then floor to even
    ceiling = (min(768, total) // 2) * 2
    assert n == (int(min(max(wanted, 4), ceiling, total)) // 2) * 2
    sel = sampling.qwen_select_frames(total, fps=fps, source_fps=source_fps)
    assert len(sel.indices) == n and np.all(np.diff(sel.indices) > 0) and sel.indices[-1] < total
    assert sel.sampled_fps == pytest.approx(n / total * source_fps)


def test_qwen_utils_index_rule():
    sel = sampling.qwen_select_frames(100, num_frames=6, index_rule="qwen-vl-utils")
    np.testing.assert_array_equal(sel.indices, np.round(np.linspace(0, 99, 6)).astype(int))


def test_uniform_sampling_matches_transformers_default():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn
    for total, fps_src, kw in [(100, 30.0, {"num_frames": 8}), (95, 24.0, {"fps": 1.0}), (7, 5.0, {"num_frames": 7})]:
        ref = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=fps_src), **kw)
        ours = sampling.uniform_select_frames(total, source_fps=fps_src, **kw).indices
        np.testing.assert_array_equal(ours, ref)


def test_sampling_errors():
    with pytest.raises(ValueError, match="either fps or num_frames"):
        sampling.qwen_select_frames(10, fps=1, num_frames=4, source_fps=10)
    with pytest.raises(ValueError, match="source_fps"):
        sampling.qwen_select_frames(10, fps=1)
    with pytest.raises(ValueError, match="cannot sample"):
        sampling.qwen_select_frames(10, num_frames=12)
    with pytest.raises(ValueError, match="no frames"):
        sampling.qwen_select_frames(0, num_frames=2)


# --- LLaVA-OneVision -------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(97, 131), (360, 203), (40, 40)])
def test_llava_onevision_video_matches_siglip_image_processor(size, pillow_pass_order):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    cfg = llava_onevision.LlavaOnevisionPreprocessConfig(height=56, width=56, image_mean=(0.5,) * 3,
                                                         image_std=(0.5,) * 3)
    frames = _smooth_frames(3, *size, seed=size[0])
    ours = llava_onevision.preprocess_video(frames, cfg)
    proc = SiglipImageProcessorPil(size={"height": 56, "width": 56}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ref = proc(images=list(frames), return_tensors="np")["pixel_values"]
    assert ours.pixel_values.shape == (3, 3, 56, 56)
    assert_close_to_reference(ours.pixel_values, ref, std=0.5)


def test_llava_onevision_config_from_folder(tiny_llava_ov_dir):
    cfg = llava_onevision.LlavaOnevisionPreprocessConfig.for_videos(tiny_llava_ov_dir)
    assert (cfg.height, cfg.width, cfg.image_mean, cfg.image_std) == (56, 56, (0.5,) * 3, (0.5,) * 3)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("video,message", [
    ([], "no frames"),
    (np.zeros((0, 8, 8, 3), np.uint8), "no frames"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], "differs from frame 0"),
    ([np.zeros((8, 8, 3), np.float32)], "uint8"),
    (np.zeros((2, 8, 8, 4), np.uint8), "HxWx3"),
    ([np.zeros((8, 8), np.uint8)], "HxWx3"),
    (np.zeros((8, 8, 3), np.uint8), "single image"),
    ("not-a-file.mp4", "no such file"),
])
def test_bad_video_input_is_refused_clearly(video, message):
    with pytest.raises(VideoInputError, match=message):
        qwen.preprocess_video(video)
    with pytest.raises(VideoInputError, match=message):
        llava_onevision.preprocess_video(video)


def test_bad_image_input_is_refused_clearly():
    with pytest.raises(VideoInputError, match="uint8"):
        qwen.preprocess_image(np.zeros((8, 8, 3), np.int16))
    with pytest.raises(VideoInputError, match="HxWx3"):
        qwen.preprocess_image(np.zeros((8, 8, 1), np.uint8))
