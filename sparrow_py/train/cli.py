"""`sparrow train` and `sparrow eval-draft`. This module imports no torch at import time: the
`sparrow` command must start without it; the commands import the training code when they run."""

from __future__ import annotations

import argparse
import sys


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (self-distillation)")
    g.add_argument("--cache-dir", help="feature cache folder (default: <out or draft>/features); reused and "
                                       "resumed when the settings match")
    g.add_argument("--max-new-tokens", type=int, default=128, help="target response length limit (default 128)")
    g.add_argument("--sample", action="store_true", help="sample the target's responses (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature with --sample (default 1)")
    g.add_argument("--max-len", type=int, default=2048, help="skip samples longer than this many tokens (default 2048)")
    g.add_argument("--store", choices=["hidden", "logits"], default=None,
                   help="how the cache keeps the target's next-token distribution: hidden = its final hidden state "
                        "(H floats a position whatever the vocabulary; the frozen head gives the logits back in "
                        "training), logits = the logits (V floats a position, or --topk). Default: hidden, or "
                        "logits when --topk is given")
    g.add_argument("--topk", type=int, default=0, help="with --store logits: keep the top-k logits per position "
                                                       "(0 = all; default 0)")
    g.add_argument("--cache-dtype", choices=["bf16", "f32"], default="bf16", help="storage of the taps (default bf16)")
    g.add_argument("--gen-batch", type=int, default=8,
                   help="greedy text-only responses generated together, by transformers or in one runtime "
                        "context (default 8; 1 = one by one)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--runtime-target", metavar="GGUF",
                   help="the target's GGUF: text samples are generated and featurized by the Sparrow runtime (its "
                        "speed, the quantized model the draft will serve); samples with video or images still use the "
                        "Hugging Face target")
    g.add_argument("--threads", type=int, default=None, help="runtime threads for --runtime-target (default: all)")
    g.add_argument("--fps", type=float, default=None,
                   help="video frames per second to sample, as `sparrow run --fps` (default: the family's rule)")
    g.add_argument("--num-frames", type=int, default=None, help="video frames to sample, as `sparrow run --num-frames`")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="Qwen targets: pixel budget per frame or image, as `sparrow run --max-pixels` (train with the "
                        "setting you will run with: the draft learns on those frames)")
    g.add_argument("--raw-prompts", action="store_true",
                   help="use each prompt's text as it is, without the chat template (for targets that have none)")


