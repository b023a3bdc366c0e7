"""Speculative decoding in the runtime: lossless against plain decoding, greedy and sampled.

Drafts are made with the training package's module (random weights, or a copy of the target's
last layer so that it agrees often) and exported/converted like a trained one.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparrow_py as sp
from sparrow_py.convert import convert

from draft_util import make_draft
from gguf_edit import copy_gguf


@pytest.fixture(scope="module")
def target(tmp_path_factory, tiny_qwen2_dir):
    path = tmp_path_factory.mktemp("spec") / "target.gguf"
    convert(tiny_qwen2_dir, path, outtype="f32", progress=False)
    return path


@pytest.fixture(scope="module")
def draft(tmp_path_factory, tiny_qwen2_dir):
    return make_draft(tiny_qwen2_dir, tmp_path_factory.mktemp("draft") / "random-draft")


@pytest.fixture(scope="module")
def small_window_draft(tmp_path_factory, tiny_qwen2_dir):
    return make_draft(tiny_qwen2_dir, tmp_path_factory.mktemp("draftw") / "w8-draft", window=8, anchors=4, seed=1)


def prompts(engine, n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, engine.n_vocab, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


# adaptive=False: the rounds draft what they are told even though this random draft never pays
SPEC_MODES = {
    "chain-1": dict(speculative="chain", n_draft=1, adaptive=False),
    "chain-3": dict(speculative="chain", n_draft=3, adaptive=False),
    "chain-6": dict(speculative="chain", n_draft=6, adaptive=False),
    "tree-4x3": dict(speculative="tree", tree_depth=4, tree_top_k=3, tree_total_tokens=10, adaptive=False),
    "tree-6x4": dict(speculative="tree", tree_depth=6, tree_top_k=4, tree_total_tokens=24, adaptive=False),
    "chain-6-adaptive": dict(speculative="chain", n_draft=6),
    "tree-adaptive": dict(speculative="tree", tree_depth=4, tree_top_k=3, tree_total_tokens=10),
}


@pytest.mark.parametrize("mode", sorted(SPEC_MODES))
def test_greedy_output_equals_plain_decoding(target, draft, mode):
    kw = SPEC_MODES[mode]
    max_depth = kw.get("n_draft", kw.get("tree_depth"))
    with sp.Engine(str(target), n_ctx=256, n_threads=2, kv_type="f32") as ar, \
         sp.Engine(str(target), n_ctx=256, n_threads=2, kv_type="f32", draft=str(draft)) as spec:
        drafted = 0
        for prompt in prompts(ar, n=20, seed=len(mode)):
            want = "".join(ar.generate(prompt, max_tokens=48, ignore_eos=True))
            got = "".join(spec.generate(prompt, max_tokens=48, ignore_eos=True, **kw))
            assert got == want
            assert spec.last_tokens == ar.last_tokens
            s = spec.last_stats
            drafted += s["n_drafted"]
            assert 1.0 <= s["mean_accepted_length"] <= max_depth + 1
            if not kw.get("adaptive", True):  # every round drafted, none decoded plainly
                assert s["n_drafted"] > 0 and (s["n_draft_rounds"] or [0])[0] == 0
        # adaptive: this random draft is soon rested, and probed ever more rarely (its speculative
        # rounds were still checked above whenever there were some)
        assert drafted > 0


def test_adaptive_speculation_rests_a_useless_draft(target, draft):
    """A random draft is (almost) never accepted: adaptive speculation turns to plain decode
    steps within a few rounds and only probes now and then, so decoding costs about what it
    costs without a draft (bench/bench_speculative.py measures the speed itself)."""
    with sp.Engine(str(target), n_ctx=512, n_threads=2, kv_type="f32") as ar, \
         sp.Engine(str(target), n_ctx=512, n_threads=2, kv_type="f32", draft=str(draft)) as spec:
        prompt = list(range(1, 30))
        for mode in ("chain", "tree"):
            want = "".join(ar.generate(prompt, max_tokens=400, ignore_eos=True))
            got = "".join(spec.generate(prompt, max_tokens=400, ignore_eos=True, speculative=mode, n_draft=6,
                                        tree_depth=4, tree_top_k=3, tree_total_tokens=10))
            assert got == want
            s = spec.last_stats
            assert s["mean_accepted_length"] < 1.1, "the test needs a draft that is not accepted"
            plain = (s["n_draft_rounds"] or [0])[0]
            assert plain >= 0.85 * s["n_target_forwards"], (mode, s)
            # the draft's work: a few rounds' drafts before it rests, then a probe every 32 steps
            # (a chain probe drafts 1 token, a tree probe the whole tree, 9 tokens here)
            per_probe = 1 if mode == "chain" else 9
            assert s["n_drafted"] <= per_probe * s["n_generated"] / 32 + 40, (mode, s["n_drafted"])


def test_small_window_draft_is_lossless_and_bounded(target, small_window_draft):
    with sp.Engine(str(target), n_ctx=256, n_threads=2, kv_type="f32") as ar, \
         sp.Engine(str(target), n_ctx=256, n_threads=2, kv_type="f32", draft=str(small_window_draft)) as spec:
        prompt = list(range(5, 105))  # longer than W + S: the ring wraps
        want = "".join(ar.generate(prompt, max_tokens=60, ignore_eos=True))
        got = "".join(spec.generate(prompt, max_tokens=60, ignore_eos=True, n_draft=4))
        assert got == want
        # VATA: never more than G + S + W + the speculative chain
        assert spec.last_stats["draft_kv_entries"] <= 0 + 4 + 8 + 4


def test_speculation_off_and_stop_conditions(target, draft):
    with sp.Engine(str(target), n_ctx=64, n_threads=2, kv_type="f32", draft=str(draft)) as spec:
        prompt = list(range(1, 20))
        off = "".join(spec.generate(prompt, max_tokens=20, ignore_eos=True, speculative="none"))
        assert spec.last_stats["n_drafted"] == 0
        on = "".join(spec.generate(prompt, max_tokens=20, ignore_eos=True))
        assert on == off
        # max_tokens cuts a round short
        "".join(spec.generate(prompt, max_tokens=7, ignore_eos=True, n_draft=6))
        assert spec.last_stats["n_generated"] == 7 and len(spec.last_tokens) == 7
        # the context fills up mid-round: same tokens as plain decoding, then "context"
        "".join(spec.generate(prompt, max_tokens=100, ignore_eos=True, n_draft=6))
        full = list(spec.last_tokens)
        assert spec.last_finish_reason == "context"
        "".join(spec.generate(prompt, max_tokens=100, ignore_eos=True, speculative="none"))
        assert full == spec.last_tokens


@pytest.mark.parametrize("mode", ["chain-3", "tree-4x3"])
def test_sampled_tokens_follow_the_target_distribution(target, draft, tmp_path, mode):
    """The second token (the first produced by a draft/verify round) is distributed exactly as
    the target's p(t2 | t1); checked with a chi-square test on a peaked copy of the model."""
    import gguf

    reader = gguf.GGUFReader(str(target))
    weight = next(np.array(t.data) for t in reader.tensors if t.name == "output_norm.weight")
    peaked = copy_gguf(target, tmp_path / "peaked.gguf",
                       replace_tensors={"output_norm.weight": (weight * 8.0).astype(np.float32)})
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    prompt = [3, 14, 15, 92, 65]
    with sp.Engine(str(peaked), n_ctx=64, n_threads=1, kv_type="f32") as e:
        p1 = _softmax(e.decode(prompt)[-1])
        firsts = [t for t in np.argsort(-p1) if p1[t] > 1e-4]
        exact = np.zeros(e.n_vocab)
        for t1 in firsts:
            e.kv_truncate(len(prompt))
            exact += p1[t1] * _softmax(e.decode([int(t1)])[-1])
        exact /= exact.sum()
    n = 2500
    counts = np.zeros(len(exact))
    with sp.Engine(str(peaked), n_ctx=64, n_threads=1, kv_type="f32", draft=str(draft)) as spec:
        for seed in range(1, n + 1):
            "".join(spec.generate(prompt, max_tokens=2, seed=seed, ignore_eos=True, **SPEC_MODES[mode], **params))
            counts[spec.last_tokens[1]] += 1
    assert_drawn_from(counts, exact, min_df=5)


