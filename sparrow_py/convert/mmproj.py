"""Vision tower + projector -> a separate "mmproj" GGUF (general.architecture "clip",
general.type "mmproj"), the file llama.cpp's mtmd loads next to the language model.

Qwen2-VL / Qwen2.5-VL follow llama.cpp's convert_hf_to_gguf.py (MmprojModel, Qwen2VLVisionModel)
key for key and name for name, so either converter's file loads in either runtime:

- the Conv3D patch embedding [C_out, C_in, 2, P, P] is split along time into two Conv2D kernels,
  v.patch_embd.weight (t = 0) and v.patch_embd.weight.1 (t = 1); a deeper one (temporal_patch_size
  T > 2: a tower that sees T frames at once, which no released checkpoint has and llama.cpp cannot
  read) goes on with v.patch_embd.weight.2 ... .weight.{T-1}, and clip.vision.temporal_patch_size
  says T (written only then);
- the fused attn.qkv rows are split into equal thirds: attn_q, attn_k, attn_v;
- Qwen2.5-VL: clip.use_silu and clip.vision.n_wa_pattern = fullatt_block_indexes[0] + 1 (every
  n-th block uses full attention, the others windowed; the indexes must be evenly spaced);
- Qwen2-VL: clip.vision.feed_forward_length is the vision config's hidden_size, as llama.cpp
  writes it (its clip code reads the MLP size from the tensors).

LLaVA-OneVision has no llama.cpp convention; ours is in docs/mmproj.md (projector type
"llava_onevision").

Types follow llama.cpp: 1-D tensors, biases, norms and position embeddings f32; the patch
embedding f16 under --outtype f16 and f32 otherwise; other matrices the --outtype (q8_0 falls
back to f16 for rows that are not whole 32-element blocks).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from . import quantize
from .errors import ConvertError
from .write import write_streamed
from .lm import Summary, _progress, _write_general, load_config
from .safetensors_reader import Checkpoint

logger = logging.getLogger("sparrow.convert")

Q = gguf.GGMLQuantizationType

ARCH_CLIP = "clip"
PROJECTOR_QWEN2VL = "qwen2vl_merger"
PROJECTOR_QWEN25VL = "qwen2.5vl_merger"
PROJECTOR_LLAVA_ONEVISION = "llava_onevision"

# HF architectures[0] -> projector type
HF_VISION_ARCHITECTURES: dict[str, str] = {
    "Qwen2VLForConditionalGeneration": PROJECTOR_QWEN2VL,
    "Qwen2_5_VLForConditionalGeneration": PROJECTOR_QWEN25VL,
    "LlavaOnevisionForConditionalGeneration": PROJECTOR_LLAVA_ONEVISION,
}

MMPROJ_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class Keys:
    """GGUF metadata keys of the clip file (gguf-py's Keys.Clip / Keys.ClipVision / clip-impl.h)."""
    PROJECTOR_TYPE = "clip.projector_type"
    HAS_VISION_ENCODER = "clip.has_vision_encoder"
    USE_GELU = "clip.use_gelu"
    USE_SILU = "clip.use_silu"
    IMAGE_SIZE = "clip.vision.image_size"
    PATCH_SIZE = "clip.vision.patch_size"
    EMBEDDING_LENGTH = "clip.vision.embedding_length"
    FEED_FORWARD_LENGTH = "clip.vision.feed_forward_length"
    PROJECTION_DIM = "clip.vision.projection_dim"
    BLOCK_COUNT = "clip.vision.block_count"
    HEAD_COUNT = "clip.vision.attention.head_count"
    LAYERNORM_EPS = "clip.vision.attention.layer_norm_epsilon"
    IMAGE_MEAN = "clip.vision.image_mean"
    IMAGE_STD = "clip.vision.image_std"
    N_WA_PATTERN = "clip.vision.n_wa_pattern"
    TEMPORAL_PATCH_SIZE = "clip.vision.temporal_patch_size"  # ours: only where it is not 2
    # llama.cpp keys (clip-impl.h) used by our llava_onevision convention
    FEATURE_LAYER = "clip.vision.feature_layer"
    IMAGE_GRID_PINPOINTS = "clip.vision.image_grid_pinpoints"
    MM_PATCH_MERGE_TYPE = "clip.vision.mm_patch_merge_type"
    # Sparrow's own keys for llava_onevision (no llama.cpp equivalent)
    FEATURE_SELECT_STRATEGY = "clip.vision.feature_select_strategy"
    VISION_ASPECT_RATIO = "clip.vision.vision_aspect_ratio"
    # Sparrow's own key for qwen2.5vl_merger: M-RoPE temporal positions step by
    # tokens_per_second x second_per_grid_ts (llama.cpp does not scale them)
    TOKENS_PER_SECOND = "clip.vision.tokens_per_second"


class Tensor:
    """GGUF tensor base names (gguf-py's TENSOR_NAMES for MODEL_TENSOR.V_*, clip-impl.h TN_*)."""
    PATCH_EMBD = "v.patch_embd"
    POS_EMBD = "v.position_embd"
    ATTN_Q = "v.blk.{bid}.attn_q"
    ATTN_K = "v.blk.{bid}.attn_k"
    ATTN_V = "v.blk.{bid}.attn_v"
    ATTN_OUT = "v.blk.{bid}.attn_out"
    LN1 = "v.blk.{bid}.ln1"
    LN2 = "v.blk.{bid}.ln2"
    FFN_UP = "v.blk.{bid}.ffn_up"
    FFN_GATE = "v.blk.{bid}.ffn_gate"
    FFN_DOWN = "v.blk.{bid}.ffn_down"
    POST_NORM = "v.post_ln"
    MM = "mm.{bid}"
    IMAGE_NEWLINE = "model.image_newline"


# Qwen vision weights, relative to the tower's root, -> GGUF base name. ("qkv" and the patch
# embedding are split, see _qwen_sources.)
_QWEN_BLOCK_TENSORS = {
    "norm1": Tensor.LN1, "norm2": Tensor.LN2, "attn.proj": Tensor.ATTN_OUT,
    "mlp.fc1": Tensor.FFN_UP, "mlp.fc2": Tensor.FFN_DOWN,  # Qwen2-VL (GELU MLP)
    "mlp.gate_proj": Tensor.FFN_GATE, "mlp.up_proj": Tensor.FFN_UP, "mlp.down_proj": Tensor.FFN_DOWN,  # 2.5
}
_QWEN_PREFIXES = ("model.visual.", "visual.")

_SIGLIP_BLOCK_TENSORS = {
    "self_attn.q_proj": Tensor.ATTN_Q, "self_attn.k_proj": Tensor.ATTN_K, "self_attn.v_proj": Tensor.ATTN_V,
    "self_attn.out_proj": Tensor.ATTN_OUT, "layer_norm1": Tensor.LN1, "layer_norm2": Tensor.LN2,
    "mlp.fc1": Tensor.FFN_UP, "mlp.fc2": Tensor.FFN_DOWN,
}
_SIGLIP_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.",
                    "model.vision_tower.", "vision_tower.")
