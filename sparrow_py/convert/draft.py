"""Sparrow draft folder (model.safetensors + config.json from sparrow_py.train) -> sparrow-draft GGUF.

general.architecture = "sparrow-draft". Tensor names are llama.cpp's eagle3 names (its
src/models/eagle3.cpp loader and gguf-py TENSOR_NAMES), plus glimpse_proj:

    fc.weight                  [H, nT*H]   g = fc(concat(taps))
    blk.0.attn_norm.weight     [H]         RMSNorm of the token embedding
    blk.0.attn_norm_2.weight   [H]         RMSNorm of g
    blk.0.attn_q/k/v.weight    [*, 2H]     HF (NEOX, rotate-half) row layout: not permuted
    blk.0.attn_output.weight, blk.0.ffn_norm.weight, blk.0.ffn_gate/up/down.weight
    output_norm.weight         [H]
    output.weight              [N, H]      only with a reduced draft vocabulary (else the target's head)
    d2t                        [N] i64     draft id -> absolute target id (llama.cpp's set_rows index)
    glimpse_proj.weight        [H, H]

and for each layer i >= 1 of a deeper draft (num_layers in config.json; block_count):

    blk.i.attn_norm.weight     [H]         RMSNorm of the layer below's output h
    blk.i.attn_q/k/v.weight    [*, H]
    blk.i.attn_output.weight, blk.i.ffn_norm.weight, blk.i.ffn_gate/up/down.weight

Shapes above are numpy (row-major) shapes, i.e. torch's (out, in); GGUF lists them reversed.
Keys: the usual per-arch hyper-parameters under sparrow-draft.* plus the spec v1 knobs (taps,
ivsb_layer, glimpses, anchors, window) and the target it fits (sparrow-draft.target.*).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from . import quantize
from .errors import ConvertError
from .names import Keys

logger = logging.getLogger("sparrow.convert")

ARCH_DRAFT = "sparrow-draft"
DRAFT_MODEL_TYPE = "sparrow-draft"   # config.json "model_type" of a draft folder (sparrow_py.train.model)
MAX_DRAFT_LAYERS = 16                # block_count the runtime loads (its kMaxDraftLayers; model.py's bound)


class DraftKeys(Keys):
    """Metadata keys; "{arch}" is sparrow-draft. The hyper-parameters a draft shares with language
    models (embedding_length, attention.head_count, rope.freq_base, ...) come from names.Keys; these
    are the draft's own."""
    TARGET_ARCH = "{arch}.target.architecture"
    TARGET_BLOCK_COUNT = "{arch}.target.block_count"
    TARGET_EMBEDDING_LENGTH = "{arch}.target.embedding_length"
    DRAFT_VOCAB_SIZE = "{arch}.draft_vocab_size"      # N (= V, the target's vocab_size, without d2t)
    TAPS = "{arch}.taps"
    IVSB_LAYER = "{arch}.ivsb_layer"
    GLIMPSES = "{arch}.glimpses"
    ANCHORS = "{arch}.anchors"
    WINDOW = "{arch}.window"
    SPEC_VERSION = "{arch}.spec_version"


# torch state_dict name -> GGUF name
DRAFT_TENSORS: dict[str, str] = {
    "fc.weight": "fc.weight",
    "embed_norm.weight": "blk.0.attn_norm.weight",
    "hidden_norm.weight": "blk.0.attn_norm_2.weight",
    "q_proj.weight": "blk.0.attn_q.weight",
    "k_proj.weight": "blk.0.attn_k.weight",
    "v_proj.weight": "blk.0.attn_v.weight",
    "o_proj.weight": "blk.0.attn_output.weight",
    "ffn_norm.weight": "blk.0.ffn_norm.weight",
    "gate_proj.weight": "blk.0.ffn_gate.weight",
    "up_proj.weight": "blk.0.ffn_up.weight",
    "down_proj.weight": "blk.0.ffn_down.weight",
    "output_norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "d2t": "d2t",
    "glimpse_proj.weight": "glimpse_proj.weight",
}
_OPTIONAL = {"lm_head.weight", "d2t"}

# a layer above the first: torch name under layers.<i>. -> GGUF name under blk.<i>.
UPPER_LAYER_TENSORS: dict[str, str] = {
    "attn_norm.weight": "attn_norm.weight",
    "q_proj.weight": "attn_q.weight",
    "k_proj.weight": "attn_k.weight",
    "v_proj.weight": "attn_v.weight",
    "o_proj.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "gate_proj.weight": "ffn_gate.weight",
    "up_proj.weight": "ffn_up.weight",
    "down_proj.weight": "ffn_down.weight",
}


def draft_tensor_names(num_layers: int) -> dict[str, str]:
    """torch state_dict name -> GGUF name, for a draft of num_layers decoder layers."""
    names = dict(DRAFT_TENSORS)
    for i in range(1, num_layers):
        names.update({f"layers.{i}.{src}": f"blk.{i}.{dst}" for src, dst in UPPER_LAYER_TENSORS.items()})
    return names


def is_draft_folder(folder: Path) -> bool:
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("model_type") == DRAFT_MODEL_TYPE


@dataclass
class DraftSummary:
    outfile: Path
    n_tensors: int
    n_params: int
    outtype: str

    def lines(self) -> list[str]:
        return [f"wrote {self.outfile}: sparrow-draft, {self.n_tensors} tensors, {self.n_params:,} parameters, "
                f"matrices {self.outtype}"]


