"""Checking what the caller handed us as a video or an image, with one clear error per problem."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np


class VideoInputError(ValueError):
    """A video or image the preprocessing refuses: no frames, mixed sizes, wrong dtype or channels."""


FramesLike = Union[np.ndarray, Sequence[np.ndarray]]


def _check_frame(frame: np.ndarray, what: str) -> None:
    if frame.dtype != np.uint8:
        raise VideoInputError(f"{what}: expected uint8 RGB pixels, got dtype {frame.dtype}")
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise VideoInputError(f"{what}: expected an HxWx3 RGB array, got shape {tuple(frame.shape)}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise VideoInputError(f"{what}: empty frame of shape {tuple(frame.shape)}")


def as_frame_array(frames: FramesLike) -> np.ndarray:
    """A list of HxWx3 uint8 frames, or a [T, H, W, 3] uint8 array -> [T, H, W, 3] uint8 array."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise VideoInputError(f"video: expected a [T, H, W, 3] array, got shape {tuple(frames.shape)}"
                                  + (" (a single image? pass it as an image)" if frames.ndim == 3 else ""))
        if frames.shape[0] == 0:
            raise VideoInputError("video: no frames")
        _check_frame(frames[0], "video frame 0")
        return frames
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
        raise VideoInputError(f"video: expected a list of HxWx3 uint8 arrays or a [T, H, W, 3] array, "
                              f"got {type(frames).__name__}")
    if len(frames) == 0:
        raise VideoInputError("video: no frames")
    first = None
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray):
            raise VideoInputError(f"video frame {i}: expected a numpy array, got {type(frame).__name__}")
        _check_frame(frame, f"video frame {i}")
        if first is None:
            first = frame.shape
        elif frame.shape != first:
            raise VideoInputError(f"video frame {i}: size {frame.shape[1]}x{frame.shape[0]} differs from "
                                  f"frame 0's {first[1]}x{first[0]} (all frames must have one size)")
    return np.stack(frames)


def as_image_array(image: np.ndarray) -> np.ndarray:
    """One HxWx3 uint8 image, checked."""
    if not isinstance(image, np.ndarray):
        raise VideoInputError(f"image: expected an HxWx3 uint8 numpy array, got {type(image).__name__}")
    _check_frame(image, "image")
    return image
