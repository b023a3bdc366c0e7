"""Which GGML type each tensor is stored as, and the conversion to it.

The rules follow llama.cpp: convert_hf_to_gguf.py's prepare_tensors for f32/f16/bf16/q8_0, and
llama-quantize's llama_tensor_get_type for the q4 types (which convert_hf_to_gguf.py does not
offer itself):

- 1-D tensors, norms and biases stay f32 (every backend reads them as f32).
- Tiny matrices (< TINY_TENSOR_ELEMENTS) stay f32: there is nothing to save, and quantization
  noise would dominate. Real models have none; tiny test models do.
- q4_0/q4_1: the output projection (output.weight, or token_embd.weight when the embeddings are
  tied and it doubles as the output) is kept at q8_0. llama-quantize keeps it at q6_K because
  output quality is most sensitive to it; gguf-py cannot quantize k-quants, so q8_0 is the
  nearest format we can write. An untied token_embd is quantized like the other matrices, as
  llama-quantize does.
- A quantized type needs rows that are a whole number of blocks (32 elements for q8_0/q4_*);
  otherwise the tensor falls back to f16, as llama.cpp's converter does, and the reason is logged.

The conversion itself is gguf-py's reference quantizer (gguf.quants.quantize), bit-exact with
ggml's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, quants

from .errors import ConvertError

logger = logging.getLogger("sparrow.convert")

Q = GGMLQuantizationType

# --outtype -> (default tensor type, general.file_type)
OUTTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}

TINY_TENSOR_ELEMENTS = 1024

_BLOCK_QUANTS = (Q.Q8_0, Q.Q4_0, Q.Q4_1)
_OUTPUT_QUANT = Q.Q8_0  # for the output projection under q4_*


@dataclass(frozen=True)
class TypeChoice:
    qtype: GGMLQuantizationType
    reason: str | None = None  # why it differs from the --outtype default, for the log


def file_type(outtype: str) -> LlamaFileType:
    return _outtype(outtype)[1]


def _outtype(outtype: str) -> tuple[GGMLQuantizationType, LlamaFileType]:
    try:
        return OUTTYPES[outtype]
    except KeyError:
        raise ConvertError(f"unknown --outtype {outtype!r} (choose from {', '.join(OUTTYPES)})") from None


def choose_type(name: str, shape: tuple[int, ...], outtype: str, *, is_output: bool) -> TypeChoice:
    """The type of GGUF tensor `name` (numpy-order `shape`). is_output: this tensor is the LM's
    output projection (output.weight, or token_embd.weight when tied)."""
    default = _outtype(outtype)[0]
    if len(shape) <= 1:
        return TypeChoice(Q.F32, None if default == Q.F32 else "1-D")
    if name.endswith("_norm.weight") or not name.endswith(".weight"):
        return TypeChoice(Q.F32, None if default == Q.F32 else "norm or bias")
    if int(np.prod(shape)) < TINY_TENSOR_ELEMENTS:
        return TypeChoice(Q.F32, None if default == Q.F32 else f"tiny (< {TINY_TENSOR_ELEMENTS} elements)")

    qtype, reason = default, None
    if is_output and default in (Q.Q4_0, Q.Q4_1):
        qtype, reason = _OUTPUT_QUANT, "output projection kept at higher precision"
    block_size = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block_size != 0:
        qtype, reason = Q.F16, f"row length {shape[-1]} is not a multiple of the {qtype.name} block size {block_size}"
    return TypeChoice(qtype, reason)


def nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block_size * type_size


def convert(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 data -> the bytes (or f32/f16 words) of `qtype`, as the writer stores them."""
    assert data.dtype == np.float32
    return quants.quantize(data, qtype)
