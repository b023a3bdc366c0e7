"""VisionEncoder: a vision (mmproj) GGUF run by the runtime, pixels in, LM embeddings out.

    enc = VisionEncoder("mmproj-qwen25vl.gguf", n_threads=4)
    v = sparrow_py.video.qwen.preprocess_video("clip.mp4", cfg)
    embeddings = enc.encode(v.pixel_values, v.grid_thw)   # [n_tokens, enc.n_embd] float32

Input layouts are those of sparrow_py.video (see sparrow_vision_encode in sparrow.h): Qwen2-VL /
Qwen2.5-VL take pixel_values [n_patches, C*T*P*P] with grid_thw (t, h, w) (or several grids);
LLaVA-OneVision takes [frames, C, H, W] and derives the grid from the shape when none is given.

A long video takes a while: encode(..., progress=, abort=) reports the fraction done after each
layer of each chunk of frames and stops when asked (sparrow_vision_encode_ext). Both callables run
on the encoding thread; an app with a UI encodes on a worker thread, hands the fractions to its UI
thread, and cancels by setting a flag the abort callable returns.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import numpy as np

from sparrow_py._native import OwnsHandles, backend_name, check, ffi, lib
from sparrow_py.errors import SparrowError

GridLike = Union[Sequence[int], Sequence[Sequence[int]], np.ndarray]
ProgressFn = Callable[[float], Optional[bool]]   # fraction done -> False to cancel
AbortFn = Callable[[], bool]                     # -> True to stop


class _CCallback:
    """A Python callable as a C callback (sparrow_progress_callback or sparrow_abort_callback),
    alive as long as this object. An exception it raises cannot cross C: it stops the call, and
    _check_with() makes it the cause of the call's SparrowError."""

    def __init__(self, fn, kind: str):
        self.error: Optional[BaseException] = None
        if kind == "progress":
            def on_progress(fraction, _user_data):
                try:
                    return fn(fraction) is not False
                except Exception as e:  # noqa: BLE001 - handed back by _check_with()
                    self.error = e
                    return False

            self.c = ffi.callback("bool(float, void *)", on_progress)
        else:
            def on_abort(_user_data):
                try:
                    return bool(fn())
                except Exception as e:  # noqa: BLE001 - handed back by _check_with()
                    self.error = e
                    return True

            self.c = ffi.callback("bool(void *)", on_abort)


def _c_callback(fn, kind: str) -> Optional[_CCallback]:
    return None if fn is None else _CCallback(fn, kind)


def _check_with(status: int, what: str, callbacks) -> None:
    """check(), with the exception a callback raised (if any) as the SparrowError's cause."""
    try:
        check(status, what)
    except SparrowError as e:
        for cb in callbacks:
            if cb is not None and cb.error is not None:
                raise e from cb.error
        raise


