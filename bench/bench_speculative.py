"""Speculative decoding cost vs video length: a random-weight target with LLaVA-OneVision-0.5B's
language-model shapes (Qwen2-0.5B) and a matching random Sparrow draft.

    python bench/bench_speculative.py [--visual 1024 4096 16384 25600] [--type q8_0] [--threads 2]

For each number of visual tokens (random embeddings standing in for the vision tower's output)
it measures, in one run: plain (AR) decode ms/token, the draft's cost per round and the target's
verify cost per round (chain of --n-draft tokens), as ratios to the first video length. A random
draft accepts almost nothing, so the speedup a trained draft gives is projected from the measured
step costs at mean accepted lengths 3 to 4.3 (the paper's range):

    speedup(L) = L * t_AR / (t_draft_round + t_verify_round)

VATA keeps the draft's cost flat as the video grows (its KV holds G + S + W entries, never the
visual tokens), while the target's verify cost grows like its decode cost. The verify batch's
queries share each block of the KV cache (one read for all of them), but each query still does
its own arithmetic over every row: on a 2-core AMD EPYC Zen 5 a decode's attention is about as
fast as the cache streams, and a verify of 5 at 16k-25.6k visual tokens costs about two decodes
(`build/bench_attention` has the attention alone).

The last column is a real speed, not a projection: decode tokens/s with adaptive speculation
(the default) and this useless draft, over plain decoding. Adaptive speculation rests a draft
that does not pay, so this should stay close to 1 (the goal: no more than 5% slower).
Needs the `train` extra (torch) to build the draft; models are cached under bench/.cache/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_lm import SHAPES, ensure_model  # noqa: E402


def write_random_draft(cache: Path, target_shapes: dict, draft_vocab: int) -> Path:
    """A random spec-v1 draft for a target of these shapes, exported and converted (f16)."""
    import torch

    from sparrow_py.convert import convert
    from sparrow_py.train.export import save_draft
    from sparrow_py.train.model import DraftConfig, SparrowDraft, TargetShape

    out = cache / f"random-draft-v{draft_vocab}.gguf"
    if out.exists():
        return out
    h, L = target_shapes["hidden"], target_shapes["layers"]
    shape = TargetShape(arch="qwen2", num_layers=L, vocab_size=target_shapes["vocab"], hidden_size=h,
                        intermediate_size=target_shapes["ffn"], num_attention_heads=target_shapes["heads"],
                        num_key_value_heads=target_shapes["kv_heads"], head_dim=h // target_shapes["heads"],
                        rms_norm_eps=1e-6, rope_theta=target_shapes["rope_base"], tie_word_embeddings=True)
    config = DraftConfig.for_target(shape, draft_vocab_size=draft_vocab)
    torch.manual_seed(0)
    draft = SparrowDraft(config)
    with torch.no_grad():
        if draft.lm_head is not None:
            draft.lm_head.weight.normal_(0, 0.02)
            draft.d2t.copy_(torch.arange(draft_vocab))
    folder = cache / f"random-draft-v{draft_vocab}"
    save_draft(draft, folder)
    convert(folder, out, outtype="f16", progress=False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--visual", type=int, nargs="+", default=[1024, 4096], help="visual token counts")
    ap.add_argument("--type", default="q8_0", choices=["f16", "q8_0", "q4_0"], help="target weight type")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-draft", type=int, default=4, help="chain length per round")
    ap.add_argument("--draft-vocab", type=int, default=32000, help="reduced draft vocabulary (0 = full)")
    ap.add_argument("--tokens", type=int, default=24, help="tokens generated per measurement")
    ap.add_argument("--adaptive-tokens", type=int, default=160,
                    help="tokens generated per measurement of adaptive speculation (it needs some to settle)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    args = ap.parse_args()

    import sparrow_py as sp

    target = ensure_model(args.cache, args.type)
    draft = write_random_draft(args.cache, SHAPES, args.draft_vocab)
    rng = np.random.default_rng(0)
    H = SHAPES["hidden"]
    text = rng.integers(100, 90_000, size=40).tolist()

    print(f"# random LLaVA-OV-0.5B-shaped target ({args.type}), random draft (vocab {args.draft_vocab or 'full'}), "
          f"{args.threads} threads, chain of {args.n_draft}")
    print(f"{'visual':>7} {'prefill s':>9} {'AR ms/tok':>10} {'draft ms/round':>15} {'verify ms/round':>16} "
          f"{'draft KV':>8} {'proj. speedup L=3 / 3.8 / 4.3':>31} {'adaptive/AR':>12}")
    base = None
    for n_vis in args.visual:
        n_ctx = n_vis + len(text) + max(args.tokens * (args.n_draft + 2), args.adaptive_tokens) + 64
        embd = (rng.standard_normal((n_vis, H)) * 0.02).astype(np.float32)
        prompt = text[:8] + [sp.MEDIA_TOKEN] * n_vis + text[8:]
        media = [sp.Media(embd, grid=(1, 1, n_vis), placeholder=text[0])]
        with sp.Engine(str(target), n_ctx=n_ctx, n_threads=args.threads, n_batch=512, draft=str(draft)) as e:
            ar, rounds, drafts, verifies, kv, prefill, speed = [], [], [], [], 0, [], []
            for _ in range(args.repeat):
                "".join(e.generate(prompt, media=media, max_tokens=args.tokens, ignore_eos=True, speculative="none"))
                s = e.last_stats
                prefill.append(s["prefill_ms"] / 1e3)
                ar.append(s["decode_ms"] / max(1, s["n_target_forwards"]))
                "".join(e.generate(prompt, media=media, max_tokens=args.tokens, ignore_eos=True,
                                   speculative="chain", n_draft=args.n_draft, adaptive=False))
                s = e.last_stats
                n_rounds = max(1, s["n_target_forwards"])
                drafts.append(s["draft_ms"] / n_rounds)
                verifies.append(s["verify_ms"] / n_rounds)
                kv = max(kv, s["draft_kv_entries"])
                # real speeds, alternating: plain, then adaptive speculation with this draft
                "".join(e.generate(prompt, media=media, max_tokens=args.adaptive_tokens, ignore_eos=True,
                                   speculative="none"))
                plain_tps = e.last_stats["decode_tokens_per_s"]
                "".join(e.generate(prompt, media=media, max_tokens=args.adaptive_tokens, ignore_eos=True,
                                   speculative="chain", n_draft=args.n_draft))
                speed.append(e.last_stats["decode_tokens_per_s"] / plain_tps)
        t_ar, t_d, t_v = statistics.median(ar), statistics.median(drafts), statistics.median(verifies)
        base = base or (t_ar, t_d, t_v)
        proj = " / ".join(f"{L * t_ar / (t_d + t_v):.2f}" for L in (3.0, 3.8, 4.3))
        print(f"{n_vis:>7} {statistics.median(prefill):9.1f} {t_ar:7.1f} ({t_ar / base[0]:.2f}x) "
              f"{t_d:9.1f} ({t_d / base[1]:.2f}x) {t_v:10.1f} ({t_v / base[2]:.2f}x) {kv:>8} {proj:>31} "
              f"{statistics.median(speed):12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
