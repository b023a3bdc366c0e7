"""Slots: the server's N contexts on one loaded model, and the bounded queue in front of them.

Each slot is an Engine made by Engine.share() (the weights are in memory once) with its own KV
cache, so N generations run in parallel on worker threads. A request waits for a free slot in a
queue of at most max_waiting requests; beyond that the server answers 503 at once, which a client
can retry, rather than letting latency grow without bound.

Prefix reuse: a slot's KV cache keeps its last prompt and reply, and the runtime keeps the longest
common prefix of the next prompt (sparrow_generate_begin), so a request goes to the free slot whose
cache shares the longest prefix with it: a follow-up question in a conversation prefills only the
new turn, and a second question about the same video skips the video's rows too (sparrow.h:
rows are compared by token or media embedding and position; with a draft, the draft is rebuilt
from the kept rows' stored features).

The pool lives on the event loop's thread (acquire and release are called there), so it needs no
lock; a slot's Engine is used by one worker thread at a time, the one serving its request.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from .errors import ApiError


@dataclass
class Slot:
    id: int
    engine: object                       # sparrow_py.Engine, its own context
    n_ctx: int
    busy: bool = False
    # the cancellation of the request it serves (set when its client goes away): per request, so
    # that a late disconnect of a finished request cannot stop the next one
    active_cancel: Optional[threading.Event] = None
    cached_tokens: list = field(default_factory=list)   # what its KV cache holds (the last prompt + reply)
    # the images and videos in its cache (Service.media_routing's keys): a request with media has
    # no tokens before its media are encoded, so it is routed by these
    media_keys: tuple = ()
    last_used: float = 0.0
    # the last request it served, for GET /slots
    last_finish: Optional[str] = None    # eog, stop, length, context, cancelled, error
    last_n_prompt: int = 0
    last_n_generated: int = 0
    n_served: int = 0
    n_cancelled: int = 0

    def should_abort(self) -> bool:
        """The Engine's abort callback: the runtime asks between layers and prompt chunks."""
        cancel = self.active_cancel
        return cancel is not None and cancel.is_set()

    def describe(self) -> dict:
        return {"id": self.id, "is_processing": self.busy, "n_ctx": self.n_ctx, "n_cached": len(self.cached_tokens),
                "n_served": self.n_served, "n_cancelled": self.n_cancelled, "last_finish_reason": self.last_finish,
                "last_n_prompt": self.last_n_prompt, "last_n_generated": self.last_n_generated}


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotPool:
    def __init__(self, slots: list, max_waiting: int):
        self.slots = slots
        self.max_waiting = max_waiting
        self._waiters: "collections.deque[asyncio.Future]" = collections.deque()
        self.n_rejected = 0

    @property
    def n_idle(self) -> int:
        return sum(not s.busy for s in self.slots)

    @property
    def n_waiting(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def _take(self, slot: Slot) -> Slot:
        slot.busy = True
        slot.last_used = time.monotonic()
        return slot

    async def acquire(self, prompt_tokens: Optional[list] = None, media_keys: tuple = ()) -> Slot:
        """A free slot: the one whose cache shares the longest prefix of media (media_keys), then
        of tokens (prompt_tokens), with the request (the least recently used among equals), or
        the first to be released after the requests already waiting. Raises ApiError 503 when
        max_waiting requests wait already."""
        idle = [s for s in self.slots if not s.busy]
        if idle and not self.n_waiting:
            prompt = prompt_tokens or []
            best = max(idle, key=lambda s: (_common_prefix(list(s.media_keys), list(media_keys)),
                                            _common_prefix(s.cached_tokens, prompt), -s.last_used))
            return self._take(best)
        if self.n_waiting >= self.max_waiting:
            self.n_rejected += 1
            raise ApiError(503, f"the server is busy: all {len(self.slots)} slots are generating and "
                                f"{self.max_waiting} requests wait already; retry later", "unavailable_error")
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # handed a slot just as the waiter went away
                self.release(future.result())
            raise
        finally:
            try:
                self._waiters.remove(future)
            except ValueError:
                pass

    def release(self, slot: Slot) -> None:
        slot.busy = False
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(self._take(slot))
                return
