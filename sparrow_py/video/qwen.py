"""Qwen2-VL / Qwen2.5-VL visual inputs: what transformers' Qwen2VL image and video processors make.

    pixel_values  [grid_t * grid_h * grid_w, C * temporal_patch_size * patch * patch] float32
    grid_thw      (grid_t, grid_h, grid_w), the image_grid_thw / video_grid_thw row

Rows are ordered time, then 2x2 merge windows row-major, then the 4 patches of a window row-major
(the order the tower's patch merger expects); each row is (channel, time, y, x) flattened, the
layout of the Conv3D patch embedding's weight. An image is a clip of one frame repeated
temporal_patch_size times (grid_t = 1); a video whose frame count is not a multiple of
temporal_patch_size repeats its last frame (as the video processor pads).

Pipeline per frame: smart_resize (factor patch*merge, min/max pixels) with Pillow-exact bicubic,
x / 255 in float64 then float32, (x - mean) / std in float32: the PIL image processor's arithmetic.

QWEN2_VL and QWEN2_5_VL, at the end, are the family objects the Engine and the trainer call
(family.py): frames sized by runtime_config, token counts, prompt block, M-RoPE grid, HF tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, read_preprocessor_config
from .family import EncodedVisual, VisionFamily
from .frames import FramesLike, VideoInputError, as_frame_array, as_image_array
from .resize import resize_bicubic, smart_resize
from .sampling import FrameSelection, qwen_select_frames, second_per_grid_ts

# transformers' class defaults (Qwen2VLImageProcessor / Qwen2VLVideoProcessor)
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 28 * 28 * 768
# qwen-vl-utils' default sampling rate for video files
DEFAULT_FILE_FPS = 2.0


@dataclass(frozen=True)
class QwenPreprocessConfig:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    min_frames: int = 4
    max_frames: int = 768

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def for_images(cls, model_dir: str | Path | None = None, **overrides: Any) -> "QwenPreprocessConfig":
        """Settings of the image processor: the folder's preprocessor_config.json over the defaults."""
        raw = read_preprocessor_config(model_dir, "preprocessor_config.json")
        return cls._from_raw(raw, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS, overrides)

    @classmethod
    def for_videos(cls, model_dir: str | Path | None = None, **overrides: Any) -> "QwenPreprocessConfig":
        """Settings of the video processor: video_preprocessor_config.json, else (older checkpoints)
        preprocessor_config.json, over the video processor's defaults."""
        raw = read_preprocessor_config(model_dir, "video_preprocessor_config.json", "preprocessor_config.json")
        return cls._from_raw(raw, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS, overrides)

    @classmethod
    def _from_raw(cls, raw: dict[str, Any], min_default: int, max_default: int,
                  overrides: dict[str, Any]) -> "QwenPreprocessConfig":
        size = raw.get("size") or {}
        values: dict[str, Any] = {
            "min_pixels": raw.get("min_pixels") or size.get("shortest_edge") or min_default,
            "max_pixels": raw.get("max_pixels") or size.get("longest_edge") or max_default,
        }
        for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "min_frames",
                    "max_frames"):
            if raw.get(key) is not None:
                values[key] = raw[key]
        for key in ("image_mean", "image_std"):
            if raw.get(key) is not None:
                values[key] = tuple(float(v) for v in raw[key])
        values.update(overrides)
        return cls(**values)


# a pixel budget's floor: with max_pixels asked for, frames smaller than transformers' video minimum
# (128 patches of 28) are kept small rather than enlarged
BUDGET_MIN_PIXELS = 56 * 56


