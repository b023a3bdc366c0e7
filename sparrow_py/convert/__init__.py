"""Hugging Face checkpoint -> GGUF conversion (the logic behind convert/to_gguf.py).

    from sparrow_py.convert import convert, ConvertError
    summary = convert("path/to/Qwen2.5-0.5B-Instruct", "qwen.gguf", outtype="q8_0")

Modules: safetensors_reader (streaming, torch-free weights reader), names (the GGUF key/tensor
name table), tokenizer (tokenizer.json -> tokenizer.* keys), quantize (type per tensor),
lm (language models: llama, qwen2, qwen2vl). Vision towers (--mmproj) will get their own module.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConvertError
from .lm import Summary, convert_lm
from .quantize import OUTTYPES

__all__ = ["ConvertError", "OUTTYPES", "Summary", "convert"]


def convert(model_dir: str | Path, outfile: str | Path, outtype: str = "f16", *,
            vocab_only: bool = False, progress: bool = True) -> Summary:
    """Convert the language model of a Hugging Face folder to one GGUF file.

    outtype: one of OUTTYPES (f32, f16, bf16, q8_0, q4_0, q4_1). vocab_only: write the metadata and
    tokenizer only, no tensors. Raises ConvertError for anything the converter refuses.
    """
    return convert_lm(Path(model_dir), Path(outfile), outtype, vocab_only=vocab_only, progress=progress)
