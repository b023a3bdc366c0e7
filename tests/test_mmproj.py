"""convert/to_gguf.py --mmproj: vision tower + projector -> clip/mmproj GGUF, read back with gguf-py.

References: gguf-py's constants (the key and tensor-name strings llama.cpp uses) and its
TensorNameMap (llama.cpp's own HF -> GGUF table), the HF weights read with safetensors, and the
split rules of llama.cpp's Qwen2VLVisionModel (Conv3D along time, qkv in thirds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sparrow_py.convert import mmproj

REPO = Path(__file__).resolve().parent.parent
TO_GGUF = REPO / "convert" / "to_gguf.py"
Q = gguf.GGMLQuantizationType


def run_to_gguf(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TO_GGUF), *map(str, args), "--quiet"], capture_output=True, text=True)


def convert(model_dir: Path, out: Path, outtype: str = "f32") -> gguf.GGUFReader:
    r = run_to_gguf(model_dir, "--mmproj", "--outtype", outtype, "-o", out)
    assert r.returncode == 0, r.stderr
    return gguf.GGUFReader(out)


def fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(reader: gguf.GGUFReader) -> dict:
    # gguf-py lists shapes innermost-first; reverse to numpy order
    return {t.name: (t.tensor_type, tuple(int(x) for x in reversed(t.shape)), t) for t in reader.tensors}


def hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in load_file(model_dir / "model.safetensors").items()}


def test_names_and_keys_are_llama_cpps():
    K, T = gguf.Keys, gguf.MODEL_TENSOR
    assert mmproj.ARCH_CLIP == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]
    assert mmproj.PROJECTOR_QWEN2VL == gguf.VisionProjectorType.QWEN2VL
    assert mmproj.PROJECTOR_QWEN25VL == gguf.VisionProjectorType.QWEN25VL
    pairs = {
        mmproj.Keys.PROJECTOR_TYPE: K.Clip.PROJECTOR_TYPE, mmproj.Keys.HAS_VISION_ENCODER: K.Clip.HAS_VISION_ENCODER,
        mmproj.Keys.USE_GELU: K.ClipVision.USE_GELU, mmproj.Keys.USE_SILU: K.ClipVision.USE_SILU,
        mmproj.Keys.IMAGE_SIZE: K.ClipVision.IMAGE_SIZE, mmproj.Keys.PATCH_SIZE: K.ClipVision.PATCH_SIZE,
        mmproj.Keys.EMBEDDING_LENGTH: K.ClipVision.EMBEDDING_LENGTH,
        mmproj.Keys.FEED_FORWARD_LENGTH: K.ClipVision.FEED_FORWARD_LENGTH,
        mmproj.Keys.PROJECTION_DIM: K.ClipVision.PROJECTION_DIM, mmproj.Keys.BLOCK_COUNT: K.ClipVision.BLOCK_COUNT,
        mmproj.Keys.HEAD_COUNT: K.ClipVision.Attention.HEAD_COUNT,
        mmproj.Keys.LAYERNORM_EPS: K.ClipVision.Attention.LAYERNORM_EPS,
        mmproj.Keys.IMAGE_MEAN: K.ClipVision.IMAGE_MEAN, mmproj.Keys.IMAGE_STD: K.ClipVision.IMAGE_STD,
        mmproj.Keys.N_WA_PATTERN: K.ClipVision.N_WA_PATTERN,
    }
    for ours, theirs in pairs.items():
        assert ours == theirs
    names = gguf.TENSOR_NAMES
    tensor_pairs = {
        mmproj.Tensor.PATCH_EMBD: T.V_ENC_EMBD_PATCH, mmproj.Tensor.POS_EMBD: T.V_ENC_EMBD_POS,
        mmproj.Tensor.ATTN_Q: T.V_ENC_ATTN_Q, mmproj.Tensor.ATTN_K: T.V_ENC_ATTN_K, mmproj.Tensor.ATTN_V: T.V_ENC_ATTN_V,
        mmproj.Tensor.ATTN_OUT: T.V_ENC_ATTN_O, mmproj.Tensor.LN1: T.V_ENC_INPUT_NORM,
        mmproj.Tensor.LN2: T.V_ENC_POST_ATTN_NORM, mmproj.Tensor.FFN_UP: T.V_ENC_FFN_UP,
        mmproj.Tensor.FFN_GATE: T.V_ENC_FFN_GATE, mmproj.Tensor.FFN_DOWN: T.V_ENC_FFN_DOWN,
        mmproj.Tensor.POST_NORM: T.V_POST_NORM, mmproj.Tensor.MM: T.V_MMPROJ,
    }
    for ours, theirs in tensor_pairs.items():
        assert ours == names[theirs]


def _expected_qwen(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What llama.cpp writes for each visual.* tensor: its TensorNameMap for plain renames, plus
    Qwen2VLVisionModel's splits (Conv3D along time; qkv rows in thirds)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 8)
    out = {}
    for name, data in hf.items():
        name = name.removeprefix("model.")
        if not name.startswith("visual."):
            continue
        if name == "visual.patch_embed.proj.weight":
            out["v.patch_embd.weight"], out["v.patch_embd.weight.1"] = data[:, :, 0], data[:, :, 1]
        elif ".attn.qkv." in name:
            for part, chunk in zip("qkv", np.split(data, 3, axis=0)):
                out[name_map.get_name(name.replace("qkv", part), try_suffixes=(".weight", ".bias"))] = chunk
        else:
            mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            assert mapped is not None, name
            out[mapped] = data
    return out


@pytest.mark.parametrize("fixture,projector", [("tiny_qwen2vl_dir", "qwen2vl_merger"),
                                               ("tiny_qwen25vl_dir", "qwen2.5vl_merger")])
def test_qwen_mmproj_f32(request, tmp_path, fixture, projector):
    model_dir = request.getfixturevalue(fixture)
    reader = convert(model_dir, tmp_path / "mmproj.gguf", "f32")
    kv = fields(reader)
    config = json.loads((model_dir / "config.json").read_text())
    vision = config["vision_config"]
    assert kv["general.architecture"] == "clip" and kv["general.type"] == "mmproj"
    assert kv["clip.projector_type"] == projector and kv["clip.has_vision_encoder"] is True
    assert kv["clip.vision.projection_dim"] == config["text_config"]["hidden_size"]
    assert kv["clip.vision.block_count"] == vision["depth"]
    assert kv["clip.vision.attention.head_count"] == vision["num_heads"]
    assert kv["clip.vision.patch_size"] == 14 and kv["clip.vision.image_size"] == 560
    assert np.allclose(kv["clip.vision.image_mean"], [0.48145466, 0.4578275, 0.40821073])
    if projector == "qwen2vl_merger":  # llama.cpp's renames for Qwen2-VL
        assert kv["clip.vision.embedding_length"] == vision["embed_dim"]
        assert kv["clip.vision.feed_forward_length"] == vision["hidden_size"]
        assert "clip.use_silu" not in kv and "clip.vision.n_wa_pattern" not in kv
    else:
        assert kv["clip.vision.embedding_length"] == vision["hidden_size"]
        assert kv["clip.vision.feed_forward_length"] == vision["intermediate_size"]
        assert kv["clip.use_silu"] is True
        assert kv["clip.vision.n_wa_pattern"] == vision["fullatt_block_indexes"][0] + 1

    expected = _expected_qwen(hf_weights(model_dir))
    got = tensors(reader)
    assert set(got) == set(expected)
    for name, data in expected.items():
        qtype, shape, t = got[name]
        assert qtype == Q.F32 and shape == data.shape, name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(shape), data, err_msg=name)


def test_types_follow_llama_cpp(tiny_qwen25vl_dir, tmp_path):
    for outtype, matrix_type, patch_type in (("f16", Q.F16, Q.F16), ("q8_0", Q.Q8_0, Q.F32), ("bf16", Q.BF16, Q.F32)):
        got = tensors(convert(tiny_qwen25vl_dir, tmp_path / f"{outtype}.gguf", outtype))
        for name, (qtype, shape, _) in got.items():
            if name.startswith("v.patch_embd.weight"):
                assert qtype == patch_type, (outtype, name)
            elif len(shape) == 1 or not name.endswith(".weight"):
                assert qtype == Q.F32, (outtype, name)
            elif outtype == "q8_0" and shape[-1] % 32:
                assert qtype == Q.F16, (outtype, name)
            else:
                assert qtype == matrix_type, (outtype, name)
    r = run_to_gguf(tiny_qwen25vl_dir, "--mmproj", "--outtype", "q4_0", "-o", tmp_path / "q4.gguf")
    assert r.returncode != 0 and "q4_0" in r.stderr


def _relabel(src: Path, dst: Path, rename) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    out = {}
    for k, v in weights.items():
        new = rename(k)
        if new is not None:
            out[new] = v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_transformers_5_names_convert_the_same(tiny_qwen2vl_dir, tmp_path):
    """model.visual.* (transformers >= 4.52) gives the same file contents as visual.*."""
    moved = _relabel(tiny_qwen2vl_dir, tmp_path / "tiny-qwen2vl",
                     lambda k: "model." + k if k.startswith("visual.") else k)
    a, b = tensors(convert(tiny_qwen2vl_dir, tmp_path / "a.gguf")), tensors(convert(moved, tmp_path / "b.gguf"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name][2].data), np.asarray(b[name][2].data))


# --- LLaVA-OneVision -------------------------------------------------------------------------

def _expected_llava(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our documented convention (docs/mmproj.md): SigLIP names through llama.cpp's TensorNameMap
    (written for vision_tower.vision_model.*), projector linear_1/2 -> mm.0/mm.2, image_newline ->
    model.image_newline; post_layernorm and head unused."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 8)
    out = {}
    for name, data in hf.items():
        if name.startswith("vision_tower."):
            full = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
            if ".post_layernorm." in full or ".head." in full:
                continue
            mapped = name_map.get_name(full, try_suffixes=(".weight", ".bias"))
            assert mapped is not None, full
            out[mapped] = data
        elif name.startswith("multi_modal_projector.linear_"):
            layer = {"1": 0, "2": 2}[name.split("linear_")[1][0]]
            out[f"mm.{layer}.{name.rsplit('.', 1)[1]}"] = data
        elif name == "image_newline":
            out["model.image_newline"] = data
    return out


def test_llava_onevision_mmproj(tiny_llava_ov_dir, tmp_path):
    reader = convert(tiny_llava_ov_dir, tmp_path / "mmproj.gguf", "f32")
    kv = fields(reader)
    config = json.loads((tiny_llava_ov_dir / "config.json").read_text())
    vision = config["vision_config"]
    assert kv["clip.projector_type"] == "llava_onevision" and kv["general.type"] == "mmproj"
    assert kv["clip.vision.image_size"] == vision["image_size"] and kv["clip.vision.patch_size"] == 14
    assert kv["clip.vision.embedding_length"] == vision["hidden_size"]
    assert kv["clip.vision.feed_forward_length"] == vision["intermediate_size"]
    assert kv["clip.vision.block_count"] == vision["num_hidden_layers"]
    assert kv["clip.vision.attention.head_count"] == vision["num_attention_heads"]
    assert kv["clip.vision.projection_dim"] == config["text_config"]["hidden_size"]
    assert kv["clip.use_gelu"] is True
    assert kv["clip.vision.feature_layer"] == [-1]
    assert kv["clip.vision.feature_select_strategy"] == "full"
    assert kv["clip.vision.image_grid_pinpoints"] == [v for pair in config["image_grid_pinpoints"] for v in pair]
    assert kv["clip.vision.image_mean"] == [0.5, 0.5, 0.5]

    expected = _expected_llava(hf_weights(tiny_llava_ov_dir))
    got = tensors(reader)
    assert set(got) == set(expected)
    for name, data in expected.items():
        qtype, shape, t = got[name]
        assert qtype == Q.F32 and shape == data.shape, name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(shape), data, err_msg=name)

    f16 = tensors(convert(tiny_llava_ov_dir, tmp_path / "f16.gguf", "f16"))
    assert f16["v.position_embd.weight"][0] == Q.F32 and f16["model.image_newline"][0] == Q.F32
    assert f16["v.patch_embd.weight"][0] == Q.F16 and f16["mm.0.weight"][0] == Q.F16


def test_llava_onevision_vision_model_spelling(tiny_llava_ov_dir, tmp_path):
    """vision_tower.vision_model.* (and model.-prefixed, transformers >= 4.52) convert identically."""
    def rename(k):
        if k.startswith("vision_tower."):
            return "model.vision_tower.vision_model." + k.removeprefix("vision_tower.")
        if k.startswith(("multi_modal_projector.", "image_newline")):
            return "model." + k
        return k
    moved = _relabel(tiny_llava_ov_dir, tmp_path / "tiny-llava-ov", rename)
    a, b = tensors(convert(tiny_llava_ov_dir, tmp_path / "a.gguf")), tensors(convert(moved, tmp_path / "b.gguf"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name][2].data), np.asarray(b[name][2].data))


def test_llava_onevision_language_model_converts(tiny_llava_ov_dir, tmp_path):
    out = tmp_path / "lm.gguf"
    r = subprocess.run([sys.executable, str(TO_GGUF), str(tiny_llava_ov_dir), "--outtype", "f32", "-o", str(out),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(out)
    kv = fields(reader)
    assert kv["general.architecture"] == "qwen2" and kv["qwen2.block_count"] == 2
    got = tensors(reader)
    assert not any(n.startswith(("v.", "mm.", "model.image_newline")) for n in got)
    hf = hf_weights(tiny_llava_ov_dir)
    embed = next(v for k, v in hf.items() if k.endswith("embed_tokens.weight"))
    np.testing.assert_array_equal(np.asarray(got["token_embd.weight"][2].data).reshape(embed.shape), embed)
    assert "<image>" in kv["tokenizer.ggml.tokens"] and "<video>" in kv["tokenizer.ggml.tokens"]


# --- bad input -------------------------------------------------------------------------------

def _one_error_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("to_gguf.py: error:"), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_not_a_vision_language_model(tiny_qwen2_dir, tmp_path):
    _one_error_line(run_to_gguf(tiny_qwen2_dir, "--mmproj", "-o", tmp_path / "x.gguf"),
                    "not a vision-language model", "Qwen2ForCausalLM")
    assert not (tmp_path / "x.gguf").exists()


def test_missing_vision_weights(tiny_qwen25vl_dir, tmp_path):
    lm_only = _relabel(tiny_qwen25vl_dir, tmp_path / "lm-only", lambda k: None if "visual." in k else k)
    _one_error_line(run_to_gguf(lm_only, "--mmproj", "-o", tmp_path / "x.gguf"), "no vision tower weights")
    partial = _relabel(tiny_qwen25vl_dir, tmp_path / "partial", lambda k: None if k.endswith("attn.qkv.bias") else k)
    _one_error_line(run_to_gguf(partial, "--mmproj", "-o", tmp_path / "y.gguf"), "attn.qkv.bias")
    assert not list(tmp_path.glob("*.gguf*"))


def test_missing_llava_newline(tiny_llava_ov_dir, tmp_path):
    broken = _relabel(tiny_llava_ov_dir, tmp_path / "broken", lambda k: None if k == "image_newline" else k)
    _one_error_line(run_to_gguf(broken, "--mmproj", "-o", tmp_path / "x.gguf"), "image_newline")


def test_uneven_window_pattern_is_refused(tiny_qwen25vl_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_qwen25vl_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["vision_config"]["fullatt_block_indexes"] = [0, 3, 5]
    (bad / "config.json").write_text(json.dumps(config))
    _one_error_line(run_to_gguf(bad, "--mmproj", "-o", tmp_path / "x.gguf"), "fullatt_block_indexes")
