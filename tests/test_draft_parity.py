"""The runtime's draft (C++) against the torch module it mirrors (sparrow_py.train.model), step by
step: fused taps, committed entries with a wrapping VATA ring and anchors, glimpses, and
speculative chains, in float32 within 1e-4 of scale."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparrow_py as sp
from sparrow_py.convert import convert
from sparrow_py.draft_session import DraftSession

from draft_util import make_draft


@pytest.fixture(scope="module", params=[1, 2], ids=["one-layer", "two-layer"])
def setup(request, tmp_path_factory, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    from sparrow_py.train.export import load_draft

    root = tmp_path_factory.mktemp("parity")
    target_path = root / "target.gguf"
    convert(tiny_qwen2_dir, target_path, outtype="f32", progress=False)
    # an FFN wider than the target's (96): the runtime must size it from the draft's own GGUF; with
    # two layers, the second random (not the identity it starts as in training)
    draft_path = make_draft(tiny_qwen2_dir, root / "draft", window=6, anchors=3, glimpses=4, seed=3, scale=0.1,
                            intermediate_size=160, num_layers=request.param)
    module = load_draft(root / "draft").eval()
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    embed = hf.get_input_embeddings().weight.detach()
    module.set_target_weights(embed, hf.get_output_embeddings().weight.detach())
    return target_path, draft_path, module


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-12))


def test_draft_matches_torch_step_by_step(setup):
    from sparrow_py.train.model import DraftCache

    target_path, draft_path, module = setup
    c = module.config
    H, nT = c.hidden_size, len(c.taps)
    rng = np.random.default_rng(0)
    n = 20  # > anchors + window: the ring wraps
    anchor_start = 2
    taps = rng.standard_normal((n, nT * H)).astype(np.float32)
    tokens = rng.integers(0, c.vocab_size, size=n).tolist()
    positions = [5 + i for i in range(n)]
    pooled = rng.standard_normal((4, H)).astype(np.float32)
    glimpse_pos = [0, 1, 2, 3]

    with sp.Engine(str(target_path), n_threads=1) as target, DraftSession(target, draft_path, n_ctx=64) as d:
        d.reset(anchor_start)
        cache = DraftCache(c, anchor_start)
        with torch.no_grad():
            module.add_glimpses(cache, torch.from_numpy(pooled), torch.tensor(glimpse_pos))
            g_ref = module.fuse_taps(torch.from_numpy(taps)).numpy()
        d.add_glimpses(pooled, glimpse_pos)
        g = d.fuse_taps(taps)
        assert rel_err(g, g_ref) < 1e-5

        # committed entries: the runtime in two batches, torch one at a time
        h_rt1, logits_rt1 = d.run(tokens[:11], g[:11], positions[:11])
        h_rt2, logits_rt2 = d.run(tokens[11:], g[11:], positions[11:])
        h_rt, logits_rt = np.concatenate([h_rt1, h_rt2]), np.concatenate([logits_rt1, logits_rt2])
        for j in range(n):
            with torch.no_grad():
                logits_ref, h_ref = module.step(cache, tokens[j], torch.from_numpy(g[j]), positions[j], speculative=False)
            assert rel_err(h_rt[j], h_ref.numpy()) < 1e-4, j
            assert rel_err(logits_rt[j], logits_ref.numpy()) < 1e-4, j
        assert d.kv_entries == cache.n_entries()

        # a speculative chain from the last committed state, then rolled back
        for depth_round in range(2):
            h_prev = h_rt[-1]
            pos = positions[-1]
            for depth in range(4):
                tok = int(rng.integers(0, c.vocab_size))
                h_s, logits_s = d.run([tok], h_prev[None], [pos + 1 + depth], parents=[depth - 1])
                with torch.no_grad():
                    logits_ref, h_ref = module.step(cache, tok, torch.from_numpy(h_prev), pos + 1 + depth, speculative=True)
                assert rel_err(h_s[0], h_ref.numpy()) < 1e-4
                assert rel_err(logits_s[0], logits_ref.numpy()) < 1e-4
                h_prev = h_s[0]
            assert d.kv_entries == cache.n_entries() <= c.glimpses + c.anchors + c.window + 4
            d.drop_speculative()
            cache.drop_speculative()


def test_draft_session_bad_input(setup):
    target_path, draft_path, module = setup
    with sp.Engine(str(target_path), n_threads=1) as target, DraftSession(target, draft_path, n_ctx=64) as d:
        H = d.n_embd
        with pytest.raises(sp.SparrowError):
            d.run([10**6], np.zeros((1, H)), [0])
        d.run([1], np.zeros((1, H)), [0], parents=[-1])
        with pytest.raises(sp.SparrowError, match="committed entries must come before"):
            d.run([1], np.zeros((1, H)), [1])
        with pytest.raises(sp.SparrowError, match="speculative"):
            d.run([1], np.zeros((1, H)), [1], parents=[5])
        with pytest.raises(sp.SparrowError):
            d.add_glimpses(np.zeros((9, H)), list(range(9)))  # more than G
    with pytest.raises(sp.SparrowError, match="draft"):
        with sp.Engine(str(target_path), n_threads=1) as target:
            DraftSession(target, target_path)  # a target is not a draft


def test_draft_layer_count_must_match_its_tensors(setup, tmp_path):
    """block_count says how many blk.i the draft has: one layer more than its tensors, or more
    layers than the runtime takes, is a clear error, not a crash."""
    from gguf_edit import copy_gguf

    target_path, draft_path, module = setup
    n = module.config.num_layers
    cases = [({"sparrow-draft.block_count": n + 1}, f"blk.{n}"), ({"sparrow-draft.block_count": 17}, "17 layers"),
             ({"sparrow-draft.block_count": 0}, "0 layers")]
    with sp.Engine(str(target_path), n_threads=1) as target:
        for kv, message in cases:
            bad = tmp_path / "bad.gguf"
            copy_gguf(draft_path, bad, replace_kv=kv)
            with pytest.raises(sp.SparrowError, match=message):
                DraftSession(target, bad)


def test_quantized_draft_tracks_the_f32_draft(setup, tmp_path):
    """convert --outtype q8_0 on a draft: matrices stored as Q8_0 (norms f32), and the runtime's draft
    logits stay close to the f32 file's on the same inputs."""
    import gguf

    target_path, draft_path, module = setup
    q8_path = tmp_path / "draft-q8_0.gguf"
    convert(draft_path.with_suffix(""), q8_path, outtype="q8_0", progress=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(q8_path)).tensors}
    Q = gguf.GGMLQuantizationType
    assert types["blk.0.attn_q.weight"] == types["fc.weight"] == types["blk.0.ffn_down.weight"] == Q.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == Q.F32

    c = module.config
    rng = np.random.default_rng(1)
    taps = rng.standard_normal((8, len(c.taps) * c.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, c.vocab_size, size=8).tolist()
    out = {}
    with sp.Engine(str(target_path), n_threads=1) as target:
        for name, path in (("f32", draft_path), ("q8_0", q8_path)):
            with DraftSession(target, path, n_ctx=64) as d:
                d.reset(0)
                g = d.fuse_taps(taps)
                out[name] = d.run(tokens, g, list(range(8)))[1]
    assert rel_err(out["q8_0"], out["f32"]) < 3e-2
    assert not np.array_equal(out["q8_0"], out["f32"])  # the quantized weights were used


@pytest.mark.parametrize("draft_vocab", [0, 40])
def test_llama_cpp_eagle3_draft_matches_torch(tiny_qwen2_dir, tmp_path, draft_vocab):
    """A llama.cpp eagle3 file (the G = 0, W = 0 case of spec v1: NORM RoPE on permuted q/k rows,
    metadata under eagle3.*) loads and runs as the torch module it came from, committed entries
    and a speculative chain, full and reduced (d2t) vocabulary; speculation with it is lossless."""
    from sparrow_py.train.export import load_draft
    from transformers import AutoModelForCausalLM

    from draft_util import write_eagle3

    target_path = tmp_path / "target.gguf"
    convert(tiny_qwen2_dir, target_path, outtype="f32", progress=False)
    sparrow_path = make_draft(tiny_qwen2_dir, tmp_path / "draft", window=0, anchors=0, glimpses=0, seed=4, scale=0.1,
                              draft_vocab_size=draft_vocab)
    eagle3_path = write_eagle3(sparrow_path, tmp_path / "eagle3.gguf")
    module = load_draft(tmp_path / "draft").eval()
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    module.set_target_weights(hf.get_input_embeddings().weight.detach(), hf.get_output_embeddings().weight.detach())
    from sparrow_py.train.model import DraftCache

    c = module.config
    rng = np.random.default_rng(2)
    n = 12
    taps = rng.standard_normal((n, len(c.taps) * c.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, c.vocab_size, size=n).tolist()
    with sp.Engine(str(target_path), n_threads=1) as target, DraftSession(target, eagle3_path, n_ctx=64) as d:
        d.reset(0)
        cache = DraftCache(c, 0)
        g = d.fuse_taps(taps)
        h_rt, logits_rt = d.run(tokens, g, list(range(3, 3 + n)))
        for j in range(n):
            with torch.no_grad():
                logits_ref, h_ref = module.step(cache, tokens[j], torch.from_numpy(g[j]), 3 + j, speculative=False)
            assert rel_err(h_rt[j], h_ref.numpy()) < 1e-4, j
            assert rel_err(logits_rt[j], logits_ref.numpy()) < 1e-4, j
        h_prev = h_rt[-1]
        for depth in range(3):
            tok = int(rng.integers(0, c.vocab_size))
            h_s, logits_s = d.run([tok], h_prev[None], [3 + n + depth], parents=[depth - 1])
            with torch.no_grad():
                logits_ref, h_ref = module.step(cache, tok, torch.from_numpy(h_prev), 3 + n + depth, speculative=True)
            assert rel_err(logits_s[0], logits_ref.numpy()) < 1e-4
            h_prev = h_s[0]

    prompt = [5, 17, 42, 9, 80, 3, 11]
    with sp.Engine(str(target_path), n_threads=1, kv_type="f32") as ar, \
         sp.Engine(str(target_path), n_threads=1, kv_type="f32", draft=str(eagle3_path)) as spec:
        want = "".join(ar.generate(prompt, max_tokens=24, ignore_eos=True))
        got = "".join(spec.generate(prompt, max_tokens=24, ignore_eos=True, speculative="chain", n_draft=3))
        assert got == want and spec.last_tokens == ar.last_tokens and spec.last_stats["n_drafted"] > 0


def test_eagle3_drafts_that_do_not_fit_are_refused(tiny_qwen2_dir, tmp_path):
    from draft_util import write_eagle3

    target_path = tmp_path / "target.gguf"
    convert(tiny_qwen2_dir, target_path, outtype="f32", progress=False)
    sparrow_path = make_draft(tiny_qwen2_dir, tmp_path / "draft", window=0, anchors=0, glimpses=0, seed=4)
    deep = write_eagle3(sparrow_path, tmp_path / "deep.gguf", taps=[0, 1, 7])  # the target has 2 layers
    with pytest.raises(sp.SparrowError, match="does not fit this target.*tap at layer 7"):
        sp.Engine(str(target_path), n_threads=1, draft=str(deep))
    variant = write_eagle3(sparrow_path, tmp_path / "nbr.gguf", extra_keys={"eagle3.norm_before_residual": True})
    with pytest.raises(sp.SparrowError, match="norm_before_residual"):
        sp.Engine(str(target_path), n_threads=1, draft=str(variant))
