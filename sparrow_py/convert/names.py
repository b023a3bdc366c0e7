"""THE table of GGUF names for the language models Sparrow converts.

Every GGUF metadata key and tensor name the converter writes comes from this module, and the
C++ runtime's table (runtime/src/models/) mirrors it. The strings are facts taken from
llama.cpp's gguf-py (constants.py: Keys, MODEL_ARCH_NAMES, TENSOR_NAMES, MODEL_TENSORS) so that
our files load in llama.cpp and theirs load here; tests/test_convert.py checks each string
against the installed `gguf` package, so a drift is caught rather than silently shipped.

Only the subset used by the supported architectures is listed; add rows here (and nowhere else)
when an architecture or tensor is added.
"""

from __future__ import annotations

import re

# --- architectures -------------------------------------------------------------------------

# the architecture tables live in sparrow_py.architectures (the trainer reads them too, without gguf)
from ..architectures import ARCH_LLAMA, ARCH_QWEN2, ARCH_QWEN2VL  # noqa: F401


# --- metadata keys ---------------------------------------------------------------------------
# "{arch}" is replaced by general.architecture.

class Keys:
    # general
    ARCHITECTURE = "general.architecture"
    TYPE = "general.type"
    NAME = "general.name"
    FILE_TYPE = "general.file_type"
    QUANTIZATION_VERSION = "general.quantization_version"
    SAMPLING_TOP_K = "general.sampling.top_k"
    SAMPLING_TOP_P = "general.sampling.top_p"
    SAMPLING_TEMP = "general.sampling.temp"

    # language model hyper-parameters
    VOCAB_SIZE = "{arch}.vocab_size"
    CONTEXT_LENGTH = "{arch}.context_length"
    EMBEDDING_LENGTH = "{arch}.embedding_length"
    BLOCK_COUNT = "{arch}.block_count"
    FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
    HEAD_COUNT = "{arch}.attention.head_count"
    HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
    KEY_LENGTH = "{arch}.attention.key_length"
    VALUE_LENGTH = "{arch}.attention.value_length"
    LAYERNORM_RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
    ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
    ROPE_DIMENSION_SECTIONS = "{arch}.rope.dimension_sections"
    ROPE_FREQ_BASE = "{arch}.rope.freq_base"
    ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
    ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
    ROPE_SCALING_ORIG_CTX_LEN = "{arch}.rope.scaling.original_context_length"

    # tokenizer
    TOKENIZER_MODEL = "tokenizer.ggml.model"
    TOKENIZER_PRE = "tokenizer.ggml.pre"
    TOKENS = "tokenizer.ggml.tokens"
    TOKEN_TYPE = "tokenizer.ggml.token_type"
    MERGES = "tokenizer.ggml.merges"
    CHAT_TEMPLATE = "tokenizer.chat_template"


# Special-token roles llama.cpp's SpecialVocab looks up, in its order ("eot" is added when the
# post-processor template shows one), and the keys their ids and add-flags are stored under.
# The spellings are llama.cpp's, typo included; roles without a key (cls) are not written.
SPECIAL_TOKEN_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
SPECIAL_TOKEN_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}
ADD_SPECIAL_TOKEN_KEYS = {
    "bos": "tokenizer.ggml.add_bos_token",
    "eos": "tokenizer.ggml.add_eos_token",
    "sep": "tokenizer.ggml.add_sep_token",
}


# tokenizer.ggml.token_type values (llama.cpp's llama_token_type / gguf.TokenType)
class TokenType:
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# tokenizer.ggml.pre values we can detect (see tokenizer.py for how)
PRE_QWEN2 = "qwen2"
PRE_LLAMA3 = "llama-bpe"
PRE_GPT2 = "gpt-2"
PRE_SMOLLM = "smollm"


# --- tensors -------------------------------------------------------------------------------

class Tensor:
    TOKEN_EMBD = "token_embd"
    OUTPUT_NORM = "output_norm"
    OUTPUT = "output"
    ROPE_FREQS = "rope_freqs"
    ATTN_NORM = "blk.{bid}.attn_norm"
    ATTN_Q = "blk.{bid}.attn_q"
    ATTN_K = "blk.{bid}.attn_k"
    ATTN_V = "blk.{bid}.attn_v"
    ATTN_OUT = "blk.{bid}.attn_output"
    FFN_NORM = "blk.{bid}.ffn_norm"
    FFN_GATE = "blk.{bid}.ffn_gate"
    FFN_UP = "blk.{bid}.ffn_up"
    FFN_DOWN = "blk.{bid}.ffn_down"


