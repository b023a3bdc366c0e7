"""Training data: manifests -> the target's own responses -> compact per-sample feature files.

Input: JSONL files, one record a line, either
    {"video": path|null, "images": [path, ...]|null, "prompt": str}         (the Sparrow manifest)
    {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}  (ShareGPT chat)
    {"video": path, "conversations": [...]} / {"image": path, "conversations": [...]}  (LLaVA-Video-178K,
                                                                       LLaVA-OneVision data)
or a .json file holding an array of such records. Relative media paths are taken from the
manifest's folder. For conversations the prompt is the conversation up to its last human turn
(earlier gpt turns kept as context; a "<video>" / "<image>" placeholder in a turn marks where the
media goes, else it goes first in the last human turn); whatever answer the record holds is
replaced by the target's own (self-distillation).

Output (build_cache): cache_dir/meta.json + cache_dir/samples/<manifest>-<line>.safetensors, one
file per good record, written atomically, so an interrupted run resumes where it stopped. A
sample holds, for the N tokens of prompt + response:
    ids [N] i32, positions [N] i32 (target RoPE text position ids), visual [N] bool,
    text_pos [T] i32            the text positions t = 0..N-1 that are not visual
    taps [T', nT*H] bf16/f32    tap inputs at the draft entries (text positions t < N-1: T' of them)
    glimpses [G', H] f32, glimpse_pos [G'] i32   pooled ivsb outputs (G' = min(G, visual tokens))
  and the target's next-token distribution at the text positions, as one of
    final [T, H] f32            the head's input (store "hidden", the default): H floats a position
                                whatever the vocabulary; training puts it through the frozen head
    topk_val [T, k] f16/f32, topk_idx [T, k] i32   the logits (store "logits"), top-k compressed
                                (k = V: all of them; V floats a position)
  metadata: prompt_len, anchor_start (draft index of the first text position after the last visual one).
Bad records are skipped and counted by reason; the summary says how many and why.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .model import DraftConfig, pool_glimpses
from .target import MediaOptions, Target, VisualInputs

CACHE_FORMAT = 1


@dataclass
class DataOptions:
    max_new_tokens: int = 128       # the target's response length limit
    sample: bool = False            # sampled responses instead of greedy
    temperature: float = 1.0
    max_len: int = 2048             # samples with more tokens are skipped ("over-long")
    # the target's distribution as its final hidden state ("hidden") or as "logits"; default: hidden,
    # or logits when topk is set
    store: str | None = None
    topk: int = 0                   # with store="logits": keep the top-k logits (0: all of them)
    cache_dtype: str = "bf16"       # taps storage: bf16 or f32
    seed: int = 0
    media: MediaOptions = field(default_factory=MediaOptions)  # frame choice and size, as `sparrow run` takes them
    gen_batch: int = 8              # greedy text-only responses generated together, per forward

    def __post_init__(self):
        self.store = self.store or ("logits" if self.topk else "hidden")
        if self.store not in ("hidden", "logits"):
            raise ValueError(f"store must be 'hidden' or 'logits', not {self.store!r}")
        if self.store == "hidden" and self.topk:
            raise ValueError("topk keeps top-k logits: it needs store='logits'")


@dataclass
class DataSummary:
    total: int = 0
    new: int = 0
    reused: int = 0
    bad: Counter = field(default_factory=Counter)

    @property
    def good(self) -> int:
        return self.new + self.reused

    def lines(self) -> list[str]:
        out = [f"data: {self.total} records, {self.good} usable ({self.new} new, {self.reused} from cache), "
               f"{sum(self.bad.values())} skipped"]
        for reason, n in sorted(self.bad.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"  skipped {n:6d}  {reason}")
        return out


class BadRecord(Exception):
    """A record that cannot be used; str(e) is the reason counted in the summary."""


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or BadRecord) for each non-empty line; a .json file holding one
    array (as LLaVA-Video-178K and LLaVA-OneVision's data ship) gives (index + 1, record) instead."""
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e}); a .json manifest holds one array of records") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json manifest holds one array of records (or use JSONL, one a line)")
        yield from enumerate(records, 1)
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError:
                yield line_no, BadRecord("invalid JSON")


def record_messages(record: Any) -> tuple[list[dict[str, str]], Any, Any]:
    """(chat messages ending with a user turn, video, images) of a manifest or ShareGPT record."""
    if not isinstance(record, dict):
        raise BadRecord("record is not a JSON object")
    if "conversations" in record:
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        msgs = []
        for turn in record["conversations"] or []:
            role = roles.get(turn.get("from") or turn.get("role"))
            text = turn.get("value", turn.get("content"))
            if role is None or not isinstance(text, str):
                raise BadRecord("malformed conversation turn")
            msgs.append({"role": role, "content": text})
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise BadRecord("no human turn")
        return msgs[:users[-1] + 1], record.get("video"), _record_images(record)
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRecord("missing prompt")
    return [{"role": "user", "content": prompt}], record.get("video"), _record_images(record)


