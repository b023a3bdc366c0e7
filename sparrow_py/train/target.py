"""The target side of training: a Hugging Face model run with hooks that record what the draft reads.

One forward over a whole sample (prompt + response) gives, per position t:
  taps      inputs of the target layers in `taps` (tap L: the final hidden state before the norm),
            recorded with forward pre-hooks so they are exactly what the runtime keeps;
  ivsb      the output of decoder layer ivsb_layer (the input of layer ivsb_layer + 1 / of the norm);
  positions the RoPE position ids the target used, captured at its rotary embedding (for M-RoPE
            targets the temporal row: for text tokens all three rows are equal);
  final     the head's input (the final hidden state after the norm);
  logits    the target's next-token logits at the text positions (the visual rows predict nothing
            the draft learns).

Visual inputs go through visual_inputs() and image_inputs(): the target's vision family
(sparrow_py.video.family, the object the runtime's Engine calls) makes the pixels exactly as the
Engine does (the same code, the same frame choice and sizes), the HF model's tensors of them, the
number of LM tokens each video or image takes and the prompt tokens around them. Families:
Qwen2-VL / Qwen2.5-VL (M-RoPE) and LLaVA-OneVision (SigLIP frames pooled 2x2 plus a newline,
anyres image tiles, 1-D positions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparrow_py.architectures import lm_architecture, vision_family

from .model import DraftConfigError, TargetShape

def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, **(config.get("text_config") or {})}


def target_shape(model_dir: str | Path) -> TargetShape:
    """Read the target's shape from its config.json (no weights loaded). arch is the GGUF
    architecture of its language model, as the converter writes it (the draft must match it)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    try:
        arch = lm_architecture(config)
    except ValueError as e:
        raise DraftConfigError(f"{model_dir}: {e}") from None
    hp = _text_config(config)
    n_head = int(hp["num_attention_heads"])
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hp.get("rope_theta", 10000.0))
    tied = config.get("tie_word_embeddings", hp.get("tie_word_embeddings", True))
    return TargetShape(arch=arch, num_layers=int(hp["num_hidden_layers"]),
                       vocab_size=int(hp["vocab_size"]), hidden_size=int(hp["hidden_size"]),
                       intermediate_size=int(hp["intermediate_size"]), num_attention_heads=n_head,
                       num_key_value_heads=int(hp.get("num_key_value_heads") or n_head),
                       head_dim=int(hp.get("head_dim") or int(hp["hidden_size"]) // n_head),
                       rms_norm_eps=float(hp.get("rms_norm_eps") or 1e-6), rope_theta=float(theta),
                       tie_word_embeddings=bool(tied))


@dataclass
class VisualInputs:
    """What a vision-language target needs for one video or image set, and how many LM tokens it makes."""
    kind: str                       # "video" or "image"
    tensors: dict[str, torch.Tensor]  # e.g. pixel_values_videos + video_grid_thw
    n_tokens: list[int]             # LM tokens of each video / image, in order


@dataclass
class MediaOptions:
    """Frame choice and size, as `sparrow run` and Engine.generate take them, so that a draft trains
    on the frames it will be served (the same sparrow_py.video code makes both)."""
    fps: float | None = None
    num_frames: int | None = None
    max_pixels: int | None = None    # Qwen: per-frame pixel budget; LLaVA-OneVision frames have a fixed size


def _load_frames(video: Any) -> Any:
    """A record's video: a file path (decoded by sparrow_py.video), a .npy of [T, H, W, 3] uint8
    frames, or such an array."""
    if isinstance(video, np.ndarray):
        return video
    path = Path(video)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    return np.load(path) if path.suffix == ".npy" else path


class Target:
    """A frozen HF target with hooks. device/dtype: where and how it runs (bf16 on GPU is fine)."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 raw_prompts: bool = False):
        """raw_prompts: each prompt's text as it is (for a target without a chat template)."""
        import transformers

        self.dir = Path(model_dir)
        self.shape = target_shape(model_dir)
        self.config = json.loads((self.dir / "config.json").read_text(encoding="utf-8"))
        arch_hf = self.config["architectures"][0]
        cls = getattr(transformers, arch_hf)
        self.model = cls.from_pretrained(str(self.dir), dtype=dtype).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        lm = self.model.model
        self.lm = getattr(lm, "language_model", lm)   # the decoder stack (Qwen2-VL nests it)
        self.family = vision_family(self.config)      # sparrow_py.video.family.VisionFamily; None: text only
        self.is_vlm = self.family is not None
        # LLaVA-OneVision's config spells them image_token_index / video_token_index
        self.media_token_ids = {kind: int(v) for kind in ("image", "video")
                                for v in [self.config.get(f"{kind}_token_id", self.config.get(f"{kind}_token_index"))]
                                if v is not None}
        self.visual_token_ids = set(self.media_token_ids.values())
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir))
        self.raw_prompts = raw_prompts
        if not raw_prompts and not getattr(self.tokenizer, "chat_template", None):
            raise DraftConfigError(f"{model_dir}: the tokenizer has no chat template, so prompts cannot be written as "
                                   "chat turns: add one to tokenizer_config.json, or pass --raw-prompts to use each "
                                   "prompt's text as it is")

    # --- weights the draft shares ---
    def embed_and_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        embed = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings().weight
        return embed.float().cpu(), head.float().cpu()

    def last_layer(self):
        return self.lm.layers[-1]

    # --- prompts ---
    def prompt_ids(self, prompt: str | list[dict[str, str]], visual: VisualInputs | None) -> list[int]:
        """Token ids of a chat prompt ending with the assistant turn's header. The visual block goes
        where a turn's "<video>" / "<image>" placeholder is (LLaVA data writes one), else at the start
        of the (last) user message."""
        messages = [dict(m) for m in (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])]
        tok = self.tokenizer
        marker = "\u0001SPARROW_VISUAL\u0001"
        if visual is not None:
            placed = False
            for m in messages:  # the first placeholder becomes the media, any other is dropped
                for placeholder in ("<video>\n", "<image>\n", "<video>", "<image>"):
                    while placeholder in m["content"]:
                        m["content"] = m["content"].replace(placeholder, "" if placed else marker, 1)
                        placed = True
            if not placed:
                last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
                messages[last_user]["content"] = marker + messages[last_user]["content"]
            for m in messages:
                m["content"] = m["content"].replace(marker, marker + self.family.text_after_block)
        if self.raw_prompts:  # the turns' texts as they are
            text = "\n".join(m["content"] for m in messages)
        else:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if visual is None:
            return tok(text, add_special_tokens=self.raw_prompts)["input_ids"]
        before, after = text.split(marker)
        return (tok(before, add_special_tokens=self.raw_prompts)["input_ids"] + self._visual_block(visual)
                + tok(after, add_special_tokens=False)["input_ids"])

    def _visual_block(self, visual: VisualInputs | None) -> list[int]:
        """The tokens the videos / images take, each its family's block around its run of the
        model's video / image token (nothing without visuals)."""
        if visual is None:
            return []
        pad = self.media_token_ids[visual.kind]
        return [tok for n in visual.n_tokens for tok in self.family.prompt_block(n, pad, self._special_token)]

    def _special_token(self, text: str) -> int:
        """The id of a special token the family's prompt block names (e.g. <|vision_start|>), from config.json."""
        return int(self.config[self.family.config_token_keys[text]])

    # --- visual inputs, made by the vision family exactly as the runtime makes them ---
    def visual_inputs(self, video: Any, media: MediaOptions | None = None) -> VisualInputs:
        """A record's video (file, .npy of frames or an array) -> the HF model's tensors."""
        if not self.is_vlm:
            raise ValueError("this target has no vision tower")
        media = media or MediaOptions()
        tensors, n_tokens = self.family.hf_video(_load_frames(video), self.dir, self.config, fps=media.fps,
                                                 num_frames=media.num_frames, max_pixels=media.max_pixels)
        return VisualInputs("video", tensors, n_tokens)

    def image_inputs(self, images: list[np.ndarray], media: MediaOptions | None = None) -> VisualInputs:
        """HxWx3 uint8 images -> the HF model's tensors (Qwen: each a one-frame clip; LLaVA-OneVision:
        anyres tiles)."""
        if not self.is_vlm:
            raise ValueError("this target has no vision tower")
        media = media or MediaOptions()
        tensors, n_tokens = self.family.hf_images([np.asarray(im) for im in images], self.dir, self.config,
                                                  max_pixels=media.max_pixels)
        return VisualInputs("image", tensors, n_tokens)

    def _model_kwargs(self, ids: torch.Tensor, visual: VisualInputs | None) -> dict[str, torch.Tensor]:
        """The processor tensors, plus what the family's forward takes besides (Qwen: the token types
        transformers builds M-RoPE positions from)."""
        if visual is None:
            return {}
        return {**{k: v.to(self.device) for k, v in visual.tensors.items()},
                **self.family.hf_extra_inputs(ids, self.media_token_ids)}

    @torch.no_grad()
    def generate(self, ids: list[int], visual: VisualInputs | None, max_new_tokens: int,
                 sample: bool = False, temperature: float = 1.0, seed: int = 0) -> list[int]:
        """The target's own response (self-distillation): greedy, or sampled with a fixed seed."""
        x = torch.tensor([ids], device=self.device)
        kwargs = self._model_kwargs(x, visual)
        eos = self.tokenizer.eos_token_id
        if sample:
            torch.manual_seed(seed)
        out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                  do_sample=sample, temperature=temperature if sample else None,
                                  top_k=None, top_p=None, eos_token_id=eos, pad_token_id=eos, **kwargs)
        return out[0, len(ids):].tolist()

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
        """Greedy responses of several text prompts in one batch (left-padded, masked), each cut
        where generate() would stop it: after the end-of-turn token, or at its own length limit."""
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=max(max_new_tokens), do_sample=False, temperature=None, top_k=None,
                                  top_p=None, eos_token_id=eos, pad_token_id=pad)
        responses = []
        for row, limit in enumerate(max_new_tokens):
            tokens = out[row, width:width + limit].tolist()
            if eos in tokens:
                tokens = tokens[:tokens.index(eos) + 1]
            responses.append(tokens)
        return responses

    @torch.no_grad()
    def features(self, ids: list[int], visual: VisualInputs | None, taps: list[int], ivsb_layer: int,
                 with_logits: bool = True) -> dict[str, torch.Tensor]:
        """One forward over ids; everything the draft trains on (see the module doc). float32, CPU.
        with_logits=False skips the head (the hidden store needs only "final")."""
        L = self.shape.num_layers
        layers = self.lm.layers
        captured: dict[str, torch.Tensor] = {}
        hooks = []

        def pre_hook(name):
            def hook(_module, args, kwargs):
                hs = args[0] if args else kwargs["hidden_states"]
                captured[name] = hs[0].float().cpu()
            return hook

        for t in sorted(set(taps) | {ivsb_layer + 1}):
            module = layers[t] if t < L else self.lm.norm
            hooks.append(module.register_forward_pre_hook(pre_hook(f"in{t}"), with_kwargs=True))

        def rope_hook(_module, args, kwargs):
            pos = args[1] if len(args) > 1 else kwargs["position_ids"]
            captured["positions"] = (pos[0, 0] if pos.ndim == 3 else pos[0]).long().cpu()
        hooks.append(self.lm.rotary_emb.register_forward_pre_hook(rope_hook, with_kwargs=True))
        try:
            x = torch.tensor([ids], device=self.device)
            kwargs = self._model_kwargs(x, visual)
            # the base model, not the one with the head: logits over every visual row would take
            # N x V floats (gigabytes for a long video); the head runs on the text rows below
            final = self.model.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False,
                                     **kwargs).last_hidden_state[0]
        finally:
            for h in hooks:
                h.remove()
        ids_t = torch.tensor(ids)
        visual_mask = torch.zeros(len(ids), dtype=torch.bool)
        for vid in self.visual_token_ids:
            visual_mask |= ids_t == vid
        text = torch.nonzero(~visual_mask).flatten()
        return {
            "ids": ids_t,
            "positions": captured["positions"],
            "visual": visual_mask,
            "taps": torch.cat([captured[f"in{t}"] for t in taps], dim=-1),
            "ivsb": captured[f"in{ivsb_layer + 1}"],
            "final": final.float().cpu(),
            **({"logits": self.model.get_output_embeddings()(final[text.to(final.device)]).float().cpu()}
               if with_logits else {}),
        }

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's final norm: the hidden state before it (tap L) -> the head's input."""
        norm = self.lm.norm
        return norm(hidden.to(norm.weight.device, norm.weight.dtype)).float().cpu()
