"""Which Hugging Face checkpoints Sparrow runs, and what their language model is in GGUF terms.

One table for the converter (sparrow_py.convert) and the trainer (sparrow_py.train), free of
their dependencies: both must agree on a target's architecture, since a draft records the
architecture of the target it was made for and the runtime refuses any other. The vision families
come from sparrow_py.video (numpy only); the Engine finds them here too, by projector type.
"""

from __future__ import annotations

from typing import Any

from sparrow_py.video import llava_onevision, qwen
from sparrow_py.video.family import VisionFamily

ARCH_LLAMA = "llama"
ARCH_QWEN2 = "qwen2"
ARCH_QWEN2VL = "qwen2vl"  # Qwen2-VL and Qwen2.5-VL share it: the LM differs only in M-RoPE

# Hugging Face `architectures[0]` -> GGUF general.architecture (as convert_hf_to_gguf.py registers them)
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": ARCH_LLAMA,
    "Qwen2ForCausalLM": ARCH_QWEN2,
    "Qwen2VLForConditionalGeneration": ARCH_QWEN2VL,
    "Qwen2_5_VLForConditionalGeneration": ARCH_QWEN2VL,
}

# Vision-language checkpoints whose language model is a plain causal LM named by text_config.model_type
# (LLaVA-OneVision: a Qwen2 in the released models, 1-D positions; a Llama-family LM works the same)
HF_WRAPPED_LM_ARCHITECTURES = ("LlavaOnevisionForConditionalGeneration",)
HF_TEXT_MODEL_TYPES: dict[str, str] = {"qwen2": ARCH_QWEN2, "llama": ARCH_LLAMA}

# vision-language architectures -> family (sparrow_py.video.family): how visual inputs are made, where
# they go in the prompt and what transformers takes of them, for the Engine and the trainer alike
HF_VISION_FAMILIES: dict[str, VisionFamily] = {
    "Qwen2VLForConditionalGeneration": qwen.QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": qwen.QWEN2_5_VL,
    "LlavaOnevisionForConditionalGeneration": llava_onevision.LLAVA_ONEVISION,
}


def lm_architecture(config: dict[str, Any]) -> str:
    """The GGUF architecture of a config.json's language model; ValueError if unsupported."""
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch in HF_ARCHITECTURES:
        return HF_ARCHITECTURES[hf_arch]
    if hf_arch in HF_WRAPPED_LM_ARCHITECTURES:
        model_type = (config.get("text_config") or {}).get("model_type", "qwen2")
        if model_type not in HF_TEXT_MODEL_TYPES:
            raise ValueError(f"{hf_arch} with a {model_type!r} language model is not supported "
                             f"(supported: {', '.join(HF_TEXT_MODEL_TYPES)})")
        return HF_TEXT_MODEL_TYPES[model_type]
    raise ValueError(f"unsupported architecture {hf_arch!r} (supported: "
                     f"{', '.join([*HF_ARCHITECTURES, *HF_WRAPPED_LM_ARCHITECTURES])})")


def vision_family(config: dict[str, Any]) -> VisionFamily | None:
    """The vision family of a config.json's model; None for a text-only model."""
    return HF_VISION_FAMILIES.get((config.get("architectures") or ["?"])[0])


def vision_family_of_projector(projector_type: str) -> VisionFamily | None:
    """The vision family whose vision (mmproj) files carry this clip.projector_type; None if unknown."""
    return next((f for f in HF_VISION_FAMILIES.values() if f.projector_type == projector_type), None)