_LM_TENSORS = (
    Tensor.TOKEN_EMBD, Tensor.OUTPUT_NORM, Tensor.OUTPUT,
    Tensor.ATTN_NORM, Tensor.ATTN_Q, Tensor.ATTN_K, Tensor.ATTN_V, Tensor.ATTN_OUT,
    Tensor.FFN_NORM, Tensor.FFN_GATE, Tensor.FFN_UP, Tensor.FFN_DOWN,
)

# Tensors each architecture may hold (a subset of llama.cpp's MODEL_TENSORS for that arch).
ARCH_TENSORS: dict[str, tuple[str, ...]] = {
    ARCH_LLAMA: (Tensor.ROPE_FREQS, *_LM_TENSORS),
    ARCH_QWEN2: _LM_TENSORS,
    ARCH_QWEN2VL: _LM_TENSORS,
}

# Hugging Face module path, relative to the language model's root (see LM_PREFIXES), -> GGUF base
# name. "{bid}" is the block index; ".weight"/".bias" carry over unchanged.
HF_TENSORS: dict[str, str] = {
    "embed_tokens": Tensor.TOKEN_EMBD,
    "norm": Tensor.OUTPUT_NORM,
    "lm_head": Tensor.OUTPUT,
    "layers.{bid}.input_layernorm": Tensor.ATTN_NORM,
    "layers.{bid}.self_attn.q_proj": Tensor.ATTN_Q,
    "layers.{bid}.self_attn.k_proj": Tensor.ATTN_K,
    "layers.{bid}.self_attn.v_proj": Tensor.ATTN_V,
    "layers.{bid}.self_attn.o_proj": Tensor.ATTN_OUT,
    "layers.{bid}.post_attention_layernorm": Tensor.FFN_NORM,
    "layers.{bid}.mlp.gate_proj": Tensor.FFN_GATE,
    "layers.{bid}.mlp.up_proj": Tensor.FFN_UP,
    "layers.{bid}.mlp.down_proj": Tensor.FFN_DOWN,
}

# Where the language model lives in the checkpoints seen in the wild, most specific first:
# transformers >= 4.52 saves VLMs as model.language_model.*, older ones and the LLMs as model.*;
# the LM head sits at the root or under the model / language_model.
LM_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
LM_HEAD_NAMES = ("lm_head.", "model.lm_head.", "language_model.lm_head.")

# Vision-tower and projector weights of the VLMs: skipped by the LM conversion (a later --mmproj
# conversion writes them into the clip/mmproj file).
VISION_PREFIXES = ("visual.", "model.visual.", "vision_tower.", "model.vision_tower.",
                   "multi_modal_projector.", "model.multi_modal_projector.",
                   "image_newline", "model.image_newline")  # LLaVA-OneVision's newline embedding

# Buffers some checkpoints carry that are not weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _hf_pattern(module: str) -> re.Pattern[str]:
    return re.compile(re.escape(module).replace(re.escape("{bid}"), r"(?P<bid>\d+)")
                      + r"\.(?P<kind>weight|bias)")


_HF_PATTERNS = [(_hf_pattern(hf), gguf_name) for hf, gguf_name in HF_TENSORS.items()]


def hf_to_gguf_name(hf_name: str) -> str | None:
    """Map a checkpoint tensor name to its GGUF name, or None if it is not a language-model weight
    this table knows. The caller decides whether an unknown name is an error or skipped."""
    for head in LM_HEAD_NAMES:
        if hf_name.startswith(head):
            rel = "lm_head." + hf_name[len(head):]
            break
    else:
        for prefix in LM_PREFIXES:
            if hf_name.startswith(prefix):
                rel = hf_name[len(prefix):]
                break
        else:
            return None
    for pattern, gguf_name in _HF_PATTERNS:
        if (m := pattern.fullmatch(rel)) is not None:
            base = gguf_name.format(bid=int(m["bid"])) if "{bid}" in gguf_name else gguf_name
            return f"{base}.{m['kind']}"
    return None


def is_vision_tensor(hf_name: str) -> bool:
    return hf_name.startswith(VISION_PREFIXES)


def is_ignored_tensor(hf_name: str) -> bool:
    return hf_name.endswith(IGNORED_SUFFIXES)
