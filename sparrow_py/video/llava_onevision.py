"""LLaVA-OneVision video inputs: what transformers' LlavaOnevisionVideoProcessor makes.

    pixel_values_videos  [frames, C, H, W] float32, every frame resized to a fixed size (384x384 for
                         SigLIP-so400m), no aspect ratio kept, bicubic (Pillow-exact), x / 255, then
                         (x - mean) / std with the checkpoint's mean/std (llava-hf ships 0.5/0.5).

The tower then encodes each frame; per-frame 2x2 bilinear pooling and the newline token are the
model's business (runtime), not preprocessing. LLAVA_ONEVISION, at the end, is the family object
the Engine and the trainer call (family.py): frames, token counts, prompt block, HF tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, read_preprocessor_config
from .family import EncodedVisual, VisionFamily
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


def frame_token_count(side: int) -> int:
    """Visual tokens of one video frame of side x side features: pooled 2x2 (rounding up)."""
    return ((side + 1) // 2) ** 2


def video_token_count(n_frames: int, tokens_per_frame: int) -> int:
    """Visual tokens of a video: every frame's, then one newline."""
    return n_frames * tokens_per_frame + 1


def preprocess_video(video: str | Path | FramesLike, cfg: LlavaOnevisionPreprocessConfig | None = None, *,
                     fps: float | None = None, num_frames: int | None = None,
                     source_fps: float | None = None, max_tokens: int | None = None,
                     tokens_per_frame: int = 0) -> LlavaOnevisionVideoInput:
    """A video file, list of HxWx3 uint8 frames or [T, H, W, 3] uint8 array -> pixel_values_videos.
    Sampling follows transformers' default rule (by count, or by fps); arrays with neither use
    every frame; files with neither get DEFAULT_FILE_NUM_FRAMES frames (all, if fewer).
    max_tokens: refuse (VideoInputError) a video whose frames x tokens_per_frame + 1 (the newline)
    exceed it, before any frame is decoded or resized."""
    from .qwen import check_token_budget

    cfg = cfg or LlavaOnevisionPreprocessConfig.for_videos()

    def checked(selection: FrameSelection) -> FrameSelection:
        n = len(selection.indices)
        check_token_budget(video_token_count(n, tokens_per_frame), max_tokens,
                           f"{n} frames of {tokens_per_frame} tokens")
        return selection

    if isinstance(video, (str, Path)):
        from .decode import read_frames

        def select(info):
            count = num_frames
            if fps is None and num_frames is None:
                count = min(DEFAULT_FILE_NUM_FRAMES, info.total_frames)
            return checked(uniform_select_frames(info.total_frames, fps=fps, num_frames=count, source_fps=info.fps))
        frames, selection, _ = read_frames(video, select)
        return preprocess_frames(frames, cfg, selection)
    frames = as_frame_array(video)
    selection = checked(uniform_select_frames(len(frames), fps=fps, num_frames=num_frames, source_fps=source_fps))
    return preprocess_frames(frames[selection.indices], cfg, selection)


# --- still images (anyres) ---------------------------------------------------------------------
# transformers' LlavaOnevisionImageProcessor (PIL backend) and LlavaOnevisionModel.pack_image_features:
# the image is resized (aspect kept) into the best of the grid pinpoints, zero-padded to it and cut
# into size x size tiles; the whole image resized to size x size goes first. The tower encodes every
# tile; the tiles' patch features are laid out as one big grid, unpadded to the image's aspect,
# bilinearly shrunk when larger than anyres_max_N tiles allow, and given a newline per row.

