"""The spec v1 draft module: VATA rule, step-by-step inference == masked full-sequence forward,
MTP semantics, glimpse pooling, KV bound, config checks. Random tiny drafts, float32, no target."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sparrow_py.train.model import (DraftCache, DraftConfig, DraftConfigError, SparrowDraft, TargetShape,  # noqa: E402
                                    attend, attend_chain, pool_glimpses, vata_visible)

H = 24


def make_config(**kw) -> DraftConfig:
    base = dict(target_arch="qwen2", target_num_layers=4, vocab_size=50, hidden_size=H, intermediate_size=40,
                num_attention_heads=6, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4,
                taps=[1, 2, 4], ivsb_layer=2, glimpses=3, anchors=2, window=4)
    base.update(kw)
    return DraftConfig(**base)


def make_model(config: DraftConfig, seed: int = 0) -> SparrowDraft:
    torch.manual_seed(seed)
    m = SparrowDraft(config)
    with torch.no_grad():  # random everything, norms included, so nothing is accidentally symmetric
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 1.0) + (1.0 if p.ndim == 1 else 0.0))
        if m.d2t is not None:
            m.d2t.copy_(torch.randperm(config.vocab_size)[:config.draft_vocab_size].sort().values)
    emb = torch.randn(config.vocab_size, H)
    m.set_target_weights(emb, torch.randn(config.vocab_size, H))
    return m.eval()


def random_inputs(config: DraftConfig, M: int, steps: int, anchor_start: int, n_glimpses: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    taps = torch.randn(1, M, len(config.taps) * H, generator=g)
    tokens = torch.randint(0, config.vocab_size, (1, M, steps + 1), generator=g)
    # positions as a target gives them: increasing, with a jump after the video (M-RoPE-like)
    positions = torch.arange(M)[None] + torch.where(torch.arange(M) >= anchor_start, 7, 0)[None] + 3
    glimpses = torch.randn(1, n_glimpses, H, generator=g) * 5
    gpos = torch.arange(n_glimpses)[None] + 3 + anchor_start
    return taps, tokens, positions, glimpses, gpos


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal within tol of the tensor's scale (max |want|): float32 sums in another order."""
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x scale {scale:.3g}"


def brute_force_visible(q: int, k: int, anchor_start: int, S: int, W: int) -> bool:
    """VATA in words: the first S text positions after the video, and the last W up to q."""
    if k > q:
        return False
    anchors = set(range(anchor_start, anchor_start + S))
    window = set(range(q - W + 1, q + 1)) if W > 0 else set(range(0, q + 1))
    return k in anchors or k in window


@pytest.mark.parametrize("anchor_start,S,W", [(0, 0, 0), (3, 2, 4), (5, 4, 1), (0, 6, 3), (2, 0, 5)])
def test_vata_mask_matches_definition(anchor_start, S, W):
    n = 14
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    got = vata_visible(q, k, anchor_start, S, W)
    for i in range(n):
        for j in range(n):
            assert bool(got[i, j]) == brute_force_visible(i, j, anchor_start, S, W), (i, j)


def run_step_by_step(model: SparrowDraft, taps, tokens, positions, glimpses, gpos, anchor_start, steps):
    """For every chain start j0: commit entries 0..j0 one at a time, then draft `steps` more from
    the draft's own hidden state (teacher tokens), as the runtime would. Returns logits/h [s][j0]."""
    M = tokens.shape[1]
    cache = DraftCache(model.config, anchor_start)
    model.add_glimpses(cache, glimpses[0], gpos[0])
    g_all = model.fuse_taps(taps[0])
    logits = [[None] * M for _ in range(steps + 1)]
    hs = [[None] * M for _ in range(steps + 1)]
    max_entries = 0
    for j0 in range(M):
        lg, h = model.step(cache, int(tokens[0, j0, 0]), g_all[j0], int(positions[0, j0]), speculative=False)
        logits[0][j0], hs[0][j0] = lg, h
        for s in range(1, steps + 1):
            lg, h = model.step(cache, int(tokens[0, j0, s]), h, int(positions[0, j0]) + s, speculative=True)
            logits[s][j0], hs[s][j0] = lg, h
            max_entries = max(max_entries, cache.n_entries())
        cache.drop_speculative()
    return logits, hs, max_entries


