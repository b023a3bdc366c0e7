"""Language models -> GGUF: llama, qwen2 and the LM half of qwen2vl (Qwen2-VL, Qwen2.5-VL).

What is written follows llama.cpp's convert_hf_to_gguf.py (TextModel, LlamaModel, Qwen2Model,
Qwen2VLModel) so files are interchangeable with llama.cpp's:

- metadata: general.* (name etc. from gguf-py's Metadata heuristics, as llama.cpp), the hyper-
  parameters, then the tokenizer keys.
- tensors: HF names mapped through names.HF_TENSORS. Llama's Q/K rows are permuted from HF's
  "rotate half" (NEOX) layout to the interleaved-pair layout llama.cpp's NORM rope expects;
  qwen2/qwen2vl use NEOX rope and keep HF's layout (with their q/k/v biases).
- tied embeddings: no output.weight (the runtime reuses token_embd).

Conversion streams: the checkpoint is validated and a plan (name, shape, type) made from the
safetensors headers alone, the GGUF header and tensor index are written from the plan, then each
tensor is loaded, converted and written in turn, so at most one tensor is in memory.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from ..architectures import lm_architecture
from . import quantize
from .errors import ConvertError
from .names import (ADD_SPECIAL_TOKEN_KEYS, ARCH_LLAMA, ARCH_QWEN2, ARCH_QWEN2VL,
                    HF_TENSORS, SPECIAL_TOKEN_ID_KEYS, Keys, Tensor, hf_to_gguf_name,
                    is_ignored_tensor, is_vision_tensor)
from .safetensors_reader import Checkpoint
from .tokenizer import Vocab, load_vocab
from .write import write_streamed

logger = logging.getLogger("sparrow.convert")


# --- hyper-parameters ----------------------------------------------------------------------

@dataclass
class HParams:
    """The language model's hyper-parameters, from config.json (flat, or nested under text_config)."""
    arch: str
    raw: dict[str, Any]  # the merged config, for optional keys
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx: int | None
    rms_eps: float | None
    rope: dict[str, Any]  # rope_parameters (transformers >= 5) or rope_scaling, plus rope_theta
    tied: bool | None  # None: config doesn't say; decided by whether lm_head is stored

    @property
    def rope_theta(self) -> float | None:
        return self.rope.get("rope_theta")

    @property
    def rope_type(self) -> str | None:
        return self.rope.get("rope_type", self.rope.get("type"))


def load_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConvertError(f"{model_dir}: not a directory")
    if not path.is_file():
        raise ConvertError(f"{model_dir}: config.json not found (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: invalid JSON ({e})") from None


def architecture(config: dict[str, Any], config_path: Path) -> str:
    if not config.get("architectures"):
        raise ConvertError(f"{config_path}: no 'architectures' entry")
    try:
        return lm_architecture(config)
    except ValueError as e:
        raise ConvertError(f"{config_path}: {e}") from None


def load_hparams(config: dict[str, Any], arch: str, config_path: Path) -> HParams:
    # Newer transformers nest a VLM's LM settings under text_config; older ones keep them flat.
    # The nested values win, as in llama.cpp's load_hparams.
    hp = {**config, **(config.get("text_config") or {})}

    def need(*keys: str) -> Any:
        for k in keys:
            if hp.get(k) is not None:
                return hp[k]
        raise ConvertError(f"{config_path}: missing {keys[0]!r}")

    n_embd, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = hp.get("head_dim") or n_embd // n_head
    rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    if "rope_theta" not in rope and hp.get("rope_theta") is not None:
        rope["rope_theta"] = hp["rope_theta"]
    tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings"))
    h = HParams(
        arch=arch, raw=hp,
        n_vocab=int(need("vocab_size")), n_embd=n_embd, n_layer=int(need("num_hidden_layers")),
        n_head=n_head, n_head_kv=int(hp.get("num_key_value_heads") or n_head), head_dim=int(head_dim),
        n_ff=int(need("intermediate_size")),
        n_ctx=hp.get("max_position_embeddings"), rms_eps=hp.get("rms_norm_eps"),
        rope=rope, tied=tied,
    )
    if h.n_head % h.n_head_kv != 0:
        raise ConvertError(f"{config_path}: num_attention_heads {h.n_head} is not a multiple of "
                           f"num_key_value_heads {h.n_head_kv}")
    if h.head_dim % 2 != 0:
        raise ConvertError(f"{config_path}: head dimension {h.head_dim} is odd (rope needs pairs)")
    if arch == ARCH_QWEN2VL and not rope.get("mrope_section"):
        raise ConvertError(f"{config_path}: qwen2vl needs rope mrope_section")
    if arch == ARCH_LLAMA and hp.get("mlp_bias"):
        raise ConvertError(f"{config_path}: llama with mlp_bias is not supported")
    return h