def runtime_config(kind: str, max_pixels: int | None = None, **geometry: int) -> QwenPreprocessConfig:
    """The settings Engine.generate (`sparrow run`) uses, and so training too: transformers' defaults
    for "video" or "image", or a per-frame pixel budget max_pixels with the floor lowered to
    min(max_pixels, BUDGET_MIN_PIXELS). geometry: the tower's own patch_size and temporal_patch_size
    where they are not the defaults (QwenFamily reads them from the model)."""
    budget = {} if max_pixels is None else {"max_pixels": int(max_pixels),
                                            "min_pixels": min(int(max_pixels), BUDGET_MIN_PIXELS)}
    budget.update(geometry)
    if kind == "video":
        return QwenPreprocessConfig.for_videos(**budget)
    if kind == "image":
        return QwenPreprocessConfig.for_images(**budget)
    raise ValueError(f"kind must be 'video' or 'image', not {kind!r}")


@dataclass
class QwenVisualInput:
    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    second_per_grid_ts: float | None = None  # videos only
    frame_indices: np.ndarray | None = None  # videos only: source frame numbers used
    merge_size: int = field(default=2, repr=False)

    @property
    def n_tokens(self) -> int:
        """Visual tokens this input becomes in the LM (after the 2x2 merger)."""
        t, h, w = self.grid_thw
        return t * h * w // (self.merge_size ** 2)


