"""DraftSession: run a Sparrow draft GGUF in the runtime outside the speculative loop.

What the speculative loop does internally, one call at a time, on features the caller supplies:
for evaluating drafts, for tools, and for checking the runtime against the torch module.

    with sp.Engine("target.gguf") as target, DraftSession(target, "draft.gguf") as d:
        g = d.fuse_taps(taps)                         # [n, n_taps * H] -> [n, H]
        h, logits = d.run(tokens, g, positions)       # committed entries
        h2, logits2 = d.run([t], h[-1:], [p], parents=[-1])   # a speculative entry
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from sparrow_py._native import OwnsHandles, check, ffi, lib
from sparrow_py.errors import SparrowError


class DraftSession(OwnsHandles):
    def __init__(self, target, draft_path, n_ctx: int = 4096, n_threads: int = 0):
        """target: an Engine holding the target model; draft_path: the draft GGUF."""
        self._session = ffi.NULL
        self._draft = ffi.NULL
        path = os.fspath(draft_path)
        if not os.path.exists(path):
            raise SparrowError(f"draft file not found: {path}", "SPARROW_ERR_IO")
        self._target = target  # keeps the target model alive as long as the session
        out = ffi.new("sparrow_model **")
        check(lib.sparrow_model_load(path.encode(), lib.sparrow_model_default_params(), out), f"cannot load {path}")
        self._draft = out[0]
        session = ffi.new("sparrow_draft_session **")
        try:
            check(lib.sparrow_draft_session_init(target._live_model(), self._draft, n_ctx, n_threads, session),
                  "cannot start a draft session")
        except SparrowError:
            self.close()
            raise
        self._session = session[0]
        self.n_embd = lib.sparrow_model_n_embd(self._draft)
        self.n_vocab = lib.sparrow_draft_n_vocab(self._session)

    def close(self) -> None:
        if self._session != ffi.NULL:
            lib.sparrow_draft_session_free(self._session)
            self._session = ffi.NULL
        if self._draft != ffi.NULL:
            lib.sparrow_model_free(self._draft)
            self._draft = ffi.NULL




    def _live(self):
        if self._session == ffi.NULL:
            raise SparrowError("the draft session is closed", "SPARROW_ERR_STATE")
        return self._session

    @staticmethod
    def _f32(a, shape_msg: str, cols: int) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] != cols:
            raise SparrowError(f"{shape_msg} must have shape [n, {cols}], not {a.shape}")
        return a

    def reset(self, anchor_start: int = 0) -> None:
        check(lib.sparrow_draft_session_reset(self._live(), int(anchor_start)))

    def fuse_taps(self, taps) -> np.ndarray:
        s = self._live()
        n_taps_h = np.asarray(taps).shape[-1]
        taps = self._f32(taps, "taps", n_taps_h)
        g = np.empty((taps.shape[0], self.n_embd), dtype=np.float32)
        check(lib.sparrow_draft_fuse_taps(s, ffi.from_buffer("float[]", taps), taps.shape[0], ffi.from_buffer("float[]", g)))
        return g

    def add_glimpses(self, pooled, positions: Sequence[int]) -> None:
        s = self._live()
        pooled = self._f32(pooled, "pooled", self.n_embd)
        pos = ffi.new("int32_t[]", [int(p) for p in positions])
        if len(positions) != pooled.shape[0]:
            raise SparrowError("one position per glimpse")
        check(lib.sparrow_draft_add_glimpses(s, ffi.from_buffer("float[]", pooled), pos, pooled.shape[0]))

    def run(self, tokens: Sequence[int], g, positions: Sequence[int],
            parents: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray]:
        """Run entries; returns (h [n, H], logits [n, n_vocab])."""
        s = self._live()
        g = self._f32(g, "g", self.n_embd)
        n = len(tokens)
        if g.shape[0] != n or len(positions) != n or (parents is not None and len(parents) != n):
            raise SparrowError("tokens, g, positions and parents need one entry each")
        h = np.empty((n, self.n_embd), dtype=np.float32)
        logits = np.empty((n, self.n_vocab), dtype=np.float32)
        par = ffi.new("int32_t[]", [int(p) for p in parents]) if parents is not None else ffi.NULL
        check(lib.sparrow_draft_run(s, ffi.new("sparrow_token[]", [int(t) for t in tokens]), ffi.from_buffer("float[]", g),
                                    ffi.new("int32_t[]", [int(p) for p in positions]), par, n,
                                    ffi.from_buffer("float[]", h), ffi.from_buffer("float[]", logits)), "draft run")
        return h, logits

    def drop_speculative(self) -> None:
        check(lib.sparrow_draft_drop_speculative(self._live()))

    @property
    def kv_entries(self) -> int:
        return lib.sparrow_draft_kv_entries(self._live())