@pytest.mark.parametrize("kw,anchor_start,n_glimpses", [
    (dict(), 3, 3),                                          # glimpses, anchors, a window smaller than M
    (dict(glimpses=0, anchors=0, window=0), 0, 0),           # the EAGLE-3 special case
    (dict(window=1, anchors=3), 2, 2),                       # window 1: only itself + anchors
    (dict(draft_vocab_size=20), 4, 1),                       # reduced vocabulary head
])
def test_step_by_step_equals_full_forward(kw, anchor_start, n_glimpses):
    config = make_config(**kw)
    model = make_model(config)
    M, steps = 11, 3
    taps, tokens, positions, glimpses, gpos = random_inputs(config, M, steps, anchor_start, n_glimpses)
    with torch.no_grad():
        full_logits, full_h = model.forward_mtp(
            taps, tokens, positions, torch.tensor([M]), torch.tensor([anchor_start]), steps,
            glimpses, gpos, torch.ones(1, n_glimpses, dtype=torch.bool))
        step_logits, step_h, max_entries = run_step_by_step(model, taps, tokens, positions, glimpses, gpos,
                                                             anchor_start, steps)
    for s in range(steps + 1):
        for j0 in range(M):
            assert_close_to_scale(step_logits[s][j0], full_logits[s][0, j0])
            assert_close_to_scale(step_h[s][j0], full_h[s][0, j0])
    if config.window:
        # VATA bound: glimpses + anchors + ring of W, plus the speculative chain
        assert max_entries <= n_glimpses + config.anchors + config.window + steps


def test_attend_chain_is_attention_over_diagonal_blocks():
    """attend_chain (shared keys + each query's own chain keys) equals attend(), torch's fused
    attention, over the layout it replaces: the s chain keys as s diagonal M x M blocks after the
    shared ones. Outputs and gradients, GQA, masked keys on both sides."""
    g = torch.Generator().manual_seed(3)
    B, M, K, s, nh, nkv, hd = 2, 7, 9, 2, 6, 2, 4
    q = torch.randn(B, M, nh, hd, generator=g, requires_grad=True)
    k, v = (torch.randn(B, K, nkv, hd, generator=g, requires_grad=True) for _ in range(2))
    ck, cv = (torch.randn(B, M, s, nkv, hd, generator=g, requires_grad=True) for _ in range(2))
    vis = torch.rand(B, M, K, generator=g) < 0.6
    vis[:, :, 0] = True
    cvis = torch.rand(B, M, s, generator=g) < 0.5
    got = attend_chain(q, k, v, vis, ck, cv, cvis)
    eye = torch.eye(M, dtype=torch.bool)
    want = attend(q, torch.cat([k] + [ck[:, :, r] for r in range(s)], 1), torch.cat([v] + [cv[:, :, r] for r in range(s)], 1),
                  torch.cat([vis] + [eye & cvis[:, :, r, None] for r in range(s)], 2))
    assert_close_to_scale(got.detach(), want.detach())
    w = torch.randn(got.shape, generator=g)
    grads_got = torch.autograd.grad((got * w).sum(), (q, k, v, ck, cv))
    grads_want = torch.autograd.grad((want * w).sum(), (q, k, v, ck, cv))
    for a, b in zip(grads_got, grads_want):
        assert_close_to_scale(a, b)


def test_padding_does_not_change_a_row():
    """A batch row padded to a longer batch gives the same outputs as alone."""
    config = make_config()
    model = make_model(config)
    M, steps = 9, 2
    taps, tokens, positions, glimpses, gpos = random_inputs(config, M, steps, 2, 3)
    pad = 4
    with torch.no_grad():
        alone, _ = model.forward_mtp(taps, tokens, positions, torch.tensor([M]), torch.tensor([2]), steps,
                                     glimpses, gpos, torch.ones(1, 3, dtype=torch.bool))
        bt = torch.cat([taps, torch.randn(1, pad, taps.shape[-1])], 1).repeat(2, 1, 1)
        btok = torch.cat([tokens, torch.zeros(1, pad, steps + 1, dtype=torch.long)], 1).repeat(2, 1, 1)
        bpos = torch.cat([positions, torch.zeros(1, pad, dtype=torch.long)], 1).repeat(2, 1)
        bg = torch.cat([glimpses, torch.randn(1, 1, H)], 1).repeat(2, 1, 1)
        bgp = torch.cat([gpos, torch.zeros(1, 1, dtype=torch.long)], 1).repeat(2, 1)
        gvalid = torch.tensor([[True, True, True, False], [True, True, True, True]])
        batched, _ = model.forward_mtp(bt, btok, bpos, torch.tensor([M, M + pad]), torch.tensor([2, 2]), steps,
                                       bg, bgp, gvalid)
    for s in range(steps + 1):
        assert_close_to_scale(batched[s][0, :M], alone[s][0])
        assert not torch.allclose(batched[s][1, :M], alone[s][0], atol=1e-3)  # the extra glimpse is seen


