"""Video files through PyAV: the sampled frames are exactly those of a full decode, without
decoding the whole file into memory."""

from __future__ import annotations

import numpy as np
import pytest

from sparrow_py.video import llava_onevision, qwen
from sparrow_py.video.decode import VideoInfo, probe, read_frames
from sparrow_py.video.frames import VideoInputError
from sparrow_py.video.sampling import qwen_select_frames

av = pytest.importorskip("av", reason="PyAV is the `video` extra")

N_FRAMES, FPS, HEIGHT, WIDTH = 24, 8, 64, 96


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(N_FRAMES):
            frame = np.full((HEIGHT, WIDTH, 3), (i * 10) % 256, np.uint8)
            frame[:, : 4 * i % WIDTH] = rng.integers(0, 255, 3, dtype=np.uint8)  # moving edge: frames differ
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _decode_all(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def test_probe(video_file):
    info = probe(video_file)
    assert (info.total_frames, info.width, info.height) == (N_FRAMES, WIDTH, HEIGHT)
    assert info.fps == pytest.approx(FPS)


def test_selected_frames_equal_full_decode(video_file):
    every = _decode_all(video_file)
    frames, selection, _ = read_frames(video_file, lambda info: qwen_select_frames(
        info.total_frames, fps=2.0, source_fps=info.fps))
    assert len(selection.indices) == 6  # 3 s at 2 fps
    np.testing.assert_array_equal(frames, every[selection.indices])


def test_qwen_file_equals_array_path(video_file):
    cfg = qwen.QwenPreprocessConfig.for_videos(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 8)
    from_file = qwen.preprocess_video(video_file, cfg, fps=4.0)
    from_array = qwen.preprocess_video(_decode_all(video_file), cfg, fps=4.0, source_fps=FPS)
    np.testing.assert_array_equal(from_file.frame_indices, from_array.frame_indices)
    np.testing.assert_array_equal(from_file.pixel_values, from_array.pixel_values)
    assert from_file.second_per_grid_ts == pytest.approx(2 / 4.0)
    # no fps / num_frames for a file: qwen-vl-utils' 2 fps
    assert len(qwen.preprocess_video(video_file, cfg).frame_indices) == 6


def test_llava_onevision_file_equals_array_path(video_file):
    cfg = llava_onevision.LlavaOnevisionPreprocessConfig(height=56, width=56)
    from_file = llava_onevision.preprocess_video(video_file, cfg, num_frames=5)
    from_array = llava_onevision.preprocess_video(_decode_all(video_file), cfg, num_frames=5)
    np.testing.assert_array_equal(from_file.frame_indices, [0, 4, 9, 14, 19])
    np.testing.assert_array_equal(from_file.pixel_values, from_array.pixel_values)


def test_header_overstating_the_frame_count_is_survived(video_file, monkeypatch):
    """A container whose header claims more frames than it holds: selection is redone on what decodes."""
    import sparrow_py.video.decode as decode
    real = decode.probe
    monkeypatch.setattr(decode, "probe", lambda p: VideoInfo(**{**real(p).__dict__, "total_frames": N_FRAMES * 2}))
    frames, selection, info = read_frames(video_file, lambda i: qwen_select_frames(i.total_frames, num_frames=4))
    assert info.total_frames == N_FRAMES and len(frames) == 4 and selection.indices[-1] < N_FRAMES


def test_not_a_video(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoInputError, match="junk.mp4"):
        qwen.preprocess_video(junk)
