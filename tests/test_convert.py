"""Tests of the HF -> GGUF converter (convert/to_gguf.py, sparrow_py.convert).

The references are independent of our code: gguf-py's GGUFReader reads the files, gguf-py's
constants / SpecialVocab / typed GGUFWriter methods say what llama.cpp's converter writes, the
`safetensors` and `tokenizers` libraries read the checkpoint and tokenizer, and transformers
computes rope frequencies. Models come from tests/conftest.py (tiny, random, built on the spot).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from conftest import TINY_ADDED_TOKENS, TINY_BPE_VOCAB, TINY_MODEL_VOCAB
from sparrow_py.convert import ConvertError, convert, names
from sparrow_py.convert.lm import HParams, llama3_rope_freqs
from sparrow_py.convert.safetensors_reader import Checkpoint

REPO = Path(__file__).resolve().parent.parent
TO_GGUF = REPO / "convert" / "to_gguf.py"

# HF name -> GGUF name, written out here independently of names.py
HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}
HF_TO_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def hf_to_gguf(hf_name: str) -> str | None:
    if hf_name in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}.{HF_TO_GGUF_BLOCK['.'.join(parts[3:])]}"
    return None  # vision tower


def hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in GGUFReader(path).tensors}


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def gguf_f32(t: gguf.ReaderTensor) -> np.ndarray:
    """A tensor's values as float32 in numpy order (dequantized if need be)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


