"""Video and image preprocessing for Sparrow's targets, in numpy (no torchvision, no PIL).

    from sparrow_py.video import qwen, llava_onevision
    cfg = qwen.QwenPreprocessConfig.for_videos("path/to/Qwen2.5-VL-7B-Instruct")
    v = qwen.preprocess_video("clip.mp4", cfg, fps=2)        # v.pixel_values, v.grid_thw, v.second_per_grid_ts
    img = qwen.preprocess_image(rgb_uint8_hwc)              # img.pixel_values, img.grid_thw
    ov = llava_onevision.preprocess_video(frames, num_frames=8)   # ov.pixel_values [T, 3, 384, 384]

Modules: frames (input checks), sampling (which frames, Qwen's and transformers' rules),
resize (smart_resize + Pillow-exact bicubic), decode (PyAV file reading, extra `video`),
qwen (Qwen2-VL / Qwen2.5-VL patch layout), llava_onevision (fixed-size frames), family (the
per-family object those two end with, which the Engine and the trainer call).
"""

from __future__ import annotations

from . import llava_onevision, qwen, sampling
from .frames import VideoInputError, as_frame_array
from .resize import resize_bicubic, smart_resize

__all__ = ["VideoInputError", "as_frame_array", "llava_onevision", "qwen", "resize_bicubic", "sampling",
           "smart_resize"]