def add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="train a Sparrow draft for a Hugging Face target",
                       description="Train a Sparrow draft (spec v1: IVSB glimpses, VATA, MTP) on the target's own "
                                   "responses. Under torchrun it uses every GPU (DDP). See docs/draft.md.")
    p.add_argument("--target", required=True, help="Hugging Face target folder (Qwen2, Llama, Qwen2-VL, Qwen2.5-VL, "
                                                   "LLaVA-OneVision)")
    p.add_argument("--data", required=True, action="append",
                   help="JSONL manifest ({video|images|prompt}, ShareGPT or LLaVA-Video-178K records), or a .json "
                        "array of records; repeatable")
    p.add_argument("--eval-data", action="append", default=[], help="held-out JSONL for acceptance (repeatable)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, model.safetensors, config.json")
    p.add_argument("--init-from", metavar="DRAFT", help="start from this exported draft's weights and vocabulary "
                                                        "(to go on training it on more data) instead of the "
                                                        "target's last layer; the draft flags must match it")
    g = p.add_argument_group("draft (spec v1 knobs)")
    g.add_argument("--taps", help="comma-separated target layers whose inputs feed fc (default 2,L/2,L-3; L = "
                                  "final hidden state)")
    g.add_argument("--ivsb-layer", type=int, default=None, help="target layer whose outputs are pooled into "
                                                                "glimpses (default round(0.7 L))")
    g.add_argument("--glimpses", type=int, default=8, help="G, pooled visual glimpses (0 = off; default 8)")
    g.add_argument("--anchors", type=int, default=32, help="S, anchor text positions after the video (default 32)")
    g.add_argument("--window", type=int, default=256, help="W, recent text positions attended (0 = all; default 256)")
    g.add_argument("--draft-vocab", type=int, default=0, help="reduced draft vocabulary: the N most frequent "
                                                              "tokens of the data (0 = target's head; default 0)")
    g.add_argument("--draft-ffn", type=int, default=None, metavar="N",
                   help="the draft layer's FFN width (default: the target's, or with --init-from that draft's). "
                        "With --init-from a wider N widens that draft: its new units start with zero output "
                        "weights, so training starts from exactly the draft it was")
    g.add_argument("--draft-layers", type=int, default=None, metavar="N",
                   help="the draft's decoder layers (default 1, or with --init-from that draft's). With "
                        "--init-from more layers deepen that draft: the new ones go on top as the identity "
                        "(zero output weights), so training starts from exactly the draft it was")
    t = p.add_argument_group("training")
    t.add_argument("--mtp-steps", type=int, default=3, help="k, steps unrolled on the draft's own hidden state "
                                                            "(default 3)")
    t.add_argument("--step-weight", type=float, default=0.8, help="loss weight base: sum_s w^s CE_s (default 0.8)")
    t.add_argument("--target-temperature", type=float, default=1.0,
                   help="distil softmax(target logits / T): below 1 sharpens toward the target's greedy token, "
                        "0 is that token alone (default 1)")
    t.add_argument("--steps", type=int, default=0, help="optimizer steps (default: from --epochs)")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0 (default 1)")
    t.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch, per process (default 1)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    t.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr (default 0.1)")
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off; default 1)")
    t.add_argument("--loss-fraction", type=float, default=1.0,
                   help="share of each sample's positions whose chains are trained, drawn anew at every step; the "
                        "rest stay in the sequence as context. Below 1 a step is cheaper (the head and the chain "
                        "steps run on those rows alone), so more samples fit the same time: 0.5 with twice the "
                        "--batch-size (default 1)")
    t.add_argument("--position-jitter", type=int, default=0, help="max random offset added to text RoPE "
                                                                  "positions per sample (default 0)")
    t.add_argument("--seed", type=int, default=0, help="seed for data order, jitter, sampling and init (default 0)")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every n steps (default: at the end)")
    t.add_argument("--eval-every", type=int, default=0, help="held-out acceptance in the progress bar every n steps")
    t.add_argument("--eval-depth", type=int, default=4, help="chain length for held-out acceptance (default 4)")
    t.add_argument("--no-resume", action="store_true", help="start over even if --out has a checkpoint")
    t.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on CUDA and on a CPU with bf16 units, e.g. AVX-512 BF16)")
    t.add_argument("--sample-cache-mb", type=int, default=1024,
                   help="training samples kept in memory between uses, in MiB; the rest stream from the feature "
                        "cache on disk (default 1024)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_data_options(p)
    p.set_defaults(func=_train)

    e = sub.add_parser("eval-draft", help="mean accepted length of a draft on held-out data",
                       description="Simulate greedy chain drafting against the target on held-out prompts "
                                   "(the target's greedy responses): mean accepted length (bonus token "
                                   "included) and acceptance by depth.")
    e.add_argument("--target", required=True, help="Hugging Face target folder")
    e.add_argument("--draft", required=True, help="exported draft folder (model.safetensors + config.json)")
    e.add_argument("--data", required=True, action="append", help="held-out JSONL manifest (repeatable)")
    e.add_argument("--depth", type=int, default=4, help="chain length k (default 4)")
    _add_data_options(e)
    e.set_defaults(func=_eval_draft, sample=False)

    m = sub.add_parser("make-prompts", help="prompts written by the target itself (Magpie), for self-distillation",
                       description="Sample user requests from an instruction-tuned model given only its chat "
                                   "template's user-turn header (Magpie), with the Sparrow runtime: a prompt set in "
                                   "the model's own domain when no corpus is at hand. Writes JSONL {\"prompt\": ...} "
                                   "records for `sparrow train --data`.")
    m.add_argument("-m", "--model", required=True, help="the target's GGUF (with its chat template)")
    m.add_argument("-n", type=int, default=1000, help="distinct prompts to write (default 1000)")
    m.add_argument("-o", "--out", required=True, help="output JSONL")
    m.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    m.add_argument("--max-tokens", type=int, default=96, help="longest prompt kept, in tokens (default 96)")
    m.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    m.add_argument("--top-p", type=float, default=0.95, help="top-p filter (default 0.95)")
    m.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_make_prompts)


