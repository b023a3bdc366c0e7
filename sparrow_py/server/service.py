"""The serving core, free of HTTP: the loaded model and its slots, and one request's generation.

A request takes a slot (slots.py), then runs on a worker thread: its images and videos are fetched
and encoded (through the media cache), its prompt tokenized, and the slot's Engine streams the
reply. The thread hands events to the event loop through an asyncio queue:

    ("start", None)  the prompt is accepted: the reply follows (streamed responses begin here)
    ("piece", str)   text
    ("end", Outcome) finished, with the numbers
    ("error", ApiError) refused or failed; nothing more follows
    ("cancelled", None) the client went away and the generation stopped

Cancellation: the request's `cancel` event is set when its client disconnects. The worker checks it
between pieces, and the slot's abort callback lets the runtime stop inside a long step too (a
video's prefill), so a slot is free again within one layer's time.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
from typing import Optional

from sparrow_py.engine import Engine
from sparrow_py.errors import SparrowError

from .config import ServerConfig
from .errors import ApiError, bad_request, context_exceeded, from_sparrow_error
from .media import EncodedVisuals, MediaCache, MediaLoader, encode_visuals
from .protocol import GenerationRequest, Outcome
from .slots import Slot, SlotPool

log = logging.getLogger("sparrow.server")


class _Cancelled(Exception):
    pass


class Service:
    """The model loaded once, `parallel` slots sharing it, the media cache and the worker threads."""

    def __init__(self, config: ServerConfig):
        config.check()
        self.config = config
        self.slots: list[Slot] = []
        n_ctx, n_threads = config.n_ctx_per_slot, config.threads_per_slot
        first = Slot(0, None, 0)
        base = Engine(config.model, n_ctx=n_ctx, n_threads=n_threads, n_batch=config.batch_size, draft=config.draft,
                      mmproj=config.mmproj, abort=first.should_abort)
        try:
            first.engine, first.n_ctx = base, base.n_ctx
            self.slots.append(first)
            for i in range(1, config.parallel):
                slot = Slot(i, None, 0)
                slot.engine = base.share(n_ctx=n_ctx, n_threads=n_threads, n_batch=config.batch_size,
                                         abort=slot.should_abort)
                slot.n_ctx = slot.engine.n_ctx
                self.slots.append(slot)
        except SparrowError:
            self.close()
            raise
        self.has_draft = config.draft is not None
        self.has_vision = config.mmproj is not None
        self.loader = MediaLoader(config.media_path, config.allow_remote_media, config.max_upload_bytes)
        self.media_cache = MediaCache(int(config.media_cache_mb * 1024 * 1024))
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=config.parallel,
                                                               thread_name_prefix="sparrow-slot")
        self.pool = SlotPool(self.slots, config.queue_size)

    def close(self) -> None:
        for slot in self.slots:  # generations still running stop at their next step
            cancel = slot.active_cancel
            if cancel is not None:
                cancel.set()
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        for slot in self.slots:
            if slot.engine is not None:
                slot.engine.close()  # the last one frees the shared model

    @property
    def engine(self) -> Engine:
        """An Engine for model-only work (tokenizing, templates): safe from any thread."""
        return self.slots[0].engine

    def model_names(self) -> set:
        """Names a request's `model` may give: the id, the file name, the file's path."""
        import os

        c = self.config
        return {c.model_id, os.path.basename(c.model), os.path.splitext(os.path.basename(c.model))[0], c.model}

    def prompt_tokens(self, req: GenerationRequest) -> Optional[list]:
        """The prompt's tokens when they are known before a slot is taken (no media): for
        choosing the slot with the longest cached prefix, and refusing a prompt longer than a
        slot's context without taking one. Model-only work: runs on any thread."""
        if req.endpoint == "completion":
            if isinstance(req.prompt, list):
                n_vocab = self.engine.n_vocab
                bad = [t for t in req.prompt if not 0 <= t < n_vocab]
                if bad:
                    raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {n_vocab})", "prompt")
                return list(req.prompt)
            return self.engine.tokenize(req.prompt, add_special=True, parse_special=True)
        if req.visuals:
            return None
        tokens, _ = self.engine.chat_prompt(req.messages)
        return tokens

    @staticmethod
    def media_routing(req: GenerationRequest) -> tuple:
        """Keys of the request's images and videos, known before anything is fetched (a hash of
        each reference and its frame options): a follow-up about the same video goes to the slot
        whose cache holds it. Routing only: the runtime compares the rows themselves."""
        return tuple((ref.kind, hashlib.blake2b(ref.url.encode(), digest_size=16).hexdigest(), ref.fps, ref.num_frames,
                      ref.max_pixels) for ref in (req.visuals or ()))

    def check_request(self, req: GenerationRequest) -> None:
        if req.visuals and not self.has_vision:
            raise bad_request("this server has no vision file: images and videos need `sparrow serve --mmproj`",
                              "messages")
        if req.sampling.speculative in ("chain", "tree") and not self.has_draft:
            raise bad_request("speculative decoding needs a draft: start the server with --draft", "speculative")

    def run(self, slot: Slot, req: GenerationRequest, tokens: Optional[list], media_keys: tuple,
            cancel: threading.Event, loop: asyncio.AbstractEventLoop) -> "asyncio.Queue":
        """Start req on slot in a worker thread; returns the queue of its events. The slot is
        released (on the loop) when the worker is done with it, whoever reads the events.
        media_keys: media_routing(req), which the slot records once its cache holds them."""
        events: asyncio.Queue = asyncio.Queue()

        def post(kind: str, value=None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        def work() -> None:
            try:
                self._generate(slot, req, tokens, media_keys, cancel, post)
            finally:
                try:
                    loop.call_soon_threadsafe(self.pool.release, slot)
                except RuntimeError:
                    pass

        self._executor.submit(work)
        return events

    def _generate(self, slot: Slot, req: GenerationRequest, tokens: Optional[list], media_keys: tuple,
                  cancel: threading.Event, post) -> None:
        engine = slot.engine
        slot.active_cancel = cancel
        visuals = EncodedVisuals([])
        finish = "error"
        try:
            media = []
            if req.endpoint == "chat" and req.visuals:
                visuals = self._encode(engine, req, cancel)
                if cancel.is_set():  # (the encoding stopped early: its items are not all there)
                    raise _Cancelled
                tokens, media = engine.chat_prompt(req.messages, visuals.items)
            if cancel.is_set():
                raise _Cancelled
            if len(tokens) >= slot.n_ctx:
                raise context_exceeded(len(tokens), slot.n_ctx)
            stream = engine.generate(tokens, media=media or None, add_special=False, **req.sampling.generate_kwargs())
            post("start")
            for piece in stream:  # the first step prefills the prompt: the abort callback can stop it
                if cancel.is_set():
                    stream.close()
                    raise _Cancelled
                post("piece", piece)
            outcome = Outcome(engine.last_finish_reason, engine.last_stats, n_media=len(visuals.items),
                              n_media_cached=visuals.n_cached, media_ms=visuals.encode_ms)
            finish = engine.last_finish_reason
            slot.cached_tokens = list(tokens) + list(engine.last_tokens)
            slot.media_keys = media_keys
            post("end", outcome)
        except _Cancelled:
            finish = "cancelled"
            post("cancelled")
        except SparrowError as e:
            if e.status == "SPARROW_ERR_ABORTED" and cancel.is_set():
                finish = "cancelled"
                post("cancelled")
            else:
                post("error", from_sparrow_error(e))
        except ApiError as e:
            post("error", e)
        except Exception as e:  # noqa: BLE001 - a bug must cost one request, not the server
            log.exception("request failed")
            post("error", ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
        finally:
            slot.active_cancel = None
            if finish not in ("eog", "stop", "length", "context"):
                slot.cached_tokens = []  # what the cache holds after a stop midway is the runtime's to know
                slot.media_keys = ()
            slot.last_finish = finish
            slot.n_served += 1
            slot.n_cancelled += finish == "cancelled"
            try:
                stats = engine.last_stats
                slot.last_n_prompt, slot.last_n_generated = stats["n_prompt"], stats["n_generated"]
            except SparrowError:
                pass

    def _encode(self, engine: Engine, req: GenerationRequest, cancel: threading.Event) -> EncodedVisuals:
        try:
            return encode_visuals(engine, req.visuals, self.loader, self.media_cache, cancel.is_set)
        except ImportError as e:  # e.g. PyAV missing for a video file
            raise ApiError(501, f"the server cannot decode this media: {e}", "not_supported_error", "messages") from None
        except ValueError as e:  # VideoInputError and frame sampling: the video or its options
            raise bad_request(f"cannot use the video or image: {e}", "messages") from None