def write_hparams(w: gguf.GGUFWriter, h: HParams, outtype: str) -> None:
    """The {arch}.* keys, in llama.cpp's order (TextModel.set_gguf_parameters, then the arch's)."""
    def key(k: str) -> str:
        return k.format(arch=h.arch)

    w.add_uint32(key(Keys.BLOCK_COUNT), h.n_layer)
    if h.n_ctx is not None:
        w.add_uint32(key(Keys.CONTEXT_LENGTH), int(h.n_ctx))
    w.add_uint32(key(Keys.EMBEDDING_LENGTH), h.n_embd)
    w.add_uint32(key(Keys.FEED_FORWARD_LENGTH), h.n_ff)
    w.add_uint32(key(Keys.HEAD_COUNT), h.n_head)
    w.add_uint32(key(Keys.HEAD_COUNT_KV), h.n_head_kv)
    if h.rope_theta is not None:
        w.add_float32(key(Keys.ROPE_FREQ_BASE), float(h.rope_theta))
    if h.rms_eps is not None:
        w.add_float32(key(Keys.LAYERNORM_RMS_EPS), float(h.rms_eps))
    if h.raw.get("head_dim") is not None:  # llama.cpp writes these only when the config has head_dim
        w.add_uint32(key(Keys.KEY_LENGTH), h.head_dim)
        w.add_uint32(key(Keys.VALUE_LENGTH), h.head_dim)
    w.add_uint32(Keys.FILE_TYPE, int(quantize.file_type(outtype)))

    if h.arch == ARCH_LLAMA:
        w.add_uint32(key(Keys.VOCAB_SIZE), h.n_vocab)
        w.add_uint32(key(Keys.ROPE_DIMENSION_COUNT), h.head_dim)
        if h.rope_type == "linear" and "factor" in h.rope:
            w.add_string(key(Keys.ROPE_SCALING_TYPE), "linear")
            w.add_float32(key(Keys.ROPE_SCALING_FACTOR), float(h.rope["factor"]))
    elif h.arch == ARCH_QWEN2:
        if h.rope_type == "yarn" and "factor" in h.rope:
            w.add_string(key(Keys.ROPE_SCALING_TYPE), "yarn")
            w.add_float32(key(Keys.ROPE_SCALING_FACTOR), float(h.rope["factor"]))
            w.add_uint32(key(Keys.ROPE_SCALING_ORIG_CTX_LEN), int(h.rope["original_max_position_embeddings"]))
    elif h.arch == ARCH_QWEN2VL:
        # llama.cpp's M-RoPE takes 4 sections (t, h, w, and a 4th used by other models): pad with 0
        sections = [int(s) for s in h.rope["mrope_section"]]
        w.add_array(key(Keys.ROPE_DIMENSION_SECTIONS), sections + [0] * max(0, 4 - len(sections)))


