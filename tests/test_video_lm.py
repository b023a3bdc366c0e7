"""Video prompts through the whole target: the vision tower's embeddings spliced in at the video
tokens and M-RoPE positions as transformers computes them; logits and greedy generation against
transformers' Qwen2-VL, and speculative decoding (with glimpses) lossless on video prompts."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparrow_py as sp
from sparrow_py.convert import convert, convert_mmproj
from sparrow_py.vision import VisionEncoder

from conftest import TINY_VOCAB_SIZE, _lm_sizes, _save_model
from draft_util import make_draft

VISION_START = TINY_VOCAB_SIZE  # [PAD] slots of the tiny vocabulary serve as the vision tokens
VIDEO_TOKEN = TINY_VOCAB_SIZE + 3


def _video_lm(root, tiny_tokenizer_dir, v25: bool, **vision_overrides):
    """(HF dir, HF model, LM gguf, mmproj gguf) of a tiny Qwen2-VL / Qwen2.5-VL whose vision tokens
    are in its vocabulary; vision_overrides go into its vision config."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(0)
    text = _lm_sizes(rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    ids = dict(vision_start_token_id=VISION_START, vision_end_token_id=VISION_START + 1,
               image_token_id=VISION_START + 2, video_token_id=VIDEO_TOKEN)
    if v25:
        # tokens_per_second 4 (transformers' default), not the released checkpoints' 2: the
        # runtime must take it from the file
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                      fullatt_block_indexes=[1], tokens_per_second=4)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, **vision_overrides)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
        model = Qwen2VLForConditionalGeneration(config).eval()
    # the tiny tokenizer plus Qwen's vision tokens, which land on the ids the config names
    from tokenizers import AddedToken, Tokenizer

    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                            ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")])
    assert tok.token_to_id("<|video_pad|>") == VIDEO_TOKEN
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    hf_dir = _save_model(model, root / "tiny-qwen-video", tok_dir)
    lm, mmproj = root / "lm.gguf", root / "mmproj.gguf"
    convert(hf_dir, lm, outtype="f32", progress=False)
    convert_mmproj(hf_dir, mmproj, outtype="f32", progress=False)
    return hf_dir, model, lm, mmproj


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory, tiny_tokenizer_dir):
    return _video_lm(tmp_path_factory.mktemp("video-lm"), tiny_tokenizer_dir, v25=False)


@pytest.fixture(scope="module")
def qwen2vl_deep(tmp_path_factory, tiny_tokenizer_dir):
    """A tower whose patches span 4 frames and 7 pixels: no released checkpoint's, the kind a
    tower that must see a short clip whole is trained with."""
    return _video_lm(tmp_path_factory.mktemp("video-lm-deep"), tiny_tokenizer_dir, v25=False,
                     temporal_patch_size=4, patch_size=7)


@pytest.fixture(scope="module")
def qwen25vl(tmp_path_factory, tiny_tokenizer_dir):
    return _video_lm(tmp_path_factory.mktemp("video-lm-25"), tiny_tokenizer_dir, v25=True)


def video_inputs(grid=(2, 4, 6), seed=0):
    rng = np.random.default_rng(seed)
    t, h, w = grid
    pixels = rng.standard_normal((t * h * w, 3 * 2 * 14 * 14)).astype(np.float32)
    return pixels, grid


def prompt_ids(n_video_tokens, before=(5, 17, 42), after=(9, 80, 3, 11)):
    return list(before) + [VISION_START] + [VIDEO_TOKEN] * n_video_tokens + [VISION_START + 1] + list(after)


def hf_logits(model, ids, pixels, grid, second_per_grid_ts=None):
    extra = {} if second_per_grid_ts is None else {"second_per_grid_ts": torch.tensor([second_per_grid_ts])}
    with torch.no_grad():
        ids_t = torch.tensor([ids])
        out = model(input_ids=ids_t, pixel_values_videos=torch.from_numpy(pixels), video_grid_thw=torch.tensor([grid]),
                    mm_token_type_ids=(ids_t == VIDEO_TOKEN).long() * 2, use_cache=False, **extra)
    return out.logits[0].numpy()


