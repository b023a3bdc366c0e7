#!/usr/bin/env python3
"""Ablation grid for the Sparrow draft: taps x ivsb_layer x G x S x W x k -> mean accepted length.

For every cell of the grid a draft is trained from the same initialisation, on the same samples,
for the same number of steps, and its held-out mean accepted length (greedy chain drafting
simulated against the torch target, depth --depth; the bonus token counts) and acceptance by depth
are printed as one table row. Features are computed once per (taps, ivsb_layer, G), the settings
they depend on; S, W and k only change training.

Target: --target DIR (a Hugging Face model folder: qwen2, llama, qwen2vl, llava_onevision) with --data / --eval-data
manifests (sparrow train's JSONL), or by default the structured synthetic task of
tests/synthetic_target.py: a tiny Qwen2 trained for a few seconds to answer templated prompts, so
that its output is not random. That target is text-only: ivsb_layer and G change nothing there
(glimpses pool visual positions), so the default grid does not vary them; give a video target and
video manifests to measure them.

    python bench/ablate_draft.py --quick
    python bench/ablate_draft.py --taps "0,1,2;2;0" --anchors 0,16 --window 4,16,0 --mtp-steps 0,1,3
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("grid (comma-separated values; every combination is one cell)")
    g.add_argument("--taps", default="default",
                   help="tap sets separated by ';', each a comma list of target layer inputs (L = final hidden "
                        "state before the norm), 'default' (2, L/2, L-3) or 'last' (L only). Default: %(default)s")
    g.add_argument("--ivsb-layer", default="default",
                   help="ivsb_layer values (decoder layer whose output feeds the glimpses), or 'default' "
                        "(round(0.7 L)). Default: %(default)s")
    g.add_argument("--glimpses", default="0", help="G values (0: no glimpses). Default: %(default)s")
    g.add_argument("--anchors", default="0,16", help="S values. Default: %(default)s")
    g.add_argument("--window", default="4,16,0", help="W values (0: unbounded). Default: %(default)s")
    g.add_argument("--mtp-steps", default="0,3", help="k values (MTP steps unrolled). Default: %(default)s")
    t = p.add_argument_group("target and data")
    t.add_argument("--target", type=Path, help="Hugging Face target folder (default: build the synthetic target)")
    t.add_argument("--data", type=Path, nargs="+", help="training manifests (JSONL), with --target")
    t.add_argument("--eval-data", type=Path, nargs="+", help="held-out manifests (JSONL), with --target")
    t.add_argument("--target-steps", type=int, default=200,
                   help="training steps of the synthetic target. Default: %(default)s")
    t.add_argument("--train-prompts", type=int, default=48,
                   help="synthetic prompts the drafts train on. Default: %(default)s")
    t.add_argument("--held-out-prompts", type=int, default=16,
                   help="synthetic prompts held out for evaluation (disjoint). Default: %(default)s")
    t.add_argument("--max-new-tokens", type=int, default=40, help="target response length limit. Default: %(default)s")
    t.add_argument("--num-frames", type=int, help="video frames per record, as `sparrow train --num-frames`")
    t.add_argument("--max-pixels", type=int, help="Qwen frame budget, as `sparrow train --max-pixels`")
    o = p.add_argument_group("training and evaluation (the same for every cell)")
    o.add_argument("--steps", type=int, default=60, help="optimizer steps per cell. Default: %(default)s")
    o.add_argument("--batch-size", type=int, default=4, help="samples per step. Default: %(default)s")
    o.add_argument("--lr", type=float, default=3e-3, help="peak learning rate. Default: %(default)s")
    o.add_argument("--depth", type=int, default=4, help="simulated chain length at evaluation. Default: %(default)s")
    o.add_argument("--seed", type=int, default=0, help="seed for everything. Default: %(default)s")
    o.add_argument("--threads", type=int, default=2, help="torch CPU threads. Default: %(default)s")
    o.add_argument("--work", type=Path, help="working folder (default: a temporary one, deleted)")
    o.add_argument("--json", type=Path, help="also write the table as JSON lines here")
    o.add_argument("--quick", action="store_true",
                   help="a small grid that finishes in a few minutes on 2 CPU cores: taps 'default;L', "
                        "S 0,16, W 4,16, k 0,3, 40 steps per cell, 8 held-out prompts")
    args = p.parse_args(argv)
    if args.quick:
        args.taps, args.anchors, args.window, args.mtp_steps = "default;last", "0,16", "4,16", "0,3"
        args.steps, args.held_out_prompts = 40, 8
    if args.target and not (args.data and args.eval_data):
        p.error("--target needs --data and --eval-data")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from sparrow_py.train.data import DataOptions, build_cache, load_sample
    from sparrow_py.train.model import DraftConfig, DraftConfigError, SparrowDraft
    from sparrow_py.train.target import MediaOptions, Target
    from sparrow_py.train.trainer import TrainOptions, init_from_target, train

    with tempfile.TemporaryDirectory(prefix="sparrow-ablate-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.target:
            target_dir, train_manifests, eval_manifests = args.target, args.data, args.eval_data
        else:
            import conftest  # noqa: F401  (tests/ helpers: the tiny tokenizer and model sizes)
            from synthetic_target import split_prompts, train_synthetic_target, write_manifest

            tok_dir = work / "tokenizer"
            if not (tok_dir / "tokenizer.json").exists():
                conftest._train_tiny_tokenizer(tok_dir)
            target_dir = work / f"synthetic-target-{args.target_steps}-{args.seed}"
            if not (target_dir / "config.json").exists():
                _, info = train_synthetic_target(target_dir, tok_dir, steps=args.target_steps, seed=args.seed)
                print(f"synthetic target: {info.steps} steps in {info.seconds:.1f}s, answer CE {info.final_loss:.3f}, "
                      f"greedy answer = template for {info.greedy_exact:.0%} of prompts", flush=True)
            train_prompts, held_prompts = split_prompts(args.train_prompts, args.held_out_prompts, seed=args.seed)
            train_manifests = [write_manifest(work / "train.jsonl", train_prompts)]
            eval_manifests = [write_manifest(work / "held.jsonl", held_prompts)]
        target = Target(target_dir)
        L = target.shape.num_layers

        tap_specs = []
        for part in args.taps.split(";"):
            part = part.strip()
            if part == "default":
                tap_specs.append(None)
            elif part == "last":
                tap_specs.append([L])
            elif part:
                tap_specs.append(int_list(part))
        ivsb_values = [None] if args.ivsb_layer == "default" else int_list(args.ivsb_layer)
        grid = list(itertools.product(tap_specs, ivsb_values, int_list(args.glimpses), int_list(args.anchors),
                                      int_list(args.window), int_list(args.mtp_steps)))
        print(f"target {target_dir.name}: L={L}, H={target.shape.hidden_size}; {len(grid)} cells, "
              f"{args.steps} steps x batch {args.batch_size} each, depth {args.depth}", flush=True)
        data_opts = DataOptions(max_new_tokens=args.max_new_tokens, cache_dtype="f32", seed=args.seed,
                                media=MediaOptions(num_frames=args.num_frames, max_pixels=args.max_pixels))
        feature_sets: dict[tuple, tuple[list[Path], list[dict]]] = {}
        header = (f"{'taps':>10} {'ivsb':>4} {'G':>3} {'S':>3} {'W':>4} {'k':>2} | {'mean acc len':>12} | "
                  f"{'acceptance by depth':<24} | {'loss':>6} {'ms/step':>7}")
        rows = []
        print(header + "\n" + "-" * len(header), flush=True)
        for taps, ivsb, G, S, W, k in grid:
            try:
                config = DraftConfig.for_target(target.shape, taps=taps, ivsb_layer=ivsb, glimpses=G, anchors=S,
                                                window=W)
            except DraftConfigError as e:
                print(f"skipping taps={taps} ivsb={ivsb}: {e}", flush=True)
                continue
            key = (tuple(config.taps), config.ivsb_layer, G)
            if key not in feature_sets:  # features depend on these only
                name = "f-" + "-".join(map(str, config.taps)) + f"-i{config.ivsb_layer}-g{G}"
                train_files, _ = build_cache(target, train_manifests, work / name / "train", config, data_opts,
                                             progress=False)
                held_files, _ = build_cache(target, eval_manifests, work / name / "held", config, data_opts,
                                            progress=False)
                feature_sets[key] = (train_files, [load_sample(f) for f in held_files])
            train_files, held_out = feature_sets[key]
            model = SparrowDraft(config)
            model.set_target_weights(*target.embed_and_head())
            init_from_target(model, target)
            opts = TrainOptions(steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 12), mtp_steps=k,
                                batch_size=args.batch_size, seed=args.seed, eval_depth=args.depth, progress=False)
            cell_dir = work / f"cell-{len(rows)}"
            result = train(model, train_files, held_out, opts, cell_dir, resume=False, log=lambda s: None)
            ev = result.eval
            by_depth = " ".join(f"{a:.2f}" for a in ev["acceptance_by_depth"])
            taps_text = ",".join(map(str, config.taps))
            print(f"{taps_text:>10} {config.ivsb_layer:>4} {G:>3} {S:>3} {W if W else 'inf':>4} {k:>2} | "
                  f"{ev['mean_accepted_length']:>12.3f} | {by_depth:<24} | {result.losses[-1]:>6.3f} "
                  f"{result.seconds_per_step * 1000:>7.1f}", flush=True)
            rows.append({"taps": config.taps, "ivsb_layer": config.ivsb_layer, "glimpses": G, "anchors": S,
                         "window": W, "mtp_steps": k, "mean_accepted_length": ev["mean_accepted_length"],
                         "acceptance_by_depth": ev["acceptance_by_depth"], "final_loss": result.losses[-1],
                         "seconds_per_step": result.seconds_per_step,
                         "samples_per_second": args.batch_size / result.seconds_per_step})
        if args.json:
            args.json.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
