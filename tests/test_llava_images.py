"""LLaVA-OneVision still images (anyres): our tiles against transformers' PIL image processor, our
bilinear shrink against torch's, and the whole image path (tiles encoded unpooled by the runtime,
packed as pack_image_features does) through the language model against transformers' greedy
generation, with and without the tile-limit shrink."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparrow_py as sp
from sparrow_py.convert import convert, convert_mmproj
from sparrow_py.video import llava_onevision as ov

from conftest import LLAVA_OV_IMAGE_SIZE, LLAVA_OV_IMAGE_TOKEN_ID

# (height, width): tall, wide, exact tile, larger than every pinpoint, tiny. Not a tall image
# shrinking on both sides: there Pillow 13 picks its pass order by a rule sparrow_py.video.resize
# does not reproduce, and single pixels can differ by a level (see its module doc).
SIZES = [(70, 50), (40, 130), (56, 56), (120, 160), (20, 33), (113, 97)]


def _image(h, w, seed=0):
    return np.random.default_rng(seed + h * 1000 + w).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hf_processor(tiny_llava_ov_dir):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    cfg = json.loads((tiny_llava_ov_dir / "preprocessor_config.json").read_text())
    return LlavaOnevisionImageProcessorPil(size=cfg["size"], image_mean=cfg["image_mean"], image_std=cfg["image_std"],
                                           image_grid_pinpoints=cfg["image_grid_pinpoints"])


@pytest.mark.parametrize("size", SIZES)
def test_tiles_match_the_hf_processor(hf_processor, size):
    image = _image(*size)
    ref = hf_processor(images=[image], return_tensors="np")
    cfg = ov.LlavaOnevisionPreprocessConfig(height=LLAVA_OV_IMAGE_SIZE, width=LLAVA_OV_IMAGE_SIZE,
                                            image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    ours = ov.preprocess_image(image, cfg, hf_processor.image_grid_pinpoints)
    assert ours.image_size == tuple(ref["image_sizes"][0])
    want = ref["pixel_values"][0][:len(ours.pixel_values)]
    assert ours.pixel_values.shape == want.shape
    assert np.abs(ours.pixel_values - want).max() < 1e-6


@pytest.mark.parametrize("shape,out", [((3, 9, 13), (4, 6)), ((5, 16, 8), (7, 3)), ((2, 6, 6), (6, 6))])
def test_bilinear_resize_is_torchs(shape, out):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], list(out), mode="bilinear")[0].numpy()
    assert np.abs(ov.bilinear_resize(x, *out) - ref).max() < 1e-5


@pytest.fixture(scope="module", params=["anyres_max_9", "anyres_max_1"])
def llava(request, tiny_llava_ov_dir, tmp_path_factory):
    """(HF model, LM gguf, mmproj gguf); anyres_max_1 makes every multi-tile image shrink."""
    from transformers import LlavaOnevisionForConditionalGeneration

    root = tmp_path_factory.mktemp("llava-images")
    hf_dir = root / "hf"
    shutil.copytree(tiny_llava_ov_dir, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["vision_aspect_ratio"] = request.param
    (hf_dir / "config.json").write_text(json.dumps(config))
    lm, mmproj = root / "lm.gguf", root / "mmproj.gguf"
    convert(hf_dir, lm, outtype="f32", progress=False)
    convert_mmproj(hf_dir, mmproj, outtype="f32", progress=False)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, lm, mmproj


@pytest.mark.parametrize("size", [(70, 50), (40, 130), (120, 160)])
def test_image_generation_matches_transformers(llava, hf_processor, size):
    model, lm, mmproj = llava
    image = _image(*size, seed=3)
    with sp.VisionEncoder(str(mmproj), n_threads=1) as enc:
        n_image = len(enc.encode_image(image))
    with sp.Engine(str(lm), n_ctx=512, n_threads=1, kv_type="f32", mmproj=str(mmproj)) as e:
        "".join(e.generate("<image> What is it?", images=[image], max_tokens=10, ignore_eos=True))
        got = e.last_tokens
        assert e.last_stats["n_prompt"] == n_image + len(e.tokenize(" What is it?", add_special=True))
        ids = [LLAVA_OV_IMAGE_TOKEN_ID] * n_image + e.tokenize(" What is it?", add_special=False)
    px = hf_processor(images=[image], return_tensors="pt")
    seq = list(ids)
    with torch.no_grad():
        for _ in range(10):
            logits = model(input_ids=torch.tensor([seq]), pixel_values=px["pixel_values"],
                           image_sizes=px["image_sizes"], batch_num_images=px["batch_num_images"],
                           use_cache=False).logits[0, -1]
            seq.append(int(logits.argmax()))
    assert got == seq[len(ids):]


def test_image_token_count_is_transformers(llava, hf_processor):
    """The number of <image> tokens the HF model expects for an image: it raises on a mismatch."""
    model, _, mmproj = llava
    image = _image(120, 160, seed=4)
    with sp.VisionEncoder(str(mmproj), n_threads=1) as enc:
        ours = enc.encode_image(image)
    px = hf_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(px["pixel_values"], px["image_sizes"],
                                               vision_feature_layer=model.config.vision_feature_layer,
                                               vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                                               vision_aspect_ratio=model.config.vision_aspect_ratio,
                                               batch_num_images=px["batch_num_images"])
    ref = (feats.pooler_output if hasattr(feats, "pooler_output") else feats[0])[0].numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_bad_images(llava):
    _, lm, mmproj = llava
    with sp.VisionEncoder(str(mmproj), n_threads=1) as enc:
        with pytest.raises(sp.SparrowError, match="uint8"):
            enc.encode_image(np.zeros((30, 30, 3), np.float32))
        with pytest.raises(sp.SparrowError):
            enc.encode_image(np.zeros((30, 30), np.uint8))
        with pytest.raises(sp.SparrowError, match="tiles"):
            enc.encode_tiles(np.zeros((1, 3, 28, 28), np.float32))
