#!/usr/bin/env python3
"""Convert a Hugging Face checkpoint folder to a GGUF file that Sparrow (and llama.cpp) loads.

    python convert/to_gguf.py path/to/Qwen2.5-0.5B-Instruct --outtype q8_0 -o qwen.gguf
    python convert/to_gguf.py path/to/model --vocab-only -o vocab.gguf
    python convert/to_gguf.py path/to/Qwen2.5-VL-7B-Instruct --mmproj -o mmproj.gguf

Supported: Qwen2ForCausalLM, LlamaForCausalLM, and the language model of
Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration. The logic lives in
sparrow_py.convert; this file is only the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparrow_py.convert import OUTTYPES, ConvertError, convert, convert_mmproj  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="to_gguf.py",
        description="Convert a Hugging Face model folder (config.json, *.safetensors, tokenizer.json) to GGUF.")
    p.add_argument("model", type=Path,
                   help="Hugging Face model folder: config.json, model.safetensors (or shards with "
                        "model.safetensors.index.json), tokenizer.json, tokenizer_config.json")
    p.add_argument("--outtype", choices=list(OUTTYPES), default="f16",
                   help="type of the weight matrices (default: %(default)s); norms, biases and 1-D "
                        "tensors stay f32; q4_* keep the output projection at q8_0; tensors whose "
                        "rows do not split into 32-element blocks fall back to f16")
    p.add_argument("-o", "--outfile", type=Path,
                   help="output file (default: <model folder name>-<outtype>.gguf in the current directory)")
    p.add_argument("--vocab-only", action="store_true",
                   help="write only the metadata and the tokenizer, no tensors")
    p.add_argument("--mmproj", action="store_true",
                   help="write the vision tower + projector instead (a clip/mmproj GGUF, as llama.cpp); "
                        "Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but errors (no progress, no summary)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Progress, log and summary go to stdout; stderr carries only the one-line error.
    logging.basicConfig(stream=sys.stdout, format="%(message)s",
                        level=logging.WARNING if args.quiet else logging.INFO)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer chatter adds nothing here

    prefix = "mmproj-" if args.mmproj else ""
    outfile = args.outfile or Path(f"{prefix}{args.model.resolve().name}-{args.outtype}.gguf")
    try:
        if args.mmproj:
            summary = convert_mmproj(args.model, outfile, args.outtype, progress=not args.quiet)
        else:
            summary = convert(args.model, outfile, args.outtype, vocab_only=args.vocab_only,
                              progress=not args.quiet)
    except ConvertError as e:
        print(f"to_gguf.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the output folder does not exist or the disk is full
        print(f"to_gguf.py: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        for line in summary.lines():
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