def _normalize(frames_uint8: np.ndarray, cfg: QwenPreprocessConfig) -> np.ndarray:
    """[..., H, W, 3] uint8 -> float32, the PIL image processor's rescale then normalize."""
    scaled = (frames_uint8.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return (scaled - mean) / std


def patchify(frames: np.ndarray, cfg: QwenPreprocessConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalised frames [T, H, W, C] float32 (T a multiple of temporal_patch_size, H and W multiples
    of patch*merge) -> (pixel_values, grid_thw) in the processors' order (see the module doc)."""
    t, h, w, c = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if t % tp or h % (p * m) or w % (p * m):
        raise ValueError(f"frames {t}x{h}x{w} do not tile into {tp}x{p * m}x{p * m} blocks")
    gt, gh, gw = t // tp, h // p, w // p
    blocks = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
    # -> (gt, gh/m, gw/m, mh, mw, C, tp, py, px)
    blocks = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(blocks).reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def _resize_all(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames
    return np.stack([resize_bicubic(frame, height, width) for frame in frames])


def preprocess_image(image: np.ndarray, cfg: QwenPreprocessConfig | None = None) -> QwenVisualInput:
    """One HxWx3 uint8 RGB image -> pixel_values / image_grid_thw as Qwen2VLImageProcessor makes them."""
    cfg = cfg or QwenPreprocessConfig.for_images()
    image = as_image_array(image)
    height, width = smart_resize(image.shape[0], image.shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    frame = _normalize(resize_bicubic(image, height, width), cfg)
    clip = np.broadcast_to(frame[None], (cfg.temporal_patch_size, *frame.shape))
    pixel_values, grid = patchify(clip, cfg)
    return QwenVisualInput(pixel_values, grid, merge_size=cfg.merge_size)


def preprocess_frames(frames: np.ndarray, cfg: QwenPreprocessConfig, selection: FrameSelection | None = None
                      ) -> QwenVisualInput:
    """Already-selected frames [T, H, W, 3] uint8 -> pixel_values_videos / video_grid_thw."""
    frames = as_frame_array(frames)
    height, width = smart_resize(frames.shape[1], frames.shape[2], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = _resize_all(frames, height, width)
    if pad := -len(resized) % cfg.temporal_patch_size:
        resized = np.concatenate([resized, np.repeat(resized[-1:], pad, axis=0)])
    pixel_values, grid = patchify(_normalize(resized, cfg), cfg)
    if selection is None:
        selection = FrameSelection(np.arange(len(frames), dtype=np.int64), len(frames), None)
    return QwenVisualInput(pixel_values, grid, second_per_grid_ts(selection, cfg.temporal_patch_size),
                           selection.indices, merge_size=cfg.merge_size)


def video_token_count(n_frames: int, height: int, width: int, cfg: QwenPreprocessConfig) -> int:
    """LM tokens of n_frames frames of height x width once resized, padded in time and merged."""
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    grid_t = -(-n_frames // cfg.temporal_patch_size)
    return grid_t * (h // cfg.patch_size) * (w // cfg.patch_size) // cfg.merge_size ** 2


def check_token_budget(n_tokens: int, max_tokens: int | None, what: str) -> None:
    """Refuse a video before any frame is resized or encoded when it cannot fit (a long video can
    take minutes to preprocess and encode before its prompt would be found too long)."""
    if max_tokens is not None and n_tokens > max_tokens:
        raise VideoInputError(f"the video takes {n_tokens} tokens ({what}) but the context has room for "
                              f"{max_tokens}: sample fewer frames (fps / num_frames), make them smaller "
                              f"(max_pixels), or use a larger context (n_ctx)")


def preprocess_video(video: str | Path | FramesLike, cfg: QwenPreprocessConfig | None = None, *,
                     fps: float | None = None, num_frames: int | None = None,
                     source_fps: float | None = None, index_rule: str = "transformers",
                     max_tokens: int | None = None) -> QwenVisualInput:
    """A video file, a list of HxWx3 uint8 frames or a [T, H, W, 3] uint8 array -> Qwen video input.

    fps / num_frames: sample with Qwen's rule (see sampling.py). For frames given as arrays,
    neither means "use every frame" (what transformers does) and source_fps is the frames' rate
    (needed for fps sampling and for second_per_grid_ts; transformers assumes 24 when unknown).
    For a file, neither means fps=2 (qwen-vl-utils' default) and the rate comes from the file.
    max_tokens: refuse (VideoInputError) a video that would take more LM tokens, before resizing
    or decoding its frames (a file's frame size is read from its header).
    """
    cfg = cfg or QwenPreprocessConfig.for_videos()

    def select(total: int, rate: float | None, fps_: float | None, height: int, width: int) -> FrameSelection:
        selection = qwen_select_frames(total, fps=fps_, num_frames=num_frames, source_fps=rate,
                                       temporal_patch_size=cfg.temporal_patch_size, min_frames=cfg.min_frames,
                                       max_frames=cfg.max_frames, index_rule=index_rule)
        n = len(selection.indices)
        check_token_budget(video_token_count(n, height, width, cfg), max_tokens, f"{n} frames of {height}x{width}")
        return selection

    if isinstance(video, (str, Path)):
        from .decode import read_frames
        file_fps = fps if fps is not None or num_frames is not None else DEFAULT_FILE_FPS
        frames, selection, _ = read_frames(
            video, lambda info: select(info.total_frames, info.fps, file_fps, info.height, info.width))
        return preprocess_frames(frames, cfg, selection)
    frames = as_frame_array(video)
    selection = select(len(frames), source_fps, fps, frames.shape[1], frames.shape[2])
    return preprocess_frames(frames[selection.indices], cfg, selection)


def preprocess_images(images: Sequence[np.ndarray], cfg: QwenPreprocessConfig | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (pixel_values concatenated, image_grid_thw [n, 3] int64), as the processor
    batches them."""
    items = [preprocess_image(image, cfg) for image in images]
    return (np.concatenate([i.pixel_values for i in items]),
            np.array([i.grid_thw for i in items], dtype=np.int64))


# --- the family: what the Engine and the trainer call (family.py) -------------------------------

class QwenFamily(VisionFamily):
    """Qwen2-VL and Qwen2.5-VL: each video / image is <|vision_start|>, its pads, <|vision_end|>,
    at M-RoPE positions over its merged (t, h, w) grid. Frames are sized by the runtime's settings
    (runtime_config), for the Engine and the trainer alike. scales_time: Qwen2.5-VL, whose temporal
    positions step by tokens_per_second * second_per_grid_t rather than 1 per temporal patch."""

    VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
    placeholders = {"video": "<|video_pad|>", "image": "<|image_pad|>"}
    config_token_keys = {VISION_START: "vision_start_token_id", VISION_END: "vision_end_token_id"}

    def __init__(self, projector_type: str, scales_time: bool):
        self.projector_type = projector_type
        self.scales_time = scales_time

    def prompt_block(self, n_tokens: int, pad: int, token_id: Callable[[str], int]) -> list[int]:
        return [token_id(self.VISION_START), *[pad] * n_tokens, token_id(self.VISION_END)]

    @staticmethod
    def _video(video, fps, num_frames, max_pixels, geometry, max_tokens=None) -> QwenVisualInput:
        return preprocess_video(video, runtime_config("video", max_pixels, **geometry), fps=fps,
                                num_frames=num_frames, max_tokens=max_tokens)

    @staticmethod
    def _tower_geometry(tower) -> dict[str, int]:
        """The patch sizes of the runtime's tower (its vision file)."""
        return {"patch_size": tower.patch_size, "temporal_patch_size": tower.temporal_patch_size}

    @staticmethod
    def _hf_geometry(hf_config: dict[str, Any]) -> dict[str, int]:
        """The patch sizes of a checkpoint's tower (its config.json; transformers' defaults where unsaid)."""
        vision = hf_config.get("vision_config") or {}
        return {key: int(vision[key]) for key in ("patch_size", "temporal_patch_size") if vision.get(key) is not None}

    @staticmethod
    def _encode(tower, visual: QwenVisualInput, t_scale: float, progress, abort) -> EncodedVisual:
        t, h, w = visual.grid_thw
        embd = tower.encode(visual.pixel_values, [visual.grid_thw], progress=progress, abort=abort)
        return EncodedVisual(embd, (t, h // visual.merge_size, w // visual.merge_size), t_scale)

    def encode_video(self, tower, video, *, fps, num_frames, max_pixels, max_tokens, progress=None, abort=None):
        v = self._video(video, fps, num_frames, max_pixels, self._tower_geometry(tower), max_tokens)
        # transformers: temporal positions step by tokens_per_second * second_per_grid_t (Qwen2.5-VL)
        t_scale = tower.tokens_per_second() * float(v.second_per_grid_ts) if self.scales_time else 1.0
        return self._encode(tower, v, t_scale, progress, abort)

    def encode_image(self, tower, image, *, max_pixels, progress=None, abort=None):
        cfg = runtime_config("image", max_pixels, **self._tower_geometry(tower))
        return self._encode(tower, preprocess_image(image, cfg), 1.0, progress, abort)

    def hf_video(self, video, hf_dir, hf_config, *, fps, num_frames, max_pixels):
        import torch

        v = self._video(video, fps, num_frames, max_pixels, self._hf_geometry(hf_config))
        tensors = {"pixel_values_videos": torch.from_numpy(v.pixel_values),
                   "video_grid_thw": torch.tensor([v.grid_thw])}
        if self.scales_time:
            # transformers takes the step from second_per_grid_ts, as the runtime does from t_scale
            tensors["second_per_grid_ts"] = torch.tensor([float(v.second_per_grid_ts)])
        return tensors, [v.n_tokens]

    def hf_images(self, images, hf_dir, hf_config, *, max_pixels):
        import torch

        cfg = runtime_config("image", max_pixels, **self._hf_geometry(hf_config))
        items = [preprocess_image(image, cfg) for image in images]
        return ({"pixel_values": torch.from_numpy(np.concatenate([i.pixel_values for i in items])),
                 "image_grid_thw": torch.tensor([i.grid_thw for i in items])}, [i.n_tokens for i in items])

    def hf_extra_inputs(self, ids, media_token_ids):
        """mm_token_type_ids (0 text, 1 image, 2 video), which transformers >= 5 needs to build M-RoPE
        position ids."""
        import torch

        mm = torch.zeros_like(ids, dtype=torch.int32)
        for kind, code in (("image", 1), ("video", 2)):
            if kind in media_token_ids:
                mm[ids == media_token_ids[kind]] = code
        return {"mm_token_type_ids": mm}


QWEN2_VL = QwenFamily("qwen2vl_merger", scales_time=False)
QWEN2_5_VL = QwenFamily("qwen2.5vl_merger", scales_time=True)
