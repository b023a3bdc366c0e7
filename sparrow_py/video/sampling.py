"""Which frames of a video to use, and the timing that follows from the choice.

Two rule sets, both taken from the reference code:

Qwen2-VL / Qwen2.5-VL (transformers' Qwen2VLVideoProcessor.sample_frames; qwen-vl-utils uses the
same count rule):
- by count: num_frames rounded to a multiple of temporal_patch_size (2);
- by fps: n = total / source_fps * fps, clamped to [min_frames, min(max_frames, total) floored to a
  multiple of 2] and to total, then floored to a multiple of 2 (min_frames 4, max_frames 768);
- indices: transformers takes arange(0, total, total / n) truncated; qwen-vl-utils takes
  round(linspace(0, total - 1, n)). Both are offered; "transformers" is the default because the
  tests' reference is transformers.
- timing: sampled_fps = n / total * source_fps and second_per_grid_ts = temporal_patch_size /
  sampled_fps (transformers' Qwen2_5_VLProcessor; it is what M-RoPE's temporal positions scale by).

LLaVA-OneVision (transformers' BaseVideoProcessor default): by fps n = max(1, int(total /
source_fps * fps)); indices arange(n) * total // n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

QWEN_TEMPORAL_PATCH_SIZE = 2
QWEN_MIN_FRAMES = 4
QWEN_MAX_FRAMES = 768


@dataclass(frozen=True)
class FrameSelection:
    indices: np.ndarray  # int64 frame numbers into the source, increasing
    total_frames: int
    source_fps: float | None

    @property
    def sampled_fps(self) -> float | None:
        """Frames per second of the sampled clip (None when the source fps is unknown)."""
        if self.source_fps is None:
            return None
        return len(self.indices) / self.total_frames * self.source_fps


def _check_request(total_frames: int, fps: float | None, num_frames: int | None,
                   source_fps: float | None) -> None:
    if total_frames <= 0:
        raise ValueError("video: no frames")
    if fps is not None and num_frames is not None:
        raise ValueError("give either fps or num_frames, not both")
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if source_fps is None or source_fps <= 0:
            raise ValueError("sampling by fps needs the source's frame rate (source_fps)")
    if num_frames is not None and num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")


def qwen_frame_count(total_frames: int, *, fps: float | None = None, num_frames: int | None = None,
                     source_fps: float | None = None, temporal_patch_size: int = QWEN_TEMPORAL_PATCH_SIZE,
                     min_frames: int = QWEN_MIN_FRAMES, max_frames: int = QWEN_MAX_FRAMES) -> int:
    """How many frames Qwen's rule samples (0 fps/num_frames: all frames, as transformers does
    when it does not sample)."""
    _check_request(total_frames, fps, num_frames, source_fps)
    if num_frames is not None:
        n = round(num_frames / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        ceiling = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
        n = total_frames / source_fps * fps
        n = min(max(n, min_frames), ceiling, total_frames)
        n = math.floor(n / temporal_patch_size) * temporal_patch_size
    else:
        return total_frames
    if n <= 0:
        raise ValueError(f"video of {total_frames} frames is too short to sample at least "
                         f"{temporal_patch_size} frames")
    if n > total_frames:
        raise ValueError(f"cannot sample {n} frames from a video of {total_frames} frames")
    return int(n)


def qwen_select_frames(total_frames: int, *, fps: float | None = None, num_frames: int | None = None,
                       source_fps: float | None = None, temporal_patch_size: int = QWEN_TEMPORAL_PATCH_SIZE,
                       min_frames: int = QWEN_MIN_FRAMES, max_frames: int = QWEN_MAX_FRAMES,
                       index_rule: str = "transformers") -> FrameSelection:
    n = qwen_frame_count(total_frames, fps=fps, num_frames=num_frames, source_fps=source_fps,
                         temporal_patch_size=temporal_patch_size, min_frames=min_frames, max_frames=max_frames)
    if fps is None and num_frames is None:
        indices = np.arange(total_frames, dtype=np.int64)
    elif index_rule == "transformers":
        # torch.arange(0, total, total / n).int(): i * step in double, stored as float32, truncated
        step = total_frames / n
        indices = (np.arange(n, dtype=np.float64) * step).astype(np.float32).astype(np.int64)
    elif index_rule == "qwen-vl-utils":
        indices = np.round(np.linspace(0, total_frames - 1, n)).astype(np.int64)
    else:
        raise ValueError(f"unknown index_rule {index_rule!r} (transformers or qwen-vl-utils)")
    return FrameSelection(indices, total_frames, source_fps)


def uniform_select_frames(total_frames: int, *, fps: float | None = None, num_frames: int | None = None,
                          source_fps: float | None = None) -> FrameSelection:
    """transformers' default sampling (LLaVA-OneVision's video processor): by count or by fps."""
    _check_request(total_frames, fps, num_frames, source_fps)
    if fps is not None:
        num_frames = max(1, int(total_frames / source_fps * fps))
    if num_frames is None:
        return FrameSelection(np.arange(total_frames, dtype=np.int64), total_frames, source_fps)
    if num_frames > total_frames:
        raise ValueError(f"cannot sample {num_frames} frames from a video of {total_frames} frames")
    indices = np.arange(num_frames, dtype=np.int64) * total_frames // num_frames
    return FrameSelection(indices, total_frames, source_fps)


def second_per_grid_ts(selection: FrameSelection, temporal_patch_size: int = QWEN_TEMPORAL_PATCH_SIZE) -> float:
    """Seconds covered by one temporal patch of the sampled clip (Qwen2.5-VL's M-RoPE scale).
    transformers assumes 24 fps when the frame rate is unknown; so do we."""
    fps = selection.sampled_fps
    return temporal_patch_size / (fps if fps else 24.0)
