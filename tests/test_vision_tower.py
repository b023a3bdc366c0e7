"""The runtime's vision encoders (sparrow_vision_encode) against transformers.

Tiny random HF models (the conftest fixtures, plus deeper variants built here for what those do
not reach: Qwen2.5-VL windowed blocks, LLaVA-OneVision odd patch grids and several feature
layers) are converted with convert_mmproj at f32 and f16 and run on the same pixels as
  Qwen2-VL / Qwen2.5-VL   model.visual(pixel_values, grid_thw).pooler_output (tower + merger)
  LLaVA-OneVision         model.get_video_features(pixel_values_videos).pooler_output (SigLIP,
                          projector, bilinear 2x2 pooling per frame, image_newline)
f32 must agree within 1e-4 of the output's scale, f16 within 1e-2. Every norm weight and bias
is perturbed away from its 1/0 initialisation first, so a skipped weight or bias shows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import _lm_sizes  # noqa: E402
from sparrow_py.convert import convert_mmproj  # noqa: E402
from sparrow_py.errors import SparrowError  # noqa: E402
from sparrow_py.vision import VisionEncoder  # noqa: E402

TOLERANCE = {"f32": 1e-4, "f16": 1e-2}


def _perturbed_copy(model, out: Path, src: Path | None = None) -> Path:
    """Save `model` with its norm parameters (and every bias) randomised: LayerNorm/RMSNorm start
    at weight 1, bias 0, which would hide a missing weight or bias. Query/key projections are
    scaled up so attention is far from uniform (at init it nearly is, and then which keys a query
    sees, windows or segments, would barely show)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if "visual" in name or "vision_tower" in name:
                if name.endswith(("attn.qkv.weight", "q_proj.weight", "k_proj.weight")):
                    p.mul_(6.0)
    model.save_pretrained(out)
    if src is not None and (src / "preprocessor_config.json").exists():
        shutil.copy(src / "preprocessor_config.json", out / "preprocessor_config.json")
    return out


class Family:
    """One converted model at both outtypes, and its HF reference."""

    def __init__(self, kind: str, hf_model, model_dir: Path, tmp: Path):
        self.kind = kind  # "qwen" or "llava"
        self.hf = hf_model.eval()
        self.paths = {}
        for outtype in TOLERANCE:
            path = tmp / f"mmproj-{outtype}.gguf"
            convert_mmproj(model_dir, path, outtype, progress=False)
            self.paths[outtype] = path
        self.encoders = {t: VisionEncoder(p, n_threads=2) for t, p in self.paths.items()}

    def reference(self, pixels: np.ndarray, grids: list[tuple[int, int, int]]) -> np.ndarray:
        with torch.no_grad():
            if self.kind == "qwen":
                out = self.hf.model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grids))
                return out.pooler_output.float().numpy()
            # one video per grid, each [1, frames, C, H, W]
            parts, start = [], 0
            for t, _, _ in grids:
                video = torch.from_numpy(pixels[start:start + t])[None]
                start += t
                parts.append(self.hf.model.get_video_features(video).pooler_output[0].float().numpy())
            return np.concatenate(parts)


def _qwen_pixels(grids, seed=0, channels=3, patch=14):
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, channels * 2 * patch * patch)).astype(np.float32)


def _llava_pixels(grids, image_size, seed=0):
    frames = sum(t for t, _, _ in grids)
    return np.random.default_rng(seed).standard_normal((frames, 3, image_size, image_size)).astype(np.float32)


def _assert_close(got: np.ndarray, want: np.ndarray, outtype: str) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= TOLERANCE[outtype] * scale, f"{outtype}: max error {err:.3g} at scale {scale:.3g}"
    return err / scale


# --- models ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen2vl(tiny_qwen2vl_dir, tmp_path_factory):
    from transformers import Qwen2VLForConditionalGeneration
    tmp = tmp_path_factory.mktemp("vt-qwen2vl")
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl_dir)
    return Family("qwen", model, _perturbed_copy(model, tmp / "hf", tiny_qwen2vl_dir), tmp)


