"""The `sparrow` command: `sparrow run` streams a model's output, llama.cpp style; `sparrow serve`
serves it over the OpenAI API (sparrow_py.server)."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from sparrow_py.errors import SparrowError


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="generate text with a GGUF model", description="Stream a model's continuation of a prompt.")
    p.add_argument("-m", "--model", required=True, help="GGUF model file")
    p.add_argument("-p", "--prompt", help="prompt text (default: read stdin)")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1: until end of text; default 128)")
    p.add_argument("-c", "--ctx-size", type=int, default=0, help="context window (default: the model's, at most 32768)")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="top-k filter (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p filter (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0 = off)")
    p.add_argument("-s", "--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the model's chat template")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--draft", help="Sparrow draft GGUF for speculative decoding (the output stays the model's own)")
    p.add_argument("--n-draft", type=int, default=4, help="tokens drafted per verification, at most (default 4)")
    p.add_argument("--draft-p-min", type=float, default=0.0,
                   help="a chain stops drafting before a token, after its first, whose draft distribution's likeliest "
                        "token has a probability below this (0..1; default 0: off, adaptive chains cut by cost)")
    p.add_argument("--speculative", choices=["chain", "tree"], default="chain",
                   help="with --draft: a chain of --n-draft tokens or an EAGLE-2 dynamic tree (default chain)")
    p.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="always draft --n-draft tokens (or the whole tree); by default each round drafts what pays "
                        "on this machine, down to plain decoding")
    v = p.add_argument_group("video and images (need --mmproj)")
    v.add_argument("--mmproj", help="the model's vision GGUF (convert/to_gguf.py --mmproj)")
    v.add_argument("--video", help="video file (extra `video`: PyAV) or .npy array of HxWx3 uint8 frames")
    v.add_argument("--image", action="append", default=[], help="image file (.npy array, or any format Pillow "
                                                                 "reads); repeatable")
    v.add_argument("--fps", type=float, default=None, help="frames sampled per second of video (default: the "
                                                           "model family's rule)")
    v.add_argument("--num-frames", type=int, default=None, help="frames sampled from the video (instead of --fps)")
    v.add_argument("--max-pixels", type=int, default=None, help="pixel budget per frame (Qwen's smart_resize)")


def _run(args) -> int:
    from sparrow_py import Engine

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    try:
        visual = _visual_kwargs(args)
        with Engine(args.model, n_ctx=args.ctx_size, n_threads=args.threads, draft=args.draft,
                    mmproj=args.mmproj) as engine:
            gen_kwargs = dict(
                max_tokens=args.n_predict,
                temperature=args.temp,
                top_k=args.top_k,
                top_p=args.top_p,
                min_p=args.min_p,
                seed=args.seed,
                stop=args.stop,
            )
            if args.draft:
                gen_kwargs.update(n_draft=args.n_draft, draft_p_min=args.draft_p_min, speculative=args.speculative,
                                  adaptive=args.adaptive)
            if args.chat:
                content = prompt
                if visual:  # Hugging Face style parts: the template places the vision tokens
                    content = ([{"type": "video"}] if "video" in visual else []) + \
                              [{"type": "image"}] * len(visual.get("images") or []) + [{"type": "text", "text": prompt}]
                stream = engine.chat([{"role": "user", "content": content}], **visual, **gen_kwargs)
            else:
                sys.stdout.write(prompt)
                stream = engine.generate(prompt, **visual, **gen_kwargs)
            t0 = time.perf_counter()
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            s = engine.last_stats
            print(
                f"prompt: {s['n_prompt']} tokens, {s['prefill_tokens_per_s']:.1f} tokens/s | "
                f"decode: {s['n_generated']} tokens, {s['decode_tokens_per_s']:.1f} tokens/s | "
                f"total {time.perf_counter() - t0:.2f} s",
                file=sys.stderr,
            )
            if args.draft:
                by_depth = ", ".join(f"{a:.2f}" for a in s["acceptance_by_depth"])
                rounds = ", ".join(f"{k}: {n}" for k, n in enumerate(s["n_draft_rounds"]) if n)
                print(f"speculative: mean accepted length {s['mean_accepted_length']:.2f}, "
                      f"acceptance by depth [{by_depth}], draft {s['draft_ms']:.0f} ms, verify {s['verify_ms']:.0f} ms, "
                      f"rounds by tokens drafted {{{rounds}}}" + (f", tree rounds {s['n_tree_rounds']}" if s["n_tree_rounds"] else ""),
                      file=sys.stderr)
    except SparrowError as exc:
        print(f"sparrow: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _read_image(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path)
    try:
        from PIL import Image
    except ImportError:
        raise SparrowError(f"{path}: reading images needs Pillow (pip install pillow), or pass a .npy array") from None
    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except OSError as e:
        raise SparrowError(f"{path}: {e}") from None


def _visual_kwargs(args) -> dict:
    """generate()/chat() keyword arguments for --video/--image and the frame options."""
    if not (args.video or args.image):
        if args.fps is not None or args.num_frames is not None or args.max_pixels is not None:
            raise SparrowError("--fps, --num-frames and --max-pixels need --video or --image")
        return {}
    if not args.mmproj:
        raise SparrowError("--video and --image need the model's vision file: --mmproj FILE")
    out: dict = {"fps": args.fps, "num_frames": args.num_frames, "max_pixels": args.max_pixels}
    if args.video:
        if args.video.endswith(".npy"):
            try:
                out["video"] = np.load(args.video)
            except (OSError, ValueError) as e:
                raise SparrowError(f"{args.video}: {e}") from None
        else:
            out["video"] = args.video
    if args.image:
        out["images"] = [_read_image(p) for p in args.image]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparrow", description="Sparrow: fast, lossless speculative decoding for video LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    from sparrow_py.train.cli import add_train_commands  # torch is imported only when they run
    add_train_commands(sub)
    from sparrow_py.demo import add_demo_command
    add_demo_command(sub)
    from sparrow_py.server.config import add_serve_command  # Starlette and uvicorn are imported only when it runs
    add_serve_command(sub)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if hasattr(args, "func"):
        return args.func(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