@dataclass
class LlavaOnevisionImageInput:
    pixel_values: np.ndarray        # [1 + rows * cols, C, size, size] float32: whole image, then tiles
    image_size: tuple[int, int]     # (height, width) of the original image
    tile_grid: tuple[int, int]      # (rows, cols) of tiles


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint (h, w) that keeps the most of the image, then wastes the least (HF's rule)."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(ph), int(pw)), effective, wasted
    if best is None:
        raise ValueError(f"no usable grid pinpoint in {pinpoints}")
    return best


def _fit_inside(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """HF's get_patch_output_size: the size that fits (target_h, target_w) with the aspect kept."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def _normalize(image: np.ndarray, cfg: LlavaOnevisionPreprocessConfig) -> np.ndarray:
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
    scaled = (image.transpose(2, 0, 1).astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    return (scaled - mean) / std


def preprocess_image(image: np.ndarray, cfg: LlavaOnevisionPreprocessConfig, grid_pinpoints) -> LlavaOnevisionImageInput:
    """An HxWx3 uint8 image -> the whole image and its anyres tiles (cfg.height = cfg.width = tile size)."""
    from .frames import as_image_array

    image = as_image_array(image)
    size = cfg.height
    if cfg.width != size:
        raise ValueError("anyres tiles are square: the config's height and width must be equal")
    h, w = image.shape[:2]
    best_h, best_w = select_best_resolution(h, w, grid_pinpoints)
    if best_h % size or best_w % size:
        raise ValueError(f"grid pinpoint {best_h}x{best_w} is not a whole number of {size}-pixel tiles")
    new_h, new_w = _fit_inside(h, w, best_h, best_w)
    resized = image if (new_h, new_w) == (h, w) else resize_bicubic(image, new_h, new_w)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas = np.zeros((best_h, best_w, 3), dtype=np.uint8)
    canvas[top:top + new_h, left:left + new_w] = resized
    whole = image if (h, w) == (size, size) else resize_bicubic(image, size, size)
    rows, cols = best_h // size, best_w // size
    tiles = [whole] + [canvas[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
    return LlavaOnevisionImageInput(np.stack([_normalize(t, cfg) for t in tiles]), (h, w), (rows, cols))


def bilinear_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(x[None], (out_h, out_w), mode="bilinear")[0] for x [C, H, W]
    (align_corners=False, no antialiasing), in float32."""
    def taps(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = (src - i0).astype(np.float32)
        return i0, i1, frac
    y0, y1, fy = taps(x.shape[1], out_h)
    x0, x1, fx = taps(x.shape[2], out_w)
    top = x[:, y0] * (1 - fy)[None, :, None] + x[:, y1] * fy[None, :, None]
    return (top[:, :, x0] * (1 - fx)[None, None, :] + top[:, :, x1] * fx[None, None, :]).astype(np.float32)


def pack_image_features(features: np.ndarray, image: LlavaOnevisionImageInput, newline: np.ndarray,
                        max_num_tiles: int = 9) -> np.ndarray:
    """The LM embeddings of one image from its tiles' unpooled features [1 + rows*cols, side*side, E]
    (sparrow_vision_encode_tiles): the whole image's tokens, then the tile grid's rows, unpadded,
    each row ending with the newline (transformers' pack_image_features)."""
    n, per_tile, dim = features.shape
    side = int(round(per_tile ** 0.5))
    rows, cols = image.tile_grid
    if side * side != per_tile or n != 1 + rows * cols:
        raise ValueError(f"{n} tiles of {per_tile} features do not make a whole image and a {rows}x{cols} grid")
    grid = features[1:].reshape(rows, cols, side, side, dim).transpose(4, 0, 2, 1, 3).reshape(dim, rows * side, cols * side)
    # unpad: drop the rows or columns that padding added (HF's unpad_image)
    orig_h, orig_w = image.image_size
    cur_h, cur_w = grid.shape[1:]
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        grid = grid[:, pad:cur_h - pad, :]
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        pad = (cur_w - new_w) // 2
        grid = grid[:, :, pad:cur_w - pad]
    _, cur_h, cur_w = grid.shape
    ratio = math.sqrt(cur_h * cur_w / (max_num_tiles * side ** 2))
    if ratio > 1.1:
        grid = bilinear_resize(grid, int(cur_h // ratio), int(cur_w // ratio))
    grid = np.concatenate([grid, np.broadcast_to(newline.astype(np.float32)[:, None, None], (dim, grid.shape[1], 1))], axis=2)
    return np.concatenate([features[0], grid.reshape(dim, -1).T]).astype(np.float32)


def image_token_count(image: LlavaOnevisionImageInput, side: int, max_num_tiles: int = 9) -> int:
    """How many LM tokens pack_image_features makes of this image (side x side features per tile),
    before any tile is encoded: the same arithmetic run on one-wide placeholder features."""
    n_tiles = 1 + image.tile_grid[0] * image.tile_grid[1]
    placeholder = np.zeros((n_tiles, side * side, 1), np.float32)
    return len(pack_image_features(placeholder, image, np.zeros(1, np.float32), max_num_tiles))


# --- the family: what the Engine and the trainer call (family.py) -------------------------------

def _hf_patches_per_side(hf_config: dict[str, Any]) -> int:
    """Features per side of a frame or tile, from a checkpoint's config.json."""
    vision = hf_config["vision_config"]
    return int(vision["image_size"]) // int(vision["patch_size"])


def _hf_max_tiles(hf_config: dict[str, Any]) -> int:
    """anyres_max_N's N: how many tiles' worth of features an image keeps (transformers' rule)."""
    aspect = str(hf_config.get("vision_aspect_ratio") or "anyres_max_9")
    return int(aspect.rsplit("_", 1)[-1]) if aspect.startswith("anyres_max_") else 9


def _hf_preprocess_config(hf_dir: str | Path, hf_config: dict[str, Any]) -> LlavaOnevisionPreprocessConfig:
    """The checkpoint's preprocessor settings; the tower's own image size when the folder has none
    (what the converter writes into the mmproj, which the runtime reads)."""
    cfg = LlavaOnevisionPreprocessConfig.for_videos(hf_dir)
    size = int(hf_config["vision_config"]["image_size"])
    if (cfg.height, cfg.width) != (size, size):
        cfg = LlavaOnevisionPreprocessConfig(height=size, width=size, image_mean=cfg.image_mean,
                                             image_std=cfg.image_std, rescale_factor=cfg.rescale_factor)
    return cfg


class LlavaOnevisionFamily(VisionFamily):
    """LLaVA-OneVision: a video is its frames' pooled features plus one newline, an image its anyres
    tiles' packed features, each where the prompt has its <video> / <image> token, at 1-D positions.
    The frame size is the tower's: max_pixels does not apply."""

    projector_type = "llava_onevision"
    placeholders = {"video": "<video>", "image": "<image>"}
    text_after_block = "\n"  # its chat template writes "<video>\n" before the question

    def prompt_block(self, n_tokens: int, pad: int, token_id: Callable[[str], int]) -> list[int]:
        return [pad] * n_tokens

    @staticmethod
    def _video(video, cfg: LlavaOnevisionPreprocessConfig, side: int, fps, num_frames, max_tokens=None
               ) -> LlavaOnevisionVideoInput:
        return preprocess_video(video, cfg, fps=fps, num_frames=num_frames, max_tokens=max_tokens,
                                tokens_per_frame=frame_token_count(side))

    def encode_video(self, tower, video, *, fps, num_frames, max_pixels, max_tokens, progress=None, abort=None):
        side, _ = tower._siglip_grid(3)
        v = self._video(video, tower.llava_preprocess_config(), side, fps, num_frames, max_tokens)
        embd = tower.encode(v.pixel_values, progress=progress, abort=abort)
        return EncodedVisual(embd, (len(v.pixel_values), side, side))

    def encode_image(self, tower, image, *, max_pixels, progress=None, abort=None):
        embd = tower.encode_image(image, progress=progress, abort=abort)  # anyres, packed as transformers does
        return EncodedVisual(embd, (1, 1, len(embd)))

    def hf_video(self, video, hf_dir, hf_config, *, fps, num_frames, max_pixels):
        import torch

        side = _hf_patches_per_side(hf_config)
        v = self._video(video, _hf_preprocess_config(hf_dir, hf_config), side, fps, num_frames)
        return ({"pixel_values_videos": torch.from_numpy(v.pixel_values)[None]},
                [video_token_count(len(v.pixel_values), frame_token_count(side))])

    def hf_images(self, images, hf_dir, hf_config, *, max_pixels):
        import torch

        cfg = _hf_preprocess_config(hf_dir, hf_config)
        pinpoints = hf_config.get("image_grid_pinpoints") or [[cfg.height, cfg.width]]
        items = [preprocess_image(image, cfg, pinpoints) for image in images]
        side, max_tiles = _hf_patches_per_side(hf_config), _hf_max_tiles(hf_config)
        n_tokens = [image_token_count(item, side, max_tiles) for item in items]
        # the model takes [images, tiles, C, H, W], each image's tiles first (image_sizes says how many)
        tiles = max(len(item.pixel_values) for item in items)
        pixels = np.zeros((len(items), tiles, *items[0].pixel_values.shape[1:]), np.float32)
        for i, item in enumerate(items):
            pixels[i, :len(item.pixel_values)] = item.pixel_values
        return ({"pixel_values": torch.from_numpy(pixels),
                 "image_sizes": torch.tensor([item.image_size for item in items])}, n_tokens)


LLAVA_ONEVISION = LlavaOnevisionFamily()
