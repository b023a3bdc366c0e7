"""The target side of training: a Hugging Face model run with hooks that record what the draft reads.

One forward over a whole sample (prompt + response) gives, per position t:
  taps      inputs of the target layers in `taps` (tap L: the final hidden state before the norm),
            recorded with forward pre-hooks so they are exactly what the runtime keeps;
  ivsb      the output of decoder layer ivsb_layer (the input of layer ivsb_layer + 1 / of the norm);
  positions the RoPE position ids the target used, captured at its rotary embedding (for M-RoPE
            targets the temporal row: for text tokens all three rows are equal);
  logits    the target's next-token logits.

Video handling lives behind one function, visual_inputs(): a record's frames (or a loader the
video module provides later) become the HF processor tensors plus the number of visual tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .model import DraftConfigError, TargetShape

# HF architectures[0] -> GGUF architecture of the LM (the converter's names)
_HF_TO_ARCH = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2VLForConditionalGeneration": "qwen2vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2vl",
}


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, **(config.get("text_config") or {})}


def target_shape(model_dir: str | Path) -> TargetShape:
    """Read the target's shape from its config.json (no weights loaded)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    arch_hf = (config.get("architectures") or ["?"])[0]
    if arch_hf not in _HF_TO_ARCH:
        raise DraftConfigError(f"{model_dir}: unsupported target architecture {arch_hf!r} "
                               f"(supported: {', '.join(_HF_TO_ARCH)})")
    hp = _text_config(config)
    n_head = int(hp["num_attention_heads"])
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hp.get("rope_theta", 10000.0))
    tied = config.get("tie_word_embeddings", hp.get("tie_word_embeddings", True))
    return TargetShape(arch=_HF_TO_ARCH[arch_hf], num_layers=int(hp["num_hidden_layers"]),
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


def frames_to_qwen2vl_video(frames: np.ndarray, vision_config: dict[str, Any]) -> VisualInputs:
    """Pre-decoded frames [T, h, w, 3] (uint8 or float in 0..1) -> Qwen2-VL video inputs.

    A minimal stand-in for the HF video processor, for pre-decoded arrays: CLIP mean/std
    normalisation, frames padded to a multiple of temporal_patch_size by repeating the last,
    h and w must already be multiples of patch_size * spatial_merge_size (no resizing here: that
    is the video module's job). Patch layout as Qwen2VLImageProcessor flattens it.
    """
    p = int(vision_config.get("patch_size", 14))
    tp = int(vision_config.get("temporal_patch_size", 2))
    m = int(vision_config.get("spatial_merge_size", 2))
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [T, h, w, 3], got {x.shape}")
    T, h, w, _ = x.shape
    if h % (p * m) or w % (p * m) or T == 0:
        raise ValueError(f"frame size {h}x{w} is not a multiple of {p * m} (resize first)")
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    x = ((x - mean) / std).transpose(0, 3, 1, 2)                      # T, C, h, w
    if T % tp:
        x = np.concatenate([x, np.repeat(x[-1:], tp - T % tp, axis=0)])
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(gt * gh * gw, 3 * tp * p * p)
    return VisualInputs(kind="video",
                        tensors={"pixel_values_videos": torch.from_numpy(np.ascontiguousarray(patches)),
                                 "video_grid_thw": torch.tensor([[gt, gh, gw]])},
                        n_tokens=[gt * gh * gw // (m * m)])


def images_to_qwen2vl(images: list[np.ndarray], vision_config: dict[str, Any]) -> VisualInputs:
    """Pre-decoded images [h, w, 3] -> Qwen2-VL image inputs (each image is a one-frame clip)."""
    parts = [frames_to_qwen2vl_video(np.asarray(im)[None], vision_config) for im in images]
    return VisualInputs(kind="image",
                        tensors={"pixel_values": torch.cat([p.tensors["pixel_values_videos"] for p in parts]),
                                 "image_grid_thw": torch.cat([p.tensors["video_grid_thw"] for p in parts])},
                        n_tokens=[p.n_tokens[0] for p in parts])


# A video loader turns a record's "video" value (a path, or an array in tests) into VisualInputs.
VideoLoader = Callable[[Any, dict[str, Any]], VisualInputs]


def default_video_loader(video: Any, vision_config: dict[str, Any]) -> VisualInputs:
    """The one place video enters training. Arrays and .npy files of frames work here; decoding
    real video files belongs to the video module, which replaces this function."""
    if isinstance(video, np.ndarray):
        return frames_to_qwen2vl_video(video, vision_config)
    path = Path(video)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    if path.suffix == ".npy":
        return frames_to_qwen2vl_video(np.load(path), vision_config)
    try:
        from sparrow_py import video as video_module  # the video issue's decoder
    except ImportError:
        video_module = None
    load_for_training = getattr(video_module, "load_for_training", None)
    if load_for_training is None:
        raise RuntimeError(f"cannot decode {path.name}: sparrow_py.video has no load_for_training(path, "
                           f"vision_config) yet (pass frames as .npy)")
    return load_for_training(path, vision_config)


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
        self.is_vlm = self.shape.arch == "qwen2vl"
        self.visual_token_ids = {int(self.config[k]) for k in ("image_token_id", "video_token_id") if k in self.config}
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
        """Token ids of a chat prompt ending with the assistant turn's header. The visual block
        (vision_start, n pad tokens, vision_end) goes at the start of the (last) user message."""
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        tok = self.tokenizer
        if self.raw_prompts:  # the turns' texts as they are; a visual block goes first
            return self._visual_block(visual) + tok("\n".join(m["content"] for m in messages))["input_ids"]
        if visual is None:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        marker = "\u0001SPARROW_VISUAL\u0001"
        messages = [dict(m) for m in messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = marker + messages[last_user]["content"]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = text.split(marker)
        return (tok(before, add_special_tokens=False)["input_ids"] + self._visual_block(visual)
                + tok(after, add_special_tokens=False)["input_ids"])

    def _visual_block(self, visual: VisualInputs | None) -> list[int]:
        """vision_start, n pad tokens, vision_end for each video / image (nothing without visuals)."""
        if visual is None:
            return []
        pad = int(self.config["video_token_id" if visual.kind == "video" else "image_token_id"])
        block = []
        for n in visual.n_tokens:
            block += [int(self.config["vision_start_token_id"])] + [pad] * n + [int(self.config["vision_end_token_id"])]
        return block

    def visual_inputs(self, record_video: Any, loader: VideoLoader | None = None) -> VisualInputs:
        if not self.is_vlm:
            raise ValueError("this target has no vision tower")
        return (loader or default_video_loader)(record_video, self.config.get("vision_config") or {})

    def _model_kwargs(self, ids: torch.Tensor, visual: VisualInputs | None) -> dict[str, torch.Tensor]:
        """The processor tensors plus mm_token_type_ids (0 text, 1 image, 2 video), which
        transformers >= 5 needs to build M-RoPE position ids."""
        if visual is None:
            return {}
        kwargs = {k: v.to(self.device) for k, v in visual.tensors.items()}
        mm = torch.zeros_like(ids, dtype=torch.int32)
        if "image_token_id" in self.config:
            mm[ids == int(self.config["image_token_id"])] = 1
        if "video_token_id" in self.config:
            mm[ids == int(self.config["video_token_id"])] = 2
        kwargs["mm_token_type_ids"] = mm
        return kwargs

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
    def features(self, ids: list[int], visual: VisualInputs | None, taps: list[int], ivsb_layer: int
                 ) -> dict[str, torch.Tensor]:
        """One forward over ids; everything the draft trains on (see the module doc). float32, CPU."""
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
            out = self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        ids_t = torch.tensor(ids)
        visual_mask = torch.zeros(len(ids), dtype=torch.bool)
        for vid in self.visual_token_ids:
            visual_mask |= ids_t == vid
        return {
            "ids": ids_t,
            "positions": captured["positions"],
            "visual": visual_mask,
            "taps": torch.cat([captured[f"in{t}"] for t in taps], dim=-1),
            "ivsb": captured[f"in{ivsb_layer + 1}"],
            "logits": out.logits[0].float().cpu(),
        }
