"""Lossless means identical on quantized models too: greedy speculative decoding (chain and tree)
produces exactly plain decoding's tokens over hundreds of tokens, and plain decoding is the same
with 1 and 2 threads.

The target is a small random Qwen2 (hidden 256, so that every matrix is whole k-quant blocks) in
each weight type the CPU backend multiplies: q8_0 / q4_0 / q4_1 from the converter, q4_K / q5_K /
q6_K from tests/kquants.py. Its final norm is scaled down so that the logits crowd together:
near-ties everywhere, where a verify batch that rounded a row differently from decoding that row
alone would change the text. The draft is random, so most rounds end at the first token: the
bonus token then comes from a batch of n_draft + 1 rows, and any batch dependence shows.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparrow_py as sp
from sparrow_py.convert import convert

from conftest import TINY_EOT_ID, TINY_IM_END_ID, TINY_MODEL_VOCAB, _save_model
from draft_util import make_draft
from gguf_edit import copy_gguf
import kquants

N_TOKENS = 300
MODES = {  # adaptive=False: a random draft would otherwise be rested, and batches never verified
    "chain-4": dict(speculative="chain", n_draft=4, adaptive=False),
    "tree": dict(speculative="tree", tree_depth=4, tree_top_k=3, tree_total_tokens=12, adaptive=False),
}


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=TINY_MODEL_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                         bos_token_id=TINY_EOT_ID, eos_token_id=TINY_IM_END_ID)
    return _save_model(Qwen2ForCausalLM(config).eval(), tmp_path_factory.mktemp("lossless") / "model", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def targets(tmp_path_factory, target_dir):
    """type name -> GGUF path, every one with its logits squeezed together."""
    import gguf

    out = tmp_path_factory.mktemp("lossless-gguf")
    paths = {}
    for t in ("q8_0", "q4_0", "q4_1", "q4_K", "q5_K", "q6_K"):
        base = out / f"{t}-base.gguf"
        convert(target_dir, base, outtype=t if t in ("q8_0", "q4_0", "q4_1") else "f32", progress=False)
        r = gguf.GGUFReader(str(base))
        norm = next(np.array(x.data) for x in r.tensors if x.name == "output_norm.weight")
        replace = {"output_norm.weight": (norm * 0.05).astype(np.float32)}
        raw = {}
        if t.endswith("_K"):
            qtype = gguf.GGMLQuantizationType[t.upper()]
            for x in r.tensors:
                if len(x.shape) == 2:
                    replace[x.name] = kquants.quantize(np.array(x.data), t.upper())
                    raw[x.name] = qtype
        paths[t] = copy_gguf(base, out / f"{t}.gguf", replace_tensors=replace, raw_types=raw)
    return paths


@pytest.fixture(scope="module")
def draft(tmp_path_factory, target_dir):
    return make_draft(target_dir, tmp_path_factory.mktemp("lossless-draft") / "draft")


def _near_ties(engine, prompt):
    """How many of the plain run's steps had a top-2 logit gap under 2e-3 (the test is only
    worth something if this is large)."""
    engine.kv_truncate(0)
    logits = engine.decode(prompt)[-1]
    gaps = 0
    for _ in range(N_TOKENS):
        top = np.sort(logits)[-2:]
        gaps += int(top[1] - top[0] < 2e-3)
        logits = engine.decode([int(np.argmax(logits))])[-1]
    return gaps


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q4_K", "q5_K", "q6_K"])
def test_verify_batch_logits_equal_decoding_alone(targets, qtype):
    """The target's logits for k tokens verified in one batch are the same bits as decoding the
    k tokens one at a time (what speculation's losslessness rests on), at 1 and 2 threads, for
    batches of 2..16 and after prompts that end inside and at the edge of an attention block."""
    path = str(targets[qtype])
    rng = np.random.default_rng(7)
    for threads in (1, 2):
        with sp.Engine(path, n_ctx=512, n_threads=threads) as e:
            for n_prompt, k in ((7, 2), (60, 5), (64, 8), (100, 16)):
                prompt = rng.integers(0, e.n_vocab, size=n_prompt).tolist()
                tokens = rng.integers(0, e.n_vocab, size=k).tolist()
                e.kv_truncate(0)
                e.decode(prompt)
                batch = e.decode(tokens, outputs=[True] * k)
                e.kv_truncate(n_prompt)
                alone = np.stack([e.decode([t])[-1] for t in tokens])
                diff = np.flatnonzero((batch != alone).any(axis=1))
                assert diff.size == 0, (f"{qtype}, {threads} thread(s), prompt {n_prompt}: rows {diff.tolist()} of a "
                                        f"{k}-token batch differ from decoding alone (max |diff| "
                                        f"{np.abs(batch - alone).max():.3g})")
            # a tree batch: each node's logits are those of decoding its path alone
            parents = [-1, 0, 0, 1, 2, 3, 3]
            tokens = rng.integers(0, e.n_vocab, size=len(parents)).tolist()
            e.kv_truncate(0)
            e.decode(prompt)
            tree = e.decode(tokens, outputs=[True] * len(tokens), parents=parents)
            for node in range(len(parents)):
                branch = []
                a = node
                while a >= 0:
                    branch.insert(0, tokens[a])
                    a = parents[a]
                e.kv_truncate(len(prompt))
                for t in branch[:-1]:
                    e.decode([t])
                alone = e.decode([branch[-1]])[-1]
                assert np.array_equal(tree[node], alone), f"{qtype}, {threads} thread(s): tree node {node} differs"


# The ref backend (CI's second run) works on one thread whatever it is given: a second pass would
# repeat the first at its scalar speed.
THREAD_COUNTS = (1,) if os.environ.get("SPARROW_BACKEND") == "ref" else (1, 2)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q4_K", "q5_K", "q6_K"])
def test_speculative_equals_plain_on_quantized_targets(targets, draft, qtype):
    path = str(targets[qtype])
    prompt = [5, 17, 42, 99, 7, 3]
    with sp.Engine(path, n_ctx=512, n_threads=1) as plain1:
        want = "".join(plain1.generate(prompt, max_tokens=N_TOKENS, ignore_eos=True))
        want_tokens = list(plain1.last_tokens)
        assert len(want_tokens) == N_TOKENS
        assert _near_ties(plain1, prompt) >= 5, "the logits should crowd together for this test to bite"
    for threads in THREAD_COUNTS[1:]:
        with sp.Engine(path, n_ctx=512, n_threads=threads) as plain:
            "".join(plain.generate(prompt, max_tokens=N_TOKENS, ignore_eos=True))
            assert plain.last_tokens == want_tokens, f"plain decoding differs between 1 and {threads} threads"
    for threads in THREAD_COUNTS:
        with sp.Engine(path, n_ctx=512, n_threads=threads, draft=str(draft)) as spec:
            for mode, kw in MODES.items():
                got = "".join(spec.generate(prompt, max_tokens=N_TOKENS, ignore_eos=True, **kw))
                first_diff = next((i for i, (a, b) in enumerate(zip(spec.last_tokens, want_tokens)) if a != b), None)
                assert spec.last_tokens == want_tokens, (
                    f"{qtype} {mode} with {threads} thread(s): tokens differ from plain decoding at {first_diff}")
                assert got == want
                assert spec.last_stats["n_drafted"] > 0


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquants_helper_round_trips(qtype):
    """The test quantizer writes ggml's layouts: gguf-py's dequantizer gives the weights back
    within the format's resolution."""
    import gguf

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 512)) * 0.05).astype(np.float32)
    blocks = kquants.quantize(x, qtype)
    assert blocks.shape[1] == 2 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])
    err = np.abs(back - x).max() / np.abs(x).max()
    assert err < {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.025}[qtype]


