"""Rebuild the demo's models from a seed: tokenizer, target, draft, GGUF files (scripts/build_demo.py).

    1. tokenizer   byte-level BPE (Qwen2 pre-tokenizer) trained on captions of the synthetic task,
                   plus Qwen2-VL's special tokens and a Qwen2-VL style chat template
    2. target      a tiny Qwen2VLForConditionalGeneration (TARGET_TEXT / TARGET_VISION) trained from
                   scratch with torch on (clip, prompt) -> caption, loss on the caption only
    3. draft       `sparrow train` on the target's own greedy captions of other clips (the project's
                   pipeline: glimpses, VATA window, MTP)
    4. GGUF        target LM, vision tower (mmproj) and draft, q8_0, plus a held-out clip and
                   demo.json (what was built, how long it took, how well it does)

Needs the `train` and `convert` extras (torch, transformers, tokenizers, gguf). Clips are made on
the fly from seeds; training clips and held-out clips never share a seed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..video._config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from . import synthetic

# The chat template: Qwen2-VL's rendering of string and list contents (video/image/text parts).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_PRETOKENIZER_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
BPE_VOCAB = 384

# The target: a few million parameters; head_dim 32 so that the M-RoPE sections (t, h, w) cover
# its 16 rotary pairs; the tower's 2x2 merger turns a 112x112 frame pair into 16 tokens.
TARGET_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
                   rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
TARGET_VISION = dict(depth=4, embed_dim=96, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2, in_channels=3)

# Qwen2-VL's processor settings, with a pixel budget that keeps the synthetic frames at their size
MAX_PIXELS = synthetic.FRAME_SIZE * synthetic.FRAME_SIZE
PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "min_pixels": 56 * 56, "max_pixels": MAX_PIXELS,
                "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}

# seeds: training clips count up from 0, held-out clips from here (the bundled clip is the first)
HELD_OUT_SEED = 10_000_000
DRAFT_SEED = 20_000_000      # the draft trains on the target's captions of clips it never saw


@dataclass
class BuildOptions:
    target_steps: int = 5000
    batch_size: int = 16
    lr: float = 2e-3
    draft_clips: int = 600
    draft_steps: int = 1200
    eval_clips: int = 60
    outtype: str = "q8_0"
    seed: int = 0
    threads: int = 2


def train_bpe_tokenizer(out_dir: Path, texts: list[str], vocab_size: int, added: list[tuple[str, bool]],
                        config: dict) -> None:
    """A byte-level BPE with Qwen2's pre-tokenizer and NFC, trained on texts, with `added` tokens
    (content, special) after the BPE vocabulary; tokenizer.json + tokenizer_config.json (config
    is merged over the defaults and gets added_tokens_decoder)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZER_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"training text too small for a vocabulary of {vocab_size}")
    tok.add_tokens([AddedToken(text, special=special, normalized=False) for text, special in added])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    decoder = {str(vocab_size + i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": special}
               for i, (text, special) in enumerate(added)}
    full = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "unk_token": None, "add_bos_token": False,
            "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
            **config, "added_tokens_decoder": decoder}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(full, indent=2), encoding="utf-8")


def build_tokenizer(out_dir: Path, seed: int) -> dict[str, int]:
    """The demo tokenizer; returns the special tokens' ids."""
    train_bpe_tokenizer(out_dir, synthetic.corpus_text(2000, seed), BPE_VOCAB,
                        [(t, True) for t in SPECIAL_TOKENS],
                        {"model_max_length": 1024, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                         "chat_template": CHAT_TEMPLATE})
    return {t: BPE_VOCAB + i for i, t in enumerate(SPECIAL_TOKENS)}