def write_vocab(w: gguf.GGUFWriter, v: Vocab) -> None:
    w.add_string(Keys.TOKENIZER_MODEL, "gpt2")
    w.add_string(Keys.TOKENIZER_PRE, v.pre)
    w.add_array(Keys.TOKENS, v.tokens)
    w.add_array(Keys.TOKEN_TYPE, v.token_types)
    w.add_array(Keys.MERGES, v.merges)
    for role, tid in v.special_ids.items():
        if role in SPECIAL_TOKEN_ID_KEYS:
            w.add_uint32(SPECIAL_TOKEN_ID_KEYS[role], tid)
    for role, flag in v.add_special.items():
        if role in ADD_SPECIAL_TOKEN_KEYS:
            w.add_bool(ADD_SPECIAL_TOKEN_KEYS[role], flag)
    if v.chat_template is not None:
        w.add_string(Keys.CHAT_TEMPLATE, v.chat_template)


# --- tensors -------------------------------------------------------------------------------

def permute_for_norm_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection (weight or bias) for llama.cpp's NORM rope.

    HF Llama rotates dimension i with i + head_dim/2 ("rotate half"); llama.cpp's NORM rope rotates
    adjacent pairs (2i, 2i+1). Within each head, row r of the half-split layout moves to
    2*(r mod head_dim/2) + r div (head_dim/2), exactly as convert_hf_to_gguf.py's LlamaModel.permute.
    """
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama3_rope_freqs(h: HParams) -> np.ndarray:
    """rope_freqs.weight for Llama 3.1-style rope scaling: per-frequency divisors (llama.cpp's
    generate_extra_tensors), so the runtime's plain rope reproduces HF's scaled frequencies."""
    base = float(h.rope.get("rope_theta", 10000.0))
    dim = h.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(h.rope.get("factor", 8.0))
    low_freq_factor = float(h.rope.get("low_freq_factor", 1.0))
    high_freq_factor = float(h.rope.get("high_freq_factor", 4.0))
    old_ctx = float(h.rope.get("original_max_position_embeddings",
                               h.raw.get("original_max_position_embeddings", 8192)))
    low_freq_wavelen, high_freq_wavelen = old_ctx / low_freq_factor, old_ctx / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # -> float32 data in GGUF layout (permuted where needed)
    source: str  # HF name, or "(generated)"


@dataclass
class Plan:
    tensors: list[PlannedTensor] = field(default_factory=list)
    skipped_vision: int = 0

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)


def expected_tensors(h: HParams, has_lm_head: bool) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy-order shape of every tensor the config implies, in GGUF order."""
    q_rows, kv_rows = h.n_head * h.head_dim, h.n_head_kv * h.head_dim
    tied = h.tied if h.tied is not None else not has_lm_head
    has_qkv_bias = h.arch in (ARCH_QWEN2, ARCH_QWEN2VL) or bool(h.raw.get("attention_bias"))
    out: dict[str, tuple[int, ...]] = {f"{Tensor.TOKEN_EMBD}.weight": (h.n_vocab, h.n_embd)}

    def t(name: str, kind: str, shape: tuple[int, ...]) -> None:
        out[f"{name.format(bid=bid)}.{kind}"] = shape

    for bid in range(h.n_layer):
        t(Tensor.ATTN_NORM, "weight", (h.n_embd,))
        t(Tensor.ATTN_Q, "weight", (q_rows, h.n_embd))
        t(Tensor.ATTN_K, "weight", (kv_rows, h.n_embd))
        t(Tensor.ATTN_V, "weight", (kv_rows, h.n_embd))
        if has_qkv_bias:
            t(Tensor.ATTN_Q, "bias", (q_rows,))
            t(Tensor.ATTN_K, "bias", (kv_rows,))
            t(Tensor.ATTN_V, "bias", (kv_rows,))
        t(Tensor.ATTN_OUT, "weight", (h.n_embd, q_rows))
        if h.arch == ARCH_LLAMA and h.raw.get("attention_bias"):
            t(Tensor.ATTN_OUT, "bias", (h.n_embd,))
        t(Tensor.FFN_NORM, "weight", (h.n_embd,))
        t(Tensor.FFN_GATE, "weight", (h.n_ff, h.n_embd))
        t(Tensor.FFN_UP, "weight", (h.n_ff, h.n_embd))
        t(Tensor.FFN_DOWN, "weight", (h.n_embd, h.n_ff))
    out[f"{Tensor.OUTPUT_NORM}.weight"] = (h.n_embd,)
    if not tied:
        out[f"{Tensor.OUTPUT}.weight"] = (h.n_vocab, h.n_embd)
    return out