@pytest.fixture(scope="module")
def qwen25vl(tiny_qwen25vl_dir, tmp_path_factory):
    """The shared fixture: one block, full attention (n_wa_pattern 1)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    tmp = tmp_path_factory.mktemp("vt-qwen25vl")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen25vl_dir)
    return Family("qwen", model, _perturbed_copy(model, tmp / "hf", tiny_qwen25vl_dir), tmp)


@pytest.fixture(scope="module")
def qwen25vl_windowed(tmp_path_factory):
    """Four blocks, full attention in blocks 1 and 3 (n_wa_pattern 2), windowed in 0 and 2; head_dim
    24 (6 rotary frequencies per axis); MLP width 40 (not a multiple of 32: f16 fallback rows)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(3)
    tmp = tmp_path_factory.mktemp("vt-qwen25vl-win")
    text = _lm_sizes(rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=4, hidden_size=48, out_hidden_size=64, intermediate_size=40, num_heads=2,
                  fullatt_block_indexes=[1, 3])
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    return Family("qwen", model, _perturbed_copy(model, tmp / "hf"), tmp)


@pytest.fixture(scope="module")
def llava(tiny_llava_ov_dir, tmp_path_factory):
    from transformers import LlavaOnevisionForConditionalGeneration
    tmp = tmp_path_factory.mktemp("vt-llava")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_ov_dir)
    return Family("llava", model, _perturbed_copy(model, tmp / "hf", tiny_llava_ov_dir), tmp)


# 5x5 patches, pooled to 3x3 with real bilinear weights; 76 is not a multiple of 14, as
# SigLIP-so400m's 384 is not: the last 6 pixels of each row and column are never read
LLAVA_ODD_IMAGE_SIZE = 76


