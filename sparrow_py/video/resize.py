"""Resizing: Qwen's smart_resize rule and a bicubic resampler bit-exact with Pillow's.

Why bicubic "as Pillow": the Hugging Face image processors that define these models' inputs
resize with PIL (`Image.resize(..., BICUBIC)`), and the video processors with torchvision's
antialiased bicubic on uint8 tensors, whose CPU kernel is a port of Pillow's algorithm (its fixed-point weights use another precision: measured, under 1% of
values differ, by 1 level, and about 1 in 100,000 by 2 when upscaling). We implement Pillow's algorithm (Resample.c) in numpy, so no imaging library is
needed:

- separable: two passes, the first one's result rounded and clipped to uint8. Pillow up to 12
  always runs the horizontal pass first. Pillow 13 (its pull request 9549) runs the vertical pass
  first when the height shrinks much more than the width; the order changes the intermediate's
  rounding and clipping, so values can move by several levels. By default we follow Pillow 13
  where its choice is certain (measured on Pillow 13.0: height shrinking while width grows, a case
  smart_resize produces often, always goes vertical first) and go horizontal first otherwise;
  when both sides shrink, Pillow 13 sometimes goes vertical first by a rule not reproduced here
  (measured: about 3 in 10 random such shapes; none of the common video shapes tried: 720p,
  1080p and 4:3 to Qwen's or SigLIP's sizes). `vertical_first` forces an order;
- each output pixel is a weighted sum over the input pixels whose centres fall within the filter's
  support, the support widened by the scale factor when shrinking (that is the antialiasing);
- bicubic kernel with a = -0.5, weights normalised to sum 1 per output pixel, then turned into
  22-bit fixed-point integers; sums start at half a unit (rounding) and are shifted back.
"""

from __future__ import annotations

import math

import numpy as np

from .frames import VideoInputError

# Pillow: PRECISION_BITS = 32 - 8 - 2, so a sum of 8-bit pixels times weights fits in int32.
_PRECISION_BITS = 22
_BICUBIC_SUPPORT = 2.0
_BICUBIC_A = -0.5


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL / Qwen2.5-VL target size: both sides multiples of `factor` (patch x merge = 28),
    the area within [min_pixels, max_pixels], the aspect ratio kept as closely as possible.
    The rule (rounding first, then floor when too big, ceil when too small) is transformers'."""
    if height <= 0 or width <= 0:
        raise VideoInputError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise VideoInputError(f"aspect ratio must be at most 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = _BICUBIC_A
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _fixed_point_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel: the input indices it reads (out_size x taps, padded with index 0)
    and their int64 fixed-point weights (0 on padding). Follows Pillow's precompute_coeffs and
    normalize_coeffs_8bpc, in double precision like Pillow."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filter_scale
    n_taps = int(math.ceil(support)) * 2 + 1
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # Pillow truncates toward zero with a C cast: int(x + 0.5); the values clipped to >= 0 anyway
    # agree with numpy's trunc.
    first = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size)
    offsets = np.arange(n_taps, dtype=np.int64)
    index = first[:, None] + offsets[None, :]
    valid = index < last[:, None]
    weights = np.where(valid, _bicubic((index - centers[:, None] + 0.5) / filter_scale), 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals != 0.0)
    unit = float(1 << _PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(weights * unit - 0.5), np.trunc(weights * unit + 0.5))
    return np.where(valid, index, 0), fixed.astype(np.int64)


# int64 elements in flight per block of lines: the fixed-point sums stay a few MB whatever the
# frame's size (a 16k x 16k frame in int64 at once would take 6 GB).
_BLOCK_ELEMENTS = 1 << 20


def _resample_axis(pixels: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One separable pass along `axis` of a uint8 array; returns uint8 (Pillow's clip8). Lines are
    independent, so the array is cut across another spatial axis and resampled a block at a time:
    the same sums, in bounded memory, and no widened copy of the whole frame."""
    index, weights = _fixed_point_taps(pixels.shape[axis], out_size)
    out_shape = list(pixels.shape)
    out_shape[axis] = out_size
    out = np.empty(out_shape, dtype=np.uint8)
    spatial = [a for a in range(pixels.ndim - 1) if a != axis]  # the last axis holds the channels
    along = max(spatial, key=lambda a: pixels.shape[a])
    per_index = pixels.size // pixels.shape[axis] // pixels.shape[along] * max(pixels.shape[axis], out_size)
    per_block = max(1, _BLOCK_ELEMENTS // per_index)
    for start in range(0, pixels.shape[along], per_block):
        cut = [slice(None)] * pixels.ndim
        cut[along] = slice(start, start + per_block)
        block = np.moveaxis(pixels[tuple(cut)], axis, -1).astype(np.int64)
        acc = np.full(block.shape[:-1] + (out_size,), 1 << (_PRECISION_BITS - 1), dtype=np.int64)
        for tap in range(index.shape[1]):
            acc += block[..., index[:, tap]] * weights[:, tap]
        out[tuple(cut)] = np.moveaxis(np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8), -1, axis)
    return out


def resize_bicubic(frames: np.ndarray, height: int, width: int, *, vertical_first: bool | None = None
                   ) -> np.ndarray:
    """Resize uint8 frames [..., H, W, C] to [..., height, width, C] as Pillow's
    Image.resize((width, height), Image.BICUBIC) does each frame (bit-exact in Pillow's pass order;
    see the module doc for how the order is chosen when vertical_first is None)."""
    if frames.dtype != np.uint8:
        raise TypeError(f"resize_bicubic expects uint8 pixels, got {frames.dtype}")
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    in_h, in_w = frames.shape[-3], frames.shape[-2]
    if vertical_first is None:
        vertical_first = height < in_h and width > in_w
    out = frames
    # Pillow skips a pass whose size does not change (the pass would be the identity anyway).
    passes = [(out.ndim - 2, width, in_w), (out.ndim - 3, height, in_h)]
    for axis, size, in_size in (passes[::-1] if vertical_first else passes):
        if size != in_size:
            out = _resample_axis(out, axis, size)
    return out