def plan_tensors(ckpt: Checkpoint, h: HParams, outtype: str) -> Plan:
    """Match the checkpoint against what the config implies; refuse any inconsistency."""
    plan = Plan()
    source: dict[str, str] = {}  # GGUF name -> HF name
    for hf_name in ckpt.names():
        if is_vision_tensor(hf_name):
            plan.skipped_vision += 1
            continue
        if is_ignored_tensor(hf_name):
            continue
        gguf_name = hf_to_gguf_name(hf_name)
        if gguf_name is None:
            raise ConvertError(f"{ckpt.model_dir}: cannot map tensor {hf_name!r} to a {h.arch} GGUF tensor")
        if gguf_name in source:
            raise ConvertError(f"{ckpt.model_dir}: tensors {source[gguf_name]!r} and {hf_name!r} both map to {gguf_name}")
        source[gguf_name] = hf_name

    has_lm_head = f"{Tensor.OUTPUT}.weight" in source
    expected = expected_tensors(h, has_lm_head)
    if has_lm_head and f"{Tensor.OUTPUT}.weight" not in expected:
        logger.info(f"tie_word_embeddings: skipping {source.pop(f'{Tensor.OUTPUT}.weight')} (token_embd is reused)")
    for gguf_name, hf_name in source.items():
        if gguf_name not in expected:
            raise ConvertError(f"{ckpt.model_dir}: unexpected tensor {hf_name!r} for this config.json ({h.arch})")
    for gguf_name, shape in expected.items():
        if gguf_name not in source:
            raise ConvertError(f"{ckpt.model_dir}: missing tensor for {gguf_name} "
                               f"(e.g. {_hf_example(gguf_name)!r})")
        info = ckpt.info(source[gguf_name])
        if info.shape != shape:
            raise ConvertError(f"{info.file}: tensor {info.name!r} has shape {list(info.shape)}, "
                               f"config.json implies {list(shape)}")
        if info.dtype not in ("F32", "F16", "BF16"):
            raise ConvertError(f"{info.file}: tensor {info.name!r} has unsupported dtype {info.dtype}")

    output_name = f"{Tensor.OUTPUT}.weight" if f"{Tensor.OUTPUT}.weight" in expected else f"{Tensor.TOKEN_EMBD}.weight"

    def add(name: str, shape: tuple[int, ...], load: Callable[[], np.ndarray], src: str) -> None:
        choice = quantize.choose_type(name, shape, outtype, is_output=name == output_name)
        if choice.reason is not None and choice.qtype != gguf.GGMLQuantizationType.F32:
            logger.info(f"{name}: {choice.qtype.name} instead of {outtype.upper()}: {choice.reason}")
        plan.tensors.append(PlannedTensor(name, shape, choice.qtype, load, src))

    if h.arch == ARCH_LLAMA and h.rope_type == "llama3":
        freqs = llama3_rope_freqs(h)
        add(f"{Tensor.ROPE_FREQS}.weight", freqs.shape, lambda: freqs, "(generated)")
    for gguf_name, shape in expected.items():
        add(gguf_name, shape, _loader(ckpt, source[gguf_name], gguf_name, h), source[gguf_name])
    return plan