def new_target(ids: dict[str, int], seed: int):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    vocab = BPE_VOCAB + len(SPECIAL_TOKENS)
    text = dict(TARGET_TEXT, vocab_size=vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    config = Qwen2VLConfig(text_config=text, vision_config=dict(TARGET_VISION), tie_word_embeddings=True,
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                           pad_token_id=ids["<|endoftext|>"])
    return Qwen2VLForConditionalGeneration(config)


class CaptionBatches:
    """Teacher-forcing batches of (clip, prompt) -> caption from a Target wrapper's prompt layout."""

    def __init__(self, target, seed: int):
        self.target = target
        self.rng = np.random.default_rng([0xBA7C, seed])
        self.next_clip = 0
        self.pad = target.tokenizer.pad_token_id
        self.eos = target.tokenizer.eos_token_id

    def example(self, clip_seed: int, prompt: str):
        from ..train.target import MediaOptions

        c = synthetic.clip(clip_seed)
        visual = self.target.visual_inputs(c.frames, MediaOptions(max_pixels=MAX_PIXELS))  # as the demo runs it
        prompt_ids = self.target.prompt_ids(prompt, visual)
        answer = self.target.tokenizer(synthetic.caption(c.scene, prompt), add_special_tokens=False)["input_ids"]
        return prompt_ids, answer + [self.eos], visual, c

    def batch(self, size: int) -> dict:
        import torch

        rows, pixels, grids = [], [], []
        for _ in range(size):
            prompt = synthetic.PROMPTS[int(self.rng.integers(len(synthetic.PROMPTS)))]
            p, a, visual, _ = self.example(self.next_clip, prompt)
            self.next_clip += 1
            rows.append((p, a))
            pixels.append(visual.tensors["pixel_values_videos"])
            grids.append(visual.tensors["video_grid_thw"])
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((size, width), self.pad, dtype=torch.long)
        labels = torch.full((size, width), -100, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            seq = p + a
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor(a)     # learn to answer, not to ask
            mask[i, :len(seq)] = 1
        mm = (ids == int(self.target.config["video_token_id"])).to(torch.int32) * 2
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "mm_token_type_ids": mm,
                "pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.cat(grids)}


def train_target(model, target, opts: BuildOptions, log: Callable[[str], None]) -> dict:
    """Teacher forcing with AdamW, warmup then cosine decay; returns timing and the loss curve."""
    import torch

    batches = CaptionBatches(target, opts.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, opts.target_steps // 25)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(opts.target_steps):
        progress = step / max(1, opts.target_steps)
        lr = opts.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(**batches.batch(opts.batch_size)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == opts.target_steps:
            log(f"target step {step + 1}/{opts.target_steps}: loss {np.mean(losses[-100:]):.4f}, "
                f"{time.perf_counter() - t0:.0f} s")
    model.eval()
    return {"steps": opts.target_steps, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(np.mean(losses[-50:])), 4), "batch_size": opts.batch_size}


def evaluate_captions(target, n_clips: int, first_seed: int = HELD_OUT_SEED) -> dict:
    """Greedy captions (transformers) of held-out clips, every prompt: correct facts and exact text."""
    batches = CaptionBatches(target, 0)
    correct = exact = total = 0
    for i in range(n_clips):
        prompt = synthetic.PROMPTS[i % len(synthetic.PROMPTS)]
        p, a, visual, c = batches.example(first_seed + i, prompt)
        got = target.generate(p, visual, max_new_tokens=len(a) + 8)
        text = target.tokenizer.decode(got, skip_special_tokens=True)
        correct += synthetic.caption_is_correct(text, c.scene)
        exact += got == a
        total += 1
    return {"clips": total, "facts_correct": round(correct / total, 3), "exact": round(exact / total, 3)}


def write_draft_data(folder: Path, n_clips: int, first_seed: int) -> Path:
    """Clips as .npy frames and a manifest of (video, prompt) records for `sparrow train`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_clips):
        name = f"clip-{first_seed + i}.npy"
        np.save(folder / name, synthetic.clip(first_seed + i).frames)
        lines.append(json.dumps({"video": name, "prompt": synthetic.PROMPTS[i % len(synthetic.PROMPTS)]}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


DRAFT_KNOBS = dict(glimpses=4, anchors=8, window=32, mtp_steps=3)


def build(out: Path, work: Path, opts: BuildOptions, log: Callable[[str], None] = print) -> dict:
    """Everything, from scratch; out receives target.gguf, mmproj.gguf, draft.gguf, clip.npy, demo.json."""
    import torch

    from ..cli import main as sparrow_main
    from ..convert import convert, convert_mmproj
    from ..train.target import Target

    torch.set_num_threads(opts.threads)
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    ids = build_tokenizer(tok_dir, opts.seed)
    target_dir = work / "target"
    trained_marker = target_dir / "sparrow-demo-training.json"
    expected = {"options": asdict(opts)}
    if trained_marker.is_file() and json.loads(trained_marker.read_text())["options"] == expected["options"]:
        # the slow part is done (an earlier run with the same options): reuse it
        training = json.loads(trained_marker.read_text())["training"]
        log(f"target: reusing the trained target in {target_dir}")
    else:
        model = new_target(ids, opts.seed)
        model.save_pretrained(target_dir)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_dir / name, target_dir / name)
        (target_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2), encoding="utf-8")
        log(f"target: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
        layout = Target(target_dir)          # the prompt layout and tokenizer the draft pipeline uses
        training = train_target(model, layout, opts, log)
        model.save_pretrained(target_dir)
        trained_marker.write_text(json.dumps({**expected, "training": training}, indent=2), encoding="utf-8")
    target = Target(target_dir)
    n_params = sum(p.numel() for p in target.model.parameters())
    info = {"seed": opts.seed, "target_parameters": n_params, "target_training": training}
    info["target_held_out"] = evaluate_captions(target, opts.eval_clips)
    log(f"target on {opts.eval_clips} held-out clips: {info['target_held_out']}")

    t_draft = time.perf_counter()
    manifest = write_draft_data(work / "draft-data", opts.draft_clips, DRAFT_SEED)
    held = write_draft_data(work / "draft-held-out", max(6, opts.eval_clips // 4), HELD_OUT_SEED + 1000)
    draft_dir = work / "draft"
    args = ["train", "--target", str(target_dir), "--data", str(manifest), "--eval-data", str(held),
            "--out", str(draft_dir), "--glimpses", str(DRAFT_KNOBS["glimpses"]),
            "--anchors", str(DRAFT_KNOBS["anchors"]), "--window", str(DRAFT_KNOBS["window"]),
            "--mtp-steps", str(DRAFT_KNOBS["mtp_steps"]), "--steps", str(opts.draft_steps),
            "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", str(max(1, opts.draft_steps // 20)),
            "--max-new-tokens", "48", "--cache-dtype", "f32", "--position-jitter", "64", "--max-pixels", str(MAX_PIXELS),
            "--seed", str(opts.seed), "--eval-every", str(max(1, opts.draft_steps // 4)), "--quiet"]
    if sparrow_main(args) != 0:
        raise RuntimeError("sparrow train failed")
    info["draft_training_seconds"] = round(time.perf_counter() - t_draft, 1)
    info["draft"] = dict(DRAFT_KNOBS, steps=opts.draft_steps, clips=opts.draft_clips)

    convert(target_dir, out / "target.gguf", outtype=opts.outtype, progress=False)
    convert_mmproj(target_dir, out / "mmproj.gguf", outtype=opts.outtype, progress=False)
    convert(draft_dir, out / "draft.gguf", outtype=opts.outtype, progress=False)
    bundled = synthetic.clip(HELD_OUT_SEED)
    np.save(out / "clip.npy", bundled.frames)
    info.update(clip_seed=HELD_OUT_SEED, clip_caption=synthetic.caption(bundled.scene, synthetic.PROMPTS[0]),
                build_seconds=round(time.perf_counter() - t_start, 1), options=asdict(opts))
    (out / "demo.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
