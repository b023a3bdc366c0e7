"""Soak: many random generations on the shipped tiny pair, every speculative output checked.

    python bench/soak.py [--cases 1000] [--seed 0] [--max-tokens 48]

The demo's q8_0 video target, its draft and its vision file (sparrow_py/demo/data). Each case
draws a random prompt (words, random token ids, or a chat turn; a third with a random video of
1 to 12 frames from 14x14 to 200x120 pixels), a sampling seed, greedy or sampled, and a thread
count (1 or 2, one Engine each). Greedy: plain decoding, then chain (adaptive and fixed n_draft
1..8) and tree (random depth, top-k, size), each output compared token for token with plain
decoding. Sampled: the same seed run twice with fixed speculation gives the same tokens, and a
plain run finishes. Any error is counted with its message. Prints the counts and exits non-zero
on a mismatch or an error. Not a test: it takes minutes; its counts go in the reliability
issue's notes.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

WORDS = ("red circle square moves left right up down small large green blue purple turns then a the on "
         "background dark light what happens in this clip describe video which shapes").split()


def random_prompt(rng, engine) -> str | list[int]:
    kind = rng.integers(0, 3)
    if kind == 0:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))
    if kind == 1:
        return [int(t) for t in rng.integers(0, engine.n_vocab, size=int(rng.integers(1, 60)))]
    question = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 12))))
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def random_video(rng) -> np.ndarray:
    t = int(rng.integers(1, 13))
    h, w = int(rng.integers(14, 201)), int(rng.integers(14, 121))
    return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    import sparrow_py as sp

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    data = Path(sp.__file__).parent / "demo" / "data"
    engines = {n: sp.Engine(str(data / "target.gguf"), draft=str(data / "draft.gguf"), mmproj=str(data / "mmproj.gguf"),
                            n_ctx=2048, n_threads=n) for n in (1, 2)}
    rng = np.random.default_rng(args.seed)
    counts = collections.Counter()
    problems = []
    t0 = time.perf_counter()
    cases = range(args.cases)
    for case in (tqdm(cases, desc="soak", unit="case") if tqdm else cases):
        e = engines[int(rng.integers(1, 3))]
        prompt = random_prompt(rng, e)
        video = random_video(rng) if isinstance(prompt, str) and rng.random() < 1 / 3 else None
        seed = int(rng.integers(0, 2**31))
        greedy = rng.random() < 0.7
        common = dict(max_tokens=args.max_tokens, seed=seed, temperature=0.0 if greedy else float(rng.uniform(0.3, 1.5)),
                      top_p=1.0 if greedy else float(rng.uniform(0.5, 1.0)))
        if video is not None:
            common["video"] = video
        runs = [("none", {})]
        if greedy:
            runs += [("chain", {}), ("chain", dict(adaptive=False, n_draft=int(rng.integers(1, 9)))),
                     ("tree", dict(adaptive=bool(rng.integers(0, 2)), tree_depth=int(rng.integers(1, 7)),
                                   tree_top_k=int(rng.integers(1, 6)), tree_total_tokens=int(rng.integers(2, 33))))]
        else:
            fixed = dict(adaptive=False, n_draft=int(rng.integers(1, 9)))
            runs += [("chain", fixed), ("chain", fixed)]
        outputs = []
        try:
            for mode, extra in runs:
                "".join(e.generate(prompt, speculative=mode, **common, **extra))
                outputs.append(list(e.last_tokens))
        except sp.SparrowError as err:
            counts["errors"] += 1
            problems.append(f"case {case}: {err.status}: {err}")
            continue
        counts["cases"] += 1
        counts["video" if video is not None else "text"] += 1
        counts["greedy" if greedy else "sampled"] += 1
        counts["generations"] += len(runs)
        counts["tokens"] += sum(len(o) for o in outputs)
        if greedy:
            same = all(o == outputs[0] for o in outputs[1:])
        else:
            same = outputs[1] == outputs[2]
        if not same:
            counts["mismatches"] += 1
            problems.append(f"case {case}: outputs differ ({'greedy' if greedy else 'sampled'}, prompt {prompt!r:.80})")
    for e in engines.values():
        e.close()
    seconds = time.perf_counter() - t0
    print(f"{counts['cases']} cases ({counts['text']} text, {counts['video']} video; {counts['greedy']} greedy, "
          f"{counts['sampled']} sampled), {counts['generations']} generations, {counts['tokens']} tokens, "
          f"{seconds:.0f} s")
    print(f"mismatches: {counts['mismatches']}, errors: {counts['errors']}")
    for p in problems[:20]:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