@pytest.fixture(scope="module")
def llava_odd(tmp_path_factory):
    """SigLIP on 76x76 frames (an odd 5x5 patch grid, 6 pixels unread), 3 layers, features from hidden_states[-3]
    (after block 0) and [-1] concatenated, as vision_feature_layer lists them."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    torch.manual_seed(5)
    tmp = tmp_path_factory.mktemp("vt-llava-odd")
    vision = dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=3, image_size=LLAVA_ODD_IMAGE_SIZE, patch_size=14,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5, vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=dict(model_type="qwen2", **_lm_sizes()),
                                  vision_feature_layer=[-3, -1], vision_feature_select_strategy="full",
                                  tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_()
    out = _perturbed_copy(model, tmp / "hf")
    (out / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return Family("llava", model, out, tmp)


# --- parity ------------------------------------------------------------------------------------

QWEN_GRIDS = [
    [(1, 2, 2)],                 # the smallest image: one merged token
    [(1, 4, 6)],                 # an image
    [(2, 6, 4)],                 # two temporal patches (4 frames)
    [(3, 10, 14)],               # odd aspect; Qwen2.5: partial windows at the edges
    [(4, 16, 18)],               # several full and partial windows per frame
    [(1, 4, 4), (2, 6, 8), (1, 2, 10)],  # several images/videos in one call
]


@pytest.mark.parametrize("outtype", list(TOLERANCE))
@pytest.mark.parametrize("grids", QWEN_GRIDS, ids=lambda g: "+".join("x".join(map(str, x)) for x in g))
@pytest.mark.parametrize("family", ["qwen2vl", "qwen25vl", "qwen25vl_windowed"])
def test_qwen_towers_match_transformers(family, grids, outtype, request):
    fam = request.getfixturevalue(family)
    pixels = _qwen_pixels(grids, seed=len(grids) + grids[0][2])
    want = fam.reference(pixels, grids)
    got = fam.encoders[outtype].encode(pixels, grids)
    assert got.shape == (sum(t * h * w for t, h, w in grids) // 4, fam.encoders[outtype].n_embd)
    _assert_close(got, want, outtype)


def test_qwen25_windows_matter(qwen25vl_windowed):
    """The windowed model's output differs from the same weights with full attention everywhere,
    so the parity test above really exercises the windows."""
    grids = [(1, 16, 18)]
    pixels = _qwen_pixels(grids)
    visual = qwen25vl_windowed.hf.model.visual
    want = qwen25vl_windowed.reference(pixels, grids)
    saved = visual.fullatt_block_indexes
    try:
        visual.fullatt_block_indexes = [0, 1, 2, 3]
        all_full = qwen25vl_windowed.reference(pixels, grids)
    finally:
        visual.fullatt_block_indexes = saved
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(all_full - want).max() > 20 * TOLERANCE["f32"] * scale  # 20x what parity allows
    _assert_close(qwen25vl_windowed.encoders["f32"].encode(pixels, grids), want, "f32")


@pytest.mark.parametrize("outtype", list(TOLERANCE))
@pytest.mark.parametrize("frames", [1, 3, 8])
def test_llava_onevision_video_features_match_transformers(llava, frames, outtype):
    from conftest import LLAVA_OV_IMAGE_SIZE
    grids = [(frames, LLAVA_OV_IMAGE_SIZE // 14, LLAVA_OV_IMAGE_SIZE // 14)]
    pixels = _llava_pixels(grids, LLAVA_OV_IMAGE_SIZE, seed=frames)
    want = llava.reference(pixels, grids)
    got = llava.encoders[outtype].encode(pixels, grids)
    assert got.shape == (frames * 2 * 2 + 1, llava.encoders[outtype].n_embd)  # 4x4 patches pooled to 2x2, newline
    _assert_close(got, want, outtype)
    # the grid defaults to the file's frame size
    np.testing.assert_array_equal(llava.encoders[outtype].encode(pixels), got)


@pytest.mark.parametrize("outtype", list(TOLERANCE))
@pytest.mark.parametrize("frames", [1, 2, 5])
def test_llava_onevision_odd_grid_and_feature_layers(llava_odd, frames, outtype):
    side = LLAVA_ODD_IMAGE_SIZE // 14
    grids = [(frames, side, side)]
    pixels = _llava_pixels(grids, LLAVA_ODD_IMAGE_SIZE, seed=10 + frames)
    want = llava_odd.reference(pixels, grids)
    got = llava_odd.encoders[outtype].encode(pixels, grids)
    assert got.shape[0] == frames * 3 * 3 + 1
    _assert_close(got, want, outtype)


def test_llava_onevision_several_videos(llava):
    from conftest import LLAVA_OV_IMAGE_SIZE
    s = LLAVA_OV_IMAGE_SIZE // 14
    grids = [(2, s, s), (1, s, s)]
    pixels = _llava_pixels(grids, LLAVA_OV_IMAGE_SIZE, seed=4)
    got = llava.encoders["f32"].encode(pixels, grids)
    _assert_close(got, llava.reference(pixels, grids), "f32")  # each video ends with its own newline


def test_n_embd_is_the_lm_hidden_size(qwen2vl, qwen25vl_windowed, llava):
    for fam in (qwen2vl, qwen25vl_windowed, llava):
        assert fam.encoders["f32"].n_embd == 64  # the tiny LMs' hidden size


def test_encoding_is_deterministic_across_thread_counts(qwen25vl_windowed):
    grids = [(2, 10, 14)]
    pixels = _qwen_pixels(grids, seed=9)
    one = VisionEncoder(qwen25vl_windowed.paths["f32"], n_threads=1)
    try:
        a = one.encode(pixels, grids)
    finally:
        one.close()
    b = qwen25vl_windowed.encoders["f32"].encode(pixels, grids)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_backend_keyword(qwen2vl):
    """VisionEncoder(backend=) runs the tower there: ref matches transformers as cpu does; an
    unknown name is refused when the file loads."""
    grids = [(2, 4, 6)]
    pixels = _qwen_pixels(grids, seed=4)
    want = qwen2vl.reference(pixels, grids)
    enc = VisionEncoder(qwen2vl.paths["f32"], backend="ref")
    try:
        assert enc.backend == "ref"
        got = enc.encode(pixels, grids)
    finally:
        enc.close()
    _assert_close(got, want, "f32")
    with pytest.raises(SparrowError) as info:
        VisionEncoder(qwen2vl.paths["f32"], backend="no-such")
    assert info.value.status == "SPARROW_ERR_INVALID_ARGUMENT" and "it has: cpu, ref" in str(info.value)


# --- bad input ---------------------------------------------------------------------------------

def _status(exc_info) -> str:
    return exc_info.value.status


def test_bad_qwen_input_is_refused(qwen2vl):
    enc = qwen2vl.encoders["f32"]
    pixels = _qwen_pixels([(1, 4, 4)])
    with pytest.raises(SparrowError, match="pixel floats"):
        enc.encode(pixels[:-1], [(1, 4, 4)])                  # a patch short
    with pytest.raises(SparrowError, match="pixel floats"):
        enc.encode(pixels[:, :-3], [(1, 4, 4)])               # wrong row width (channels)
    with pytest.raises(SparrowError, match="multiples of the merge size"):
        enc.encode(_qwen_pixels([(1, 3, 4)]), [(1, 3, 4)])    # h not divisible by 2
    with pytest.raises(SparrowError, match="out of range"):
        enc.encode(pixels, [(0, 4, 4)])
    with pytest.raises(SparrowError, match="out of range"):
        enc.encode(pixels, [(1, -4, -4)])


def test_bad_llava_input_is_refused(llava):
    from conftest import LLAVA_OV_IMAGE_SIZE
    enc = llava.encoders["f32"]
    s = LLAVA_OV_IMAGE_SIZE // 14
    with pytest.raises(SparrowError, match="this tower takes"):
        enc.encode(np.zeros((1, 3, 70, 70), np.float32), [(1, 5, 5)])   # not the file's frame size
    with pytest.raises(SparrowError, match="this tower takes"):
        enc.encode(np.zeros((1, 3, 56, 70), np.float32))               # not square
    with pytest.raises(SparrowError, match="pixel floats"):
        enc.encode(np.zeros((2, 3, 56, 56), np.float32), [(3, s, s)])   # fewer frames than the grid says
    with pytest.raises(SparrowError, match="pixel floats"):
        enc.encode(np.zeros((1, 4, 56, 56), np.float32), [(1, s, s)])   # four channels


def test_c_api_argument_checks(qwen2vl):
    from sparrow_py._native import ffi, lib
    model = qwen2vl.encoders["f32"]._model
    pixels = _qwen_pixels([(1, 2, 2)])
    px = ffi.from_buffer("float[]", pixels)
    grid = ffi.new("int32_t[]", [1, 2, 2])
    n = ffi.new("int64_t *")
    out = np.zeros((1, 64), np.float32)
    op = ffi.from_buffer("float[]", out)
    ok = lib.SPARROW_OK
    assert lib.sparrow_vision_encode(ffi.NULL, px, pixels.size, grid, 1, 1, op, out.size, n) == lib.SPARROW_ERR_INVALID_ARGUMENT
    assert lib.sparrow_vision_encode(model, ffi.NULL, pixels.size, grid, 1, 1, op, out.size, n) == lib.SPARROW_ERR_INVALID_ARGUMENT
    assert lib.sparrow_vision_encode(model, px, pixels.size, ffi.NULL, 1, 1, op, out.size, n) == lib.SPARROW_ERR_INVALID_ARGUMENT
    assert lib.sparrow_vision_encode(model, px, pixels.size, grid, 0, 1, op, out.size, n) == lib.SPARROW_ERR_INVALID_ARGUMENT
    assert lib.sparrow_vision_encode(model, px, pixels.size, grid, 1, -1, op, out.size, n) == lib.SPARROW_ERR_INVALID_ARGUMENT
    assert lib.sparrow_vision_encode(model, px, pixels.size, grid, 1, 1, ffi.NULL, out.size, n) == lib.SPARROW_ERR_INVALID_ARGUMENT
    # the size protocol: too small reports the token count; NULL out with 0 floats asks for it
    assert lib.sparrow_vision_encode(model, px, pixels.size, grid, 1, 1, op, out.size - 1, n) == lib.SPARROW_ERR_BUFFER_TOO_SMALL
    assert n[0] == 1
    assert lib.sparrow_vision_encode(model, px, pixels.size, grid, 1, 1, ffi.NULL, 0, n) == lib.SPARROW_ERR_BUFFER_TOO_SMALL
    assert n[0] == 1
    assert lib.sparrow_vision_encode(model, px, pixels.size, grid, 1, 1, op, out.size, n) == ok
    assert np.abs(out).max() > 0
    assert lib.sparrow_vision_n_embd(ffi.NULL) == 0


def test_a_language_model_is_not_a_vision_file(tiny_qwen2_dir, tmp_path):
    from sparrow_py._native import ffi, lib
    from sparrow_py.convert import convert
    gguf_path = tmp_path / "lm.gguf"
    convert(tiny_qwen2_dir, gguf_path, "f32", progress=False)
    with pytest.raises(SparrowError, match="not a vision"):
        VisionEncoder(gguf_path)
    out = ffi.new("sparrow_model **")
    assert lib.sparrow_model_load(str(gguf_path).encode(), lib.sparrow_model_default_params(), out) == lib.SPARROW_OK
    try:
        n = ffi.new("int64_t *")
        grid = ffi.new("int32_t[]", [1, 2, 2])
        px = ffi.new("float[]", 4 * 3 * 2 * 14 * 14)
        status = lib.sparrow_vision_encode(out[0], px, 4 * 3 * 2 * 14 * 14, grid, 1, 1, ffi.NULL, 0, n)
        assert status == lib.SPARROW_ERR_INVALID_ARGUMENT
        assert b"not a vision file" in ffi.string(lib.sparrow_last_error())
    finally:
        lib.sparrow_model_free(out[0])


def test_a_vision_file_has_no_context_or_tokenizer(qwen2vl):
    from sparrow_py._native import ffi, lib
    model = qwen2vl.encoders["f32"]._model
    assert ffi.string(lib.sparrow_model_arch(model)) == b"clip"
    ctx = ffi.new("sparrow_context **")
    assert lib.sparrow_context_init(model, lib.sparrow_context_default_params(), ctx) == lib.SPARROW_ERR_INVALID_ARGUMENT
    assert b"vision" in ffi.string(lib.sparrow_last_error())
    n = ffi.new("int32_t *")
    assert lib.sparrow_tokenize(model, b"hi", 2, False, False, ffi.NULL, 0, n) == lib.SPARROW_ERR_INVALID_ARGUMENT


# The runtime encodes whole frames in chunks of about 4096 patches (activation memory follows the
# chunk, not the video): these inputs span several chunks, the last one partial.

def test_qwen_video_longer_than_a_chunk(qwen25vl_windowed):
    grids = [(5, 40, 40)]  # 1600 patches a frame: chunks of 2, 2 and 1 frames
    pixels = _qwen_pixels(grids, seed=21)
    _assert_close(qwen25vl_windowed.encoders["f32"].encode(pixels, grids), qwen25vl_windowed.reference(pixels, grids), "f32")


def test_llava_video_longer_than_a_chunk(llava):
    from conftest import LLAVA_OV_IMAGE_SIZE
    s = LLAVA_OV_IMAGE_SIZE // 14
    grids = [(300, s, s)]  # 16 patches a frame: chunks of 256 and 44 frames
    pixels = _llava_pixels(grids, LLAVA_OV_IMAGE_SIZE, seed=22)
    _assert_close(llava.encoders["f32"].encode(pixels, grids), llava.reference(pixels, grids), "f32")
