"""LLaVA-OneVision video inputs: what transformers' LlavaOnevisionVideoProcessor makes.

    pixel_values_videos  [frames, C, H, W] float32, every frame resized to a fixed size (384x384 for
                         SigLIP-so400m), no aspect ratio kept, bicubic (Pillow-exact), x / 255, then
                         (x - mean) / std with the checkpoint's mean/std (llava-hf ships 0.5/0.5).

The tower then encodes each frame; per-frame 2x2 bilinear pooling and the newline token are the
model's business (runtime), not preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, read_preprocessor_config
from .frames import FramesLike, as_frame_array
from .resize import resize_bicubic
from .sampling import FrameSelection, uniform_select_frames

DEFAULT_SIZE = 384
# LLaVA-OneVision's own video setting samples a fixed number of frames (32 in its evaluation); a
# file with no fps/num_frames asked for gets that many (or all, if shorter).
DEFAULT_FILE_NUM_FRAMES = 32


@dataclass(frozen=True)
class LlavaOnevisionPreprocessConfig:
    height: int = DEFAULT_SIZE
    width: int = DEFAULT_SIZE
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def for_videos(cls, model_dir: str | Path | None = None, **overrides: Any) -> "LlavaOnevisionPreprocessConfig":
        raw = read_preprocessor_config(model_dir, "video_preprocessor_config.json", "preprocessor_config.json")
        values: dict[str, Any] = {}
        size = raw.get("size") or {}
        if "height" in size and "width" in size:
            values.update(height=int(size["height"]), width=int(size["width"]))
        elif "shortest_edge" in size:  # some configs give one number for a square
            values.update(height=int(size["shortest_edge"]), width=int(size["shortest_edge"]))
        for key in ("image_mean", "image_std"):
            if raw.get(key) is not None:
                values[key] = tuple(float(v) for v in raw[key])
        if raw.get("rescale_factor") is not None:
            values["rescale_factor"] = raw["rescale_factor"]
        values.update(overrides)
        return cls(**values)


@dataclass
class LlavaOnevisionVideoInput:
    pixel_values: np.ndarray  # [frames, C, H, W] float32
    frame_indices: np.ndarray


def preprocess_frames(frames: np.ndarray, cfg: LlavaOnevisionPreprocessConfig,
                      selection: FrameSelection | None = None) -> LlavaOnevisionVideoInput:
    frames = as_frame_array(frames)
    out = np.empty((len(frames), 3, cfg.height, cfg.width), dtype=np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
    for i, frame in enumerate(frames):  # one frame at a time: memory stays at the output's size
        if frame.shape[:2] != (cfg.height, cfg.width):
            frame = resize_bicubic(frame, cfg.height, cfg.width)
        scaled = (frame.transpose(2, 0, 1).astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        out[i] = (scaled - mean) / std
    indices = selection.indices if selection is not None else np.arange(len(frames), dtype=np.int64)
    return LlavaOnevisionVideoInput(out, indices)


def preprocess_video(video: str | Path | FramesLike, cfg: LlavaOnevisionPreprocessConfig | None = None, *,
                     fps: float | None = None, num_frames: int | None = None,
                     source_fps: float | None = None) -> LlavaOnevisionVideoInput:
    """A video file, list of HxWx3 uint8 frames or [T, H, W, 3] uint8 array -> pixel_values_videos.
    Sampling follows transformers' default rule (by count, or by fps); arrays with neither use
    every frame; files with neither get DEFAULT_FILE_NUM_FRAMES frames (all, if fewer)."""
    cfg = cfg or LlavaOnevisionPreprocessConfig.for_videos()
    if isinstance(video, (str, Path)):
        from .decode import read_frames

        def select(info):
            count = num_frames
            if fps is None and num_frames is None:
                count = min(DEFAULT_FILE_NUM_FRAMES, info.total_frames)
            return uniform_select_frames(info.total_frames, fps=fps, num_frames=count, source_fps=info.fps)
        frames, selection, _ = read_frames(video, select)
        return preprocess_frames(frames, cfg, selection)
    frames = as_frame_array(video)
    selection = uniform_select_frames(len(frames), fps=fps, num_frames=num_frames, source_fps=source_fps)
    return preprocess_frames(frames[selection.indices], cfg, selection)