_LLAVA_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
# linear_1 -> mm.0, linear_2 -> mm.2: llama.cpp's LLaVA MLP projector layout (mm.0, GELU, mm.2)
_LLAVA_PROJECTOR_TENSORS = {"linear_1": "mm.0", "linear_2": "mm.2"}
_LLAVA_NEWLINE_NAMES = ("model.image_newline", "image_newline")
# SigLIP parts LLaVA-OneVision never uses: it takes hidden_states[vision_feature_layer], which
# is before post_layernorm, and has no pooling head.
_SIGLIP_UNUSED = re.compile(r"(post_layernorm|head)\..*")


@dataclass
class _Source:
    """How to produce one GGUF tensor from the checkpoint."""
    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    source: str
    qtype: Q = Q.F32  # decided once all sources are known


def _strip(name: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def _rows(ckpt: Checkpoint, hf_name: str, part: int, parts: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        data = ckpt.load_f32(hf_name)
        rows = data.shape[0] // parts
        return np.ascontiguousarray(data[part * rows:(part + 1) * rows])
    return load


def _time_slice(ckpt: Checkpoint, hf_name: str, t: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return np.ascontiguousarray(ckpt.load_f32(hf_name)[:, :, t])
    return load


def _whole(ckpt: Checkpoint, hf_name: str) -> Callable[[], np.ndarray]:
    return lambda: ckpt.load_f32(hf_name)


def _need(cfg: dict[str, Any], key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise ConvertError(f"{where}: vision_config has no {key!r}")
    return cfg[key]


# --- Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------------

def _qwen_sources(ckpt: Checkpoint, vision: dict[str, Any], projector: str, where: str) -> list[_Source]:
    depth = int(_need(vision, "depth", where))
    tp = temporal_patch_size(vision, where)
    rel_names: dict[str, str] = {}
    for hf_name in ckpt.names():
        rel = _strip(hf_name, _QWEN_PREFIXES)
        if rel is not None:
            rel_names[rel] = hf_name
    if not rel_names:
        raise ConvertError(f"{ckpt.model_dir}: no vision tower weights (visual.* / model.visual.*) in the checkpoint")

    out: list[_Source] = []
    used: set[str] = set()

    def take(rel: str) -> str:
        if rel not in rel_names:
            raise ConvertError(f"{ckpt.model_dir}: missing vision tensor 'visual.{rel}'")
        used.add(rel)
        return rel_names[rel]

    patch = take("patch_embed.proj.weight")
    shape = ckpt.info(patch).shape
    if len(shape) != 5 or shape[2] != tp:
        raise ConvertError(f"{ckpt.model_dir}: {patch} has shape {list(shape)}, expected [C_out, C_in, {tp}, P, P]")
    per_frame = (shape[0], shape[1], shape[3], shape[4])
    for t in range(tp):
        out.append(_Source(f"{Tensor.PATCH_EMBD}.weight" + (f".{t}" if t else ""), per_frame,
                           _time_slice(ckpt, patch, t), patch))

    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if projector == PROJECTOR_QWEN25VL else ("mlp.fc1", "mlp.fc2")
    kinds = ("weight",) if projector == PROJECTOR_QWEN25VL else ("weight", "bias")  # RMSNorm vs LayerNorm
    for bid in range(depth):
        blk = f"blocks.{bid}."
        for norm in ("norm1", "norm2"):
            for kind in kinds:
                hf = take(f"{blk}{norm}.{kind}")
                out.append(_Source(f"{_QWEN_BLOCK_TENSORS[norm].format(bid=bid)}.{kind}", ckpt.info(hf).shape,
                                   _whole(ckpt, hf), hf))
        for kind in ("weight", "bias"):
            hf = take(f"{blk}attn.qkv.{kind}")
            qkv_shape = ckpt.info(hf).shape
            if qkv_shape[0] % 3:
                raise ConvertError(f"{ckpt.model_dir}: {hf} has {qkv_shape[0]} rows, not a multiple of 3")
            part_shape = (qkv_shape[0] // 3, *qkv_shape[1:])
            for i, base in enumerate((Tensor.ATTN_Q, Tensor.ATTN_K, Tensor.ATTN_V)):
                out.append(_Source(f"{base.format(bid=bid)}.{kind}", part_shape, _rows(ckpt, hf, i, 3), hf))
        for module in ("attn.proj", *mlp):
            for kind in ("weight", "bias"):
                hf = take(f"{blk}{module}.{kind}")
                out.append(_Source(f"{_QWEN_BLOCK_TENSORS[module].format(bid=bid)}.{kind}", ckpt.info(hf).shape,
                                   _whole(ckpt, hf), hf))
    for kind in kinds:
        hf = take(f"merger.ln_q.{kind}")
        out.append(_Source(f"{Tensor.POST_NORM}.{kind}", ckpt.info(hf).shape, _whole(ckpt, hf), hf))
    for layer in (0, 2):
        for kind in ("weight", "bias"):
            hf = take(f"merger.mlp.{layer}.{kind}")
            out.append(_Source(f"{Tensor.MM.format(bid=layer)}.{kind}", ckpt.info(hf).shape, _whole(ckpt, hf), hf))

    extra = sorted(set(rel_names) - used)
    if extra:
        raise ConvertError(f"{ckpt.model_dir}: unexpected vision tensor {rel_names[extra[0]]!r} "
                           f"(vision_config says depth {depth})")
    return out


# the runtime's limit on the Conv3D's depth (runtime/src/models/vision.h kMaxTemporalPatch)
MAX_TEMPORAL_PATCH = 16


def temporal_patch_size(vision: dict[str, Any], where: str) -> int:
    tp = int(vision.get("temporal_patch_size", 2))
    if not 2 <= tp <= MAX_TEMPORAL_PATCH:
        raise ConvertError(f"{where}: temporal_patch_size {tp} (2 to {MAX_TEMPORAL_PATCH} are supported)")
    return tp


def _qwen_keys(w: gguf.GGUFWriter, config: dict[str, Any], vision: dict[str, Any], projector: str,
               where: str) -> None:
    if projector == PROJECTOR_QWEN2VL:
        # llama.cpp renames: embed_dim is the width; hidden_size (the merger's output) is written
        # as the feed-forward length.
        n_embd, n_ff = _need(vision, "embed_dim", where), _need(vision, "hidden_size", where)
    else:
        n_embd, n_ff = _need(vision, "hidden_size", where), _need(vision, "intermediate_size", where)
    w.add_uint32(Keys.IMAGE_SIZE, int(vision.get("image_size", 560)))
    w.add_uint32(Keys.PATCH_SIZE, int(_need(vision, "patch_size", where)))
    w.add_uint32(Keys.EMBEDDING_LENGTH, int(n_embd))
    w.add_uint32(Keys.FEED_FORWARD_LENGTH, int(n_ff))
    w.add_uint32(Keys.BLOCK_COUNT, int(_need(vision, "depth", where)))
    w.add_uint32(Keys.HEAD_COUNT, int(_need(vision, "num_heads", where)))
    w.add_string(Keys.PROJECTOR_TYPE, projector)
    if (tp := temporal_patch_size(vision, where)) != 2:
        w.add_uint32(Keys.TEMPORAL_PATCH_SIZE, tp)
    if projector == PROJECTOR_QWEN25VL:
        w.add_bool(Keys.USE_SILU, True)
        full = vision.get("fullatt_block_indexes")
        if not full:
            raise ConvertError(f"{where}: vision_config has no 'fullatt_block_indexes' (needed for Qwen2.5-VL)")
        pattern = int(full[0]) + 1
        if any(b - a != pattern for a, b in zip(full, full[1:])):
            raise ConvertError(f"{where}: fullatt_block_indexes {full} are not evenly spaced "
                               f"(llama.cpp's n_wa_pattern cannot express them)")
        w.add_uint32(Keys.N_WA_PATTERN, pattern)
        # transformers' class default (4) when config.json has none; released checkpoints say 2
        w.add_float32(Keys.TOKENS_PER_SECOND, float(vision.get("tokens_per_second", 4)))
    # llama.cpp reads the top-level rms_norm_eps (default 1e-6), whatever the vision norm is
    w.add_float32(Keys.LAYERNORM_EPS, float(config.get("rms_norm_eps", 1e-6)))


# --- LLaVA-OneVision -------------------------------------------------------------------------

def _llava_sources(ckpt: Checkpoint, vision: dict[str, Any], where: str) -> list[_Source]:
    n_layer = int(_need(vision, "num_hidden_layers", where))
    tower: dict[str, str] = {}
    projector: dict[str, str] = {}
    newline = None
    for hf_name in ckpt.names():
        if (rel := _strip(hf_name, _SIGLIP_PREFIXES)) is not None:
            tower.setdefault(rel, hf_name)
        elif (rel := _strip(hf_name, _LLAVA_PROJECTOR_PREFIXES)) is not None:
            projector[rel] = hf_name
        elif hf_name in _LLAVA_NEWLINE_NAMES:
            newline = hf_name
    if not tower:
        raise ConvertError(f"{ckpt.model_dir}: no vision tower weights (vision_tower.* / model.vision_tower.*) "
                           f"in the checkpoint")

    out: list[_Source] = []
    used: set[str] = set()

    def take(table: dict[str, str], rel: str, what: str) -> str:
        if rel not in table:
            raise ConvertError(f"{ckpt.model_dir}: missing {what} tensor {rel!r}")
        used.add(table[rel])
        return table[rel]

    def add(gguf_name: str, hf: str) -> None:
        out.append(_Source(gguf_name, ckpt.info(hf).shape, _whole(ckpt, hf), hf))

    for kind in ("weight", "bias"):
        add(f"{Tensor.PATCH_EMBD}.{kind}", take(tower, f"embeddings.patch_embedding.{kind}", "vision"))
    add(f"{Tensor.POS_EMBD}.weight", take(tower, "embeddings.position_embedding.weight", "vision"))
    for bid in range(n_layer):
        for module, base in _SIGLIP_BLOCK_TENSORS.items():
            for kind in ("weight", "bias"):
                add(f"{base.format(bid=bid)}.{kind}", take(tower, f"encoder.layers.{bid}.{module}.{kind}", "vision"))
    for hf_module, gguf_base in _LLAVA_PROJECTOR_TENSORS.items():
        for kind in ("weight", "bias"):
            add(f"{gguf_base}.{kind}", take(projector, f"{hf_module}.{kind}", "projector"))
    if newline is None:
        raise ConvertError(f"{ckpt.model_dir}: missing tensor 'image_newline' (LLaVA-OneVision's newline embedding)")
    add(f"{Tensor.IMAGE_NEWLINE}", newline)
    out[-1].name = Tensor.IMAGE_NEWLINE  # a bare parameter: no .weight suffix, as llama.cpp names it

    for hf_name in list(tower.values()) + list(projector.values()):
        if hf_name in used:
            continue
        rel = _strip(hf_name, _SIGLIP_PREFIXES)
        if rel is not None and _SIGLIP_UNUSED.fullmatch(rel):
            logger.info(f"skipping {hf_name} (not used by LLaVA-OneVision)")
            continue
        raise ConvertError(f"{ckpt.model_dir}: unexpected vision tensor {hf_name!r} "
                           f"(vision_config says {n_layer} layers)")
    return out


def _llava_keys(w: gguf.GGUFWriter, config: dict[str, Any], vision: dict[str, Any], where: str) -> None:
    w.add_string(Keys.PROJECTOR_TYPE, PROJECTOR_LLAVA_ONEVISION)
    w.add_uint32(Keys.IMAGE_SIZE, int(_need(vision, "image_size", where)))
    w.add_uint32(Keys.PATCH_SIZE, int(_need(vision, "patch_size", where)))
    w.add_uint32(Keys.EMBEDDING_LENGTH, int(_need(vision, "hidden_size", where)))
    w.add_uint32(Keys.FEED_FORWARD_LENGTH, int(_need(vision, "intermediate_size", where)))
    w.add_uint32(Keys.BLOCK_COUNT, int(_need(vision, "num_hidden_layers", where)))
    w.add_uint32(Keys.HEAD_COUNT, int(_need(vision, "num_attention_heads", where)))
    w.add_float32(Keys.LAYERNORM_EPS, float(vision.get("layer_norm_eps", 1e-6)))
    act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu"):
        raise ConvertError(f"{where}: unsupported vision hidden_act {act!r}")
    w.add_bool(Keys.USE_GELU, True)
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ConvertError(f"{where}: unsupported projector_hidden_act {config['projector_hidden_act']!r}")
    layers = config.get("vision_feature_layer", -1)
    layers = [int(x) for x in layers] if isinstance(layers, list) else [int(layers)]
    w.add_array(Keys.FEATURE_LAYER, layers)
    w.add_string(Keys.FEATURE_SELECT_STRATEGY, str(config.get("vision_feature_select_strategy", "full")))
    pinpoints = config.get("image_grid_pinpoints") or []
    w.add_array(Keys.IMAGE_GRID_PINPOINTS, [int(v) for pair in pinpoints for v in pair])
    w.add_string(Keys.MM_PATCH_MERGE_TYPE, "spatial_unpad")
    w.add_string(Keys.VISION_ASPECT_RATIO, str(config.get("vision_aspect_ratio", "anyres_max_9")))


# --- shared ----------------------------------------------------------------------------------

def choose_type(name: str, shape: tuple[int, ...], outtype: str) -> Q:
    """llama.cpp's rule for mmproj tensors (MmprojModel.tensor_force_quant + prepare_tensors)."""
    default = quantize.OUTTYPES[outtype][0]
    if ".patch_embd.weight" in name:  # also catches the other slices, v.patch_embd.weight.1 ...
        return Q.F16 if outtype == "f16" else Q.F32
    if name.startswith(Tensor.POS_EMBD) or name == Tensor.IMAGE_NEWLINE:
        return Q.F32
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[default][0]
    if shape[-1] % block:
        logger.info(f"{name}: F16 instead of {outtype.upper()}: row length {shape[-1]} is not a multiple of {block}")
        return Q.F16
    return default


def _mean_std(model_dir: Path) -> tuple[list[float], list[float]]:
    from ..video._config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, read_preprocessor_config
    raw = read_preprocessor_config(model_dir, "preprocessor_config.json")
    if raw.get("image_mean") is None or raw.get("image_std") is None:
        logger.warning(f"{model_dir}: no image_mean/image_std in preprocessor_config.json; writing the "
                       f"processor defaults (OpenAI CLIP)")
        return list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    return [float(v) for v in raw["image_mean"]], [float(v) for v in raw["image_std"]]


def convert_mmproj(model_dir: str | Path, outfile: str | Path, outtype: str = "f16", *,
                   progress: bool = True) -> Summary:
    """Write the vision tower + projector of a Hugging Face VLM folder to an mmproj GGUF."""
    model_dir, outfile = Path(model_dir), Path(outfile)
    if outtype not in MMPROJ_OUTTYPES:
        raise ConvertError(f"--outtype {outtype} is not available for --mmproj (choose from "
                           f"{', '.join(MMPROJ_OUTTYPES)}, as llama.cpp)")
    config = load_config(model_dir)
    where = str(model_dir / "config.json")
    archs = config.get("architectures") or []
    if not archs or archs[0] not in HF_VISION_ARCHITECTURES:
        found = repr(archs[0]) if archs else "no 'architectures' entry"
        raise ConvertError(f"{where}: not a vision-language model --mmproj converts ({found}; supported: "
                           f"{', '.join(HF_VISION_ARCHITECTURES)})")
    projector = HF_VISION_ARCHITECTURES[archs[0]]
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        raise ConvertError(f"{where}: no vision_config")
    text = {**config, **(config.get("text_config") or {})}
    if not text.get("hidden_size"):
        raise ConvertError(f"{where}: no hidden_size for the language model (projection_dim)")

    ckpt = Checkpoint(model_dir)
    try:
        if projector == PROJECTOR_LLAVA_ONEVISION:
            sources = _llava_sources(ckpt, vision, where)
        else:
            sources = _qwen_sources(ckpt, vision, projector, where)
        for s in sources:
            dtype = ckpt.info(s.source).dtype
            if dtype not in ("F32", "F16", "BF16"):
                raise ConvertError(f"{ckpt.model_dir}: tensor {s.source!r} has unsupported dtype {dtype}")
        for s in sources:
            s.qtype = choose_type(s.name, s.shape, outtype)
        mean, std = _mean_std(model_dir)

        w = gguf.GGUFWriter(path=None, arch=ARCH_CLIP)
        w.add_type(gguf.GGUFType.MMPROJ)
        _write_general(w, model_dir, sum(int(np.prod(s.shape)) for s in sources))
        w.add_file_type(quantize.file_type(outtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_bool(Keys.HAS_VISION_ENCODER, True)
        w.add_uint32(Keys.PROJECTION_DIM, int(text["hidden_size"]))
        w.add_array(Keys.IMAGE_MEAN, mean)
        w.add_array(Keys.IMAGE_STD, std)
        if projector == PROJECTOR_LLAVA_ONEVISION:
            _llava_keys(w, config, vision, where)
        else:
            _qwen_keys(w, config, vision, projector, where)
        for s in sources:
            w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), quantize.nbytes(s.shape, s.qtype),
                              raw_dtype=s.qtype)

        def tensor_data():
            for s in _progress(sources, progress):
                data = s.load()
                if data.shape != s.shape:
                    raise ConvertError(f"{ckpt.model_dir}: {s.source} gave shape {list(data.shape)} for {s.name}, "
                                       f"expected {list(s.shape)}")
                yield quantize.convert(np.ascontiguousarray(data, dtype=np.float32), s.qtype)

        write_streamed(w, outfile, tensor_data())
    finally:
        ckpt.close()

    counts = Counter(s.qtype.name for s in sources)
    return Summary(outfile, f"{ARCH_CLIP}/{projector}", len(sources), dict(counts), outfile.stat().st_size, 0)