def ours(engine, mmproj_path, ids, pixels, grid, **gen):
    with VisionEncoder(mmproj_path, n_threads=1) as enc:
        embd = enc.encode(pixels, [grid])
    t, h, w = grid
    media = [sp.Media(embd, grid=(t, h // 2, w // 2), t_scale=1.0, placeholder=VIDEO_TOKEN)]
    tokens = [sp.MEDIA_TOKEN if i == VIDEO_TOKEN else i for i in ids]
    return engine.generate(tokens, media=media, **gen)


# (8, 2, 2): the temporal positions run past where the text resumes, so generation must continue
# after the largest position, not after the last row's
@pytest.mark.parametrize("grid", [(2, 4, 6), (4, 6, 4), (1, 2, 2), (8, 2, 2)])
def test_video_prompt_logits_match_transformers(qwen2vl, grid):
    from sparrow_py._native import lib, ffi

    _, model, lm, mmproj = qwen2vl
    pixels, grid = video_inputs(grid)
    n_vis = grid[0] * grid[1] * grid[2] // 4
    ids = prompt_ids(n_vis)
    ref = hf_logits(model, ids, pixels, grid)[-1]
    with sp.Engine(str(lm), n_ctx=256, n_threads=1, kv_type="f32") as e:
        stream = ours(e, mmproj, ids, pixels, grid, max_tokens=1)
        next(stream, None)
        got = np.frombuffer(ffi.buffer(lib.sparrow_get_logits(e._ctx, 0), 4 * e.n_vocab), dtype=np.float32).copy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("grid", [(2, 4, 6), (8, 2, 2)])
def test_video_greedy_generation_matches_transformers(qwen2vl, grid):
    _, model, lm, mmproj = qwen2vl
    pixels, grid = video_inputs(grid, seed=1)
    ids = prompt_ids(grid[0] * grid[1] * grid[2] // 4)
    seq = list(ids)
    for _ in range(16):
        seq.append(int(hf_logits(model, seq, pixels, grid)[-1].argmax()))
    with sp.Engine(str(lm), n_ctx=256, n_threads=1, kv_type="f32") as e:
        "".join(ours(e, mmproj, ids, pixels, grid, max_tokens=16, ignore_eos=True))
        assert e.last_tokens == seq[len(ids):]


def test_media_errors(qwen2vl):
    _, _, lm, mmproj = qwen2vl
    pixels, grid = video_inputs((2, 4, 6))
    with sp.Engine(str(lm), n_ctx=64, n_threads=1) as e, VisionEncoder(mmproj, n_threads=1) as enc:
        embd = enc.encode(pixels, [grid])
        tokens = [1, 2] + [sp.MEDIA_TOKEN] * len(embd) + [3]
        with pytest.raises(sp.SparrowError, match="grid"):
            e.generate(tokens, media=[sp.Media(embd, grid=(2, 2, 2))])
        with pytest.raises(sp.SparrowError, match="tokens but its run"):
            e.generate(tokens[:-3] + [3], media=[sp.Media(embd, grid=(2, 2, 3))])
        with pytest.raises(sp.SparrowError, match="media"):
            e.generate(tokens, media=[sp.Media(embd, grid=(2, 2, 3))] * 2)
        with pytest.raises(sp.SparrowError, match="outside the vocabulary"):
            e.generate(tokens)  # media tokens without media
        long = [1] + [sp.MEDIA_TOKEN] * 70
        with pytest.raises(sp.SparrowError, match="context"):
            e.generate(long, media=[sp.Media(np.zeros((70, e.n_embd), np.float32), grid=(70, 1, 1))])


@pytest.mark.parametrize("glimpses", [3, 0])
@pytest.mark.parametrize("mode", [dict(speculative="chain", n_draft=3),
                                  dict(speculative="tree", tree_depth=4, tree_top_k=3, tree_total_tokens=10)])
def test_speculative_on_video_is_lossless_and_bounded(qwen2vl, tmp_path, mode, glimpses):
    hf_dir, _, lm, mmproj = qwen2vl
    draft = make_draft(hf_dir, tmp_path / "draft", glimpses=glimpses, anchors=2, window=4, seed=2, scale=0.1)
    pixels, grid = video_inputs((4, 6, 4), seed=3)
    ids = prompt_ids(grid[0] * grid[1] * grid[2] // 4, after=(9, 80, 3, 11, 5, 6, 7, 8))
    with sp.Engine(str(lm), n_ctx=256, n_threads=1, kv_type="f32") as ar, \
         sp.Engine(str(lm), n_ctx=256, n_threads=1, kv_type="f32", draft=str(draft)) as spec:
        want = "".join(ours(ar, mmproj, ids, pixels, grid, max_tokens=30, ignore_eos=True))
        got = "".join(ours(spec, mmproj, ids, pixels, grid, max_tokens=30, ignore_eos=True, **mode))
        assert got == want and spec.last_tokens == ar.last_tokens
        s = spec.last_stats
        assert s["n_drafted"] > 0
        # VATA: glimpses + anchors + window + speculative entries, never the 24 visual tokens
        limit = glimpses + 2 + 4 + max(mode.get("n_draft", 0), 3 * 4)
        assert glimpses <= s["draft_kv_entries"] <= limit


@pytest.mark.parametrize("grid,glimpses", [((4, 6, 4), 5), ((2, 4, 6), 4), ((1, 2, 2), 3)])
def test_glimpses_are_transformers_pooled_ivsb_outputs(qwen2vl, tmp_path, grid, glimpses):
    """The IVSB hand-off itself, not only its effect on acceptance: the glimpses the runtime gives
    the draft equal pool_glimpses (the training code's definition) over transformers' hidden
    states after layer ivsb_layer at the video tokens, at transformers' M-RoPE temporal positions
    of each segment's first token. (1, 2, 2): fewer visual tokens (1) than glimpses."""
    from sparrow_py.train.model import pool_glimpses

    hf_dir, model, lm, mmproj = qwen2vl
    draft = make_draft(hf_dir, tmp_path / "draft", glimpses=glimpses, ivsb_layer=0, anchors=2, window=4, seed=2,
                       scale=0.1)
    pixels, grid = video_inputs(grid, seed=4)
    ids = prompt_ids(grid[0] * grid[1] * grid[2] // 4)
    with sp.Engine(str(lm), n_ctx=256, n_threads=1, kv_type="f32", draft=str(draft)) as e:
        "".join(ours(e, mmproj, ids, pixels, grid, max_tokens=4, ignore_eos=True, speculative="chain", n_draft=2))
        pooled, pos = e.last_glimpses
        "".join(e.generate(e.tokenize("plain text", add_special=True), max_tokens=2, speculative="chain"))
        assert e.last_glimpses[0].shape == (0, e.n_embd)  # a text prompt has none

    ids_t = torch.tensor([ids])
    mm_types = (ids_t == VIDEO_TOKEN).long() * 2
    with torch.no_grad():
        out = model(input_ids=ids_t, pixel_values_videos=torch.from_numpy(pixels), video_grid_thw=torch.tensor([grid]),
                    mm_token_type_ids=mm_types, use_cache=False, output_hidden_states=True)
        rope, _ = model.model.get_rope_index(ids_t, mm_types, video_grid_thw=torch.tensor([grid]))
    visual = ids_t[0] == VIDEO_TOKEN
    want, want_pos = pool_glimpses(out.hidden_states[1][0][visual], rope[0, 0][visual], glimpses)
    assert pooled.shape == tuple(want.shape) and pos.tolist() == want_pos.tolist()
    assert np.abs(pooled - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()


@pytest.mark.parametrize("family,n_frames", [("qwen2vl", 4), ("qwen25vl", 4), ("qwen25vl", 16)])
def test_generate_with_video_frames(request, family, n_frames):
    """Engine(mmproj=).generate(prompt, video=frames): preprocessing, encoding, markers and
    positions in one call, against transformers fed the same pixels. Qwen2.5-VL: 16 frames make 8
    temporal patches, enough for tokens_per_second x second_per_grid_ts to move the positions."""
    from sparrow_py.video import qwen

    _, model, lm, mmproj = request.getfixturevalue(family)
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, size=(n_frames, 60, 90, 3), dtype=np.uint8)
    from sparrow_py._native import lib, ffi

    v = qwen.preprocess_video(frames, qwen.QwenPreprocessConfig.for_videos(min_pixels=56 * 56, max_pixels=112 * 112))
    with sp.Engine(str(lm), n_ctx=512, n_threads=1, kv_type="f32", mmproj=str(mmproj)) as e:
        stream = e.generate("What happens? <video> Answer:", video=frames, max_pixels=112 * 112, max_tokens=12,
                            ignore_eos=True)
        next(stream)  # the prompt's logits, before the second token is decoded
        first = np.frombuffer(ffi.buffer(lib.sparrow_get_logits(e._ctx, 0), 4 * e.n_vocab), dtype=np.float32).copy()
        "".join(stream)
        got = e.last_tokens
        ids = (e.tokenize("What happens? ", add_special=True) + [VISION_START] + [VIDEO_TOKEN] * (len(v.pixel_values) // 4)
               + [VISION_START + 1] + e.tokenize(" Answer:", add_special=False))
    spt = v.second_per_grid_ts if family == "qwen25vl" else None
    ref = hf_logits(model, ids, v.pixel_values, v.grid_thw, spt)[-1]
    assert np.abs(first - ref).max() / np.abs(ref).max() < 1e-4
    seq = list(ids)
    for _ in range(12):
        seq.append(int(hf_logits(model, seq, v.pixel_values, v.grid_thw, spt)[-1].argmax()))
    assert got == seq[len(ids):]


def test_deeper_temporal_patches_match_transformers(qwen2vl_deep):
    """A Conv3D 4 frames deep over 7-pixel patches: the converter writes a kernel per frame and
    says the depth, the runtime sums them, and both the Engine (from the vision file) and the
    trainer's inputs (from config.json) cut frames into such patches; logits and greedy tokens
    against transformers."""
    import json

    import gguf

    from sparrow_py._native import lib, ffi
    from sparrow_py.video import qwen

    hf_dir, model, lm, mmproj = qwen2vl_deep
    kernels = sorted(t.name for t in gguf.GGUFReader(str(mmproj)).tensors if t.name.startswith("v.patch_embd."))
    assert kernels == ["v.patch_embd.weight", "v.patch_embd.weight.1", "v.patch_embd.weight.2", "v.patch_embd.weight.3"]
    with VisionEncoder(mmproj, n_threads=1) as enc:
        assert (enc.temporal_patch_size, enc.patch_size) == (4, 7)
    frames = np.random.default_rng(7).integers(0, 256, size=(8, 56, 84, 3), dtype=np.uint8)
    tensors, [n_vis] = qwen.QWEN2_VL.hf_video(frames, hf_dir, json.loads((hf_dir / "config.json").read_text()),
                                               fps=None, num_frames=None, max_pixels=56 * 84)
    pixels, grid = tensors["pixel_values_videos"].numpy(), tuple(tensors["video_grid_thw"][0].tolist())
    assert grid == (2, 8, 12) and pixels.shape == (2 * 8 * 12, 3 * 4 * 7 * 7) and n_vis == 2 * 8 * 12 // 4
    with sp.Engine(str(lm), n_ctx=512, n_threads=1, kv_type="f32", mmproj=str(mmproj)) as e:
        stream = e.generate("What happens? <video> Answer:", video=frames, max_pixels=56 * 84, max_tokens=8,
                            ignore_eos=True)
        next(stream)
        first = np.frombuffer(ffi.buffer(lib.sparrow_get_logits(e._ctx, 0), 4 * e.n_vocab), dtype=np.float32).copy()
        "".join(stream)
        got = e.last_tokens
        ids = (e.tokenize("What happens? ", add_special=True) + [VISION_START] + [VIDEO_TOKEN] * n_vis
               + [VISION_START + 1] + e.tokenize(" Answer:", add_special=False))
    ref = hf_logits(model, ids, pixels, grid)[-1]
    assert np.abs(first - ref).max() / np.abs(ref).max() < 1e-4
    seq = list(ids)
    for _ in range(8):
        seq.append(int(hf_logits(model, seq, pixels, grid)[-1].argmax()))
    assert got == seq[len(ids):]


@pytest.mark.parametrize("grid", [(8, 2, 2), (4, 4, 6)])
def test_qwen25_video_prompt_logits_match_transformers(qwen25vl, grid):
    """Qwen2.5-VL's temporal M-RoPE positions: t x tokens_per_second x second_per_grid_ts."""
    from sparrow_py._native import lib, ffi

    _, model, lm, mmproj = qwen25vl
    pixels, grid = video_inputs(grid, seed=4)
    ids = prompt_ids(grid[0] * grid[1] * grid[2] // 4)
    spt = 0.5  # 4 fps sampling: temporal positions step by 4 x 0.5 = 2
    ref = hf_logits(model, ids, pixels, grid, spt)[-1]
    with VisionEncoder(mmproj, n_threads=1) as enc:
        embd = enc.encode(pixels, [grid])
        assert enc.meta_floats("clip.vision.tokens_per_second") == [4.0]
    t, h, w = grid
    media = [sp.Media(embd, grid=(t, h // 2, w // 2), t_scale=4 * spt, placeholder=VIDEO_TOKEN)]
    with sp.Engine(str(lm), n_ctx=256, n_threads=1, kv_type="f32") as e:
        next(e.generate([sp.MEDIA_TOKEN if i == VIDEO_TOKEN else i for i in ids], media=media, max_tokens=1), None)
        got = np.frombuffer(ffi.buffer(lib.sparrow_get_logits(e._ctx, 0), 4 * e.n_vocab), dtype=np.float32).copy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    # the same prompt with Qwen2-VL's unscaled positions is a different prompt
    assert np.abs(got - hf_logits(model, ids, pixels, grid, 1 / 4)[-1]).max() > 1e-3


def test_video_needs_a_vision_file(qwen2vl):
    _, _, lm, mmproj = qwen2vl
    with sp.Engine(str(lm), n_ctx=64, n_threads=1) as e:
        with pytest.raises(sp.SparrowError, match="mmproj"):
            e.generate("x", video=np.zeros((2, 56, 56, 3), np.uint8))


@pytest.fixture(scope="module")
def llava_ov(tiny_llava_ov_dir, tmp_path_factory):
    from transformers import LlavaOnevisionForConditionalGeneration

    root = tmp_path_factory.mktemp("llava-ov-lm")
    lm, mmproj = root / "lm.gguf", root / "mmproj.gguf"
    convert(tiny_llava_ov_dir, lm, outtype="f32", progress=False)
    convert_mmproj(tiny_llava_ov_dir, mmproj, outtype="f32", progress=False)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_ov_dir, dtype=torch.float32).eval()
    return model, lm, mmproj


def test_llava_onevision_video_generation_matches_transformers(llava_ov):
    """LLaVA-OneVision: SigLIP frames, 2x2 bilinear pooling, image_newline, 1-D positions."""
    from conftest import LLAVA_OV_VIDEO_TOKEN_ID
    from sparrow_py.video import llava_onevision as ov

    model, lm, mmproj = llava_ov
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, size=(3, 70, 50, 3), dtype=np.uint8)
    with sp.Engine(str(lm), n_ctx=256, n_threads=1, kv_type="f32", mmproj=str(mmproj)) as e:
        "".join(e.generate("<video> What moves?", video=frames, max_tokens=10, ignore_eos=True))
        got = e.last_tokens
        n_video = e.last_stats["n_prompt"] - len(e.tokenize(" What moves?", add_special=True))
        ids = [LLAVA_OV_VIDEO_TOKEN_ID] * n_video + e.tokenize(" What moves?", add_special=False)
    assert n_video == 3 * 2 * 2 + 1  # 4x4 patches pooled to 2x2 per frame, one newline
    cfg = ov.LlavaOnevisionPreprocessConfig(height=56, width=56, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    pixels = torch.from_numpy(ov.preprocess_video(frames, cfg).pixel_values)[None]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(10):
            logits = model(input_ids=torch.tensor([seq]), pixel_values_videos=pixels, use_cache=False).logits[0, -1]
            seq.append(int(logits.argmax()))
    assert got == seq[len(ids):]


def test_llava_onevision_video_too_long_is_refused_before_its_frames_are_processed(llava_ov, monkeypatch):
    from sparrow_py.video import llava_onevision as ov

    _, lm, mmproj = llava_ov

    def must_not_run(*args, **kwargs):
        raise AssertionError("frames were processed before the token budget was checked")
    frames = np.zeros((40, 56, 56, 3), np.uint8)
    with sp.Engine(str(lm), n_ctx=64, n_threads=1, mmproj=str(mmproj)) as e:
        monkeypatch.setattr(ov, "preprocess_frames", must_not_run)
        # 4x4 patches pooled to 2x2: 4 tokens a frame, plus the newline
        with pytest.raises(ValueError, match=r"takes 161 tokens \(40 frames of 4 tokens\) .* room for 64"):
            "".join(e.generate("<video> What moves?", video=frames, max_tokens=4))
        monkeypatch.undo()
        "".join(e.generate("<video> What moves?", video=frames[:8], max_tokens=4))  # 33 tokens fit
        assert e.last_stats["n_prompt"] > 33