def assert_drawn_from(counts, p, min_df):
    """A chi-square test that counts[t] (token t drawn so often) came from distribution p, the
    tokens expected fewer than 5 times pooled; the bound is ~4.5 sigma above the mean."""
    exp = p * counts.sum()
    big = exp >= 5
    obs_b = np.append(counts[big], counts[~big].sum())
    exp_b = np.append(exp[big], exp[~big].sum())
    keep = exp_b > 0
    chi2 = float(((obs_b[keep] - exp_b[keep]) ** 2 / exp_b[keep]).sum())
    df = int(keep.sum()) - 1
    assert df >= min_df, "the test distribution is too concentrated to say anything"
    assert chi2 < df + 4.5 * np.sqrt(2 * df) + 10, f"chi2 {chi2:.1f} with {df} degrees of freedom"


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_draft_p_min_out_of_range_is_refused(target, draft, bad):
    with sp.Engine(str(target), n_ctx=64, n_threads=1, kv_type="f32", draft=str(draft)) as spec:
        with pytest.raises(sp.SparrowError, match="draft_p_min"):
            "".join(spec.generate([1, 2, 3], max_tokens=4, draft_p_min=bad))


def test_draft_p_min_cuts_greedy_chains_losslessly(target, draft):
    """A chain stops before a token whose draft probability is below draft_p_min (its first token
    is always drafted): at 1 every round drafts one token, at 0 all n_draft, and in between some
    rounds stop early; the output is plain decoding's in every case."""
    with sp.Engine(str(target), n_ctx=256, n_threads=2, kv_type="f32") as ar, \
         sp.Engine(str(target), n_ctx=256, n_threads=2, kv_type="f32", draft=str(draft)) as spec:
        rounds = {}
        for p_min in (0.0, 0.02, 1.0):
            lengths = np.zeros(33, dtype=int)
            for prompt in prompts(ar, n=6, seed=3):
                want = "".join(ar.generate(prompt, max_tokens=32, ignore_eos=True))
                got = "".join(spec.generate(prompt, max_tokens=32, ignore_eos=True, speculative="chain", n_draft=6,
                                            adaptive=False, draft_p_min=p_min))
                assert got == want and spec.last_tokens == ar.last_tokens, p_min
                n = spec.last_stats["n_draft_rounds"]
                lengths[:len(n)] += n
            rounds[p_min] = lengths
        assert rounds[1.0][1] > 0 and rounds[1.0].sum() == rounds[1.0][1], rounds[1.0]
        assert rounds[0.0][6] > 0 and rounds[0.0][1:6].sum() == 0, rounds[0.0]
        assert rounds[0.02][1:6].sum() > 0, rounds[0.02]


