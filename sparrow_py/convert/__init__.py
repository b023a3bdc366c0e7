"""Hugging Face checkpoint -> GGUF conversion (the logic behind convert/to_gguf.py).

    from sparrow_py.convert import convert, ConvertError
    summary = convert("path/to/Qwen2.5-0.5B-Instruct", "qwen.gguf", outtype="q8_0")

Modules: safetensors_reader (streaming, torch-free weights reader), names (the GGUF key/tensor
name table), tokenizer (tokenizer.json -> tokenizer.* keys), quantize (type per tensor),
lm (language models: llama, qwen2, qwen2vl), mmproj (vision tower + projector -> clip/mmproj GGUF).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConvertError
from .lm import Summary, convert_lm
from .mmproj import convert_mmproj
from .quantize import OUTTYPES

__all__ = ["ConvertError", "OUTTYPES", "Summary", "convert", "convert_mmproj"]


def convert(model_dir: str | Path, outfile: str | Path, outtype: str = "f16", *,
            vocab_only: bool = False, progress: bool = True) -> Summary:
    """Convert the language model of a Hugging Face folder to one GGUF file.

    outtype: one of OUTTYPES (f32, f16, bf16, q8_0, q4_0, q4_1). vocab_only: write the metadata and
    tokenizer only, no tensors. Raises ConvertError for anything the converter refuses.
    """
    from .draft import convert_draft, is_draft_folder  # a Sparrow draft folder (sparrow_py.train export)

    if is_draft_folder(Path(model_dir)):
        if vocab_only:
            raise ConvertError(f"{model_dir}: a draft has no vocabulary (it shares the target's)")
        return convert_draft(Path(model_dir), Path(outfile), outtype, progress=progress)
    return convert_lm(Path(model_dir), Path(outfile), outtype, vocab_only=vocab_only, progress=progress)
