"""Shared pytest fixtures: tiny Hugging Face models and tokenizers built on the spot.

Nothing is downloaded. Models are random (torch.manual_seed(0)) transformers models saved with
save_pretrained (safetensors), each with the tiny tokenizer below, so a test can convert them, run
them with transformers as the reference, and tokenize text. All fixtures are session-scoped and
return a pathlib.Path to a read-only-by-convention folder: copy it before modifying it.

    tiny_tokenizer_dir   tokenizer.json (byte-level BPE, Qwen2 pre-tokenizer regex, NFC, ByteLevel
                         decoder, TINY_VOCAB_SIZE tokens incl. added tokens) + tokenizer_config.json
                         (chatml chat_template, eos <|im_end|>, pad <|endoftext|>, add_bos_token false)
    qwen2_tokenizer_dir  the real Qwen2 tokenizer (tests/data/qwen2-tokenizer, xz-compressed in git)
    tiny_qwen2_dir       Qwen2ForCausalLM: 2 layers, hidden 64, GQA 4/2, qkv bias, tied embeddings
    tiny_llama_dir       LlamaForCausalLM: 2 layers, hidden 72, GQA 6/2, head_dim 12, untied
    tiny_llama_sharded_dir  the same Llama weights saved in several shards + model.safetensors.index.json
                         (same folder name as tiny_llama_dir, so converted files are byte-identical)
    tiny_qwen2vl_dir     Qwen2VLForConditionalGeneration (tiny vision tower), LM like tiny_qwen2, tied
    tiny_qwen25vl_dir    Qwen2_5_VLForConditionalGeneration (tiny vision tower), LM untied

Model vocab_size is TINY_MODEL_VOCAB (a bit more than the tokenizer has, like real Qwen checkpoints,
so the GGUF token list gets [PAD] entries).
"""

from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path

import pytest

# The tests use the installed sparrow_py (`pip install ".[test]"`): its compiled runtime is only
# there, not in the source tree.
REPO_ROOT = Path(__file__).resolve().parent.parent
# `python -m pytest` puts the checkout first on sys.path, where sparrow_py has no compiled part:
# drop it so the installed package is the one imported.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def retain_freed_memory_calls(monkeypatch):
    """`sparrow train` sets glibc to keep freed memory for the whole process; the tests run it in
    this process, so the call is recorded here instead (and the list returned to tests that check
    it). Only where torch is loaded: the trainer needs it, and the other tests never train."""
    calls: list[bool] = []
    if "torch" in sys.modules:
        from sparrow_py.train import trainer
        monkeypatch.setattr(trainer, "retain_freed_memory", lambda: calls.append(True) or True)
    return calls

# The added tokens of the tiny tokenizer, in id order after the BPE vocab: (content, special)
TINY_ADDED_TOKENS = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                     ("<think>", False)]
TINY_BPE_VOCAB = 320
TINY_VOCAB_SIZE = TINY_BPE_VOCAB + len(TINY_ADDED_TOKENS)
TINY_MODEL_VOCAB = TINY_VOCAB_SIZE + 12
TINY_EOT_ID = TINY_BPE_VOCAB  # <|endoftext|>
TINY_IM_END_ID = TINY_BPE_VOCAB + 2

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAINING_TEXT = """\
Sparrow drafts tokens for a video language model and the target verifies them in one pass.
The quick brown fox jumps over the lazy dog; 12 frames, 345 patches, 6789 visual tokens!
Speculative decoding is lossless: every accepted token is exactly what the target would emit.
Qwen2-VL and Qwen2.5-VL use multimodal rotary position embeddings (M-RoPE) with three sections.
Llama models permute the query and key projections so adjacent pairs rotate together.
Ça va? Größe, naïve café, 東京, 北京 — unicode text is normalized with NFC before splitting.
    Indented code: def f(x): return x * 2  # comments, tabs\tand\nnewlines\r\n too.
"""


def _train_tiny_tokenizer(out_dir: Path) -> None:
    from sparrow_py.demo.build import train_bpe_tokenizer

    train_bpe_tokenizer(out_dir, [_TRAINING_TEXT] * 4, TINY_BPE_VOCAB, TINY_ADDED_TOKENS,
                        {"model_max_length": 256, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                         "chat_template": CHATML_TEMPLATE})


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tiny-tokenizer"
    _train_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory) -> Path:
    """The real Qwen2 tokenizer, decompressed from tests/data/qwen2-tokenizer/."""
    src = DATA_DIR / "qwen2-tokenizer"
    out = tmp_path_factory.mktemp("qwen2tok") / "qwen2-tokenizer"
    out.mkdir()
    with lzma.open(src / "tokenizer.json.xz") as f:
        (out / "tokenizer.json").write_bytes(f.read())
    shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def _save_model(model, out: Path, tokenizer_dir: Path, **save_kwargs) -> Path:
    model.save_pretrained(out, **save_kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def _lm_sizes(**overrides):
    sizes = dict(vocab_size=TINY_MODEL_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rms_norm_eps=1e-6, bos_token_id=TINY_EOT_ID, eos_token_id=TINY_IM_END_ID)
    sizes.update(overrides)
    return sizes


def build_tiny_qwen2(out: Path, tokenizer_dir: Path, **save_kwargs) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**_lm_sizes(), rope_theta=1e6, tie_word_embeddings=True)
    return _save_model(Qwen2ForCausalLM(config).eval(), out, tokenizer_dir, **save_kwargs)