@pytest.fixture(scope="module")
def copying_pair(tmp_path_factory, tiny_llama_dir):
    """A target whose next-token distribution p is the same at every position (every token has
    the same embedding, so every position's state is alike), spread over a few dozen tokens, and
    a draft that computes exactly p (its fc passes the target's final state through, its layer adds
    nothing, its output norm is the target's): every sampled draft is accepted (min(1, p / q) = 1),
    so every chain reaches its end and a stop anywhere in it changes which tokens the target draws
    itself. Returns (target, draft, p)."""
    import shutil

    from transformers import LlamaForCausalLM

    from sparrow_py.train.export import save_draft
    from sparrow_py.train.model import DraftConfig, SparrowDraft
    from sparrow_py.train.target import target_shape

    folder = tmp_path_factory.mktemp("copying")
    hf = folder / "target-hf"
    shutil.copytree(tiny_llama_dir, hf)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[0].expand_as(model.model.embed_tokens.weight))
        unit = model(torch.tensor([[1, 2, 3]])).logits[0, -1].double().numpy()
        # the final norm's weight scales the logits: sharpen p until its likeliest token has ~0.25
        scale = next(s for s in np.linspace(1.0, 400.0, 4000) if _softmax(s * unit).max() >= 0.25)
        model.model.norm.weight.mul_(float(scale))
    model.save_pretrained(hf)
    target = folder / "target.gguf"
    convert(hf, target, outtype="f32", progress=False)

    config = DraftConfig.for_target(target_shape(hf), glimpses=0)
    L, H = config.target_num_layers, config.hidden_size
    assert config.taps[-1] == L, "the draft passes the target's final state (tap L) through"
    d = SparrowDraft(config)
    with torch.no_grad():
        d.fc.weight.zero_()
        d.fc.weight[:, (len(config.taps) - 1) * H:].copy_(torch.eye(H))
        d.o_proj.weight.zero_()
        d.down_proj.weight.zero_()
        d.output_norm.weight.copy_(model.model.norm.weight)
    save_draft(d, folder / "draft")
    draft = folder / "draft.gguf"
    convert(folder / "draft", draft, outtype="f32", progress=False)
    with sp.Engine(str(target), n_ctx=64, n_threads=1, kv_type="f32") as e:
        p = _softmax(e.decode([5, 6, 7])[-1])
    return target, draft, p


