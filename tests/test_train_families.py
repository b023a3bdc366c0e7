"""Training for every video family (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision): the features the trainer
records are what the runtime hands its draft (the same sparrow_py.video preprocessing on both sides,
then transformers' towers and LM against ours), and `sparrow train` on a manifest of video files
makes a draft that loads beside the target and speculates losslessly on a video file."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
av = pytest.importorskip("av")

import sparrow_py as sp  # noqa: E402
from sparrow_py.convert import convert, convert_mmproj  # noqa: E402
from sparrow_py.train.model import DraftConfig, pool_glimpses  # noqa: E402
from sparrow_py.train.target import MediaOptions, Target, target_shape  # noqa: E402

from conftest import build_tiny_llava_ov  # noqa: E402
from draft_util import make_draft  # noqa: E402
from test_video_lm import _video_lm  # noqa: E402

# llava_onevision_llama: the released models' LM is a Qwen2; a Llama-family one must work the same
FAMILIES = ["qwen2vl", "qwen25vl", "llava_onevision", "llava_onevision_llama"]
MAX_PIXELS = 56 * 56  # Qwen frames of 56x56: 4 tokens per temporal patch (LLaVA-OneVision's size is fixed)


@dataclass
class Family:
    name: str
    hf_dir: Path
    lm: Path
    mmproj: Path


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, tiny_tokenizer_dir, tiny_llava_ov_dir) -> Family:
    root = tmp_path_factory.mktemp(request.param)
    if request.param.startswith("llava_onevision"):
        hf_dir = tiny_llava_ov_dir
        if request.param == "llava_onevision_llama":
            hf_dir = build_tiny_llava_ov(root / "hf", tiny_tokenizer_dir, text_model_type="llama")
        lm, mmproj = root / "lm.gguf", root / "mmproj.gguf"
        convert(hf_dir, lm, outtype="f32", progress=False)
        convert_mmproj(hf_dir, mmproj, outtype="f32", progress=False)
        return Family(request.param, hf_dir, lm, mmproj)
    hf_dir, _, lm, mmproj = _video_lm(root, tiny_tokenizer_dir, v25=request.param == "qwen25vl")
    return Family(request.param, hf_dir, lm, mmproj)


def write_clip(path: Path, seed: int, n_frames: int = 8, fps: int = 4, height: int = 48, width: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            frame = np.full((height, width, 3), rng.integers(0, 256, 3), np.uint8)
            frame[:, : (6 * i) % width] = rng.integers(0, 256, 3, dtype=np.uint8)  # a moving edge
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_target_shape_of_every_family(family):
    shape = target_shape(family.hf_dir)
    # the converter's architecture: LLaVA-OneVision's LM is a plain Qwen2 (1-D positions)
    assert shape.arch == {"llava_onevision": "qwen2", "llava_onevision_llama": "llama"}.get(family.name, "qwen2vl")
    with sp.Engine(str(family.lm), n_ctx=32, n_threads=1) as e:
        assert e.arch == shape.arch and e.n_layer == shape.num_layers and e.n_vocab == shape.vocab_size


def test_training_features_are_what_the_runtime_hands_its_draft(family, tmp_path):
    """The same frames through the trainer (Target: sparrow_py.video + transformers) and through the
    runtime (Engine: sparrow_py.video + our tower and LM): the prompt takes as many visual tokens, and
    the glimpses (ivsb outputs over the visual rows, pooled) and their positions agree."""
    target = Target(family.hf_dir)
    glimpses = 3
    config = DraftConfig.for_target(target.shape, ivsb_layer=0, glimpses=glimpses, anchors=2, window=4)
    draft = make_draft(family.hf_dir, tmp_path / "draft", ivsb_layer=0, glimpses=glimpses, anchors=2, window=4,
                       seed=2, scale=0.1)
    frames = np.random.default_rng(3).integers(0, 256, size=(6, 60, 90, 3), dtype=np.uint8)
    media = MediaOptions(max_pixels=MAX_PIXELS)
    visual = target.visual_inputs(frames, media)
    ids = target.prompt_ids("What moves?", visual)
    f = target.features(ids, visual, config.taps, config.ivsb_layer)
    vis = f["visual"]
    want, want_pos = pool_glimpses(f["ivsb"][vis], f["positions"][vis], glimpses)

    with sp.Engine(str(family.lm), mmproj=str(family.mmproj), draft=str(draft), n_ctx=256, n_threads=1,
                   kv_type="f32") as e:
        items = e.encode_visuals(frames, max_pixels=media.max_pixels)  # what generate(video=) encodes
        assert [len(m.embd) for _, m in items] == visual.n_tokens
        tokens = [sp.MEDIA_TOKEN if i in target.visual_token_ids else i for i in ids]
        "".join(e.generate(tokens, media=[m for _, m in items], max_tokens=3, ignore_eos=True, speculative="chain",
                           n_draft=2))
        pooled, pos = e.last_glimpses
    assert int(vis.sum()) == visual.n_tokens[0]
    assert pos.tolist() == want_pos.tolist()
    assert pooled.shape == tuple(want.shape)
    assert np.abs(pooled - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()
    if family.name.startswith("llava_onevision"):  # 1-D positions: the glimpses sit at sequence indices of the video
        first = ids.index(target.media_token_ids["video"])
        assert pos[0] == first


def test_train_from_video_files_then_speculate_losslessly(family, tmp_path):
    """`sparrow train` on a manifest of mp4 files (a Sparrow record and a LLaVA-Video-178K style record
    in a .json array), convert the draft, load it beside the target: speculative output on a video
    file equals the target's own."""
    from sparrow_py.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        write_clip(data / f"clip{i}.mp4", seed=i)
    records = [{"video": "clip0.mp4", "prompt": "What happens in this video?"},
               {"video": "clip1.mp4", "conversations": [{"from": "human", "value": "<video>\nDescribe it."},
                                                        {"from": "gpt", "value": "replaced by the target's own"}]},
               {"video": "clip2.mp4", "prompt": "Which colour moves?"},
               {"video": "missing.mp4", "prompt": "skipped, counted"}]
    manifest = data / "train.json"
    manifest.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "draft"
    rc = main(["train", "--target", str(family.hf_dir), "--data", str(manifest), "--out", str(out),
               "--steps", "4", "--glimpses", "3", "--anchors", "4", "--window", "16", "--mtp-steps", "2",
               "--max-new-tokens", "10", "--num-frames", "4", "--max-pixels", str(MAX_PIXELS), "--lr", "3e-3",
               "--quiet"])
    assert rc == 0
    samples = sorted((out / "features" / "samples").glob("*.safetensors"))
    assert len(samples) == 3
    meta = json.loads((out / "features" / "meta.json").read_text())
    assert meta["media_num_frames"] == 4 and meta["media_max_pixels"] == MAX_PIXELS
    draft = tmp_path / "draft.gguf"
    convert(out, draft, outtype="f32", progress=False)

    clip = write_clip(tmp_path / "held-out.mp4", seed=9, n_frames=12)
    gen = dict(video=str(clip), num_frames=4, max_pixels=MAX_PIXELS, max_tokens=24, ignore_eos=True)
    with sp.Engine(str(family.lm), mmproj=str(family.mmproj), n_ctx=256, n_threads=1) as plain, \
         sp.Engine(str(family.lm), mmproj=str(family.mmproj), draft=str(draft), n_ctx=256, n_threads=1) as spec:
        want = "".join(plain.generate("<video> What happens?", **gen))
        for mode in (dict(speculative="chain", n_draft=3), dict(speculative="tree", tree_depth=3)):
            got = "".join(spec.generate("<video> What happens?", **gen, **mode))
            assert got == want and spec.last_tokens == plain.last_tokens
            assert spec.last_stats["n_drafted"] > 0 and spec.last_glimpses[0].shape[0] == 3