class VisionEncoder(OwnsHandles):
    """A loaded vision file. Owns its handle: close() or a with-block releases it."""

    def __init__(self, path: Union[str, os.PathLike], n_threads: int = 0, backend: Optional[str] = None):
        """backend: which backend encodes ("cpu", "ref"); None: $SPARROW_BACKEND, else "cpu"."""
        self._model = ffi.NULL
        if not isinstance(n_threads, int) or isinstance(n_threads, bool) or n_threads < 0:
            raise SparrowError(f"n_threads must be a non-negative integer, not {n_threads!r}")
        self.backend = backend
        self._c_backend = backend_name(backend)  # (alive as long as the encoder: every encode passes it)
        path = os.fspath(path)
        if not os.path.exists(path):
            raise SparrowError(f"vision file not found: {path}", "SPARROW_ERR_IO")
        self.n_threads = n_threads
        out = ffi.new("sparrow_model **")
        mparams = lib.sparrow_model_default_params()
        mparams.backend = self._c_backend
        check(lib.sparrow_model_load(path.encode(), mparams, out), path)
        self._model = out[0]
        self.n_embd = int(lib.sparrow_vision_n_embd(self._model))
        if self.n_embd == 0:
            arch = ffi.string(lib.sparrow_model_arch(self._model)).decode()
            self.close()
            raise SparrowError(f"{path}: not a vision (mmproj) file (architecture {arch!r})")
        self.projector_type = self._meta("clip.projector_type")

    def _meta(self, key: str) -> str:
        n = ffi.new("size_t *")
        buf = ffi.new("char[]", 256)
        check(lib.sparrow_model_meta_string(self._model, key.encode(), buf, 256, n), key)
        return ffi.string(buf).decode()

    def meta_floats(self, key: str) -> list[float]:
        """A numeric metadata entry of the vision file as floats (e.g. "clip.vision.image_mean")."""
        out = ffi.new("float[]", 64)
        n = ffi.new("int32_t *")
        check(lib.sparrow_model_meta_floats(self._model, key.encode(), out, 64, n), key)
        return [out[i] for i in range(min(n[0], 64))]

    def tokens_per_second(self) -> float:
        """Qwen2.5-VL's temporal M-RoPE scale (clip.vision.tokens_per_second). Files without the key
        (llama.cpp's converter does not write it) get 2, the value of every released checkpoint."""
        try:
            return self.meta_floats("clip.vision.tokens_per_second")[0]
        except SparrowError as e:
            if "no metadata" not in str(e):
                raise
            return 2.0

    @property
    def patch_size(self) -> int:
        """The side of the tower's patches in pixels (clip.vision.patch_size)."""
        return int(self.meta_floats("clip.vision.patch_size")[0])

    @property
    def temporal_patch_size(self) -> int:
        """Qwen: frames one patch spans, the depth of its Conv3D (clip.vision.temporal_patch_size,
        written only by our converter and only where it is not 2, the released towers' depth)."""
        try:
            return int(self.meta_floats("clip.vision.temporal_patch_size")[0])
        except SparrowError as e:
            if "no metadata" not in str(e):
                raise
            return 2

    @property
    def image_size(self) -> int:
        """LLaVA-OneVision: the side of the tower's square frames in pixels (clip.vision.image_size;
        SigLIP reads image_size // patch patches per side, 384 // 14 = 27 for so400m)."""
        return int(self.meta_floats("clip.vision.image_size")[0])

    def llava_preprocess_config(self):
        """LLaVA-OneVision: the frame size and mean/std this file's tower was trained with."""
        from sparrow_py.video import llava_onevision as ov

        size = self.image_size   # not patches x patch: SigLIP-so400m leaves 384 % 14 pixels unread
        return ov.LlavaOnevisionPreprocessConfig(height=size, width=size,
                                                 image_mean=tuple(self.meta_floats("clip.vision.image_mean")),
                                                 image_std=tuple(self.meta_floats("clip.vision.image_std")))

    def _llava_side(self, pixels: np.ndarray, what: str) -> int:
        """Patches per side of LLaVA-OneVision frames/tiles [n, C, H, W], after checking H = W = image_size."""
        side, _ = self._siglip_grid(pixels.shape[1])
        size = self.image_size
        if pixels.shape[2:] != (size, size):
            raise SparrowError(f"{what} of {pixels.shape[2]}x{pixels.shape[3]} pixels, but this tower takes {size}x{size}")
        return side

    def _siglip_grid(self, channels: int) -> tuple[int, int]:
        """(patches per side, patch size) of a LLaVA-OneVision tower's fixed frame, from its
        tensors: one position embedding row per patch, a C*P*P kernel per output channel."""
        width = lib.sparrow_model_tensor_numel(self._model, b"v.patch_embd.bias")
        n_pos = lib.sparrow_model_tensor_numel(self._model, b"v.position_embd.weight")
        kernel = lib.sparrow_model_tensor_numel(self._model, b"v.patch_embd.weight")
        if width <= 0 or n_pos <= 0 or kernel <= 0 or channels <= 0:
            raise SparrowError("grid_thw is required for this vision file")
        side = int(round((n_pos // width) ** 0.5))
        patch = int(round((kernel // width / channels) ** 0.5))
        return side, patch

    def _params(self, progress: Optional[ProgressFn], abort: Optional[AbortFn], tiles: bool = False):
        """sparrow_vision_params with this encoder's threads and the callbacks (kept alive by the
        returned list, which the caller holds during the call)."""
        params = lib.sparrow_vision_default_params()
        params.n_threads = self.n_threads
        params.tiles = tiles
        keep = [_c_callback(progress, "progress"), _c_callback(abort, "abort")]
        params.backend = self._c_backend
        if keep[0] is not None:
            params.progress_callback = keep[0].c
        if keep[1] is not None:
            params.abort_callback = keep[1].c
        return params, keep

    def encode(self, pixel_values: np.ndarray, grid_thw: Optional[GridLike] = None,
               progress: Optional[ProgressFn] = None, abort: Optional[AbortFn] = None) -> np.ndarray:
        """Embeddings [n_tokens, n_embd] float32 for one or more images/videos.

        progress(fraction) is called after each layer of each chunk of frames (at most 4096
        patches), the fraction rising to exactly 1; returning False cancels. abort() is asked
        before each layer; True cancels. A cancel raises SparrowError (SPARROW_ERR_ABORTED) within
        one layer's time; the encoder stays usable. Both run on the calling thread."""
        if self._model == ffi.NULL:
            raise SparrowError("the encoder is closed", "SPARROW_ERR_STATE")
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if grid_thw is None:
            if pixels.ndim != 4:
                raise SparrowError("grid_thw is required unless pixel_values is [frames, C, H, W] (LLaVA-OneVision)")
            side = self._llava_side(pixels, "frames")
            grid_thw = (pixels.shape[0], side, side)
        grids = np.ascontiguousarray(np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3))
        if grids.size == 0 or np.any(np.abs(grids) > np.iinfo(np.int32).max):
            raise SparrowError(f"bad grid_thw {np.asarray(grid_thw).tolist()}")  # the runtime checks the rest
        grids32 = grids.astype(np.int32)
        n_tokens = ffi.new("int64_t *")
        px = ffi.from_buffer("float[]", pixels)
        gp = ffi.from_buffer("int32_t[]", grids32)
        params, keep = self._params(progress, abort)
        # the size query does no work and calls no callback
        status = lib.sparrow_vision_encode_ext(self._model, px, pixels.size, gp, len(grids32), ffi.NULL, 0, n_tokens,
                                               params)
        if status != lib.SPARROW_ERR_BUFFER_TOO_SMALL:
            check(status, "vision encode")
        out = np.empty((int(n_tokens[0]), self.n_embd), dtype=np.float32)
        _check_with(lib.sparrow_vision_encode_ext(self._model, px, pixels.size, gp, len(grids32),
                                                  ffi.from_buffer("float[]", out), out.size, n_tokens, params),
                    "vision encode", keep)
        return out

    def encode_tiles(self, pixel_values: np.ndarray, progress: Optional[ProgressFn] = None,
                     abort: Optional[AbortFn] = None) -> np.ndarray:
        """LLaVA-OneVision: the unpooled projected patch features of image tiles [n, C, H, W] ->
        [n, h * w, n_embd] (sparrow_vision_encode_tiles). progress / abort as encode()'s."""
        if self._model == ffi.NULL:
            raise SparrowError("the encoder is closed", "SPARROW_ERR_STATE")
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if pixels.ndim != 4:
            raise SparrowError(f"tiles must be [n, C, H, W], not {pixels.shape}")
        side = self._llava_side(pixels, "tiles")
        grid = ffi.new("int32_t[3]", [pixels.shape[0], side, side])
        out = np.empty((pixels.shape[0], side * side, self.n_embd), dtype=np.float32)
        n_tokens = ffi.new("int64_t *")
        params, keep = self._params(progress, abort, tiles=True)
        _check_with(lib.sparrow_vision_encode_ext(self._model, ffi.from_buffer("float[]", pixels), pixels.size, grid, 1,
                                                  ffi.from_buffer("float[]", out), out.size, n_tokens, params),
                    "vision encode", keep)
        return out

    def encode_image(self, image: np.ndarray, progress: Optional[ProgressFn] = None,
                     abort: Optional[AbortFn] = None) -> np.ndarray:
        """LLaVA-OneVision: one HxWx3 uint8 image -> its LM embeddings [n, n_embd], anyres as
        transformers does it (tiles from clip.vision.image_grid_pinpoints, then
        pack_image_features with clip.vision.vision_aspect_ratio's tile limit). progress / abort
        as encode()'s."""
        from sparrow_py.video import llava_onevision as ov

        if self.projector_type != "llava_onevision":
            raise SparrowError(f"encode_image is LLaVA-OneVision's; a {self.projector_type} tower takes "
                               "preprocessed pixels with encode()")
        flat = self.meta_floats("clip.vision.image_grid_pinpoints")
        pinpoints = [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat) - 1, 2)]
        aspect = self._meta("clip.vision.vision_aspect_ratio")
        if not aspect.startswith("anyres_max_") or not aspect[len("anyres_max_"):].isdigit():
            raise SparrowError(f"unsupported vision_aspect_ratio {aspect!r} (anyres_max_N is)")
        try:
            tiles = ov.preprocess_image(image, self.llava_preprocess_config(), pinpoints)
        except ValueError as e:
            raise SparrowError(str(e)) from None
        newline = np.empty(self.n_embd, dtype=np.float32)
        check(lib.sparrow_model_tensor_f32(self._model, b"model.image_newline", ffi.from_buffer("float[]", newline),
                                           self.n_embd), "image_newline")
        return ov.pack_image_features(self.encode_tiles(tiles.pixel_values, progress, abort), tiles, newline,
                                      int(aspect[len("anyres_max_"):]))

    def close(self) -> None:
        if self._model != ffi.NULL:
            lib.sparrow_model_free(self._model)
            self._model = ffi.NULL