@pytest.mark.parametrize("p_min", [0.1, 0.9])
def test_sampled_chains_cut_by_draft_p_min_keep_the_target_distribution(copying_pair, p_min):
    """Sampled chains with draft_p_min: the stop is decided on the draft's distribution before
    its token is drawn (here its largest probability, ~0.25, the same at every step: 0.1 never
    stops a chain, 0.9 stops every one after its first token). Deciding on the drawn token's own
    probability instead (0.1: the unlikely ones) would let the target's fresh draws replace exactly
    those and skew the output towards p's likely tokens. Every output token is a draw from p here."""
    target, draft, p = copying_pair
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    counts = np.zeros(len(p))
    with sp.Engine(str(target), n_ctx=128, n_threads=1, kv_type="f32", draft=str(draft)) as spec:
        lengths = np.zeros(33, dtype=int)
        accepted = drafted = 0
        for seed in range(1, 61):
            "".join(spec.generate([5, 6, 7], max_tokens=48, seed=seed, ignore_eos=True, speculative="chain",
                                  n_draft=4, adaptive=False, draft_p_min=p_min, **params))
            for t in spec.last_tokens[1:]:  # the first comes from the prompt's prefill
                counts[t] += 1
            s = spec.last_stats
            n = s["n_draft_rounds"]
            lengths[:len(n)] += n
            accepted, drafted = accepted + s["n_accepted"], drafted + s["n_drafted"]
    assert accepted >= 0.97 * drafted, "the test needs a draft whose tokens are all accepted"
    stops = p_min > p.max()
    assert lengths[1:].sum() == (lengths[1] if stops else lengths[4]), (p_min, lengths)
    assert_drawn_from(counts, p, min_df=8)


def _softmax(x):
    z = np.exp(x.astype(np.float64) - x.max())
    return z / z.sum()


def test_draft_for_another_target_is_refused(target, tiny_llama_dir, tmp_path):
    other = make_draft(tiny_llama_dir, tmp_path / "llama-draft")
    with pytest.raises(sp.SparrowError, match="does not fit this target"):
        sp.Engine(str(target), draft=str(other))
    with pytest.raises(sp.SparrowError, match="draft"):
        sp.Engine(str(other))  # a draft is not a model to run on its own


