"""A vision family: what the Engine and the trainer both need to put videos and images in a prompt.

Each family is one object in its preprocessing module (qwen.QWEN2_VL, qwen.QWEN2_5_VL,
llava_onevision.LLAVA_ONEVISION), found through sparrow_py.architectures: by a checkpoint's
architecture for the trainer, by a vision file's clip.projector_type for the Engine. Both sides
call the same object, so they make the same pixels and give them the same prompt tokens; only the
last step differs: the Engine runs the pixels through the runtime's tower (encode_*), the trainer
hands them to transformers (hf_*).

Positions follow from what each side gets: the Engine's EncodedVisual carries the token grid and
temporal step the runtime places M-RoPE rows by (1-D families ignore them), and the trainer's
tensors are what transformers computes the same positions from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # annotations only: the runtime's extension is not needed to import this
    from sparrow_py.vision import AbortFn, ProgressFn, VisionEncoder


@dataclass
class EncodedVisual:
    """One video or image through the runtime's tower: what the Engine's Media holds, less the
    placeholder token (the Engine looks that up in its vocabulary)."""
    embd: np.ndarray                # [n_tokens, n_embd] float32, one row per visual token of the LM
    grid: tuple[int, int, int]      # (t, h, w) of the tokens, the M-RoPE grid
    t_scale: float = 1.0            # temporal position step per grid frame (Qwen2.5-VL)


class VisionFamily(ABC):
    """The per-family object (see the module doc). Videos and images are given as the Engine takes
    them: a file path, a list or [T, H, W, 3] array of uint8 frames, and HxWx3 uint8 images; fps,
    num_frames and max_pixels choose frames and size them as `sparrow run` does."""

    projector_type: str             # clip.projector_type of the family's vision files
    placeholders: dict[str, str]    # "video" / "image" -> the token the model's chat template writes for one
    # the special tokens prompt_block names -> the config.json key of their id, where the trainer reads
    # them (as transformers does: a checkpoint's tokenizer need not list them)
    config_token_keys: dict[str, str] = {}
    text_after_block: str = ""      # what a chat turn has between the visual block and its question

    # ---- the prompt ----
    @abstractmethod
    def prompt_block(self, n_tokens: int, pad: int, token_id: Callable[[str], int]) -> list[int]:
        """The prompt tokens of one video or image of n_tokens visual tokens, where a prompt's text
        says <video> / <image> (a chat template's own markers are the placeholders instead): pad
        stands for each visual token; token_id(text) is the vocabulary's id of a special token."""

    # ---- the Engine: the runtime's tower ----
    @abstractmethod
    def encode_video(self, tower: VisionEncoder, video: Any, *, fps: float | None, num_frames: int | None,
                     max_pixels: int | None, max_tokens: int | None, progress: ProgressFn | None = None,
                     abort: AbortFn | None = None) -> EncodedVisual:
        """A video's embeddings and grid. max_tokens: refuse (VideoInputError) a video that would take
        more visual tokens, before its frames are resized. progress / abort: the tower's."""

    @abstractmethod
    def encode_image(self, tower: VisionEncoder, image: np.ndarray, *, max_pixels: int | None,
                     progress: ProgressFn | None = None, abort: AbortFn | None = None) -> EncodedVisual:
        """An image's embeddings and grid."""

    # ---- the trainer: transformers' inputs, from the checkpoint folder and its config.json ----
    @abstractmethod
    def hf_video(self, video: Any, hf_dir: Path, hf_config: dict[str, Any], *, fps: float | None,
                 num_frames: int | None, max_pixels: int | None) -> tuple[dict[str, Any], list[int]]:
        """(the model's tensors for one video, [its visual token count])."""

    @abstractmethod
    def hf_images(self, images: list[np.ndarray], hf_dir: Path, hf_config: dict[str, Any], *,
                  max_pixels: int | None) -> tuple[dict[str, Any], list[int]]:
        """(the model's tensors for the images, each image's visual token count)."""

    def hf_extra_inputs(self, ids: Any, media_token_ids: dict[str, int]) -> dict[str, Any]:
        """What the model's forward takes besides the tensors of hf_video / hf_images, for a batch of
        ids [1, n] whose visual tokens are media_token_ids' ("video" / "image" -> id). Nothing by default."""
        return {}