def _record_images(record: dict) -> Any:
    """"images": [paths], or LLaVA data's "image": path (or list)."""
    images = record.get("images", record.get("image"))
    return [images] if isinstance(images, str) else images


def load_visual(target: Target, video: Any, images: Any, media: MediaOptions, base_dir: Path) -> VisualInputs | None:
    if video is None and not images:
        return None
    if not target.is_vlm:
        raise BadRecord("video/images given but the target has no vision tower")
    if video is not None and images:
        raise BadRecord("both video and images given")
    if video is not None:
        if isinstance(video, str) and not Path(video).is_absolute():
            video = base_dir / video
        if isinstance(video, (str, Path)) and not Path(video).is_file():
            raise BadRecord("missing video file")
        try:
            return target.visual_inputs(video, media)
        except Exception as e:  # any decoder failure is a bad record, never a crash
            raise BadRecord(f"unreadable video ({type(e).__name__})") from None
    if isinstance(images, str):
        images = [images]
    arrays = []
    for im in images:
        path = Path(im) if Path(im).is_absolute() else base_dir / im
        if not path.is_file():
            raise BadRecord("missing image file")
        try:
            arrays.append(np.load(path) if path.suffix == ".npy" else _read_image(path))
        except Exception as e:
            raise BadRecord(f"unreadable image ({type(e).__name__})") from None
    try:
        return target.image_inputs(arrays, media)
    except Exception as e:
        raise BadRecord(f"unreadable image ({type(e).__name__})") from None


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image  # optional; the video module will own image decoding too
    return np.asarray(Image.open(path).convert("RGB"))


def sample_prompt(target: Target, messages, visual: VisualInputs | None, options: DataOptions) -> tuple[list[int], int]:
    """(prompt ids, response length limit) of a record."""
    prompt = target.prompt_ids(messages, visual)
    if len(prompt) >= options.max_len:
        raise BadRecord("over-long sample")
    return prompt, min(options.max_new_tokens, options.max_len - len(prompt))


