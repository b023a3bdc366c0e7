"""The data step on the Sparrow runtime: `sparrow train --runtime-target` featurizes text samples
with the runtime (checked against the transformers target it replaces), and `sparrow
make-prompts` writes prompts the target itself samples after its chat template's user header."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparrow_py as sp
from sparrow_py.convert import convert
from sparrow_py.train.data import DataOptions, build_cache, load_sample
from sparrow_py.train.model import DraftConfig
from sparrow_py.train.prompts import magpie_prompts, user_turn_prefix
from sparrow_py.train.runtime_target import RuntimeTarget
from sparrow_py.train.sequences import continue_together
from sparrow_py.train.target import Target


@pytest.fixture(scope="module")
def targets(tiny_qwen2_dir, tmp_path_factory):
    gguf = tmp_path_factory.mktemp("rt") / "target.gguf"
    convert(tiny_qwen2_dir, gguf, outtype="f32", progress=False)
    hf = Target(tiny_qwen2_dir)
    return hf, RuntimeTarget(hf, gguf, n_ctx=256, n_threads=2), gguf


def test_runtime_features_match_transformers(targets):
    hf, rt, _ = targets
    shape = hf.shape
    taps = [0, 1, shape.num_layers]  # the embeddings, a middle layer's input, the final hidden state
    ids = hf.prompt_ids("Speculative decoding is", None)
    want = hf.generate(ids, None, 20)
    got = rt.generate(ids, None, 20)
    assert got == want, "greedy responses of the runtime and transformers differ"
    full = ids + got
    a, b = hf.features(full, None, taps, 0), rt.features(full, None, taps, 0)
    assert torch.equal(a["positions"], b["positions"]) and torch.equal(a["visual"], b["visual"])
    for key in ("taps", "ivsb", "final", "logits"):
        scale = a[key].abs().max()
        assert (a[key] - b[key]).abs().max() <= 5e-4 * scale, (key, float((a[key] - b[key]).abs().max() / scale))
    # without logits (the hidden store) the states are the same bits, and no head ran over the rows
    c = rt.features(full, None, taps, 0, with_logits=False)
    assert "logits" not in c
    for key in ("taps", "ivsb", "final"):
        assert torch.equal(b[key], c[key]), key


def test_generate_batch_equals_one_at_a_time(targets):
    """Responses decoded together (one sequence each in a context) are those generate() gives for
    each prompt alone, whatever the limits; prompts that do not fit the context together go in
    groups (256 positions here: the 150-token limit forces a second group)."""
    hf, rt, _ = targets
    texts = ["The quick brown fox", "every token", "Speculative decoding is", "a", "Once upon a time there"]
    prompts = [hf.prompt_ids(t, None) for t in texts]
    limits = [20, 3, 0, 150, 40]
    want = [rt.generate(p, None, n) for p, n in zip(prompts, limits)]
    assert rt.generate_batch(prompts, limits) == want
    assert sum(map(len, prompts)) + sum(limits) > rt.engine.n_ctx


def test_features_captured_while_generating_equal_a_forward_over_the_sample(targets):
    """generate_batch_features keeps each sample's hidden states from the batched generation
    (every row captured, the final token fed once more) instead of running prompt + response
    again: the responses are generate_batch's, and the features those of features() over each
    sample alone, bit for bit (a row's result does not depend on the rows beside it), through
    an end of turn, a length limit, an empty response and a second context group."""
    hf, rt, _ = targets
    texts = ["The quick brown fox", "every token", "Speculative decoding is", "a", "Once upon a time there"]
    prompts = [hf.prompt_ids(t, None) for t in texts]
    limits = [20, 3, 0, 150, 40]
    taps, ivsb = [0, 1, hf.shape.num_layers], 0
    got = rt.generate_batch_features(prompts, limits, taps, ivsb)
    assert [r for r, _ in got] == rt.generate_batch(prompts, limits)
    for prompt, (response, f) in zip(prompts, got):
        want = rt.features(prompt + response, None, taps, ivsb, with_logits=False)
        assert set(f) == set(want)
        for key in want:
            assert torch.equal(f[key], want[key]), key
    # continuations that end at an end-of-turn token (this random model rarely emits one: a pick
    # that ends every fifth draw of a row), with the token the caller stores fed for its rows
    eos = hf.tokenizer.eos_token_id
    assert rt.engine.is_eog(eos)
    draws = iter(range(10**6))
    pick = lambda row: eos if next(draws) % 5 == 4 else int(np.argmax(row))  # noqa: E731
    done = continue_together(rt.engine, prompts[:3], [20, 20, 2], pick, capture_slots=len(taps) + 2, end_token=eos)
    assert [ended for _, ended, _ in done] == [True, True, False]
    for prompt, (tokens, ended, hidden) in zip(prompts, done):
        full = prompt + tokens + [eos] * ended
        rt.features(full, None, taps, ivsb, with_logits=False)  # sets the engine's capture layers
        rt.engine.decode(full, capture_all=True)
        for slot, h in enumerate(hidden):
            assert np.array_equal(h, rt.engine.hidden(slot)), slot
        rt.engine.kv_truncate(0)


def test_build_cache_with_the_runtime_target(targets, tmp_path):
    hf, rt, _ = targets
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["The quick brown fox", "every token"]))
    config = DraftConfig.for_target(hf.shape, glimpses=0, anchors=4, window=16)
    opts = DataOptions(max_new_tokens=16, cache_dtype="f32", topk=8)
    files_rt, summary = build_cache(rt, [manifest], tmp_path / "rt", config, opts, progress=False)
    files_hf, _ = build_cache(hf, [manifest], tmp_path / "hf", config, opts, progress=False)
    assert summary.good == 2 and len(files_rt) == len(files_hf) == 2
    for f_rt, f_hf in zip(files_rt, files_hf):
        s_rt, s_hf = load_sample(f_rt), load_sample(f_hf)
        assert torch.equal(s_rt["ids"], s_hf["ids"])
        assert torch.allclose(s_rt["taps"], s_hf["taps"], rtol=0, atol=5e-4 * float(s_hf["taps"].abs().max()))
        assert torch.equal(s_rt["topk_idx"][:, 0], s_hf["topk_idx"][:, 0])  # the argmax at every position
    # the default store (hidden): features captured during generation, as the forward gives them
    hidden_opts = DataOptions(max_new_tokens=16, cache_dtype="f32")
    files_cap, _ = build_cache(rt, [manifest], tmp_path / "rt-hidden", config, hidden_opts, progress=False)
    files_one, _ = build_cache(rt, [manifest], tmp_path / "rt-hidden-1", config,
                               DataOptions(max_new_tokens=16, cache_dtype="f32", gen_batch=1), progress=False)
    for f_cap, f_one in zip(files_cap, files_one, strict=True):
        a, b = load_sample(f_cap), load_sample(f_one)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b if isinstance(b[k], torch.Tensor))
    meta = json.loads((tmp_path / "rt" / "meta.json").read_text())
    assert meta["generator"].endswith("target.gguf")
    with pytest.raises(ValueError, match="generator"):  # a runtime cache is not a transformers cache
        build_cache(hf, [manifest], tmp_path / "rt", config, opts, progress=False)


def test_magpie_prompts_come_after_the_user_header(targets):
    _, _, gguf = targets
    with sp.Engine(str(gguf), n_ctx=256, n_threads=2) as e:
        prefix = user_turn_prefix(e)
        text = e.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=False)
        assert e.tokenize(text, add_special=False)[:len(prefix)] == prefix
        assert e.detokenize(prefix, special=True).endswith("user\n")
        prompts = list(magpie_prompts(e, 5, seed=3, max_tokens=48, min_chars=1, batch=4))
        assert len(set(prompts)) == len(prompts) and all(p.strip() == p and p for p in prompts)
        # a seed gives the same prompts again (drafts written together: a draft's logits do not
        # depend on the others in its batch), another seed others
        assert list(magpie_prompts(e, 5, seed=3, max_tokens=48, min_chars=1, batch=4)) == prompts
        assert list(magpie_prompts(e, 5, seed=4, max_tokens=48, min_chars=1, batch=4)) != prompts


@pytest.mark.parametrize("temperature,top_p,candidates", [(1.0, 0.9, 1024), (1.0, 0.9, 2), (2.0, 0.9, 1024),
                                                           (1.0, 1.0, 1024)])
def test_sample_top_p_draws_the_nucleus_distribution(temperature, top_p, candidates):
    """magpie_prompts' sampler against the exact nucleus distribution: softmax at the temperature,
    the most probable tokens until their mass reaches top_p (the crossing one included),
    renormalized. candidates=2 holds less than top_p, so the full sort is taken."""
    import numpy as np

    from sparrow_py.train.prompts import sample_top_p

    p = np.array([0.05, 0.5, 0.002, 0.3, 0.148])
    logits = np.log(p).astype(np.float32) + 3.0
    q = p ** (1.0 / temperature)
    q /= q.sum()
    order = np.argsort(-q)
    cut = int(np.searchsorted(np.cumsum(q[order]), top_p)) + 1 if top_p < 1 else len(q)
    want = np.zeros_like(q)
    want[order[:cut]] = q[order[:cut]] / q[order[:cut]].sum()
    rng = np.random.default_rng(0)
    n = 40_000
    got = np.bincount([sample_top_p(logits, temperature, top_p, rng, candidates) for _ in range(n)], minlength=len(p)) / n
    assert np.all(got[want == 0] == 0), got
    assert np.abs(got - want).max() < 4 * np.sqrt(0.25 / n), (got, want)
    assert sample_top_p(logits, 0.0, top_p, rng, candidates) == int(np.argmax(p))  # temperature 0: greedy


def test_make_prompts_command(targets, tmp_path):
    _, _, gguf = targets
    out = tmp_path / "prompts.jsonl"
    res = subprocess.run([sys.executable, "-m", "sparrow_py.cli", "make-prompts", "-m", str(gguf), "-n", "4", "-o",
                          str(out), "--max-tokens", "48", "--quiet", "-t", "2"], capture_output=True, text=True,
                         cwd=tmp_path)   # not the checkout: its sparrow_py has no built runtime
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(isinstance(r["prompt"], str) and r["prompt"] for r in records)
    bad = subprocess.run([sys.executable, "-m", "sparrow_py.cli", "make-prompts", "-m", str(tmp_path / "nope.gguf"),
                          "-o", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("sparrow make-prompts: error:"), bad.stderr