def test_mtp_step_consumes_its_own_hidden_state():
    """Chain j0 at step s > 0 reads the draft's h, not the target features of later entries:
    changing the taps of entries after j0 leaves it unchanged; changing the taps of j0 does not."""
    config = make_config(glimpses=0, anchors=0, window=0)
    model = make_model(config)
    M, steps, j0 = 8, 3, 3
    taps, tokens, positions, _, _ = random_inputs(config, M, steps, 0, 0)

    def run(t):
        with torch.no_grad():
            lg, hs = model.forward_mtp(t, tokens, positions, torch.tensor([M]), torch.tensor([0]), steps)
        return lg, hs

    base_logits, base_h = run(taps)
    later = taps.clone()
    later[0, j0 + 1:] += torch.randn_like(later[0, j0 + 1:])
    later_logits, _ = run(later)
    for s in range(steps + 1):
        torch.testing.assert_close(later_logits[s][0, j0], base_logits[s][0, j0])
    own = taps.clone()
    own[0, j0] += 1.0
    own_logits, _ = run(own)
    for s in range(steps + 1):
        assert not torch.allclose(own_logits[s][0, j0], base_logits[s][0, j0], atol=1e-4)
    # and step 1 of chain j0 is exactly step() fed with h^0 of chain j0
    cache = DraftCache(config, 0)
    g_all = model.fuse_taps(taps[0])
    with torch.no_grad():
        for j in range(j0 + 1):
            _, h = model.step(cache, int(tokens[0, j, 0]), g_all[j], int(positions[0, j]), speculative=False)
        assert_close_to_scale(h, base_h[0][0, j0])
        lg1, _ = model.step(cache, int(tokens[0, j0, 1]), h, int(positions[0, j0]) + 1, speculative=True)
    assert_close_to_scale(lg1, base_logits[1][0, j0])


def test_pool_glimpses_contiguous_segments():
    states = torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2)
    pos = torch.arange(100, 110)
    pooled, gpos = pool_glimpses(states, pos, 3)
    # segments [0,3) [3,6) [6,10)
    expect = torch.stack([states[0:3].mean(0), states[3:6].mean(0), states[6:10].mean(0)])
    torch.testing.assert_close(pooled, expect)
    assert gpos.tolist() == [100, 103, 106]
    pooled, gpos = pool_glimpses(states[:2], pos[:2], 8)  # fewer visual tokens than G
    assert pooled.shape == (2, 2) and gpos.tolist() == [100, 101]
    pooled, gpos = pool_glimpses(states[:0], pos[:0], 8)
    assert pooled.shape == (0, 2)


def test_config_checks():
    with pytest.raises(DraftConfigError, match="tap 9"):
        make_config(taps=[1, 9]).validate()
    with pytest.raises(DraftConfigError, match="ivsb_layer"):
        make_config(ivsb_layer=4).validate()
    c = make_config()
    shape = TargetShape(arch="qwen2", num_layers=4, vocab_size=50, hidden_size=H, intermediate_size=40,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-6,
                        rope_theta=1e4, tie_word_embeddings=True)
    c.check_fits(shape)
    for field, value, msg in (("hidden_size", 32, "hidden size"), ("vocab_size", 51, "vocab size"),
                              ("num_layers", 5, "layer count"), ("arch", "llama", "architecture")):
        other = TargetShape(**{**shape.__dict__, field: value})
        with pytest.raises(DraftConfigError, match=msg):
            c.check_fits(other)
    assert DraftConfig.from_dict(c.to_dict()) == c
    assert DraftConfig.for_target(shape, glimpses=0).intermediate_size == 40  # the target's FFN by default
    assert DraftConfig.for_target(shape, glimpses=0, intermediate_size=96).intermediate_size == 96
    with pytest.raises(DraftConfigError, match="intermediate_size"):
        make_config(intermediate_size=0).validate()
    with pytest.raises(DraftConfigError, match="num_layers"):
        make_config(num_layers=0).validate()
    assert DraftConfig.for_target(shape, glimpses=0).num_layers == 1
    assert DraftConfig.from_dict({k: v for k, v in c.to_dict().items() if k != "num_layers"}).num_layers == 1