def _hf_example(gguf_name: str) -> str:
    """The usual HF name of a GGUF tensor, to make a "missing tensor" message actionable."""
    base, kind = gguf_name.rsplit(".", 1)
    parts = base.split(".")
    bid = parts[1] if parts[0] == "blk" else None
    for hf, g in HF_TENSORS.items():
        if (g.format(bid=bid) if bid is not None else g) == base:
            prefix = "" if hf == "lm_head" else "model."
            return f"{prefix}{hf.format(bid=bid)}.{kind}"
    return gguf_name


def _loader(ckpt: Checkpoint, hf_name: str, gguf_name: str, h: HParams) -> Callable[[], np.ndarray]:
    permute_heads = None
    if h.arch == ARCH_LLAMA:
        if gguf_name.startswith("blk.") and ".attn_q." in gguf_name:
            permute_heads = h.n_head
        elif gguf_name.startswith("blk.") and ".attn_k." in gguf_name:
            permute_heads = h.n_head_kv  # K has n_head_kv heads under GQA

    def load() -> np.ndarray:
        data = ckpt.load_f32(hf_name)
        return permute_for_norm_rope(data, permute_heads) if permute_heads else data
    return load


# --- the conversion ------------------------------------------------------------------------

@dataclass
class Summary:
    outfile: Path
    arch: str
    n_tensors: int
    type_counts: dict[str, int]
    file_size: int
    skipped_vision: int

    def lines(self) -> list[str]:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.type_counts.items()))
        return [f"wrote {self.outfile} ({self.arch}): {self.n_tensors} tensors ({types or 'vocab only'}), "
                f"{self.file_size / 2**20:.1f} MiB"] + (
            [f"skipped {self.skipped_vision} vision tensors (not part of the language model)"]
            if self.skipped_vision else [])


def _progress(items: list[PlannedTensor], enabled: bool):
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        for i, t in enumerate(items, 1):
            print(f"[{i}/{len(items)}] {t.name} {t.qtype.name} {list(t.shape)}", file=sys.stdout, flush=True)
            yield t
        return
    with tqdm(items, desc="writing", unit="tensor", file=sys.stdout) as bar:
        for t in bar:
            bar.set_postfix_str(t.name, refresh=False)
            yield t


def convert_lm(model_dir: Path, outfile: Path, outtype: str = "f16", *, vocab_only: bool = False,
               progress: bool = True) -> Summary:
    model_dir, outfile = Path(model_dir), Path(outfile)
    quantize.file_type(outtype)  # refuse a bad outtype before any work
    config = load_config(model_dir)
    config_path = model_dir / "config.json"
    arch = architecture(config, config_path)
    h = load_hparams(config, arch, config_path)
    vocab = load_vocab(model_dir, config, h.n_vocab)

    ckpt = None if vocab_only else Checkpoint(model_dir)
    try:
        plan = Plan() if ckpt is None else plan_tensors(ckpt, h, outtype)

        w = gguf.GGUFWriter(path=None, arch=arch)
        w.add_type(gguf.GGUFType.MODEL)
        _write_general(w, model_dir, plan.n_params)
        write_hparams(w, h, outtype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(w, vocab)
        for t in plan.tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), quantize.nbytes(t.shape, t.qtype), raw_dtype=t.qtype)

        write_streamed(w, outfile, (quantize.convert(t.load(), t.qtype) for t in _progress(plan.tensors, progress)))
    finally:
        if ckpt is not None:
            ckpt.close()

    counts = Counter(t.qtype.name for t in plan.tensors)
    return Summary(outfile, arch, len(plan.tensors), dict(counts), outfile.stat().st_size, plan.skipped_vision)


def _write_general(w: gguf.GGUFWriter, model_dir: Path, n_params: int) -> None:
    """general.name, basename, size_label, sampling defaults...: gguf-py's Metadata heuristics
    (model card, config, folder name, generation_config.json), exactly what llama.cpp writes."""
    meta = gguf.Metadata.load(None, model_dir, None, n_params)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and n_params > 0:
        meta.size_label = gguf.size_label(n_params, n_params, 0, 0)
    meta.set_gguf_meta_model(w)
