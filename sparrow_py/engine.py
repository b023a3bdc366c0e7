"""Engine: a loaded model plus one context, with streaming generation.

The Engine owns its C handles and releases them deterministically (close(), or a with-block);
every runtime error raises SparrowError with the runtime's message. Runtime calls release the
GIL (cffi does so for every call), so other Python threads keep running during generation.

Threads: an Engine has one context, so its generations take turns. A generation holds the Engine
from generate() until its stream ends (last piece, error, close() or garbage collection); other
threads' generate() and context calls wait meanwhile. The generating thread itself may call in
(last_stats, decode ...), and a second generate() on that thread supersedes its open stream. For
generations that run in parallel, give each thread its own Engine: engine.share() makes one on the
same loaded files (the weights are in memory once; each Engine has its own context).

Apps with a UI run generate() on a worker thread and keep the UI thread out of the runtime. They
get: abort= (Engine) to cancel from the UI thread, by returning a flag it sets; progress= and
vision_progress= (generate, chat) for a long video's vision encoding and prompt prefill; and
last_stats, which the worker may read after each piece for live figures. The callables run on
the worker thread: hand their values to the UI thread (a queued signal) and return at once.
examples/desktop is such an app.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from sparrow_py._native import OwnsHandles, backend_name, check, ffi, lib
from sparrow_py.chat import render_chat_template
from sparrow_py.errors import SparrowError
from sparrow_py.vision import _c_callback, _check_with

if TYPE_CHECKING:
    from sparrow_py.video.family import VisionFamily

_KV_TYPES = {"f16": lib.SPARROW_TYPE_F16, "f32": lib.SPARROW_TYPE_F32}
_FINISH_NAMES = {
    lib.SPARROW_FINISH_EOG: "eog",
    lib.SPARROW_FINISH_LENGTH: "length",
    lib.SPARROW_FINISH_STOP: "stop",
    lib.SPARROW_FINISH_CONTEXT: "context",
}


MEDIA_TOKEN = -1  # a prompt token standing for one visual token (sparrow.h SPARROW_MEDIA_TOKEN)


def _trim_zeros(counts: list) -> list:
    while counts and counts[-1] == 0:
        counts = counts[:-1]
    return counts


@dataclass
class Media:
    """One image or video in a prompt: the vision encoder's embeddings and where they sit.

    embd: [n_tokens, n_embd] float32 (sparrow_py.vision.VisionEncoder.encode's output)
    grid: the item's token grid in the LM (t, h, w after the 2x2 merge), for M-RoPE models
    t_scale: temporal position step per grid frame (Qwen2.5-VL: int(second_per_grid_t) *
        tokens_per_second, as transformers computes it; Qwen2-VL and images: 1)
    placeholder: the token id the model's prompts use here (e.g. <|video_pad|>)
    """

    embd: np.ndarray
    grid: tuple = (0, 0, 0)
    t_scale: float = 1.0
    placeholder: int = 0


class _Weights:
    """The handles an Engine and the Engines its share() made have in common (the model, its draft
    and its vision file): freed when the last of them closes, since a model must outlive every
    context made from it (sparrow.h)."""

    def __init__(self, model):
        self.model = model
        self.draft = ffi.NULL
        self.vision = None
        self._users = 1
        self._lock = threading.Lock()

    def retain(self) -> None:
        with self._lock:
            if self._users == 0:
                raise SparrowError("the engine is closed", "SPARROW_ERR_STATE")
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
        if self.draft != ffi.NULL:
            lib.sparrow_model_free(self.draft)
            self.draft = ffi.NULL
        if self.vision is not None:
            self.vision.close()
            self.vision = None
        if self.model != ffi.NULL:
            lib.sparrow_model_free(self.model)
            self.model = ffi.NULL


def _check_context_options(n_ctx, n_threads, n_batch, seed, kv_type, backend=None) -> None:
    backend_name(backend)  # refuses what is not a name
    if kv_type not in _KV_TYPES:
        raise SparrowError(f"kv_type must be one of {sorted(_KV_TYPES)}, not {kv_type!r}")
    for name, value in (("n_ctx", n_ctx), ("n_threads", n_threads), ("n_batch", n_batch), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SparrowError(f"{name} must be a non-negative integer, not {value!r}")


class Engine(OwnsHandles):
    """Run a GGUF language model.

    Args:
        model: path to a GGUF file.
        n_ctx: context window in tokens (0: the model's training context, at most 32768).
        n_threads: CPU threads (0: all cores).
        seed: default sampling seed.
        n_batch: prompt tokens per forward pass.
        kv_type: "f16" (default) or "f32" key/value cache.
        backend: which backend runs the model ("cpu", "ref": sparrow.system_info() lists them);
            None: $SPARROW_BACKEND, else "cpu". The vision file runs on the same one.
        vocab_only: load only the tokenizer (works with vocab-only GGUFs); tokenize and
            detokenize work, generation does not.
        draft: a Sparrow draft GGUF made for this model: generate() then decodes speculatively
            (the output is still exactly the model's own).
        mmproj: the model's vision file (convert/to_gguf.py --mmproj): generate() and chat()
            then take video= and images=.
        progress: a callable(progress: float) -> bool|None called while loading; return False
            to cancel.
        abort: a callable() -> bool called between steps of long work (a layer, a prompt
            chunk); True stops the generation in progress at once: its stream raises SparrowError
            (status SPARROW_ERR_ABORTED) and the Engine stays usable. For cancelling a long
            prompt (a video) from another thread. generate() and chat() also ask it while their
            video= / images= go through the vision tower.
    """

    def __init__(
        self,
        model: Union[str, os.PathLike],
        n_ctx: int = 0,
        n_threads: int = 0,
        seed: int = 0x5EED,
        n_batch: int = 256,
        kv_type: str = "f16",
        vocab_only: bool = False,
        draft: Optional[Union[str, os.PathLike]] = None,
        mmproj: Optional[Union[str, os.PathLike]] = None,
        progress=None,
        abort: Optional[Callable[[], bool]] = None,
        backend: Optional[str] = None,
    ):
        self._init_state()
        _check_context_options(n_ctx, n_threads, n_batch, seed, kv_type, backend)
        path = os.fspath(model)
        if not os.path.exists(path):
            raise SparrowError(f"model file not found: {path}", "SPARROW_ERR_IO")

        mparams = lib.sparrow_model_default_params()
        mparams.vocab_only = bool(vocab_only)
        c_backend = backend_name(backend)  # the weights are prepared for it at load
        mparams.backend = c_backend
        callback = None
        if progress is not None:

            def on_progress(fraction, _user_data):
                try:
                    return progress(fraction) is not False
                except Exception:  # an exception in a callback cannot cross C: treat as cancel
                    return False

            callback = ffi.callback("bool(float, void *)", on_progress)
            mparams.progress_callback = callback
        out_model = ffi.new("sparrow_model **")
        check(lib.sparrow_model_load(path.encode(), mparams, out_model), f"cannot load {path}")
        self._model = out_model[0]
        self._weights = _Weights(self._model)
        self.vocab_only = bool(vocab_only)
        if self.vocab_only:
            return

        self._init_context(n_ctx, n_threads, n_batch, kv_type, seed, abort, backend)
        try:
            if draft is not None:
                self._attach_draft(os.fspath(draft))
            if mmproj is not None:
                from sparrow_py.vision import VisionEncoder

                self._weights.vision = self._vision = VisionEncoder(mmproj, n_threads=n_threads, backend=backend)
                if self._vision.n_embd != self.n_embd:
                    raise SparrowError(f"the vision file projects to {self._vision.n_embd} dimensions but the model "
                                       f"has {self.n_embd}: it belongs to another model")
        except SparrowError:
            self.close()
            raise

    def _init_state(self) -> None:
        self._model = ffi.NULL
        self._ctx = ffi.NULL
        self._draft = ffi.NULL
        self._vision = None
        self._weights: Optional[_Weights] = None
        self._abort_callback = None       # the cffi callback the context calls: kept alive with it
        self._abort_fn: Optional[Callable[[], bool]] = None  # abort=, also asked by the vision tower
        self.vocab_only = False
        self.backend: Optional[str] = None  # as given; None: $SPARROW_BACKEND, else "cpu"
        self._turn = threading.Lock()     # held by the open generation (its _Stream), or one call
        self._in_call = threading.Lock()  # held during each runtime call on the context: close() waits
        # the open generation: its stream's ticket (not the stream: a stream dropped unread must be
        # collected, which ends its turn) and the thread reading it
        self._open_ticket: Optional[object] = None
        self._open_thread = 0
        self.last_finish_reason: Optional[str] = None
        self.last_tokens: list[int] = []

    def _init_context(self, n_ctx, n_threads, n_batch, kv_type, seed, abort, backend) -> None:
        cparams = lib.sparrow_context_default_params()
        self.backend = backend
        c_backend = backend_name(backend)
        cparams.backend = c_backend
        cparams.n_ctx = n_ctx
        cparams.n_threads = n_threads
        cparams.n_batch = n_batch
        cparams.kv_type = _KV_TYPES[kv_type]
        cparams.seed = seed
        self._abort_fn = abort
        if abort is not None:

            def on_abort(_user_data):
                try:
                    return bool(abort())
                except Exception:  # an exception in a callback cannot cross C: treat as a request to stop
                    return True

            self._abort_callback = ffi.callback("bool(void *)", on_abort)
            cparams.abort_callback = self._abort_callback
        out_ctx = ffi.new("sparrow_context **")
        try:
            check(lib.sparrow_context_init(self._model, cparams, out_ctx), "cannot create a context")
            self._ctx = out_ctx[0]
            if self._draft != ffi.NULL:  # a shared draft (share()): this context drafts with it too
                check(lib.sparrow_context_set_draft(self._ctx, self._draft), "cannot use the draft")
        except SparrowError:
            self.close()
            raise

    def share(self, n_ctx: int = 0, n_threads: int = 0, seed: int = 0x5EED, n_batch: int = 256,
              kv_type: str = "f16", abort: Optional[Callable[[], bool]] = None) -> "Engine":
        """Another Engine on this one's loaded files, with a context of its own: the model, draft
        and vision file are shared (in memory once), so the two generate in parallel on different
        threads. Either may be closed first: the files stay loaded until the last Engine sharing
        them is closed. Arguments as Engine's."""
        self._live()
        _check_context_options(n_ctx, n_threads, n_batch, seed, kv_type, self.backend)
        other = Engine.__new__(Engine)
        other._init_state()
        self._weights.retain()
        other._weights = self._weights
        other._model, other._draft, other._vision = self._model, self._draft, self._vision
        other._init_context(n_ctx, n_threads, n_batch, kv_type, seed, abort, self.backend)
        return other

    def _attach_draft(self, path: str) -> None:
        if not os.path.exists(path):
            raise SparrowError(f"draft file not found: {path}", "SPARROW_ERR_IO")
        out = ffi.new("sparrow_model **")
        mparams = lib.sparrow_model_default_params()
        c_backend = backend_name(self.backend)
        mparams.backend = c_backend
        check(lib.sparrow_model_load(path.encode(), mparams, out), f"cannot load {path}")
        self._weights.draft = self._draft = out[0]
        check(lib.sparrow_context_set_draft(self._ctx, self._draft), "cannot use the draft")

    # ---- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release the context, and the model once no Engine shares it (share()). Safe to call
        twice. A generation running on another thread stops with an error at its next step (the
        step in flight completes)."""
        with self._in_call:
            self._free_handles()

    def _free_handles(self) -> None:
        if self._ctx != ffi.NULL:
            lib.sparrow_context_free(self._ctx)
            self._ctx = ffi.NULL
        weights, self._weights = getattr(self, "_weights", None), None
        self._model, self._draft, self._vision = ffi.NULL, ffi.NULL, None
        if weights is not None:  # the model, draft and vision file: freed by the last Engine sharing them
            weights.release()

    def _live(self):
        """The context handle; raises if the engine is closed or vocab-only."""
        self._live_model()
        if self._ctx == ffi.NULL:
            raise SparrowError("the engine was loaded vocab-only: it can tokenize but not run", "SPARROW_ERR_STATE")
        return self._ctx

    @contextmanager
    def _context(self):
        """The live context for one runtime call: after any other thread's open generation (the
        generating thread's own calls go straight in), and never while close() runs."""
        own = self._holds_turn()
        if not own:
            self._turn.acquire()
        try:
            with self._in_call:
                yield self._live()
        finally:
            if not own:
                self._turn.release()

    def _holds_turn(self) -> bool:
        """Whether this thread is reading the open generation (its calls need no turn)."""
        return self._open_ticket is not None and self._open_thread == threading.get_ident()

    def _take_turn(self, stream: "_Stream") -> None:
        """Make stream the open generation: wait for another thread's to end; this thread's own
        open stream, if any, is superseded (it raises if read further)."""
        if not self._holds_turn():
            self._turn.acquire()
        self._open_ticket = stream.ticket
        self._open_thread = threading.get_ident()

    def _live_model(self):
        if self._model == ffi.NULL:
            raise SparrowError("the engine is closed", "SPARROW_ERR_STATE")
        return self._model

    # ---- model info ----------------------------------------------------------------------
    @property
    def arch(self) -> str:
        self._live_model()
        return ffi.string(lib.sparrow_model_arch(self._model)).decode()

    @property
    def n_vocab(self) -> int:
        self._live_model()
        return lib.sparrow_model_n_vocab(self._model)

    @property
    def n_embd(self) -> int:
        self._live_model()
        return lib.sparrow_model_n_embd(self._model)

    @property
    def n_layer(self) -> int:
        self._live_model()
        return lib.sparrow_model_n_layer(self._model)

    @property
    def n_ctx(self) -> int:
        return lib.sparrow_context_n_ctx(self._live())

    @property
    def bos_token(self) -> int:
        self._live_model()
        return lib.sparrow_token_bos(self._model)

    @property
    def eos_token(self) -> int:
        self._live_model()
        return lib.sparrow_token_eos(self._model)

    def is_eog(self, token: int) -> bool:
        self._live_model()
        return bool(lib.sparrow_token_is_eog(self._model, token))

    def metadata(self, key: str) -> Optional[str]:
        """A string metadata value of the GGUF (e.g. "general.name"), or None."""
        self._live_model()
        size = ffi.new("size_t *")
        buf = ffi.new("char[]", 256)
        status = lib.sparrow_model_meta_string(self._model, key.encode(), buf, 256, size)
        if status == lib.SPARROW_ERR_BUFFER_TOO_SMALL:
            buf = ffi.new("char[]", size[0] + 1)
            status = lib.sparrow_model_meta_string(self._model, key.encode(), buf, size[0] + 1, size)
        if status == lib.SPARROW_ERR_INVALID_ARGUMENT:
            return None
        check(status)
        return ffi.unpack(buf, size[0]).decode("utf-8", "replace")

    def tensor(self, name: str) -> np.ndarray:
        """A weight tensor dequantized to float32, flattened (ggml order: rows of ne[0])."""
        self._live_model()
        numel = lib.sparrow_model_tensor_numel(self._model, name.encode())
        if numel < 0:
            raise SparrowError(f"no tensor {name!r}")
        out = np.empty(numel, dtype=np.float32)
        check(lib.sparrow_model_tensor_f32(self._model, name.encode(), ffi.from_buffer("float[]", out), numel))
        return out

    # ---- tokens --------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of text. add_special adds BOS where the model wants one; parse_special
        recognises special tokens written in the text."""
        self._live_model()
        data = text.encode("utf-8")
        n_out = ffi.new("int32_t *")
        cap = len(data) + 8
        buf = ffi.new("sparrow_token[]", cap)
        status = lib.sparrow_tokenize(self._model, data, len(data), add_special, parse_special, buf, cap, n_out)
        if status == lib.SPARROW_ERR_BUFFER_TOO_SMALL:
            cap = n_out[0]
            buf = ffi.new("sparrow_token[]", cap)
            status = lib.sparrow_tokenize(self._model, data, len(data), add_special, parse_special, buf, cap, n_out)
        check(status, "tokenize")
        return list(ffi.unpack(buf, n_out[0]))

    def detokenize_bytes(self, tokens: Sequence[int], special: bool = False) -> bytes:
        self._live_model()
        tokens = list(tokens)
        arr = ffi.new("sparrow_token[]", tokens) if tokens else ffi.NULL
        size = ffi.new("size_t *")
        cap = 16 * len(tokens) + 16
        buf = ffi.new("char[]", cap)
        status = lib.sparrow_detokenize(self._model, arr, len(tokens), special, buf, cap, size)
        if status == lib.SPARROW_ERR_BUFFER_TOO_SMALL:
            cap = size[0]
            buf = ffi.new("char[]", cap)
            status = lib.sparrow_detokenize(self._model, arr, len(tokens), special, buf, cap, size)
        check(status, "detokenize")
        return ffi.unpack(buf, size[0])

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of a token sequence (invalid UTF-8, e.g. a cut character, becomes U+FFFD)."""
        return self.detokenize_bytes(tokens, special).decode("utf-8", "replace")

    # ---- generation ----------------------------------------------------------------------
    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        add_special: bool = True,
        ignore_eos: bool = False,
        speculative: Optional[str] = None,
        n_draft: int = 4,
        draft_p_min: float = 0.0,
        tree_depth: int = 5,
        tree_top_k: int = 4,
        tree_total_tokens: int = 24,
        adaptive: bool = True,
        media: Optional[Sequence[Media]] = None,
        video=None,
        images=None,
        fps: Optional[float] = None,
        num_frames: Optional[int] = None,
        max_pixels: Optional[int] = None,
        progress: Optional[Callable[[float], Optional[bool]]] = None,
        vision_progress: Optional[Callable[[float], Optional[bool]]] = None,
    ) -> Iterator[str]:
        """Yield the continuation of prompt (text or token ids) piece by piece, as produced.

        temperature 0 is greedy. Stops at an end-of-generation token, a stop string (not
        included in the output), max_tokens (-1: no limit) or a full context.
        With a draft attached, decoding is speculative: "chain" (the default then) drafts n_draft
        tokens per target forward; "tree" drafts an EAGLE-2 dynamic tree (tree_depth levels,
        tree_top_k children per expanded node, the tree_total_tokens best verified together);
        "none" turns speculation off. adaptive (default) sizes each round from what this machine
        and this text show: up to n_draft tokens, or a plain decode step when speculating does
        not pay (last_stats["n_draft_rounds"] counts what it chose), and a greedy or sampled
        chain stops where the draft's confidence no longer pays for another token; adaptive=False
        always drafts n_draft (or the whole tree). draft_p_min (0..1, llama.cpp's --draft-p-min)
        also stops a chain before a token, after its first, whose draft distribution's likeliest
        token is less likely than that (0: off).
        video / images (needs mmproj=): a video file, a list or array of HxWx3 uint8 RGB frames,
        and a list of images. They go where the prompt text says "<video>" / "<image>", else
        before the text, wrapped in the model's vision markers. fps / num_frames choose frames;
        max_pixels caps each frame's size (Qwen's smart_resize budget).
        media: low level: images/videos already encoded, for a prompt of token ids holding
        runs of MEDIA_TOKEN (-1), one run per item, in order.
        progress(fraction): the prompt's prefill, which the first piece waits for (long for a
        video): called after each chunk of n_batch prompt tokens with the fraction done (tokens
        reused from the cache count as done), rising to exactly 1 once the first token is ready.
        vision_progress(fraction): video= / images= going through the vision tower (encode_visuals),
        before this returns: per item, after each layer of each chunk of frames, rising to 1.
        Either returning False cancels: SparrowError (SPARROW_ERR_ABORTED), the Engine stays usable.
        They run on the calling thread (progress on the thread reading the stream).
        ``last_finish_reason``, ``last_tokens`` (the token ids produced) and ``last_stats``
        describe the generation afterwards.
        """
        self._live()
        if video is not None or images is not None:
            if not isinstance(prompt, str):
                raise SparrowError("video= and images= need a text prompt")
            items = self.encode_visuals(video, images, fps, num_frames, max_pixels, progress=vision_progress,
                                        abort=self._abort_fn)
            text = prompt
            for kind in ("video", "image"):
                if not any(k == kind for k, _ in items):
                    continue
                marker = f"<{kind}>"
                n = sum(k == kind for k, _ in items)
                if text.count(marker) == 0:
                    text = marker * n + text
                elif text.count(marker) != n:
                    raise SparrowError(f"the prompt has {text.count(marker)} {marker} markers for {n} {kind}s")
            # the family's block, e.g. Qwen's vision markers around the item (a chat template writes those itself)
            family = self._vision_family()
            prompt, media = self._tokens_with_visuals(
                text, items, add_special, {"video": "<video>", "image": "<image>"},
                lambda n: family.prompt_block(n, MEDIA_TOKEN, self._vision_token))
        tokens = self.tokenize(prompt, add_special=add_special) if isinstance(prompt, str) else [int(t) for t in prompt]
        if isinstance(stop, str):
            stop = [stop]
        params = lib.sparrow_generate_default_params()
        params.max_tokens = int(max_tokens)
        params.sampling.temperature = float(temperature)
        params.sampling.top_k = int(top_k)
        params.sampling.top_p = float(top_p)
        params.sampling.min_p = float(min_p)
        if seed is not None:
            if seed < 0:
                raise SparrowError(f"seed must be >= 0, not {seed}")
            params.sampling.seed = int(seed)
        params.ignore_eog = bool(ignore_eos)
        modes = {None: -1, "none": lib.SPARROW_SPEC_NONE, "chain": lib.SPARROW_SPEC_CHAIN, "tree": lib.SPARROW_SPEC_TREE}
        if speculative not in modes:
            raise SparrowError(f"speculative must be 'none', 'chain' or 'tree' (or None for the default), not {speculative!r}")
        params.speculative = modes[speculative]
        params.n_draft = int(n_draft)
        params.draft_p_min = float(draft_p_min)
        params.tree_depth = int(tree_depth)
        params.tree_top_k = int(tree_top_k)
        params.tree_total_tokens = int(tree_total_tokens)
        params.adaptive = bool(adaptive)
        keep_alive = [ffi.new("char[]", s.encode("utf-8")) for s in (stop or [])]
        stop_array = ffi.new("char *[]", keep_alive) if keep_alive else ffi.NULL
        params.stop = stop_array
        params.n_stop = len(keep_alive)
        prompt_arr = ffi.new("sparrow_token[]", tokens) if tokens else ffi.NULL
        # called during the stream's first step: the stream keeps it alive
        prefill_progress = _c_callback(progress, "progress")
        if prefill_progress is not None:
            params.progress_callback = prefill_progress.c
        items = None
        if media:
            keep = []
            items = ffi.new("sparrow_media[]", len(media))
            for item, m in zip(items, media):
                embd = np.ascontiguousarray(m.embd, dtype=np.float32)
                if embd.ndim != 2 or embd.shape[1] != self.n_embd:
                    raise SparrowError(f"media embeddings must have shape [n, {self.n_embd}], not {embd.shape}")
                keep.append(embd)
                item.embd = ffi.from_buffer("float[]", embd)
                item.n_tokens = embd.shape[0]
                item.grid_t, item.grid_h, item.grid_w = (int(x) for x in m.grid)
                item.t_scale = float(m.t_scale)
                item.placeholder = int(m.placeholder)
        stream = _Stream(self, prefill_progress)
        self._take_turn(stream)
        try:
            with self._in_call:
                ctx = self._live()
                if items is not None:
                    status = lib.sparrow_generate_begin_media(ctx, prompt_arr, len(tokens), items, len(media), params)
                else:
                    status = lib.sparrow_generate_begin(ctx, prompt_arr, len(tokens), params)
            check(status, "generate")
        except BaseException:
            stream.close()
            raise
        self.last_finish_reason = None
        self.last_tokens = []
        return stream

    # ---- images and videos -------------------------------------------------------------------
    def _vision_token(self, text: str) -> int:
        ids = self.tokenize(text, add_special=False, parse_special=True)
        if len(ids) != 1:
            raise SparrowError(f"the model's vocabulary has no {text} token: it is not a vision model of this family")
        return ids[0]

    def _media_token_room(self) -> Optional[int]:
        """The most tokens a video can take in this Engine's context (None: model-only Engine)."""
        return None if self._ctx == ffi.NULL else self.n_ctx

    def _vision_family(self) -> VisionFamily:
        """The vision file's family: how its videos and images are encoded and laid out in prompts."""
        from sparrow_py.architectures import vision_family_of_projector

        if self._vision is None:
            raise SparrowError("video and images need the model's vision file: Engine(..., mmproj=...)")
        family = vision_family_of_projector(self._vision.projector_type)
        if family is None:
            raise SparrowError(f"video= / images= are not wired for projector type {self._vision.projector_type!r}; "
                               "encode with sparrow_py.vision.VisionEncoder and pass media= instead")
        return family

    def encode_visuals(self, video=None, images=None, fps: Optional[float] = None, num_frames: Optional[int] = None,
                       max_pixels: Optional[int] = None, progress: Optional[Callable[[float], Optional[bool]]] = None,
                       abort: Optional[Callable[[], bool]] = None) -> list[tuple[str, Media]]:
        """[(kind, Media)] for the video (first) and the images, encoded by the vision tower: what
        chat_prompt() takes, so that encodings can be kept and reused for several prompts. The
        vision file is only read: any thread may call this, also while generations run.
        progress / abort: VisionEncoder.encode's, for each item in turn (the fraction rises to 1
        per item); a cancel raises SparrowError (SPARROW_ERR_ABORTED)."""
        family = self._vision_family()

        def encoded(kind: str, encode) -> tuple[str, Media]:
            # the placeholder first: a model of another family fails before a long encode
            placeholder = self._vision_token(family.placeholders[kind])
            e = encode()
            return kind, Media(e.embd, grid=e.grid, t_scale=e.t_scale, placeholder=placeholder)

        items = []
        if video is not None:
            items.append(encoded("video", lambda: family.encode_video(
                self._vision, video, fps=fps, num_frames=num_frames, max_pixels=max_pixels,
                max_tokens=self._media_token_room(), progress=progress, abort=abort)))
        for image in images or []:
            items.append(encoded("image", lambda: family.encode_image(
                self._vision, np.asarray(image), max_pixels=max_pixels, progress=progress, abort=abort)))
        return items

    def _tokens_with_visuals(self, text: str, items: list, add_special: bool, markers: dict[str, str],
                             block: Callable[[int], list[int]]):
        """Token ids of text with each marker ("video" / "image" -> its text) replaced, in order, by
        block(n) for the next item of its kind, n its visual token count; and the items' Media in
        prompt order."""
        import re

        by_kind = {k: [m for kk, m in items if kk == k] for k in ("video", "image")}
        pattern = "|".join(re.escape(m) for m in markers.values())
        tokens, media, pos, first = [], [], 0, True
        for match in re.finditer(pattern, text):
            kind = "video" if match.group(0) == markers["video"] else "image"
            if not by_kind[kind]:
                raise SparrowError(f"the prompt has more {match.group(0)} than {kind}s were given")
            tokens += self.tokenize(text[pos:match.start()], add_special=add_special and first)
            first = False
            item = by_kind[kind].pop(0)
            tokens += block(len(item.embd))
            media.append(item)
            pos = match.end()
        tokens += self.tokenize(text[pos:], add_special=add_special and first)
        return tokens, media

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text the model's own chat template makes of messages."""
        template = self.metadata("tokenizer.chat_template")
        if template is None:
            raise SparrowError("the model has no chat template (tokenizer.chat_template)")
        bos = self.detokenize([self.bos_token], special=True) if self.bos_token >= 0 else ""
        eos = self.detokenize([self.eos_token], special=True) if self.eos_token >= 0 else ""
        return render_chat_template(template, messages, add_generation_prompt, bos_token=bos, eos_token=eos)

    def chat(self, messages: Sequence[dict[str, Any]], video=None, images=None, fps: Optional[float] = None,
             num_frames: Optional[int] = None, max_pixels: Optional[int] = None,
             vision_progress: Optional[Callable[[float], Optional[bool]]] = None, **kwargs) -> Iterator[str]:
        """generate() on the chat template's rendering of messages (special tokens parsed).

        With video= / images=, message contents may be lists of {"type": "video"}, {"type":
        "image"} and {"type": "text", "text": ...} parts, as Hugging Face chat templates take them;
        the template's vision pad tokens are replaced by the encoded items, in order.
        vision_progress (and progress, among kwargs) as generate()'s."""
        items = None
        if video is not None or images is not None:
            items = self.encode_visuals(video, images, fps, num_frames, max_pixels, progress=vision_progress,
                                        abort=self._abort_fn)
        tokens, media = self.chat_prompt(messages, items)
        return self.generate(tokens, media=media or None, **kwargs)

    def chat_prompt(self, messages: Sequence[dict[str, Any]], visuals: Optional[Sequence[tuple[str, Media]]] = None
                    ) -> tuple[list[int], list[Media]]:
        """The prompt chat() generates from: the token ids of the chat template's rendering of
        messages, with a run of MEDIA_TOKEN for each visual item, and the items' Media in prompt
        order (for generate(tokens, media=...)). visuals: encode_visuals() output, videos in the
        order the messages show videos, images likewise."""
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        if not visuals:
            # the template writes BOS itself where the model wants one
            return self.tokenize(text, add_special=False, parse_special=True), []
        # the template writes each item's placeholder (and any markers around it): the placeholder
        # becomes the item's run of MEDIA_TOKEN
        family = self._vision_family()
        return self._tokens_with_visuals(text, list(visuals), False, family.placeholders, lambda n: [MEDIA_TOKEN] * n)

    @property
    def last_stats(self) -> dict:
        """Statistics of the last generation: token counts, times and speeds. While a stream is
        open, the thread reading it gets the figures so far (the runtime updates them at every
        piece): for a live accepted length and tokens/s."""
        out = ffi.new("sparrow_stats *")
        with self._context() as ctx:
            check(lib.sparrow_get_stats(ctx, out))
        s = out[0]
        return {
            "n_prompt": s.n_prompt,
            "n_prompt_cached": s.n_prompt_cached,
            "n_generated": s.n_generated,
            "n_target_forwards": s.n_target_forwards,
            "prefill_ms": s.t_prefill_ms,
            "decode_ms": s.t_decode_ms,
            "prefill_tokens_per_s": s.prefill_tokens_per_s,
            "decode_tokens_per_s": s.decode_tokens_per_s,
            "n_drafted": s.n_drafted,
            "n_accepted": s.n_accepted,
            "mean_accepted_length": s.mean_accepted_length,
            "acceptance_by_depth": [
                s.accepted_by_depth[d] / s.drafted_by_depth[d] for d in range(32) if s.drafted_by_depth[d]
            ],
            "draft_ms": s.t_draft_ms,
            "verify_ms": s.t_verify_ms,
            "draft_kv_entries": s.draft_kv_entries,
            # rounds by tokens drafted (index 0: plain decode steps), trimmed after the last used
            "n_draft_rounds": _trim_zeros([s.n_draft_rounds[k] for k in range(33)]),
            "n_tree_rounds": s.n_tree_rounds,
        }

    @property
    def last_glimpses(self) -> tuple[np.ndarray, np.ndarray]:
        """The glimpses the last speculative generation gave its draft: (pooled [G, n_embd], the
        mean of the target's ivsb-layer outputs over each segment of the visual tokens, before
        glimpse_proj; positions [G], each segment's first visual token). Empty for text prompts
        or drafts without glimpses."""
        n = ffi.new("int32_t *")
        with self._context() as ctx:
            check(lib.sparrow_get_glimpses(ctx, ffi.NULL, ffi.NULL, 0, n))
            pooled = np.zeros((n[0], self.n_embd), np.float32)
            pos = np.zeros(n[0], np.int32)
            if n[0]:
                check(lib.sparrow_get_glimpses(ctx, ffi.cast("float *", pooled.ctypes.data),
                                               ffi.cast("int32_t *", pos.ctypes.data), n[0], n))
        return pooled, pos

    # ---- low level -----------------------------------------------------------------------
    def decode(
        self,
        tokens: Sequence[int],
        positions: Optional[Sequence[int]] = None,
        outputs: Optional[Sequence[bool]] = None,
        parents: Optional[Sequence[int]] = None,
        seq_ids: Optional[Sequence[int]] = None,
        capture_all: bool = False,
    ) -> np.ndarray:
        """One forward pass appending tokens to the KV cache; returns the logits of the rows
        flagged in outputs (default: the last), shape (n_outputs, n_vocab).

        parents makes the batch a token tree (speculative verification): parents[i] is the index
        of token i's parent in the batch, or -1; each token attends to the cache, its ancestors
        and itself.

        seq_ids puts token i in sequence seq_ids[i] (>= 0; default: all in 0): the cache then
        holds several independent sequences, a token attends only to its own, and one pass
        advances them all with the logits each would get alone (batched generation). Without
        positions, a token continues its own sequence.

        capture_all captures hidden states (set_capture_layers) at every token, not only at the
        output rows: hidden(slot) then has a row per token."""
        self._live()
        tokens = [int(t) for t in tokens]
        n = len(tokens)
        if n == 0:
            raise SparrowError("decode needs at least one token")
        if positions is not None and len(positions) != n:
            raise SparrowError("positions must have one entry per token")
        if outputs is not None and len(outputs) != n:
            raise SparrowError("outputs must have one entry per token")
        batch = ffi.new("sparrow_batch *")
        tok = ffi.new("sparrow_token[]", tokens)
        batch.tokens = tok
        batch.n_tokens = n
        pos = ffi.new("int32_t[]", [int(p) for p in positions]) if positions is not None else ffi.NULL
        outs = ffi.new("int8_t[]", [1 if o else 0 for o in outputs]) if outputs is not None else ffi.NULL
        if parents is not None and len(parents) != n:
            raise SparrowError("parents must have one entry per token")
        par = ffi.new("int32_t[]", [int(p) for p in parents]) if parents is not None else ffi.NULL
        if seq_ids is not None and len(seq_ids) != n:
            raise SparrowError("seq_ids must have one entry per token")
        seq = ffi.new("int32_t[]", [int(s) for s in seq_ids]) if seq_ids is not None else ffi.NULL
        batch.pos = pos
        batch.outputs = outs
        batch.parents = par
        batch.seq_ids = seq
        batch.capture_all = 1 if capture_all else 0
        with self._context() as ctx:
            check(lib.sparrow_decode(ctx, batch[0]), "decode")
            n_out = lib.sparrow_n_outputs(ctx)
            result = np.empty((n_out, self.n_vocab), dtype=np.float32)
            for i in range(n_out):
                ptr = lib.sparrow_get_logits(ctx, i)
                result[i] = np.frombuffer(ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32)
        return result

    def set_capture_layers(self, layers: Sequence[int]) -> None:
        """Record the input of these layers (n_layer = final hidden state) at output rows."""
        layers = [int(x) for x in layers]
        arr = ffi.new("int32_t[]", layers) if layers else ffi.NULL
        with self._context() as ctx:
            check(lib.sparrow_set_capture_layers(ctx, arr, len(layers)), "set_capture_layers")
        self._capture = layers

    def hidden(self, slot: int) -> np.ndarray:
        """Captured hidden states of capture slot `slot` for every output row of the last
        decode (every token with capture_all), shape (rows, n_embd)."""
        with self._context() as ctx:
            n_out = lib.sparrow_n_hidden_rows(ctx)
            out = np.empty((n_out, self.n_embd), dtype=np.float32)
            for i in range(n_out):
                ptr = lib.sparrow_get_hidden(ctx, slot, i)
                if ptr == ffi.NULL:
                    raise SparrowError(f"no captured hidden state for slot {slot}")
                out[i] = np.frombuffer(ffi.buffer(ptr, 4 * self.n_embd), dtype=np.float32)
        return out

    @property
    def kv_size(self) -> int:
        with self._context() as ctx:
            return lib.sparrow_kv_size(ctx)

    def kv_truncate(self, n_keep: int) -> None:
        """Roll the KV cache back to its first n_keep tokens."""
        with self._context() as ctx:
            check(lib.sparrow_kv_truncate(ctx, int(n_keep)), "kv_truncate")

    def kv_compact(self, n_keep: int, rows: Sequence[int]) -> None:
        """Keep cache rows [0, n_keep) followed by `rows` (increasing), e.g. an accepted tree path."""
        rows = [int(r) for r in rows]
        arr = ffi.new("int32_t[]", rows) if rows else ffi.NULL
        with self._context() as ctx:
            check(lib.sparrow_kv_compact(ctx, int(n_keep), arr, len(rows)), "kv_compact")


class _Stream:
    """The pieces of one generate() call, and its hold on the Engine (the module's docstring):
    released at the last piece, on an error, by close(), or when the stream is collected."""

    def __init__(self, engine: Engine, progress=None):
        self._engine = engine
        self._progress = progress  # the prefill progress callback (vision._CCallback) the runtime calls
        self.ticket = object()
        self._done = False
        self._buf = ffi.new("char[]", 4096)
        self._size = ffi.new("size_t *")
        self._finish = ffi.new("int32_t *")

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        e = self._engine
        if e._open_ticket is not self.ticket:
            self._done = True
            raise SparrowError("this generation was superseded by a later generate() on the same Engine",
                               "SPARROW_ERR_STATE")
        e._open_thread = threading.get_ident()  # the reading thread's own calls go straight in
        try:
            while True:
                with e._in_call:
                    if e._ctx == ffi.NULL:
                        raise SparrowError("the engine was closed during generation", "SPARROW_ERR_STATE")
                    _check_with(lib.sparrow_generate_next(e._ctx, self._buf, 4096, self._size, self._finish, ffi.NULL),
                                "generate", [self._progress])
                    piece = ffi.unpack(self._buf, self._size[0]).decode("utf-8", "replace") if self._size[0] else ""
                    finish = self._finish[0]
                    if finish != lib.SPARROW_FINISH_NONE:
                        tokens = ffi.new("sparrow_token **")
                        n = ffi.new("int32_t *")
                        check(lib.sparrow_generated_tokens(e._ctx, tokens, n))
                        # (an empty generation's array may be NULL: an end of text came first)
                        e.last_tokens = list(ffi.unpack(tokens[0], n[0])) if n[0] else []
                        e.last_finish_reason = _FINISH_NAMES.get(finish, "unknown")
                if finish != lib.SPARROW_FINISH_NONE:
                    self.close()
                    if piece:
                        return piece
                    raise StopIteration
                if piece:
                    return piece
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop reading: the Engine is free for other generations."""
        self._done = True
        e = self._engine
        if e._open_ticket is self.ticket:
            e._open_ticket = None
            e._turn.release()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the Engine may be half torn down
            pass
