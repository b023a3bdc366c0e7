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


# --- the SmolLM2 demo's target, assembled on the user's machine (sparrow_py/demo/assemble.py) ---

def test_unpermute_undoes_the_converters_llama_permutation():
    from sparrow_py.convert.lm import permute_for_norm_rope
    from sparrow_py.demo.assemble import unpermute_norm_rope

    w = np.random.default_rng(0).standard_normal((6 * 12, 40)).astype(np.float32)
    for heads in (6, 2, 1):
        permuted = permute_for_norm_rope(w, heads)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(unpermute_norm_rope(permuted, heads), w)


@pytest.fixture(scope="module")
def lora_target(llama_with_spares, grafted, tmp_path_factory):
    """The graft with LoRA factors (f16, as the build ships them) merged in, converted to f32, and
    the Llama's own GGUF as the base the delta refers to."""
    from sparrow_py.demo.build_smol import LORA_TARGETS, make_target
    from transformers import Qwen2VLForConditionalGeneration

    work = tmp_path_factory.mktemp("assemble")
    base, converted = work / "base.gguf", work / "target.gguf"
    convert(llama_with_spares, base, outtype="f32", progress=False)
    rng = np.random.default_rng(7)
    qwen = Qwen2VLForConditionalGeneration.from_pretrained(grafted, dtype=torch.float32)
    torch.save(qwen.model.visual.state_dict(), work / "tower.pt")
    factors = {}
    for i, layer in enumerate(qwen.model.language_model.layers):
        for hf_name, gguf_name in LORA_TARGETS.items():
            parent, attr = hf_name.split(".")
            lin = getattr(getattr(layer, parent), attr)
            factors[f"blk.{i}.{gguf_name}.weight"] = (
                rng.standard_normal((4, lin.in_features)).astype(np.float16),
                (0.1 * rng.standard_normal((lin.out_features, 4))).astype(np.float16))
    make_target(grafted, work / "tower.pt", factors, work / "target")
    convert(work / "target", converted, outtype="f32", progress=False)
    return base, converted, factors, work


def test_assembled_target_is_the_converted_target(lora_target, grafted):
    """base GGUF (llama.cpp's Q/K row order) + delta (metadata, biases, LoRA) -> the same file the
    converter writes from the merged checkpoint: every tensor bit for bit, every metadata value."""
    import gguf

    from sparrow_py.demo.assemble import KEY_TENSORS, assemble_target, write_delta
    from sparrow_py.demo.build_smol import LORA_ALPHA, LORA_RANK

    base, converted, factors, work = lora_target
    delta = write_delta(converted, base, "tiny llama", factors, LORA_ALPHA / LORA_RANK, work / "delta.gguf")
    assembled = assemble_target(base, delta, work / "assembled.gguf")
    want, got, d = gguf.GGUFReader(str(converted)), gguf.GGUFReader(str(assembled)), gguf.GGUFReader(str(delta))
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors] == list(d.fields[KEY_TENSORS].contents())
    for a, b in zip(want.tensors, got.tensors):
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name
    skip = ("GGUF.",)
    assert {k: f.contents() for k, f in want.fields.items() if not k.startswith(skip)} == \
           {k: f.contents() for k, f in got.fields.items() if not k.startswith(skip)}
    # the delta carries no LM weight of its own: only what the base lacks (the zero biases) and LoRA
    assert all(t.name.endswith(("_proj.bias", ".bias", ".lora_a", ".lora_b")) for t in d.tensors)
    assert any(t.name.endswith(".lora_a") for t in d.tensors)
    with sp.Engine(str(assembled), n_ctx=128, n_threads=1) as e:   # and the runtime loads it
        "".join(e.generate("the red circle", max_tokens=4, ignore_eos=True))
        assert len(e.last_tokens) == 4


def test_assemble_refuses_another_base(lora_target, tmp_path):
    from sparrow_py.demo.assemble import AssembleError, assemble_target, write_delta

    base, converted, factors, work = lora_target
    delta = write_delta(converted, base, "tiny llama", factors, 2.0, tmp_path / "delta.gguf")
    other = tmp_path / "other.gguf"
    other.write_bytes(base.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(AssembleError, match="not the file the demo was built on"):
        assemble_target(other, delta, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    with pytest.raises(AssembleError, match="not a demo delta file"):
        assemble_target(base, converted, tmp_path / "out.gguf")
    with pytest.raises(AssembleError, match="does not have"):
        write_delta(converted, base, "tiny llama", {"blk.0.nope.weight": factors["blk.0.attn_q.weight"]}, 2.0,
                    tmp_path / "d2.gguf")


def test_lora_training_wrapper_is_what_merge_ships(grafted, tmp_path):
    """The build trains LoRA through wrappers (x A^T B^T s added to each projection) and ships the
    factors merged into the weights (assemble.merge_lora): with the same f16 factors, the wrapped
    graft and the merged checkpoint give the same logits; with B = 0 (the start) the graft's own."""
    from transformers import Qwen2VLForConditionalGeneration

    from sparrow_py.demo import build_smol
    from sparrow_py.train.target import Target

    target = Target(grafted, raw_prompts=True)
    ids = torch.tensor([[5, 17, 42, 9, 80, 3, 11, 200]])
    mm = torch.zeros_like(ids, dtype=torch.int32)
    with torch.no_grad():
        before = target.model(input_ids=ids, mm_token_type_ids=mm).logits
    wrapped = build_smol.add_lora(target, seed=3)
    with torch.no_grad():
        assert torch.equal(target.model(input_ids=ids, mm_token_type_ids=mm).logits, before)
        g = torch.Generator().manual_seed(4)
        for w in wrapped.values():     # factors as shipped: f16 values
            w.b.copy_((0.05 * torch.randn(w.b.shape, generator=g)).half().float())
            w.a.copy_(w.a.half().float())
        lora = target.model(input_ids=ids, mm_token_type_ids=mm).logits
    assert (lora - before).abs().max() > 1e-2           # the factors do change the model
    factors = {n: (w.a.detach().numpy().astype(np.float16), w.b.detach().numpy().astype(np.float16))
               for n, w in wrapped.items()}
    torch.save(target.model.model.visual.state_dict(), tmp_path / "tower.pt")
    build_smol.make_target(grafted, tmp_path / "tower.pt", factors, tmp_path / "merged")
    merged = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids, mm_token_type_ids=mm).logits
    assert (got - lora).abs().max() <= 1e-4 * lora.abs().max()
