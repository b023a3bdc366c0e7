"""Vision encoding and LM prefill vs video length, with peak memory, for a random-weight target
with LLaVA-OneVision-0.5B's shapes (SigLIP-so400m at 384 px, Qwen2-0.5B language model).

    python bench/bench_video.py [--visual 1024 4096 16384 25600] [--type q8_0] [--threads 2]

Each video length runs in a fresh process, so its peak resident memory (VmHWM) is its own:
the LM prefill feeds n_visual random visual embeddings (what the tower would produce; 196 tokens a
frame: 27x27 patches pooled 2x2 to 14x14) plus a short text, in n_batch chunks through attention
that streams over the KV cache. The tower's cost is per frame (frames never attend to each other),
so it is measured on --encode-frames frames and reported per frame and as the total for each length
(that total is the measured per-frame time x frames; --encode-frames 0 skips the tower).

Printed per length: encode seconds, prefill seconds and tokens/s, peak RSS, with ratios to the
first length.
Needs the `train` extra (torch, transformers) once, to write the random tower; files are cached
under bench/.cache/.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_lm import SHAPES, ensure_model  # noqa: E402

TOKENS_PER_FRAME = 14 * 14
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                     num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)


def write_random_tower(cache: Path, outtype: str) -> Path:
    """A random SigLIP-so400m + LLaVA-OneVision projector mmproj (the LM part is a 1-layer stub)."""
    out = cache / f"random-llava-ov-0.5b-mmproj-{outtype}.gguf"
    if out.exists():
        return out
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from sparrow_py.convert import convert_mmproj

    torch.manual_seed(0)
    text = dict(model_type="qwen2", hidden_size=SHAPES["hidden"], intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=SHAPES["heads"], num_key_value_heads=SHAPES["kv_heads"], vocab_size=256)
    config = LlavaOnevisionConfig(vision_config=SIGLIP_SO400M, text_config=text, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_token_index=250, video_token_index=251)
    folder = cache / "random-llava-ov-0.5b-hf"
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    tmp = out.with_suffix(".tmp")
    convert_mmproj(folder, tmp, outtype=outtype, progress=False)
    os.replace(tmp, out)
    return out


def peak_rss_mb() -> float:
    """This process's resident high-water mark since its exec (VmHWM; ru_maxrss would also count
    what the parent held when it forked)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_encode(args) -> dict:
    """The tower on --encode-frames random frames, in this process."""
    import sparrow_py as sp

    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, size=(args.encode_frames, 3, 384, 384)).astype(np.float32)
    with sp.VisionEncoder(str(args.tower), n_threads=args.threads) as enc:
        t0 = time.perf_counter()
        embd = enc.encode(pixels)
        seconds = time.perf_counter() - t0
    assert embd.shape[0] == args.encode_frames * TOKENS_PER_FRAME + 1, embd.shape  # + image_newline
    return {"encode_s_per_frame": seconds / args.encode_frames,
            "peak_rss_mb": peak_rss_mb()}


def measure_prefill(args) -> dict:
    """One video length's prefill, in this process."""
    import sparrow_py as sp

    n_vis = args.one
    rng = np.random.default_rng(1)
    text = rng.integers(100, 90_000, size=40).tolist()
    embd = (rng.standard_normal((n_vis, SHAPES["hidden"])) * 0.02).astype(np.float32)
    prompt = text[:8] + [sp.MEDIA_TOKEN] * n_vis + text[8:]
    media = [sp.Media(embd, grid=(1, 1, n_vis), placeholder=text[0])]
    with sp.Engine(str(args.target), n_ctx=len(prompt) + 64, n_threads=args.threads, n_batch=512) as e:
        "".join(e.generate(prompt, media=media, max_tokens=4, ignore_eos=True))
        s = e.last_stats
    return {"prefill_s": s["prefill_ms"] / 1e3, "n_prompt": s["n_prompt"],
            "peak_rss_mb": peak_rss_mb()}


def child(args, *extra) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--visual", type=int, nargs="+", default=[1024, 4096, 16384, 25600], help="visual token counts")
    ap.add_argument("--type", default="q8_0", choices=["f16", "q8_0", "q4_0"], help="LM weight type")
    ap.add_argument("--tower-type", default="f16", choices=["f32", "f16", "q8_0"], help="vision tower weight type")
    ap.add_argument("--encode-frames", type=int, default=2, help="frames encoded to time the tower (0 = skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)       # child: measure this length
    ap.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tower", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--encode", action="store_true", help=argparse.SUPPRESS)  # child: time the tower
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure_prefill(args)))
        return 0
    if args.encode:
        print(json.dumps(measure_encode(args)))
        return 0

    target = ensure_model(args.cache, args.type)
    per_frame = None
    print(f"# random LLaVA-OV-0.5B-shaped target: LM {args.type}, SigLIP-so400m tower {args.tower_type}, "
          f"{args.threads} threads")
    if args.encode_frames:
        tower = write_random_tower(args.cache, args.tower_type)
        enc = child(args, "--encode", "--tower", str(tower), "--encode-frames", str(args.encode_frames))
        per_frame = enc["encode_s_per_frame"]
        print(f"# vision tower: {per_frame:.2f} s/frame measured on {args.encode_frames} frames "
              f"({TOKENS_PER_FRAME} tokens each), peak RSS {enc['peak_rss_mb']:.0f} MB; totals below are "
              f"that per-frame time x frames (frames are encoded independently)")
    print(f"{'visual':>7} {'frames':>6} {'encode s':>9} {'prefill s':>15} {'prefill tok/s':>13} {'peak RSS MB':>16}")
    base = None
    for n_vis in args.visual:
        r = child(args, "--one", str(n_vis), "--target", str(target))
        base = base or r
        frames = n_vis / TOKENS_PER_FRAME
        enc_s = f"{per_frame * frames:9.1f}" if per_frame else f"{'-':>9}"
        print(f"{n_vis:>7} {frames:6.0f} {enc_s} {r['prefill_s']:8.1f} ({r['prefill_s'] / base['prefill_s']:4.1f}x) "
              f"{r['n_prompt'] / r['prefill_s']:13.0f} {r['peak_rss_mb']:8.0f} ({r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x)")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
