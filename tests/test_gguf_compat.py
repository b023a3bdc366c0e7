"""GGUF compatibility with llama.cpp: files written with gguf-py (llama.cpp's own writer) in
llama.cpp's layout load and run here, including the k-quants of its Q4_K_M files; our files load
in gguf-py's reader.

gguf-py cannot quantize to k-quants, so the k-quant tensors are random valid blocks; gguf-py's
dequantizer then gives the exact weights, which a transformers model is loaded with to serve as
the reference for the runtime's quantized matrix products.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

import sparrow_py as sp
from sparrow_py.convert import convert

from gguf_edit import copy_gguf

Q = gguf.GGMLQuantizationType
# block layouts (bytes) and where their f16 super-block scales sit, from ggml-common.h
# d and dmin are chosen so that the weights are zero-mean on average (dmin = d * mean(q)), as
# quantized real weights are: with a large common offset, every product would cancel and 8-bit
# activation rounding would be amplified far beyond what real models see.
KQUANT_LAYOUT = {
    Q.Q4_K: dict(size=144, f16_fields=[(0, 1.0e-4), (2, 7.5e-4)]),   # d, dmin (q in 0..15)
    Q.Q5_K: dict(size=176, f16_fields=[(0, 0.5e-4), (2, 7.75e-4)]),  # d, dmin (q in 0..31)
    Q.Q6_K: dict(size=210, f16_fields=[(208, 2.5e-5)]),               # d (q - 32 is already centred)
}
# a Q4_K_M-like mix: most matrices q4_K, attn_v / ffn_down q6_K, embeddings q5_K
TYPE_FOR = {"attn_v": Q.Q6_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q5_K}

HF_NAME = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def random_kquant(rows: int, cols: int, qtype, rng) -> np.ndarray:
    layout = KQUANT_LAYOUT[qtype]
    n_blocks = rows * cols // 256
    raw = rng.integers(0, 256, size=(n_blocks, layout["size"]), dtype=np.uint8)
    for offset, scale in layout["f16_fields"]:
        values = np.full(n_blocks, scale, dtype=np.float16)
        raw[:, offset:offset + 2] = values.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, cols // 256 * layout["size"])


@pytest.fixture(scope="module")
def kquant_model(tmp_path_factory, tiny_tokenizer_dir):
    """(gguf path with k-quant weights, transformers model holding the same weights exactly)."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=336, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)
    hf = Qwen2ForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("kquant")
    hf_dir = root / "tiny-qwen2-256"
    hf.save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_tokenizer_dir / name, hf_dir / name)
    f32_path = root / "f32.gguf"
    convert(hf_dir, f32_path, outtype="f32", progress=False)

    rng = np.random.default_rng(0)
    reader = gguf.GGUFReader(str(f32_path))
    replacements, raw_types, state = {}, {}, hf.state_dict()
    for t in reader.tensors:
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.split(".")[0]
        if t.name.endswith(".bias") or "norm" in t.name:
            continue
        rows, cols = int(t.shape[1]), int(t.shape[0])
        qtype = TYPE_FOR.get(kind, Q.Q4_K)
        raw = random_kquant(rows, cols, qtype, rng)
        replacements[t.name] = raw
        raw_types[t.name] = qtype
        weights = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(rows, cols).copy())
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = weights
            state["lm_head.weight"] = weights
        else:
            layer = t.name.split(".")[1]
            state[f"model.layers.{layer}.{HF_NAME[kind]}.weight"] = weights
    hf.load_state_dict(state)
    path = copy_gguf(f32_path, root / "kquant.gguf", replace_tensors=replacements, raw_types=raw_types)
    return path, hf, replacements, raw_types


def test_kquant_dequantization_matches_gguf_py(kquant_model):
    path, _, replacements, raw_types = kquant_model
    with sp.Engine(str(path), vocab_only=False, n_threads=1) as e:
        for name, raw in replacements.items():
            want = gguf.quants.dequantize(raw, raw_types[name]).reshape(-1)
            np.testing.assert_allclose(e.tensor(name), want, rtol=1e-6, atol=1e-9, err_msg=name)


def test_kquant_model_matches_transformers(kquant_model):
    path, hf, _, _ = kquant_model
    ids = np.random.default_rng(1).integers(0, 336, size=64).tolist()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    with sp.Engine(str(path), n_ctx=128, n_threads=2, kv_type="f32") as e:
        ours = e.decode(ids, outputs=[True] * len(ids))
    # activations are quantized to 8 bits for the k-quant products: close, not identical
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert err < 3e-2, err
    assert top1 >= 0.95, top1


def test_our_files_read_by_gguf_py(tiny_qwen2_dir, tmp_path):
    path = tmp_path / "q8.gguf"
    convert(tiny_qwen2_dir, path, outtype="q8_0", progress=False)
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    with sp.Engine(str(path), n_threads=1) as e:
        for t in reader.tensors:
            want = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(-1)
            np.testing.assert_allclose(e.tensor(t.name), want, rtol=1e-6, atol=1e-9, err_msg=t.name)