def test_malformed_draft_files(target, draft, tmp_path):
    data = draft.read_bytes()
    for name, content in {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"GGUF" + b"\x07" * 300}.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(sp.SparrowError):
            sp.Engine(str(target), draft=str(path))
    missing = copy_gguf(draft, tmp_path / "missing.gguf", drop_tensors={"fc.weight"})
    with pytest.raises(sp.SparrowError, match="fc.weight"):
        sp.Engine(str(target), draft=str(missing))


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_prompt_prefix_is_reused_and_the_draft_rebuilt_exactly(mode):
    """A prompt that continues the last one (a chat's next turn) keeps the cached prefix while
    speculating: the target's rows are not prefilled again, and the draft is rebuilt from the
    kept rows' features, so it drafts and is accepted exactly as after a fresh prefill (same
    counts at every depth), and the output is plain decoding's. The shipped demo pair (q8_0, a
    trained draft) is used: its draft is accepted often enough for the counts to tell."""
    from sparrow_py.demo import demo_models

    models = demo_models()
    kw = dict(speculative=mode, n_draft=4, tree_depth=4, tree_top_k=3, tree_total_tokens=10, adaptive=False,
              ignore_eos=True)
    with sp.Engine(str(models.target), n_ctx=512, n_threads=2) as ar, \
         sp.Engine(str(models.target), n_ctx=512, n_threads=2, draft=str(models.draft)) as spec, \
         sp.Engine(str(models.target), n_ctx=512, n_threads=2, draft=str(models.draft)) as fresh:
        first = spec.tokenize("Describe the video.")
        "".join(spec.generate(first, max_tokens=24, **kw))
        turn = first + list(spec.last_tokens) + spec.tokenize(" the blue square")
        got = "".join(spec.generate(turn, max_tokens=40, **kw))
        reused = spec.last_stats
        # every row of the last generation is kept but perhaps its final token (a bonus token is
        # never fed to the target; an accepted draft is)
        assert len(first) + 24 - 1 <= reused["n_prompt_cached"] <= len(first) + 24
        assert got == "".join(ar.generate(turn, max_tokens=40, ignore_eos=True))
        assert spec.last_tokens == ar.last_tokens
        "".join(fresh.generate(turn, max_tokens=40, **kw))
        assert fresh.last_stats["n_prompt_cached"] == 0
        assert reused["n_accepted"] > 5, "the comparison needs a draft that is accepted"
        for key in ("n_drafted", "n_accepted", "acceptance_by_depth", "n_target_forwards"):
            assert reused[key] == fresh.last_stats[key], key

        # a plain generation in between appends rows the draft has no features for: the next
        # speculative prompt keeps only the rows before them, and is still rebuilt exactly
        plain_turn = turn + list(spec.last_tokens) + spec.tokenize(" then")
        "".join(spec.generate(plain_turn, max_tokens=8, ignore_eos=True, speculative="none"))
        plain_began = spec.last_stats["n_prompt_cached"]
        assert len(turn) + 40 - 1 <= plain_began <= len(turn) + 40
        third = plain_turn + list(spec.last_tokens) + spec.tokenize(" a small")
        got = "".join(spec.generate(third, max_tokens=30, **kw))
        assert spec.last_stats["n_prompt_cached"] == plain_began  # where the plain rows began
        assert got == "".join(ar.generate(third, max_tokens=30, ignore_eos=True))
        "".join(fresh.generate(spec.tokenize("ring"), max_tokens=4, **kw))  # nothing in common
        "".join(fresh.generate(third, max_tokens=30, **kw))
        assert fresh.last_stats["n_prompt_cached"] == 0
        for key in ("n_drafted", "n_accepted", "acceptance_by_depth"):
            assert spec.last_stats[key] == fresh.last_stats[key], key


def test_a_follow_up_about_a_video_keeps_its_rows_while_speculating():
    """With the draft on, a second question about the same video keeps the video's rows too: the
    draft gets the glimpses it had and the kept text rows' features, so it drafts and is
    accepted exactly as after a fresh prefill; a question about another video keeps only the
    text before it; plain decoding's output throughout."""
    from sparrow_py.demo import demo_models

    models = demo_models()
    clip = np.load(models.clip)
    kw = dict(speculative="chain", n_draft=4, adaptive=False, ignore_eos=True)
    open_engine = lambda **extra: sp.Engine(str(models.target), mmproj=str(models.mmproj), n_ctx=2048, n_threads=2,
                                            **extra)
    with open_engine() as ar, open_engine(draft=str(models.draft)) as spec, open_engine(draft=str(models.draft)) as fresh:
        first = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
        answer = "".join(spec.chat(first, video=clip, max_tokens=24, **kw))
        n_first = spec.last_stats["n_prompt"]
        follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        got = "".join(spec.chat(follow, video=clip, max_tokens=64, **kw))
        reused = spec.last_stats
        assert reused["n_prompt_cached"] >= n_first - 1
        assert got == "".join(ar.chat(follow, video=clip, max_tokens=64, ignore_eos=True))
        "".join(fresh.chat(follow, video=clip, max_tokens=64, **kw))
        assert fresh.last_stats["n_prompt_cached"] == 0
        assert reused["n_accepted"] > 8, "the comparison needs a draft that is accepted"
        for key in ("n_drafted", "n_accepted", "acceptance_by_depth"):
            assert reused[key] == fresh.last_stats[key], key
        assert np.array_equal(spec.last_glimpses[0], fresh.last_glimpses[0])

        other = np.ascontiguousarray(clip[:, :, ::-1])
        got = "".join(spec.chat(follow, video=other, max_tokens=16, **kw))
        assert spec.last_stats["n_prompt_cached"] < 8  # the chat header before the video
        assert got == "".join(ar.chat(follow, video=other, max_tokens=16, ignore_eos=True))
