"""Prefill and decode speed of the runtime on a random-weight model with Qwen2.5-0.5B's shapes.

    python bench/bench_lm.py [--types f16 q8_0 q4_0] [--threads 2] [--repeat 5]

Writes the models once (bench/.cache/, a few hundred MB each; --cache to move it) with random
weights quantized by gguf-py, then measures with the Engine: prefill of --prefill tokens and
single-token decode, reporting medians and min/max over --repeat runs. Speed work itself lives
in the CPU-speed issue; its llama.cpp comparison is bench/compare_llamacpp.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# Qwen2.5-0.5B
SHAPES = dict(hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864, vocab=151936, ctx=32768, rope_base=1_000_000.0)


def random_k_quant_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random but valid k-quant blocks (gguf-py has no k-quant quantizer): every bit pattern of
    the quants and 6-bit scales is a valid block, so only the fp16 super-block scales are chosen,
    small enough that weights come out with a spread like the float models' (~0.02)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows that are whole blocks of {block}, not {cols}")
    nb = rows * (cols // block)
    blocks = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    d = np.full(nb, 3e-5, dtype=np.float16).view(np.uint8).reshape(nb, 2)
    if qtype == gguf.GGMLQuantizationType.Q6_K:  # ql, qh, scales, then d
        blocks[:, size - 2:] = d
    else:  # q4_K / q5_K: d, dmin, scales, ...
        blocks[:, 0:2] = d
        blocks[:, 2:4] = d
    return blocks.reshape(rows, (cols // block) * size)


def write_random_model(path: Path, outtype: str, shapes=SHAPES, seed: int = 0) -> None:
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
             "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}[outtype]
    k_quants = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
    rng = np.random.default_rng(seed)
    h, ff, v = shapes["hidden"], shapes["ffn"], shapes["vocab"]
    hd = h // shapes["heads"]
    kv = shapes["kv_heads"] * hd
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("random-qwen2.5-0.5b-shapes")
    w.add_context_length(shapes["ctx"])
    w.add_embedding_length(h)
    w.add_block_count(shapes["layers"])
    w.add_feed_forward_length(ff)
    w.add_head_count(shapes["heads"])
    w.add_head_count_kv(shapes["kv_heads"])
    w.add_rope_freq_base(shapes["rope_base"])
    w.add_layer_norm_rms_eps(1e-6)
    # A byte-level vocabulary padded to the model's size: enough to load; benchmarks feed ids.
    byte_chars = [chr(c) for c in range(33, 127)] + ['!"']
    tokens = byte_chars + [f"[PAD{i}]" for i in range(len(byte_chars), v)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(byte_chars) + [4] * (v - len(byte_chars)))
    w.add_token_merges(['! "'])
    w.add_eos_token_id(len(byte_chars))

    def add(name, rows, cols, kind="weight"):
        if kind == "weight" and qtype in k_quants:
            w.add_tensor(name, random_k_quant_blocks(rng, rows, cols, qtype), raw_dtype=qtype)
            return
        if kind == "norm":
            data = np.ones(cols, dtype=np.float32)
        elif kind == "bias":
            data = (rng.standard_normal(cols) * 0.02).astype(np.float32)
        else:
            data = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
        if kind != "weight" or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", v, h)
    add("output_norm.weight", 1, h, "norm")
    for i in range(shapes["layers"]):
        add(f"blk.{i}.attn_norm.weight", 1, h, "norm")
        add(f"blk.{i}.attn_q.weight", h, h)
        add(f"blk.{i}.attn_k.weight", kv, h)
        add(f"blk.{i}.attn_v.weight", kv, h)
        add(f"blk.{i}.attn_q.bias", 1, h, "bias")
        add(f"blk.{i}.attn_k.bias", 1, kv, "bias")
        add(f"blk.{i}.attn_v.bias", 1, kv, "bias")
        add(f"blk.{i}.attn_output.weight", h, h)
        add(f"blk.{i}.ffn_norm.weight", 1, h, "norm")
        add(f"blk.{i}.ffn_gate.weight", ff, h)
        add(f"blk.{i}.ffn_up.weight", ff, h)
        add(f"blk.{i}.ffn_down.weight", h, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def ensure_model(cache: Path, outtype: str, name: str = "random-qwen2-0.5b", shapes=SHAPES) -> Path:
    """cache/<name>-<outtype>.gguf, written once (atomically) with random weights of these shapes."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}-{outtype}.gguf"
    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        tmp = path.with_suffix(".tmp")
        write_random_model(tmp, outtype, shapes=shapes)
        os.replace(tmp, path)
    return path


def measure(engine, n_prefill: int, n_decode: int, repeat: int, rng) -> dict:
    prefill, decode = [], []
    for _ in range(repeat):
        engine.kv_truncate(0)
        prompt = rng.integers(0, 90, size=n_prefill).tolist()
        t0 = time.perf_counter()
        engine.decode(prompt)
        prefill.append(n_prefill / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(n_decode):
            engine.decode([int(rng.integers(0, 90))])
        decode.append(n_decode / (time.perf_counter() - t0))
    return {"prefill": prefill, "decode": decode}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    args = ap.parse_args()

    import sparrow_py as sp

    args.cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    print(f"# {sp.__version__} | threads {args.threads} | Qwen2.5-0.5B shapes, random weights")
    print(f"{'type':6} {'file MB':>8} {'prefill t/s (median [min, max])':>34} {'decode t/s (median [min, max])':>34} {'GB/s':>6}")
    for outtype in args.types:
        path = ensure_model(args.cache, outtype)
        size_mb = path.stat().st_size / 1e6
        with sp.Engine(str(path), n_ctx=args.prefill + args.decode + 8, n_threads=args.threads, n_batch=args.prefill) as e:
            r = measure(e, args.prefill, args.decode, args.repeat, rng)
        p, d = r["prefill"], r["decode"]
        # decode reads every weight once per token: file size is a fair proxy for bytes moved
        gbs = statistics.median(d) * size_mb / 1e3
        print(f"{outtype:6} {size_mb:8.0f} {statistics.median(p):14.1f} [{min(p):7.1f}, {max(p):7.1f}] "
              f"{statistics.median(d):14.2f} [{min(d):7.2f}, {max(d):7.2f}] {gbs:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