def unpermute_norm_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation, written as an explicit row index: within each head
    of size D, GGUF row 2i+j holds HF row j*D/2 + i (pairs interleaved vs. halves)."""
    d = w.shape[0] // n_head
    gguf_row_of_hf = np.empty(w.shape[0], dtype=np.int64)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):
                gguf_row_of_hf[h * d + j * (d // 2) + i] = h * d + 2 * i + j
    return w[gguf_row_of_hf]


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def qwen2_f32(tiny_qwen2_dir, out_dir) -> Path:
    out = out_dir / "qwen2-f32.gguf"
    convert(tiny_qwen2_dir, out, "f32", progress=False)
    return out


@pytest.fixture(scope="session")
def llama_f32(tiny_llama_dir, out_dir) -> Path:
    out = out_dir / "llama-f32.gguf"
    convert(tiny_llama_dir, out, "f32", progress=False)
    return out


# --- the name table mirrors llama.cpp's ---------------------------------------------------------

def test_names_table_matches_gguf_py_constants():
    K = gguf.Keys
    ours_to_theirs = {
        names.Keys.ARCHITECTURE: K.General.ARCHITECTURE, names.Keys.TYPE: K.General.TYPE,
        names.Keys.NAME: K.General.NAME, names.Keys.FILE_TYPE: K.General.FILE_TYPE,
        names.Keys.QUANTIZATION_VERSION: K.General.QUANTIZATION_VERSION,
        names.Keys.SAMPLING_TOP_K: K.General.SAMPLING_TOP_K, names.Keys.SAMPLING_TOP_P: K.General.SAMPLING_TOP_P,
        names.Keys.SAMPLING_TEMP: K.General.SAMPLING_TEMP,
        names.Keys.VOCAB_SIZE: K.LLM.VOCAB_SIZE, names.Keys.CONTEXT_LENGTH: K.LLM.CONTEXT_LENGTH,
        names.Keys.EMBEDDING_LENGTH: K.LLM.EMBEDDING_LENGTH, names.Keys.BLOCK_COUNT: K.LLM.BLOCK_COUNT,
        names.Keys.FEED_FORWARD_LENGTH: K.LLM.FEED_FORWARD_LENGTH,
        names.Keys.HEAD_COUNT: K.Attention.HEAD_COUNT, names.Keys.HEAD_COUNT_KV: K.Attention.HEAD_COUNT_KV,
        names.Keys.KEY_LENGTH: K.Attention.KEY_LENGTH, names.Keys.VALUE_LENGTH: K.Attention.VALUE_LENGTH,
        names.Keys.LAYERNORM_RMS_EPS: K.Attention.LAYERNORM_RMS_EPS,
        names.Keys.ROPE_DIMENSION_COUNT: K.Rope.DIMENSION_COUNT,
        names.Keys.ROPE_DIMENSION_SECTIONS: K.Rope.DIMENSION_SECTIONS,
        names.Keys.ROPE_FREQ_BASE: K.Rope.FREQ_BASE, names.Keys.ROPE_SCALING_TYPE: K.Rope.SCALING_TYPE,
        names.Keys.ROPE_SCALING_FACTOR: K.Rope.SCALING_FACTOR,
        names.Keys.ROPE_SCALING_ORIG_CTX_LEN: K.Rope.SCALING_ORIG_CTX_LEN,
        names.Keys.TOKENIZER_MODEL: K.Tokenizer.MODEL, names.Keys.TOKENIZER_PRE: K.Tokenizer.PRE,
        names.Keys.TOKENS: K.Tokenizer.LIST, names.Keys.TOKEN_TYPE: K.Tokenizer.TOKEN_TYPE,
        names.Keys.MERGES: K.Tokenizer.MERGES, names.Keys.CHAT_TEMPLATE: K.Tokenizer.CHAT_TEMPLATE,
    }
    for ours, theirs in ours_to_theirs.items():
        assert ours == theirs
    T = K.Tokenizer
    assert names.SPECIAL_TOKEN_ID_KEYS == {"bos": T.BOS_ID, "eos": T.EOS_ID, "eot": T.EOT_ID, "unk": T.UNK_ID,
                                           "sep": T.SEP_ID, "pad": T.PAD_ID, "mask": T.MASK_ID}
    assert names.ADD_SPECIAL_TOKEN_KEYS == {"bos": T.ADD_BOS, "eos": T.ADD_EOS, "sep": T.ADD_SEP}

    arch_of = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    for arch, arch_tensors in names.ARCH_TENSORS.items():
        theirs = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_of[arch]]}
        assert set(arch_tensors) <= theirs, arch
    for attr in ("NORMAL", "CONTROL", "USER_DEFINED", "UNUSED"):
        assert getattr(names.TokenType, attr) == getattr(gguf.TokenType, attr)


def test_hf_name_layouts():
    f = names.hf_to_gguf_name
    for prefix in ("model.", "model.language_model.", "language_model.model."):
        assert f(prefix + "layers.3.self_attn.k_proj.bias") == "blk.3.attn_k.bias"
        assert f(prefix + "embed_tokens.weight") == "token_embd.weight"
    for head in ("lm_head.weight", "model.lm_head.weight", "language_model.lm_head.weight"):
        assert f(head) == "output.weight"
    assert f("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert names.is_vision_tensor("model.visual.blocks.0.attn.qkv.weight")
    assert names.is_vision_tensor("visual.merger.mlp.0.weight")


# --- metadata: what llama.cpp's converter writes -------------------------------------------------

def llama_cpp_reference(model_dir: Path, arch: str, ftype: gguf.LlamaFileType, pre: str, tmp: Path,
                        merges: bool = True) -> GGUFReader:
    """The hyper-parameter and tokenizer keys llama.cpp's convert_hf_to_gguf.py writes for this
    folder, made with the same gguf-py calls it makes (TextModel/LlamaModel/Qwen2VLModel
    .set_gguf_parameters, _set_vocab_gpt2 with SpecialVocab)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hp = {**cfg, **cfg.get("text_config", {})}
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    w = gguf.GGUFWriter(tmp / "reference.gguf", arch)
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_rope_freq_base(rope.get("rope_theta", hp.get("rope_theta")))
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(ftype)
    if arch == "llama":
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
    if arch == "qwen2vl":
        sections = list(rope["mrope_section"])
        w.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    gguf.SpecialVocab(model_dir, load_merges=merges).add_to_gguf(w, quiet=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return GGUFReader(tmp / "reference.gguf")


def assert_keys_match_reference(ours: GGUFReader, ref: GGUFReader) -> None:
    for key, ref_field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        assert key in ours.fields, f"missing {key}"
        assert ours.fields[key].types == ref_field.types, key
        assert ours.fields[key].contents() == ref_field.contents(), key


@pytest.mark.parametrize("model, arch", [("tiny_qwen2_dir", "qwen2"), ("tiny_llama_dir", "llama"),
                                         ("tiny_qwen2vl_dir", "qwen2vl"), ("tiny_qwen25vl_dir", "qwen2vl")])
def test_metadata_matches_llama_cpp(model, arch, request, tmp_path):
    model_dir = request.getfixturevalue(model)
    out = tmp_path / "m.gguf"
    convert(model_dir, out, "q8_0", progress=False)
    ours = GGUFReader(out)
    assert field(ours, "general.architecture") == arch
    assert field(ours, "general.type") == "model"
    assert field(ours, "general.name")
    ref = llama_cpp_reference(model_dir, arch, gguf.LlamaFileType.MOSTLY_Q8_0, "qwen2", tmp_path)
    assert_keys_match_reference(ours, ref)
    # spot-check values that matter most, against the numbers the fixtures were built with
    assert field(ours, f"{arch}.attention.head_count_kv") == 2
    assert field(ours, "tokenizer.ggml.eos_token_id") == TINY_BPE_VOCAB + 2  # <|im_end|>
    assert field(ours, "tokenizer.ggml.padding_token_id") == TINY_BPE_VOCAB  # <|endoftext|>
    assert field(ours, "tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in field(ours, "tokenizer.chat_template")
    if arch == "qwen2vl":
        assert field(ours, "qwen2vl.rope.dimension_sections") == [2, 3, 3, 0]
    if arch == "llama":
        assert field(ours, "llama.rope.dimension_count") == 12


# --- tokenizer -----------------------------------------------------------------------------------

def test_tokens_types_and_merges_match_tokenizer_json(qwen2_f32, tiny_qwen2_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_qwen2_dir / "tokenizer.json"))
    r = GGUFReader(qwen2_f32)
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == TINY_MODEL_VOCAB
    special = {tok.token_to_id(t): s for t, s in TINY_ADDED_TOKENS}
    for i in range(TINY_MODEL_VOCAB):
        text = tok.id_to_token(i)
        if text is None:
            assert (tokens[i], types[i]) == (f"[PAD{i}]", gguf.TokenType.UNUSED)
        else:
            assert tokens[i] == text
            expected = (gguf.TokenType.NORMAL if i not in special else
                        gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED)
            assert types[i] == expected, text
    merges = json.loads((tiny_qwen2_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "qwen2"


def test_real_qwen2_tokenizer_vocab_only(qwen2_tokenizer_dir, tmp_path):
    model_dir = tmp_path / "Qwen2.5-0.5B-Instruct"
    shutil.copytree(qwen2_tokenizer_dir, model_dir)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
              "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
              "bos_token_id": 151643, "eos_token_id": 151645}
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "vocab.gguf"
    result = subprocess.run([sys.executable, str(TO_GGUF), str(model_dir), "--vocab-only", "--quiet", "-o", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    r = GGUFReader(out)
    assert len(r.tensors) == 0
    assert field(r, "tokenizer.ggml.pre") == "qwen2"
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == 151936
    vocab = tok_json["model"]["vocab"]
    assert all(tokens[i] == t for t, i in vocab.items())
    for a in tok_json["added_tokens"]:  # <|...|> are special; <tool_call>, <think>... are not
        looks_special = a["content"].startswith("<|") and a["content"].endswith("|>")
        expected_type = gguf.TokenType.CONTROL if a["special"] or looks_special else gguf.TokenType.USER_DEFINED
        assert (tokens[a["id"]], types[a["id"]]) == (a["content"], expected_type)
    assert tokens[-1] == "[PAD151935]" and types[-1] == gguf.TokenType.UNUSED
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in tok_json["model"]["merges"]]
    assert field(r, "general.name") == "Qwen2.5 0.5B Instruct"  # llama.cpp's name heuristics
    # (GGUFReader is slow on 150k-entry arrays: the reference leaves merges out, compared above)
    ref = llama_cpp_reference(model_dir, "qwen2", gguf.LlamaFileType.MOSTLY_F16, "qwen2", tmp_path, merges=False)
    assert_keys_match_reference(r, ref)
    assert field(r, "tokenizer.ggml.bos_token_id") == 151643  # from config.json
    assert field(r, "tokenizer.ggml.eos_token_id") == 151645


# --- tensors -------------------------------------------------------------------------------------

def test_qwen2_f32_tensors_equal_hf(qwen2_f32, tiny_qwen2_dir):
    got = tensors(qwen2_f32)
    hf = hf_weights(tiny_qwen2_dir)
    expected = {hf_to_gguf(n): w for n, w in hf.items() if n != "lm_head.weight"}
    assert set(got) == set(expected)
    assert "output.weight" not in got  # tied embeddings: the runtime reuses token_embd
    for name, w in expected.items():
        assert got[name].tensor_type == Q.F32
        np.testing.assert_array_equal(gguf_f32(got[name]), w, err_msg=name)
    assert tuple(int(d) for d in got["blk.0.attn_k.weight"].shape) == (64, 32)  # GGUF ne order: (cols, rows)


def test_llama_f32_qk_permuted_like_llama_cpp(llama_f32, tiny_llama_dir):
    got = tensors(llama_f32)
    hf = hf_weights(tiny_llama_dir)
    assert set(got) == {hf_to_gguf(n) for n in hf}
    assert "output.weight" in got  # untied
    for hf_name, w in hf.items():
        name = hf_to_gguf(hf_name)
        data = gguf_f32(got[name])
        if ".attn_q." in name or ".attn_k." in name:
            n_head = 6 if ".attn_q." in name else 2  # K has the KV heads
            assert not np.array_equal(data, w)
            np.testing.assert_array_equal(unpermute_norm_rope(data, n_head), w, err_msg=name)
        else:
            np.testing.assert_array_equal(data, w, err_msg=name)


def quantization_step(blocks: np.ndarray, qtype: Q) -> np.ndarray:
    """Largest error a correct quantizer may make per element, for each 32-element block."""
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    if qtype == Q.Q8_0:  # d = amax/127, round to nearest: d/2, plus the f16 rounding of d
        return amax / 127
    if qtype == Q.Q4_0:  # d = -max/8; the far end of the other sign clips at 7: up to d
        return amax / 8 * 1.01
    assert qtype == Q.Q4_1  # d = (max - min)/15 from min, round to nearest
    return (blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)) / 15


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0", "q4_1"])
def test_quantized_within_format_tolerance(outtype, tiny_qwen2_dir, tmp_path):
    out = tmp_path / f"{outtype}.gguf"
    convert(tiny_qwen2_dir, out, outtype, progress=False)
    got = tensors(out)
    hf = hf_weights(tiny_qwen2_dir)
    for hf_name, w in hf.items():
        name = hf_to_gguf(hf_name)
        t = got[name]
        if w.ndim == 1:
            assert t.tensor_type == Q.F32, name
            np.testing.assert_array_equal(gguf_f32(t), w)
            continue
        # tied model: token_embd is also the output projection, kept at q8_0 under q4_*
        assert t.tensor_type == (Q.Q8_0 if name == "token_embd.weight" else Q[outtype.upper()]), name
        blocks, deq = w.reshape(-1, 32), gguf_f32(t).reshape(-1, 32)
        assert np.all(np.abs(deq - blocks) <= quantization_step(blocks, t.tensor_type) + 1e-7), name


def test_types_fall_back_for_rows_not_multiple_of_32(tiny_llama_dir, tmp_path):
    out = tmp_path / "llama-q8.gguf"
    convert(tiny_llama_dir, out, "q8_0", progress=False)
    got = tensors(out)
    # hidden 72: matrices with rows of 72 fall back to f16; ffn_down rows are 96 = 3 blocks
    assert got["blk.0.attn_q.weight"].tensor_type == Q.F16
    assert got["token_embd.weight"].tensor_type == Q.F16
    assert got["blk.0.ffn_down.weight"].tensor_type == Q.Q8_0
    assert got["blk.0.attn_norm.weight"].tensor_type == Q.F32
    r = GGUFReader(out)
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


@pytest.mark.parametrize("outtype, matrix_type", [("f16", Q.F16), ("bf16", Q.BF16)])
def test_float_outtypes(outtype, matrix_type, tiny_qwen2_dir, tmp_path):
    out = tmp_path / f"{outtype}.gguf"
    convert(tiny_qwen2_dir, out, outtype, progress=False)
    got = tensors(out)
    w = hf_weights(tiny_qwen2_dir)["model.layers.0.mlp.up_proj.weight"]
    t = got["blk.0.ffn_up.weight"]
    assert t.tensor_type == matrix_type
    np.testing.assert_allclose(gguf_f32(t), w, rtol=2 ** -8 if outtype == "bf16" else 2 ** -11, atol=1e-7)
    assert got["blk.0.attn_q.bias"].tensor_type == Q.F32


@pytest.mark.parametrize("model, tied", [("tiny_qwen2vl_dir", True), ("tiny_qwen25vl_dir", False)])
def test_qwen2vl_language_model_only(model, tied, request, tmp_path):
    model_dir = request.getfixturevalue(model)
    out = tmp_path / "vl.gguf"
    summary = convert(model_dir, out, "f32", progress=False)
    got = tensors(out)
    hf = hf_weights(model_dir)
    lm = {hf_to_gguf(n): w for n, w in hf.items() if hf_to_gguf(n) is not None}
    assert summary.skipped_vision == sum(n.startswith("visual.") for n in hf) > 0
    assert set(got) == set(lm) - ({"output.weight"} if tied else set())
    assert ("output.weight" in got) == (not tied)
    for name, t in got.items():
        np.testing.assert_array_equal(gguf_f32(t), lm[name], err_msg=name)  # NEOX rope: no permutation


def test_new_transformers_layout_converts_identically(tiny_qwen25vl_dir, tmp_path):
    """transformers >= 4.52 stores VLMs as model.language_model.* / model.visual.*."""
    from safetensors.numpy import load_file, save_file

    new_dir = tmp_path / "new" / tiny_qwen25vl_dir.name
    shutil.copytree(tiny_qwen25vl_dir, new_dir)
    weights = load_file(new_dir / "model.safetensors")
    renamed = {}
    for n, w in weights.items():
        if n.startswith("model."):
            n = "model.language_model." + n[len("model."):]
        elif n.startswith("visual."):
            n = "model." + n
        renamed[n] = w
    assert any(n.startswith("model.language_model.layers.") for n in renamed)
    save_file(renamed, new_dir / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "old").mkdir()
    convert(tiny_qwen25vl_dir, tmp_path / "old.gguf", "q8_0", progress=False)
    convert(new_dir, tmp_path / "new.gguf", "q8_0", progress=False)
    assert (tmp_path / "old.gguf").read_bytes() == (tmp_path / "new.gguf").read_bytes()


def test_sharded_and_unsharded_are_byte_identical(tiny_llama_dir, tiny_llama_sharded_dir, tmp_path):
    assert (tiny_llama_sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(tiny_llama_sharded_dir.glob("*.safetensors"))) > 2
    assert tiny_llama_dir.name == tiny_llama_sharded_dir.name  # general.name comes from the folder
    convert(tiny_llama_dir, tmp_path / "single.gguf", "f16", progress=False)
    convert(tiny_llama_sharded_dir, tmp_path / "sharded.gguf", "f16", progress=False)
    assert (tmp_path / "single.gguf").read_bytes() == (tmp_path / "sharded.gguf").read_bytes()


def test_llama3_rope_freqs_match_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=512, rope_parameters=rope)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base_inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    h = HParams(arch="llama", raw={}, n_vocab=1, n_embd=64, n_layer=1, n_head=2, n_head_kv=2, head_dim=32,
                n_ff=1, n_ctx=512, rms_eps=1e-5, rope=rope, tied=False)
    factors = llama3_rope_freqs(h)
    assert factors.min() == 1.0 and factors.max() == 8.0  # the sweep covers all three regimes
    np.testing.assert_allclose(factors, (base_inv_freq / hf_inv_freq).numpy(), rtol=1e-5)


def test_safetensors_reader_widens_f16_and_bf16(tmp_path):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = {"a.bf16": torch.randn(3, 5).to(torch.bfloat16), "b.f16": torch.randn(7).to(torch.float16),
           "c.f32": torch.randn(2, 2, 2)}
    save_file(src, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert ckpt.names() == sorted(src)
    for name, t in src.items():
        got = ckpt.load_f32(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, t.float().numpy())


def test_package_does_not_import_torch():
    code = "import sys, sparrow_py.convert; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- command line ------------------------------------------------------------------------------

def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TO_GGUF), *map(str, args)], capture_output=True, text=True, cwd=REPO)