def build_tiny_llama(out: Path, tokenizer_dir: Path, **save_kwargs) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # hidden 72 = 6 heads x 12: head_dim not a power of two, rows not a multiple of 32
    config = LlamaConfig(**_lm_sizes(hidden_size=72, num_attention_heads=6, num_key_value_heads=2, head_dim=12),
                         tie_word_embeddings=False)
    return _save_model(LlamaForCausalLM(config).eval(), out, tokenizer_dir, **save_kwargs)


def build_tiny_qwen2vl(out: Path, tokenizer_dir: Path, *, v25: bool = False, **save_kwargs) -> Path:
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(0)
    # head_dim 16: the M-RoPE sections (t, h, w) cover its 8 rotary pairs
    text = _lm_sizes(rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    if v25:
        vision = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                      fullatt_block_indexes=[0])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
        model = Qwen2VLForConditionalGeneration(config)
    return _save_model(model.eval(), out, tokenizer_dir, **save_kwargs)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama-sharded") / "tiny-llama", tiny_tokenizer_dir,
                            max_shard_size="40KB")


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl") / "tiny-qwen2vl", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen25vl_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen25vl") / "tiny-qwen25vl", tiny_tokenizer_dir, v25=True)


# --- LLaVA-OneVision (tests/test_mmproj.py, tests/test_video_*.py) ----------------------------

# <image> and <video> placeholders the LLaVA-OneVision processor needs, added after the tiny
# tokenizer's own tokens (ids TINY_VOCAB_SIZE and TINY_VOCAB_SIZE + 1, below TINY_MODEL_VOCAB).
LLAVA_OV_ADDED_TOKENS = ("<image>", "<video>")
LLAVA_OV_IMAGE_TOKEN_ID = TINY_VOCAB_SIZE
LLAVA_OV_VIDEO_TOKEN_ID = TINY_VOCAB_SIZE + 1
LLAVA_OV_IMAGE_SIZE = 56  # 4x4 patches of 14: tiny frames


def _tiny_tokenizer_with_media_tokens(src: Path, out: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_tokens([AddedToken(text, special=True, normalized=False) for text in LLAVA_OV_ADDED_TOKENS])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    for i, text in enumerate(LLAVA_OV_ADDED_TOKENS):
        config["added_tokens_decoder"][str(TINY_VOCAB_SIZE + i)] = {
            "content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
    config["image_token"], config["video_token"] = LLAVA_OV_ADDED_TOKENS
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def build_tiny_llava_ov(out: Path, tokenizer_dir: Path, text_model_type: str = "qwen2", **save_kwargs) -> Path:
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, image_size=LLAVA_OV_IMAGE_SIZE, patch_size=14,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
    text = dict(model_type=text_model_type, **_lm_sizes(rope_theta=1e6))
    s = LLAVA_OV_IMAGE_SIZE
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=LLAVA_OV_IMAGE_TOKEN_ID,
        video_token_index=LLAVA_OV_VIDEO_TOKEN_ID, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]], tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # the newline embedding is initialised to zeros-ish; make it informative
        model.model.image_newline.normal_()
    model.save_pretrained(out, **save_kwargs)
    _tiny_tokenizer_with_media_tokens(tokenizer_dir, out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaOnevisionImageProcessor", "do_resize": True, "resample": 3,
        "size": {"height": s, "width": s}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255, "image_grid_pinpoints": config.image_grid_pinpoints}, indent=2), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_llava_ov_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """LlavaOnevisionForConditionalGeneration: SigLIP (2 layers, hidden 32, 56x56 images), 2-layer GELU
    projector, image_newline, Qwen2 LM like tiny_qwen2 (untied); the tiny tokenizer plus <image> and
    <video>; a preprocessor_config.json with llava-hf's 0.5 mean/std."""
    return build_tiny_llava_ov(tmp_path_factory.mktemp("llava-ov") / "tiny-llava-ov", tiny_tokenizer_dir)