def _make_prompts(args) -> int:
    from sparrow_py.errors import SparrowError

    from .prompts import write_prompts

    if args.n < 1:
        print("sparrow make-prompts: error: -n must be at least 1", file=sys.stderr)
        return 1
    try:
        n = write_prompts(args.model, args.out, args.n, seed=args.seed, threads=args.threads, max_tokens=args.max_tokens,
                          temperature=args.temperature, top_p=args.top_p, progress=not args.quiet)
    except (SparrowError, ValueError, OSError) as e:
        print(f"sparrow make-prompts: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} prompts to {args.out}" + ("" if n == args.n else f" (asked for {args.n}: the model repeated "
                                                                       f"itself or ran on too often)"))
    return 0 if n > 0 else 1


def _with_runtime(target, args):
    """The data step's target: the runtime for text samples when --runtime-target is given."""
    if not getattr(args, "runtime_target", None):
        return target
    from .runtime_target import RuntimeTarget
    return RuntimeTarget(target, args.runtime_target, n_ctx=args.max_len + 8, n_threads=args.threads)


def _device(name):
    import torch
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _data_options(args):
    from .data import DataOptions
    from .target import MediaOptions
    return DataOptions(max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature,
                       max_len=args.max_len, store=args.store, topk=args.topk, cache_dtype=args.cache_dtype,
                       seed=getattr(args, "seed", 0),
                       media=MediaOptions(fps=args.fps, num_frames=args.num_frames, max_pixels=args.max_pixels),
                       gen_batch=args.gen_batch)