def test_cli_converts_with_summary(tiny_qwen2_dir, tmp_path):
    out = tmp_path / "qwen.gguf"
    result = run_cli(tiny_qwen2_dir, "--outtype", "q4_0", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"wrote {out}" in result.stdout and "Q4_0" in result.stdout and "MiB" in result.stdout
    assert field(GGUFReader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert not (tmp_path / "qwen.gguf.part").exists()


def test_cli_help_documents_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--outtype", "--outfile", "--vocab-only", "--quiet", "q4_1", "bf16"):
        assert option in result.stdout


def _break_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def _drop_tensor(d: Path, name: str) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(d / "model.safetensors")
    del weights[name]
    save_file(weights, d / "model.safetensors")


def _unknown_pretokenizer(d: Path) -> None:
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (d / "tokenizer.json").write_text(json.dumps(tok))


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: _break_config(d, architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
    (lambda d: _drop_tensor(d, "model.layers.1.mlp.up_proj.weight"), "missing tensor for blk.1.ffn_up.weight"),
    (lambda d: _break_config(d, intermediate_size=128), "config.json implies [128, 64]"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json not found"),
    (_unknown_pretokenizer, r"unknown pre-tokenizer (split regex '\p{L}+|\s+')"),
], ids=["unsupported-arch", "missing-tensor", "wrong-shape", "no-tokenizer", "unknown-pretokenizer"])
def test_cli_refuses_bad_input_with_one_line(breakage, expected, tiny_qwen2_dir, tmp_path):
    model_dir = tmp_path / "broken"
    shutil.copytree(tiny_qwen2_dir, model_dir)
    breakage(model_dir)
    out = tmp_path / "out.gguf"
    result = run_cli(model_dir, "-o", out)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("to_gguf.py: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stdout
    assert not out.exists() and not (tmp_path / "out.gguf.part").exists()


def test_convert_raises_convert_error(tmp_path):
    with pytest.raises(ConvertError, match="config.json not found"):
        convert(tmp_path, tmp_path / "x.gguf")
