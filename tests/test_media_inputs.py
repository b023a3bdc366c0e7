"""Odd media and non-finite numbers: each gives a clear error or a correct generation.

Before: video= with 1x1 frames (or any generation whose first token ended it) raised an internal
cffi error; NaN or infinite embeddings through media= were sampled as token 0 ("!!!!"); a model
whose weights hold NaN did the same.
"""
from pathlib import Path

import numpy as np
import pytest

import sparrow_py as sp
from sparrow_py.errors import SparrowError
from sparrow_py.video.frames import VideoInputError

from gguf_edit import copy_gguf

DEMO = Path(sp.__file__).parent / "demo" / "data"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine():
    with sp.Engine(str(DEMO / "target.gguf"), mmproj=str(DEMO / "mmproj.gguf"), n_ctx=2048, n_threads=2) as e:
        yield e


@pytest.mark.parametrize("shape", [(2, 1, 1, 3), (1, 1, 1, 3), (2, 13, 13, 3), (4, 3, 500, 3)])
def test_tiny_and_thin_frames_are_resized_and_run(engine, shape):
    rng = np.random.default_rng(sum(shape))
    frames = rng.integers(0, 256, shape, dtype=np.uint8)
    text_only = len(engine.tokenize("Describe it.", add_special=False))
    "".join(engine.generate("Describe it.", video=frames, max_tokens=8, add_special=False))
    assert engine.last_finish_reason in ("eog", "length")
    assert len(engine.last_tokens) <= 8
    assert engine.last_stats["n_prompt"] > text_only + 4  # the frames became visual tokens


def test_an_empty_generation_reports_no_tokens(engine):
    # whatever the first token is, generation that ends at once leaves an empty token list, not an error
    "".join(engine.generate("x", max_tokens=0))
    assert engine.last_tokens == [] and engine.last_finish_reason == "length"


def test_extreme_aspect_ratio_is_refused(engine):
    with pytest.raises(VideoInputError, match="aspect ratio"):
        "".join(engine.generate("Describe it.", video=np.zeros((2, 3000, 2, 3), np.uint8), max_tokens=4))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_media_embeddings_are_refused(engine, bad):
    embd = np.ones((4, engine.n_embd), np.float32)
    embd[2, 5] = bad
    prompt = engine.tokenize("<|im_start|>user\n", add_special=False) + [sp.MEDIA_TOKEN] * 4 + [13]
    with pytest.raises(SparrowError, match="NaN or an infinity") as info:
        "".join(engine.generate(prompt, media=[sp.Media(embd, (1, 2, 2), 1.0, 0)], max_tokens=4))
    assert info.value.status == "SPARROW_ERR_INVALID_ARGUMENT"
    # the same prompt with finite values runs
    embd[2, 5] = 0.0
    "".join(engine.generate(prompt, media=[sp.Media(embd, (1, 2, 2), 1.0, 0)], max_tokens=4))
    assert engine.last_finish_reason in ("eog", "length")


def test_nan_in_a_norm_weight_is_refused_at_load(tmp_path):
    import gguf

    src = REPO / "tests" / "data" / "tiny-qwen2.gguf"
    reader = gguf.GGUFReader(str(src))
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    poisoned = np.array(norm.data, dtype=np.float32).copy()
    poisoned[3] = np.nan
    bad = tmp_path / "nan.gguf"
    copy_gguf(src, bad, replace_tensors={"output_norm.weight": poisoned})
    with pytest.raises(SparrowError, match="'output_norm.weight' holds a NaN or an infinity at index 3") as info:
        sp.Engine(str(bad), n_ctx=128, n_threads=1)
    assert info.value.status == "SPARROW_ERR_FORMAT"


def test_a_context_that_cannot_fit_is_refused_before_it_is_used(monkeypatch):
    # Linux would hand out the KV cache lazily and kill the process midway through a long prefill;
    # the runtime compares it first with the memory available (capped here by the variable)
    monkeypatch.setenv("SPARROW_MEMORY_LIMIT_MB", "2")
    kv_mib = 2 * 4 * 4096 * 64 * 2 / 2**20  # K and V, 4 layers, 4096 tokens, 2 kv heads x 32, f16
    with pytest.raises(SparrowError, match=f"KV cache for n_ctx 4096 needs {kv_mib:.0f} MiB but only 2 MiB") as info:
        sp.Engine(str(DEMO / "target.gguf"), n_ctx=4096, n_threads=1)
    assert info.value.status == "SPARROW_ERR_OUT_OF_MEMORY"
    with sp.Engine(str(DEMO / "target.gguf"), n_ctx=1024, n_threads=1) as e:  # 1 MiB fits
        "".join(e.generate("Hello", max_tokens=2))