def sample_tensors(target: Target, prompt: list[int], response: list[int], visual: VisualInputs | None,
                   config: DraftConfig, options: DataOptions, features: dict[str, torch.Tensor] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The sample's tensors (see module doc), from one forward over prompt + response, or from its
    features captured while the response was generated."""
    if not response:
        raise BadRecord("empty response")
    ids = prompt + response
    f = features if features is not None else \
        target.features(ids, visual, config.taps, config.ivsb_layer, with_logits=options.store == "logits")
    N = len(ids)
    visual_mask = f["visual"]
    text_pos = torch.nonzero(~visual_mask).flatten()
    entries = text_pos[text_pos < N - 1]
    vis_pos = torch.nonzero(visual_mask).flatten()
    last_visual = int(vis_pos[-1]) if len(vis_pos) else -1
    anchor_start = int((entries <= last_visual).sum())
    pooled, gpos = pool_glimpses(f["ivsb"][vis_pos], f["positions"][vis_pos], config.glimpses)
    tap_dtype = torch.bfloat16 if options.cache_dtype == "bf16" else torch.float32
    tensors = {
        "ids": torch.tensor(ids, dtype=torch.int32),
        "positions": f["positions"].to(torch.int32),
        "visual": visual_mask.to(torch.uint8),
        "text_pos": text_pos.to(torch.int32),
        "taps": f["taps"][entries].to(tap_dtype).contiguous(),
        "glimpses": pooled.float().contiguous(),
        "glimpse_pos": gpos.to(torch.int32),
    }
    if options.store == "hidden":  # H floats a position; the frozen head gives the logits back in training
        tensors["final"] = f["final"][text_pos].float().contiguous()
    else:
        logits = f["logits"]  # [text positions, V]
        k = options.topk if 0 < options.topk < logits.shape[-1] else logits.shape[-1]
        if k == logits.shape[-1]:
            val, idx = logits, torch.arange(k).expand(len(text_pos), k)
        else:
            val, idx = logits.topk(k, dim=-1)
        small = k < logits.shape[-1] and options.cache_dtype == "bf16"
        tensors["topk_val"] = val.to(torch.float16 if small else torch.float32).contiguous()
        tensors["topk_idx"] = idx.to(torch.int32).contiguous()
    meta = {"prompt_len": str(len(prompt)), "anchor_start": str(anchor_start)}
    return tensors, meta


def cache_meta(target_dir: Path, config: DraftConfig, options: DataOptions, runtime_gguf: Path | None = None
               ) -> dict[str, Any]:
    """What the cached features depend on: a cache made with other settings is refused."""
    return {"format": CACHE_FORMAT, "target": str(Path(target_dir).resolve()),
            "generator": str(Path(runtime_gguf).resolve()) if runtime_gguf else "transformers", "taps": config.taps,
            "ivsb_layer": config.ivsb_layer, "glimpses": config.glimpses, "topk": options.topk,
            "cache_dtype": options.cache_dtype, "max_new_tokens": options.max_new_tokens,
            "sample": options.sample, "temperature": options.temperature, "max_len": options.max_len,
            "seed": options.seed,
            **({"store": "hidden"} if options.store == "hidden" else {}),  # absent in logit caches made before it
            # only when asked for: caches made before these options existed still match
            **{f"media_{k}": v for k, v in vars(options.media).items() if v is not None}}


def build_cache(target: Target, manifests: list[str | Path], cache_dir: str | Path, config: DraftConfig,
                options: DataOptions, progress: bool = True,
                rank: int = 0, world_size: int = 1) -> tuple[list[Path], DataSummary]:
    """Compute (or reuse) the feature file of every good record; returns (files, summary).
    Under DDP each rank computes the records with index % world_size == rank."""
    from safetensors.torch import save_file

    cache_dir = Path(cache_dir)
    samples_dir = cache_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    meta = cache_meta(target.dir, config, options, getattr(target, "gguf", None))
    if getattr(target, "raw_prompts", False):  # (only then: caches made before the option still match)
        meta["prompts"] = "raw"
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old != meta:
            changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(f"{cache_dir}: feature cache was made with other settings ({', '.join(changed)}); "
                             f"use another --cache-dir or delete it")
    elif rank == 0:
        meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    records = []
    summary = DataSummary()
    for m in manifests:
        m = Path(m)
        for line_no, rec in read_jsonl(m):
            records.append((m, line_no, rec))
    summary.total = len(records)
    files: list[Path] = []
    it = records
    if progress and rank == 0:
        from tqdm import tqdm
        it = tqdm(records, desc="features", unit="rec", dynamic_ncols=True)
    # greedy text-only records wait here to be generated together (a batch per forward)
    pending: list[tuple[Path, list[int], int]] = []

    def finish(out: Path, prompt: list[int], response: list[int], visual: VisualInputs | None,
               features: dict[str, torch.Tensor] | None = None) -> None:
        try:
            tensors, smeta = sample_tensors(target, prompt, response, visual, config, options, features)
        except BadRecord as e:
            summary.bad[str(e)] += 1
            return
        tmp = out.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=smeta)
        os.replace(tmp, out)
        files.append(out)
        summary.new += 1

    def flush() -> None:
        if not pending:
            return
        prompts, limits = [p for _, p, _ in pending], [n for _, _, n in pending]
        if options.store == "hidden" and hasattr(target, "generate_batch_features"):
            # the runtime keeps each sample's features as it generates: no second forward over it
            done = target.generate_batch_features(prompts, limits, config.taps, config.ivsb_layer)
        else:
            done = [(r, None) for r in target.generate_batch(prompts, limits)]
        for (out, prompt, _), (response, features) in zip(pending, done):
            finish(out, prompt, response, None, features)
        pending.clear()

    for i, (m, line_no, rec) in enumerate(it):
        out = samples_dir / f"{m.stem}-{line_no:06d}.safetensors"
        if out.exists():
            files.append(out)
            summary.reused += 1
            continue
        if i % world_size != rank:
            continue
        try:
            if isinstance(rec, BadRecord):
                raise rec
            messages, video, images = record_messages(rec)
            visual = load_visual(target, video, images, options.media, m.parent)
            prompt, limit = sample_prompt(target, messages, visual, options)
        except BadRecord as e:
            summary.bad[str(e)] += 1
            continue
        if visual is None and not options.sample and options.gen_batch > 1:
            pending.append((out, prompt, limit))
            if len(pending) >= options.gen_batch:
                flush()
            continue
        # sampled responses keep their per-record seed; visual ones their own pixel tensors
        response = target.generate(prompt, visual, limit, sample=options.sample, temperature=options.temperature,
                                   seed=options.seed + i)
        finish(out, prompt, response, visual)
    flush()
    return sorted(files), summary


def load_sample(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        s = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    s["prompt_len"] = int(meta["prompt_len"])
    s["anchor_start"] = int(meta["anchor_start"])
    return s


# --- batching: samples -> the tensors SparrowDraft.forward_mtp takes -----------------------------

def sample_to_rows(s: dict[str, Any], steps: int, position_jitter: int = 0, loss_fraction: float = 1.0,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One sample's draft-sequence tensors for forward_mtp with `steps` MTP steps, plus the loss
    targets: target_row[j, s] indexes the sample's text positions (final / topk_val rows) holding the
    target distribution for step s of the chain starting at entry j, or -1 where there is none
    (beyond the sequence, or the chain would cross a visual position).
    position_jitter: added to the text entries' RoPE positions (not the glimpses'), the random
    offset that teaches invariance to the gap between video and text.
    loss_fraction: below 1, each entry's chain is trained (keeps its targets) with that chance,
    drawn from `generator`; the others stay in the sequence as keys, so the draft sees the same
    context while the head and the chain steps run on the kept rows alone."""
    ids = s["ids"].long()
    N = len(ids)
    text_pos = s["text_pos"].long()
    entries = text_pos[text_pos < N - 1]
    M = len(entries)
    is_text = torch.ones(N + steps + 2, dtype=torch.bool)
    is_text[:N] = s["visual"] == 0
    is_text[N:] = False
    row_of = torch.full((N + steps + 2,), -1, dtype=torch.long)
    row_of[text_pos] = torch.arange(len(text_pos))
    tokens = torch.zeros(M, steps + 1, dtype=torch.long)
    target_row = torch.full((M, steps + 1), -1, dtype=torch.long)
    ok = torch.ones(M, dtype=torch.bool)
    for st in range(steps + 1):
        q = entries + 1 + st                       # the position whose next-token distribution step st learns
        inside = q < N
        tokens[:, st] = torch.where(inside, ids[q.clamp(max=N - 1)], torch.zeros_like(q))
        ok &= is_text[q]
        target_row[:, st] = torch.where(ok, row_of[q], torch.full_like(q, -1))
    if loss_fraction < 1:
        drop = torch.rand(M, generator=generator) >= loss_fraction
        trainable = (target_row >= 0).any(-1)
        if trainable.any() and not (trainable & ~drop).any():  # a sample always gives the loss a term
            candidates = torch.nonzero(trainable).flatten()
            drop[candidates[torch.randint(len(candidates), (1,), generator=generator)]] = False
        target_row[drop] = -1
    positions = s["positions"].long()[entries] + position_jitter
    return {"taps": s["taps"], "tokens": tokens, "positions": positions, "target_row": target_row,
            "anchor_start": torch.tensor(s["anchor_start"]), "glimpses": s["glimpses"],
            "glimpse_pos": s["glimpse_pos"].long(),
            **({"final": s["final"]} if "final" in s else {"topk_val": s["topk_val"], "topk_idx": s["topk_idx"].long()})}


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad a list of sample_to_rows outputs into a batch. target_row becomes a row of the
    concatenated final (or topk_val/topk_idx) of the batch."""
    B = len(rows)
    M = max(r["tokens"].shape[0] for r in rows)
    G = max(r["glimpses"].shape[0] for r in rows)
    S1 = rows[0]["tokens"].shape[1]
    F_ = rows[0]["taps"].shape[1]
    H = rows[0]["glimpses"].shape[1]
    out = {
        "taps": torch.zeros(B, M, F_, dtype=torch.float32),
        "tokens": torch.zeros(B, M, S1, dtype=torch.long),
        "positions": torch.zeros(B, M, dtype=torch.long),
        "target_row": torch.full((B, M, S1), -1, dtype=torch.long),
        "n_entries": torch.tensor([r["tokens"].shape[0] for r in rows]),
        "anchor_start": torch.stack([r["anchor_start"] for r in rows]),
        "glimpses": torch.zeros(B, G, H), "glimpse_pos": torch.zeros(B, G, dtype=torch.long),
        "glimpse_valid": torch.zeros(B, G, dtype=torch.bool),
    }
    offset = 0
    dist_keys = ("final",) if "final" in rows[0] else ("topk_val", "topk_idx")
    if any(k not in r for r in rows for k in dist_keys):
        raise ValueError("a batch mixes samples that store the target's distribution differently")
    dist = {k: [] for k in dist_keys}
    for b, r in enumerate(rows):
        m, g = r["tokens"].shape[0], r["glimpses"].shape[0]
        out["taps"][b, :m] = r["taps"].float()
        out["tokens"][b, :m] = r["tokens"]
        out["positions"][b, :m] = r["positions"]
        tr = r["target_row"]
        out["target_row"][b, :m] = torch.where(tr >= 0, tr + offset, tr)
        out["glimpses"][b, :g] = r["glimpses"]
        out["glimpse_pos"][b, :g] = r["glimpse_pos"]
        out["glimpse_valid"][b, :g] = True
        offset += r[dist_keys[0]].shape[0]
        for k in dist_keys:
            dist[k].append(r[k].float() if r[k].is_floating_point() else r[k])
    out.update({k: torch.cat(v) for k, v in dist.items()})
    return out