def convert_draft(folder: Path, outfile: Path, outtype: str = "f32", progress: bool = True) -> DraftSummary:
    """Write the GGUF of a draft folder. outtype (any of the LM converter's) applies to the 2-D
    matrices, by the LM converter's rules; norms stay f32 and d2t is i64."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{folder / 'config.json'}: {e}") from None
    st = folder / "model.safetensors"
    if not st.is_file():
        raise ConvertError(f"{folder}: model.safetensors not found")
    weights = load_file(str(st))
    num_layers = int(config.get("num_layers", 1))
    if not 1 <= num_layers <= MAX_DRAFT_LAYERS:
        raise ConvertError(f"{folder / 'config.json'}: num_layers {num_layers} is outside 1..{MAX_DRAFT_LAYERS}")
    names = draft_tensor_names(num_layers)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ConvertError(f"{st}: unexpected tensors {', '.join(unknown)}")
    missing = sorted(set(names) - set(weights) - _OPTIONAL)
    if missing:
        raise ConvertError(f"{st}: missing tensors {', '.join(missing)}")
    if ("lm_head.weight" in weights) != ("d2t" in weights):
        raise ConvertError(f"{st}: a reduced head needs both lm_head.weight and d2t")
    quantize.file_type(outtype)  # refuses an unknown outtype before any work

    H = int(config["hidden_size"])
    n_vocab = int(config["vocab_size"])
    n_draft = int(weights["d2t"].shape[0]) if "d2t" in weights else n_vocab
    expect = {"fc.weight": (H, len(config["taps"]) * H),
              "q_proj.weight": (config["num_attention_heads"] * config["head_dim"], 2 * H),
              "k_proj.weight": (config["num_key_value_heads"] * config["head_dim"], 2 * H),
              "glimpse_proj.weight": (H, H)}
    for i in range(1, num_layers):
        expect[f"layers.{i}.q_proj.weight"] = (config["num_attention_heads"] * config["head_dim"], H)
        expect[f"layers.{i}.k_proj.weight"] = (config["num_key_value_heads"] * config["head_dim"], H)
    for name, shape in expect.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise ConvertError(f"{st}: {name} has shape {tuple(weights[name].shape)}, config says {tuple(shape)}")

    def k(key: str) -> str:
        return key.format(arch=ARCH_DRAFT)

    w = gguf.GGUFWriter(path=None, arch=ARCH_DRAFT)
    w.add_name(folder.resolve().name)
    w.add_uint32(k(DraftKeys.SPEC_VERSION), int(config.get("spec_version", 1)))
    w.add_string(k(DraftKeys.TARGET_ARCH), str(config["target_arch"]))
    w.add_uint32(k(DraftKeys.TARGET_BLOCK_COUNT), int(config["target_num_layers"]))
    w.add_uint32(k(DraftKeys.TARGET_EMBEDDING_LENGTH), H)
    w.add_uint32(k(DraftKeys.VOCAB_SIZE), n_vocab)
    w.add_uint32(k(DraftKeys.DRAFT_VOCAB_SIZE), n_draft)
    w.add_uint32(k(DraftKeys.EMBEDDING_LENGTH), H)
    w.add_uint32(k(DraftKeys.BLOCK_COUNT), num_layers)
    w.add_uint32(k(DraftKeys.FEED_FORWARD_LENGTH), int(config["intermediate_size"]))
    w.add_uint32(k(DraftKeys.HEAD_COUNT), int(config["num_attention_heads"]))
    w.add_uint32(k(DraftKeys.HEAD_COUNT_KV), int(config["num_key_value_heads"]))
    w.add_uint32(k(DraftKeys.KEY_LENGTH), int(config["head_dim"]))
    w.add_uint32(k(DraftKeys.VALUE_LENGTH), int(config["head_dim"]))
    w.add_float32(k(DraftKeys.LAYERNORM_RMS_EPS), float(config["rms_norm_eps"]))
    w.add_uint32(k(DraftKeys.ROPE_DIMENSION_COUNT), int(config["head_dim"]))
    w.add_float32(k(DraftKeys.ROPE_FREQ_BASE), float(config["rope_theta"]))
    w.add_array(k(DraftKeys.TAPS), [int(t) for t in config["taps"]])
    w.add_uint32(k(DraftKeys.IVSB_LAYER), int(config["ivsb_layer"]))
    w.add_uint32(k(DraftKeys.GLIMPSES), int(config["glimpses"]))
    w.add_uint32(k(DraftKeys.ANCHORS), int(config["anchors"]))
    w.add_uint32(k(DraftKeys.WINDOW), int(config["window"]))
    w.add_file_type(quantize.file_type(outtype))

    n_params = 0
    for src, dst in names.items():
        if src not in weights:
            continue
        a = weights[src]
        n_params += a.size
        if src == "d2t":
            w.add_tensor(dst, np.ascontiguousarray(a.astype(np.int64)))
            continue
        # the LM converter's rule: norms and 1-D stay f32, rows that are not whole blocks fall back
        # to f16; the reduced head counts as an output projection
        qtype = quantize.choose_type(dst, a.shape, outtype, is_output=dst == "output.weight").qtype
        data = quantize.convert(np.ascontiguousarray(a.astype(np.float32)), qtype)
        if qtype in (quantize.Q.F32, quantize.Q.F16):
            w.add_tensor(dst, data)
        else:
            w.add_tensor(dst, data, raw_shape=data.shape, raw_dtype=qtype)
    outfile = Path(outfile)
    partial = outfile.with_name(outfile.name + ".partial")
    w.write_header_to_file(path=partial)
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    partial.replace(outfile)
    return DraftSummary(outfile, sum(1 for s in names if s in weights), n_params, outtype)