@pytest.mark.skipif(os.environ.get("SPARROW_SIMD") == "avx2", reason="this is the AVX2 run itself")
def test_batch_invariance_at_avx2_level_too():
    """The kernels of every SIMD level must be batch-invariant, not only the best one here: the
    logits test again in a process capped at AVX2 (as AVX2-only CPUs run it)."""
    if "AVX512" not in sp.system_info():
        pytest.skip("this CPU runs the AVX2 kernels in the main test already")
    env = dict(os.environ, SPARROW_SIMD="avx2")
    test = f"{__file__}::test_verify_batch_logits_equal_decoding_alone"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                       capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "6 passed" in r.stdout


def test_weight_of_an_unmultipliable_type_is_refused_at_load(targets, tmp_path):
    """A valid file whose ffn_down is stored as Q8_K (an activation-only type with no dot
    product) is refused when it loads, naming the tensor, instead of failing mid-generation."""
    import gguf

    r = gguf.GGUFReader(str(targets["q8_0"]))
    t = next(x for x in r.tensors if x.name == "blk.0.ffn_down.weight")
    cols, rows = int(t.shape[0]), int(t.shape[1])
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    raw = np.zeros((rows, cols // block * size), dtype=np.uint8)
    bad = copy_gguf(targets["q8_0"], tmp_path / "q8k.gguf", replace_tensors={t.name: raw},
                    raw_types={t.name: gguf.GGMLQuantizationType.Q8_K})
    with pytest.raises(sp.SparrowError, match="blk.0.ffn_down.weight.*q8_K"):
        sp.Engine(str(bad))
