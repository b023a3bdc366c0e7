#!/usr/bin/env python3
"""Rebuild the demo's tiny video captioning target and its Sparrow draft from a seed.

    python scripts/build_demo.py                       # writes sparrow_py/demo/data/
    python scripts/build_demo.py --quick -o /tmp/demo  # a minutes-long smoke run of every stage

Needs `pip install ".[train,convert]"`. On 2 CPU cores the full build takes about 50 minutes
(target training about 48, draft features and training about 2); demo.json records the measured
times and the held-out accuracy. The work folder keeps the trained target, so a rerun with the same
options goes straight to the draft.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    from sparrow_py.demo.build import BuildOptions, build

    defaults = BuildOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", default=str(REPO / "sparrow_py" / "demo" / "data"),
                   help="where the GGUF files, clip.npy and demo.json go (default: the package's demo data)")
    p.add_argument("--work", default=str(REPO / "build" / "demo-work"),
                   help="intermediate files: tokenizer, HF target, features, draft (default build/demo-work)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of everything (default 0)")
    p.add_argument("--target-steps", type=int, default=defaults.target_steps,
                   help=f"target optimizer steps (default {defaults.target_steps})")
    p.add_argument("--draft-steps", type=int, default=defaults.draft_steps,
                   help=f"draft optimizer steps (default {defaults.draft_steps})")
    p.add_argument("--draft-clips", type=int, default=defaults.draft_clips,
                   help=f"clips the target captions for the draft's training (default {defaults.draft_clips})")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny step counts: checks the pipeline, not the models")
    args = p.parse_args()
    opts = BuildOptions(seed=args.seed, target_steps=args.target_steps, draft_steps=args.draft_steps,
                        draft_clips=args.draft_clips, threads=args.threads)
    if args.quick:
        opts = BuildOptions(seed=args.seed, target_steps=20, batch_size=4, draft_clips=12, draft_steps=10,
                            eval_clips=6, threads=args.threads)
    info = build(Path(args.out), Path(args.work), opts, log=lambda s: print(s, flush=True))
    print(f"built in {info['build_seconds']:.0f} s: target held-out {info['target_held_out']}; files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