def assert_same_mtp_outputs(reference: SparrowDraft, model: SparrowDraft) -> list[torch.Tensor]:
    """Every MTP step's logits and hidden states of model equal to reference's (1e-6 of scale) on
    one set of random inputs; returns model's logits, with their graph."""
    config = reference.config
    M, steps, anchor_start, n_glimpses = 9, 2, 2, 3
    taps, tokens, positions, glimpses, gpos = random_inputs(config, M, steps, anchor_start, n_glimpses)
    args = (taps, tokens, positions, torch.tensor([M]), torch.tensor([anchor_start]), steps, glimpses, gpos,
            torch.ones(1, n_glimpses, dtype=torch.bool))
    with torch.no_grad():
        want_logits, want_h = reference.forward_mtp(*args)
    got_logits, got_h = model.forward_mtp(*args)
    for s in range(steps + 1):
        assert_close_to_scale(got_logits[s], want_logits[s], tol=1e-6)
        assert_close_to_scale(got_h[s], want_h[s], tol=1e-6)
    return got_logits


def test_widened_ffn_computes_the_same_draft_and_still_learns():
    """widen_ffn: every output of the MTP forward equal to the narrow draft's (the new units' down_proj
    columns are zero), yet the new units get gradient (down's columns at once), and narrowing is refused."""
    from sparrow_py.train.trainer import widen_ffn

    config = make_config(draft_vocab_size=20)
    narrow = make_model(config)
    wide = widen_ffn(narrow, 3 * config.intermediate_size)
    assert wide.config.intermediate_size == 3 * config.intermediate_size
    assert torch.equal(wide.d2t, narrow.d2t) and torch.equal(wide.target_head, narrow.target_head)
    assert wide.gate_proj.weight[config.intermediate_size:].abs().sum() > 0  # random rows, not zeros
    got_logits = assert_same_mtp_outputs(narrow, wide)
    sum(x.float().square().sum() for x in got_logits).backward()
    assert wide.down_proj.weight.grad[:, config.intermediate_size:].abs().sum() > 0
    with pytest.raises(DraftConfigError, match="widened, not narrowed"):
        widen_ffn(narrow, config.intermediate_size - 1)


@pytest.mark.parametrize("kw,anchor_start,n_glimpses", [
    (dict(num_layers=2), 3, 3),                              # glimpses, anchors, a window smaller than M
    (dict(num_layers=3, glimpses=0, anchors=0, window=0, draft_vocab_size=20), 0, 0),
])
def test_deeper_draft_step_by_step_equals_full_forward(kw, anchor_start, n_glimpses):
    """Layers above the first (random, not the identity they start as): the step-by-step cache, one
    slot of every layer's K/V per entry, gives what the masked full forward gives."""
    test_step_by_step_equals_full_forward(kw, anchor_start, n_glimpses)


def test_deepened_draft_computes_the_same_draft_and_still_learns():
    """deepen: a layer on top starts as the identity (every MTP output equal to the shallower
    draft's), yet gets gradient (its o_proj at once); cutting layers is refused; widening a deeper
    draft widens every layer's FFN and keeps its outputs too."""
    from sparrow_py.train.trainer import deepen, widen_ffn

    config = make_config(draft_vocab_size=20)
    shallow = make_model(config)
    deep = deepen(shallow, 2)
    assert deep.config.num_layers == 2 and list(deep.layers) == ["1"]
    assert torch.equal(deep.d2t, shallow.d2t) and torch.equal(deep.target_head, shallow.target_head)
    assert not deep.layers["1"].o_proj.weight.any() and deep.layers["1"].q_proj.weight.abs().sum() > 0
    got_logits = assert_same_mtp_outputs(shallow, deep)
    sum(x.float().square().sum() for x in got_logits).backward()
    assert deep.layers["1"].o_proj.weight.grad.abs().sum() > 0
    with pytest.raises(DraftConfigError, match="deepened, not cut"):
        deepen(deep, 1)

    with torch.no_grad():  # a trained upper layer (not the identity), then widened
        for p in deep.layers["1"].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    wide = widen_ffn(deep, 2 * config.intermediate_size)
    assert not wide.layers["1"].down_proj.weight[:, config.intermediate_size:].any()
    assert_same_mtp_outputs(deep, wide)
