"""The demo's target is a pretrained Llama LM set inside Qwen2-VL (sparrow_py/demo/graft.py): on
text it must be the same model, in transformers and in the runtime, with Qwen2-VL's vision tokens
on ids the LM's tokenizer already had."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparrow_py as sp
from sparrow_py.convert import convert, convert_mmproj
from sparrow_py.demo.graft import GraftError, graft, mrope_sections

from conftest import TINY_VOCAB_SIZE

SPARE = [f"<unused{i}>" for i in range(4)]
RENAMES = dict(zip(("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"), SPARE))
VISION = dict(depth=1, embed_dim=32, hidden_size=72, num_heads=2, mlp_ratio=2, temporal_patch_size=4, patch_size=7)


@pytest.fixture(scope="module")
def llama_with_spares(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama whose tokenizer has four unused special tokens, as SmolLM2's has."""
    import shutil

    from tokenizers import AddedToken, Tokenizer

    out = tmp_path_factory.mktemp("graft") / "llama"
    shutil.copytree(tiny_llama_dir, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPARE])
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def grafted(llama_with_spares, tmp_path_factory):
    return graft(llama_with_spares, tmp_path_factory.mktemp("graft") / "qwen2vl", VISION, RENAMES)


def test_mrope_sections_cover_the_rotary_pairs():
    assert mrope_sections(128) == [16, 24, 24]  # Qwen2-VL's own
    for head_dim in (12, 64, 80):
        s = mrope_sections(head_dim)
        assert sum(s) == head_dim // 2 and min(s) >= 1


def test_grafted_lm_is_the_llama_on_text(llama_with_spares, grafted):
    from transformers import AutoModelForCausalLM, Qwen2VLForConditionalGeneration

    llama = AutoModelForCausalLM.from_pretrained(llama_with_spares, dtype=torch.float32).eval()
    qwen = Qwen2VLForConditionalGeneration.from_pretrained(grafted, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 9, 80, 3, 11, 200, 7, 64]])
    with torch.no_grad():
        want = llama(input_ids=ids).logits
        got = qwen(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids, dtype=torch.int32)).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    cfg = json.loads((grafted / "config.json").read_text())
    tok = json.loads((grafted / "tokenizer.json").read_text())
    by_name = {t["content"]: t["id"] for t in tok["added_tokens"]}
    for i, name in enumerate(("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")):
        assert by_name[name] == TINY_VOCAB_SIZE + i and SPARE[i] not in by_name
    assert (cfg["vision_start_token_id"], cfg["video_token_id"]) == (TINY_VOCAB_SIZE, TINY_VOCAB_SIZE + 3)


def test_runtime_runs_the_graft_as_the_llama(llama_with_spares, grafted, tmp_path):
    """Converted as Qwen2-VL (LM + mmproj), the runtime's greedy text equals the Llama's own GGUF's,
    and a video goes through the grafted tower's 4-frame patches."""
    lm, mmproj, ref = tmp_path / "lm.gguf", tmp_path / "mmproj.gguf", tmp_path / "llama.gguf"
    convert(grafted, lm, outtype="f32", progress=False)
    convert_mmproj(grafted, mmproj, outtype="f32", progress=False)
    convert(llama_with_spares, ref, outtype="f32", progress=False)
    outs = []
    for path in (lm, ref):
        with sp.Engine(str(path), n_ctx=256, n_threads=1, kv_type="f32") as e:
            "".join(e.generate("the red circle moves", max_tokens=12, ignore_eos=True))
            outs.append(list(e.last_tokens))
    assert outs[0] == outs[1]
    frames = np.random.default_rng(3).integers(0, 256, size=(8, 56, 56, 3), dtype=np.uint8)
    with sp.Engine(str(lm), n_ctx=256, n_threads=1, mmproj=str(mmproj)) as e:
        "".join(e.generate("<video> What happens?", video=frames, max_pixels=56 * 56, max_tokens=4, ignore_eos=True))
        # 8 frames of 56 x 56: 2 temporal patches of 8 x 8 patches, merged 2 x 2: 32 visual tokens
        assert len(e.last_tokens) == 4 and e.last_stats["n_prompt"] > 32


def test_graft_refusals(llama_with_spares, tmp_path):
    with pytest.raises(GraftError, match="hidden_size"):
        graft(llama_with_spares, tmp_path / "a", dict(VISION, hidden_size=64), RENAMES)
    with pytest.raises(GraftError, match="no added token '<nope>'"):
        graft(llama_with_spares, tmp_path / "b", VISION, dict(RENAMES, **{"<|video_pad|>": "<nope>"}))
    with pytest.raises(GraftError, match="each of"):
        graft(llama_with_spares, tmp_path / "c", VISION, {"<|vision_start|>": SPARE[0]})