def test_a_huge_frame_is_resized_in_bounded_memory():
    # the resampler used to widen the whole frame to int64 (and its output to int64 sums): 14x the
    # frame's bytes at the peak (506 MiB here), 10 GB for one 16k x 16k frame; now a block of lines
    # at a time: the output and a few MB of sums, whatever the frame's size
    import tracemalloc

    from sparrow_py.video import qwen

    frame = np.random.default_rng(0).integers(0, 256, (4000, 3000, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        out = qwen.preprocess_image(frame, qwen.QwenPreprocessConfig.for_images())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.pixel_values.shape[0] > 0
    assert peak < frame.nbytes + 48 * 2**20, f"peak {peak / 2**20:.0f} MiB for a {frame.nbytes / 2**20:.0f} MiB frame"


@pytest.mark.parametrize("shape,max_pixels", [((5, 60, 90), None), ((8, 28, 28), 56 * 56), ((3, 100, 40), 112 * 112),
                                              ((1, 300, 200), 28 * 28 * 40)])
def test_the_planned_token_count_is_the_preprocessed_one(shape, max_pixels):
    from sparrow_py.video import qwen

    cfg = qwen.runtime_config("video", max_pixels)
    frames = np.zeros((*shape, 3), np.uint8)
    assert qwen.video_token_count(shape[0], shape[1], shape[2], cfg) == qwen.preprocess_video(frames, cfg).n_tokens


def test_a_video_too_long_for_the_context_is_refused_before_its_frames_are_processed(engine, monkeypatch, tmp_path):
    # 10,000 frames used to be resized and encoded (minutes) before the prompt was found too long
    from sparrow_py.video import qwen

    def must_not_run(*args, **kwargs):
        raise AssertionError("frames were processed before the token budget was checked")
    monkeypatch.setattr(qwen, "preprocess_frames", must_not_run)
    frames = np.zeros((10_000, 28, 28, 3), np.uint8)
    cfg = qwen.runtime_config("video")
    want = qwen.video_token_count(10_000, 28, 28, cfg)  # an array with no fps / num_frames: every frame
    with pytest.raises(VideoInputError, match=f"takes {want} tokens .* room for {engine.n_ctx}"):
        "".join(engine.generate("Describe it.", video=frames, max_tokens=4))
    # a file: its header gives the frame count and size, so nothing is decoded either
    av = pytest.importorskip("av")
    path = tmp_path / "long.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        for _ in range(60):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((480, 640, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoInputError, match=r"takes \d+ tokens \(60 frames of 480x640\)"):
        "".join(engine.generate("Describe it.", video=str(path), fps=30, max_tokens=4))


def test_a_second_question_about_a_video_keeps_its_rows(engine):
    """A follow-up about the same video keeps every cached row up to where the prompts differ,
    the video's included (rows are compared by what they were computed from: token or
    embedding, and positions), and answers as a fresh context does; another video, or the same
    one sampled differently, keeps only the text before it."""
    clip = np.load(DEMO / "clip.npy")
    first = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
    answer = "".join(engine.chat(first, video=clip, max_tokens=24))
    n_first = engine.last_stats["n_prompt"]
    follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "What happens next?"}]
    got = "".join(engine.chat(follow, video=clip, max_tokens=24))
    kept = engine.last_stats["n_prompt_cached"]
    assert kept >= n_first - 1, (kept, n_first)  # the video and the first question at least
    with sp.Engine(str(DEMO / "target.gguf"), mmproj=str(DEMO / "mmproj.gguf"), n_ctx=2048, n_threads=2) as fresh:
        want = "".join(fresh.chat(follow, video=clip, max_tokens=24))
        assert fresh.last_stats["n_prompt_cached"] == 0
        assert got == want and engine.last_tokens == fresh.last_tokens
    text_before_video = len(engine.tokenize("<|im_start|>user\n", add_special=False))
    for other in (np.ascontiguousarray(clip[:, ::-1]), clip[:-2]):
        "".join(engine.chat(follow, video=other, max_tokens=4))
        assert engine.last_stats["n_prompt_cached"] <= text_before_video + 2, engine.last_stats["n_prompt_cached"]


def test_media_rows_are_compared_row_by_row(tmp_path, tiny_qwen2_dir):
    """media= on a 1-D model: a prompt whose third media row differs keeps exactly the rows
    before it; the output equals a fresh context's."""
    from sparrow_py.convert import convert

    path = tmp_path / "t.gguf"
    convert(tiny_qwen2_dir, path, outtype="f32", progress=False)
    rng = np.random.default_rng(5)
    with sp.Engine(str(path), n_ctx=256, n_threads=2, kv_type="f32") as e, \
         sp.Engine(str(path), n_ctx=256, n_threads=2, kv_type="f32") as fresh:
        embd = rng.standard_normal((6, e.n_embd)).astype(np.float32)
        prompt = [5, 6, 7] + [sp.MEDIA_TOKEN] * 6 + [8, 9]
        "".join(e.generate(prompt, media=[sp.Media(embd)], max_tokens=6, ignore_eos=True))
        "".join(e.generate(prompt, media=[sp.Media(embd)], max_tokens=6, ignore_eos=True))
        assert e.last_stats["n_prompt_cached"] == len(prompt) - 1
        changed = embd.copy()
        changed[2, 0] += 1e-3
        got = "".join(e.generate(prompt, media=[sp.Media(changed)], max_tokens=6, ignore_eos=True))
        assert e.last_stats["n_prompt_cached"] == 3 + 2
        want = "".join(fresh.generate(prompt, media=[sp.Media(changed)], max_tokens=6, ignore_eos=True))
        assert got == want and e.last_tokens == fresh.last_tokens