def _train(args) -> int:
    from pathlib import Path

    from .data import build_cache, load_sample
    from .model import DraftConfig, DraftConfigError, SparrowDraft
    from .target import Target
    from .trainer import TrainOptions, choose_draft_vocab, init_from_target, retain_freed_memory, train

    if not args.target_temperature >= 0:
        print("sparrow train: error: --target-temperature must be 0 or more", file=sys.stderr)
        return 1
    if args.draft_ffn is not None and args.draft_ffn < 1:
        print("sparrow train: error: --draft-ffn must be at least 1", file=sys.stderr)
        return 1
    if args.draft_layers is not None and args.draft_layers < 1:
        print("sparrow train: error: --draft-layers must be at least 1", file=sys.stderr)
        return 1
    if not 0 < args.loss_fraction <= 1:
        print("sparrow train: error: --loss-fraction must be above 0 and at most 1", file=sys.stderr)
        return 1
    retain_freed_memory()
    import torch
    device = _device(args.device)
    try:
        target = Target(args.target, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
                        raw_prompts=args.raw_prompts)
        taps = [int(x) for x in args.taps.split(",")] if args.taps else None
        config = DraftConfig.for_target(target.shape, taps=taps, ivsb_layer=args.ivsb_layer, glimpses=args.glimpses,
                                        anchors=args.anchors, window=args.window, draft_vocab_size=args.draft_vocab,
                                        intermediate_size=args.draft_ffn or 0, num_layers=args.draft_layers or 1)
    except DraftConfigError as e:
        print(f"sparrow train: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "features"
    opts = _data_options(args)
    from .trainer import _ddp
    rank, world = _ddp()
    data_target = _with_runtime(target, args)
    files, summary = build_cache(data_target, args.data, cache_dir, config, opts, progress=not args.quiet,
                                 rank=rank, world_size=world)
    if world > 1:  # every rank needs every feature file
        torch.distributed.barrier()
        files, summary = build_cache(data_target, args.data, cache_dir, config, opts, progress=False)
    if rank == 0:
        for line in summary.lines():
            print(line)
    eval_samples = []
    if args.eval_data:
        eval_opts = _data_options(args)
        eval_opts.sample = False
        ef, es = build_cache(data_target, args.eval_data, cache_dir.with_name(cache_dir.name + "-eval"), config,
                             eval_opts, progress=not args.quiet)
        for line in es.lines():
            print("held-out " + line)
        eval_samples = [load_sample(f) for f in ef]
    if not files:
        print("sparrow train: error: no usable training samples", file=sys.stderr)
        return 1
    if args.init_from:
        model = _initial_draft(args.init_from, config, target, args.draft_ffn, args.draft_layers)
        if model is None:
            return 1
    else:
        model = SparrowDraft(config)
        model.set_target_weights(*target.embed_and_head())
        if config.reduced_vocab:
            with torch.no_grad():
                model.d2t.copy_(choose_draft_vocab(files, config.vocab_size, config.draft_vocab_size))
        init_from_target(model, target)
    target.model.to("cpu")  # features are cached: free the device for the draft
    topt = TrainOptions(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
                        weight_decay=args.weight_decay, clip=args.clip, mtp_steps=args.mtp_steps,
                        step_weight=args.step_weight, target_temperature=args.target_temperature,
                        position_jitter=args.position_jitter, loss_fraction=args.loss_fraction, seed=args.seed,
                        save_every=args.save_every, eval_every=args.eval_every, eval_depth=args.eval_depth,
                        device=device, bf16=None if args.bf16 == "auto" else args.bf16 == "on",
                        progress=not args.quiet, sample_cache_mb=args.sample_cache_mb)
    result = train(model, files, eval_samples, topt, out, resume=not args.no_resume)
    if rank == 0 and result.losses:
        print(f"loss: first {result.losses[0]:.4f}, last {result.losses[-1]:.4f}; "
              f"{result.seconds_per_step * 1000:.1f} ms/step; draft written to {out}")
    if world > 1:
        # an orderly end: a rank whose process group is torn down at exit while its peer still
        # talks to it aborts in gloo's threads ("terminate called without an active exception",
        # 2 runs in 8 of the DDP test on a 2-core Zen 5)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _initial_draft(folder, config, target, ffn=None, layers=None):
    """The exported draft at `folder`, attached to `target`, if it is the draft these flags describe
    (its vocabulary is kept: the head's rows are trained for those tokens), widened to an FFN of
    `ffn` units and deepened to `layers` decoder layers when those are given; None after an error."""
    from .export import load_draft
    from .model import DraftConfig, DraftConfigError
    from .trainer import deepen, widen_ffn

    try:
        have = DraftConfig.load(folder)
    except (OSError, ValueError, DraftConfigError) as e:
        print(f"sparrow train: error: --init-from {folder}: {e}", file=sys.stderr)
        return None
    want, got = config.to_dict(), have.to_dict()
    want.pop("intermediate_size")  # --draft-ffn: kept or widened below
    want.pop("num_layers")         # --draft-layers: kept or deepened below
    differ = [f"{k} {got.get(k)!r} (the flags give {want[k]!r})" for k in want if got.get(k) != want[k]]
    if differ:
        print(f"sparrow train: error: --init-from {folder} is another draft: " + "; ".join(differ) +
              ". Pass the draft flags it was trained with.", file=sys.stderr)
        return None
    try:
        model = load_draft(folder, target)
    except Exception as e:  # a missing or damaged model.safetensors: safetensors' and torch's own errors
        print(f"sparrow train: error: --init-from {folder}: cannot read its weights: {e}", file=sys.stderr)
        return None
    try:
        if ffn is not None and ffn != have.intermediate_size:
            model = widen_ffn(model, ffn)
        if layers is not None and layers != have.num_layers:
            model = deepen(model, layers)
    except DraftConfigError as e:  # narrower or shallower than the draft
        flags = (f"--draft-ffn {ffn}, " if ffn is not None else "") + (f"--draft-layers {layers}, " if layers else "")
        print(f"sparrow train: error: {flags}--init-from {folder}: {e}", file=sys.stderr)
        return None
    return model


def _eval_draft(args) -> int:
    from pathlib import Path

    from .data import build_cache, load_sample
    from .evaluate import evaluate
    from .export import load_draft
    from .model import DraftConfigError
    from .target import Target

    device = _device(args.device)
    try:
        target = Target(args.target, device=device, raw_prompts=args.raw_prompts)
        model = load_draft(args.draft, target).to(device)
    except DraftConfigError as e:
        print(f"sparrow eval-draft: error: {e}", file=sys.stderr)
        return 1
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.draft) / "features-eval"
    files, summary = build_cache(_with_runtime(target, args), args.data, cache_dir, model.config, _data_options(args),
                                 progress=False)
    for line in summary.lines():
        print(line)
    stats = evaluate(model, [load_sample(f) for f in files], args.depth)
    for line in stats.lines():
        print(line)
    return 0
