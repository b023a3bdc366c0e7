"""Test helper: a plain k-quant quantizer (q4_K, q5_K, q6_K) in numpy, for test models in the
formats llama.cpp's Q4_K_M / Q5_K_M files hold. gguf-py reads these types but cannot write them.

Not llama.cpp's search for the best scales: a sub-block's range is split evenly. The block
layouts are ggml's (checked against gguf-py's dequantizer in test_kquants_helper_round_trips).
"""
from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(x):
    return np.asarray(x, dtype=np.float16)


def _pack_scales(sc, m):
    """8 six-bit scales and mins -> ggml's 12 bytes (get_scale_min_k4's inverse), per block."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    for j in range(4):
        out[:, j] = (sc[:, j] & 63) | ((sc[:, j + 4] >> 4) << 6)
        out[:, j + 4] = (m[:, j] & 63) | ((m[:, j + 4] >> 4) << 6)
        out[:, 8 + j] = (sc[:, j + 4] & 0xF) | ((m[:, j + 4] & 0xF) << 4)
    return out


def _quantize_k45(x, bits):
    """x: (nb, 256) floats -> d, dmin, packed scales, quants (nb, 8, 32) in 0 .. 2^bits - 1."""
    top = (1 << bits) - 1
    sub = x.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0.0)
    hi = np.maximum(sub.max(axis=2), lo + 1e-12)
    scale = (hi - lo) / top
    mins = -lo
    d = _f16(scale.max(axis=1) / 63.0).astype(np.float32)
    dmin = _f16(mins.max(axis=1) / 63.0).astype(np.float32)
    safe = lambda v: np.where(v > 0, v, 1.0)  # noqa: E731
    sc = np.clip(np.rint(scale / safe(d)[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.rint(mins / safe(dmin)[:, None]), 0, 63).astype(np.uint8)
    step = d[:, None] * sc
    q = np.clip(np.rint((sub + (dmin[:, None] * m)[:, :, None]) / safe(step)[:, :, None]), 0, top).astype(np.uint8)
    return d, dmin, _pack_scales(sc, m), q


def quantize(data: np.ndarray, qtype_name: str) -> np.ndarray:
    """float32 (rows, cols) with cols a multiple of 256 -> raw blocks (rows, bytes per row)."""
    rows, cols = data.shape
    x = data.reshape(-1, QK_K).astype(np.float32)
    nb = x.shape[0]
    if qtype_name in ("Q4_K", "Q5_K"):
        d, dmin, scales, q = _quantize_k45(x, 4 if qtype_name == "Q4_K" else 5)
        low = q & 0xF  # (nb, 8, 32)
        qs = (low[:, 0::2, :] | (low[:, 1::2, :] << 4)).reshape(nb, 128)  # pair p: sub-blocks 2p, 2p + 1
        parts = [_f16(d).view(np.uint8).reshape(nb, 2), _f16(dmin).view(np.uint8).reshape(nb, 2), scales]
        if qtype_name == "Q5_K":
            high = (q >> 4) & 1  # bit s of qh[l] is the fifth bit of sub-block s, element l
            qh = np.zeros((nb, 32), dtype=np.uint8)
            for s in range(8):
                qh |= (high[:, s, :] << s).astype(np.uint8)
            parts.append(qh)
        parts.append(qs)
    elif qtype_name == "Q6_K":
        sub = x.reshape(nb, 16, 16)
        amax = np.abs(sub).max(axis=2)
        scale = amax / 31.0
        d = _f16(np.maximum(scale.max(axis=1), 1e-12) / 127.0).astype(np.float32)
        sc = np.clip(np.rint(scale / d[:, None]), 1, 127).astype(np.int8)
        step = d[:, None] * sc.astype(np.float32)
        q = np.clip(np.rint(sub / step[:, :, None]) + 32, 0, 63).astype(np.uint8).reshape(nb, 256)
        ql = np.zeros((nb, 128), dtype=np.uint8)
        qh = np.zeros((nb, 64), dtype=np.uint8)
        for e in range(256):  # element 128 h + 32 g + l
            h, g, l = e // 128, (e % 128) // 32, e % 32
            low, high = q[:, e] & 0xF, q[:, e] >> 4
            ql[:, 64 * h + 32 * (g & 1) + l] |= low if g < 2 else (low << 4)
            qh[:, 32 * h + l] |= (high << (2 * g)).astype(np.uint8)
        parts = [ql, qh, sc.view(np.uint8), _f16(d).view(np.uint8).reshape(nb, 2)]
    else:
        raise ValueError(f"not a k-quant: {qtype_name}")
    blocks = np.concatenate(parts, axis=1)
    return blocks.reshape(rows, -1)
