"""Draft training pipeline on tiny random targets: target features vs transformers, bad records
counted, video glimpses, loss falls, resume is exact, trained draft beats untrained, GGUF export
read back with gguf-py, the CLI, and drafts that don't fit refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
gguf = pytest.importorskip("gguf")

from conftest import REPO_ROOT, TINY_VOCAB_SIZE, _lm_sizes, _save_model  # noqa: E402
from sparrow_py.train.data import DataOptions, build_cache, load_sample  # noqa: E402
from sparrow_py.train.evaluate import evaluate  # noqa: E402
from sparrow_py.train.export import load_draft, save_draft  # noqa: E402
from sparrow_py.train.model import DraftConfig, DraftConfigError, SparrowDraft  # noqa: E402
from sparrow_py.train.target import MediaOptions, Target  # noqa: E402
from sparrow_py.train.trainer import TrainOptions, init_from_target, train  # noqa: E402

PROMPTS = ["The quick brown fox", "Speculative decoding is", "Qwen2-VL uses", "Llama models permute",
           "Sparrow drafts tokens", "unicode text is", "Indented code", "every accepted token",
           "the lazy dog", "frames and patches", "the target verifies", "rotary position"]


@pytest.fixture(scope="module")
def video_target_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny Qwen2-VL whose vision token ids lie inside its (tiny) vocabulary, so it runs videos."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    text = _lm_sizes(rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    b = TINY_VOCAB_SIZE  # ids b.. are [PAD] slots of the tiny model's vocabulary
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                           vision_start_token_id=b, vision_end_token_id=b + 1, image_token_id=b + 2,
                           video_token_id=b + 3)
    model = Qwen2VLForConditionalGeneration(config).eval()
    return _save_model(model, tmp_path_factory.mktemp("vl-video") / "tiny-qwen2vl-video", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def text_target(tiny_qwen2_dir) -> Target:
    return Target(tiny_qwen2_dir)


@pytest.fixture(scope="module")
def text_features(text_target, tmp_path_factory):
    """Greedy self-distilled features of the tiny Qwen2 for 12 prompts: (config, files)."""
    d = tmp_path_factory.mktemp("text-feat")
    manifest = d / "train.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = DraftConfig.for_target(text_target.shape, glimpses=0, anchors=4, window=16)
    files, summary = build_cache(text_target, [manifest], d / "cache", config,
                                 DataOptions(max_new_tokens=24, cache_dtype="f32"), progress=False)
    assert summary.good == len(PROMPTS)
    return config, files


def test_target_features_match_transformers(text_target):
    ids = text_target.prompt_ids("The quick brown fox", None) + [5, 17, 99]
    L = text_target.shape.num_layers
    f = text_target.features(ids, None, [0, 1, L], ivsb_layer=0)
    with torch.no_grad():
        ref = text_target.model(torch.tensor([ids]), output_hidden_states=True)
    H = text_target.shape.hidden_size
    for i, tap in enumerate([0, 1]):  # HF hidden_states[l] is the input of layer l
        torch.testing.assert_close(f["taps"][:, i * H:(i + 1) * H], ref.hidden_states[tap][0])
    # tap L is the final hidden state BEFORE the norm; HF's hidden_states[L] has the norm applied
    with torch.no_grad():
        normed = text_target.lm.norm(f["taps"][None, :, 2 * H:])[0]
    torch.testing.assert_close(normed, ref.hidden_states[L][0])
    torch.testing.assert_close(f["ivsb"], ref.hidden_states[1][0])  # output of layer 0
    torch.testing.assert_close(f["logits"], ref.logits[0])
    torch.testing.assert_close(f["final"], ref.hidden_states[L][0])  # the head's input
    assert f["positions"].tolist() == list(range(len(ids)))


@pytest.mark.parametrize("draft_vocab", [0, 40])
def test_hidden_store_is_the_full_distribution_in_fewer_bytes(text_target, tmp_path, draft_vocab):
    """The default cache keeps the head's input instead of the logits: the frozen head gives the
    target's logits back, the loss equals the loss on full logits (with a reduced draft vocabulary
    too), and a sample takes H floats a position instead of V."""
    from safetensors import safe_open
    from sparrow_py.train.data import collate, sample_to_rows
    from sparrow_py.train.trainer import mtp_loss

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    config = DraftConfig.for_target(text_target.shape, glimpses=0, anchors=4, window=16, draft_vocab_size=draft_vocab)
    caches = {}
    for store in ("hidden", "logits"):
        files, _ = build_cache(text_target, [manifest], tmp_path / store, config,
                               DataOptions(max_new_tokens=12, cache_dtype="f32", store=store), progress=False)
        caches[store] = files
    draft = new_draft(config, text_target)
    if draft_vocab:
        with torch.no_grad():
            draft.d2t.copy_(torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(0))[:draft_vocab]
                            .sort().values)
    for f_hidden, f_logits in zip(caches["hidden"], caches["logits"]):
        h, lg = load_sample(f_hidden), load_sample(f_logits)
        assert "topk_val" not in h and "final" not in lg
        torch.testing.assert_close(h["final"] @ draft.target_head.t(), lg["topk_val"], rtol=1e-5, atol=1e-5)
        with safe_open(str(f_hidden), "pt") as a, safe_open(str(f_logits), "pt") as b:
            assert a.get_slice("final").get_shape()[1] == config.hidden_size
            assert b.get_slice("topk_val").get_shape()[1] == config.vocab_size
    batches = {store: collate([sample_to_rows(load_sample(f), 2) for f in files]) for store, files in caches.items()}
    with torch.no_grad():
        b = batches["hidden"]
        logits, _ = draft(b["taps"], b["tokens"], b["positions"], b["n_entries"], b["anchor_start"], 2,
                          b["glimpses"], b["glimpse_pos"], b["glimpse_valid"])
        loss_hidden, parts_hidden = mtp_loss(logits, batches["hidden"], draft, 0.8)
        loss_logits, parts_logits = mtp_loss(logits, batches["logits"], draft, 0.8)
        # the trainer's path: the head only at the entries with a target, in the same order
        has_target = b["target_row"] >= 0
        assert not bool(has_target.all())  # padding and the last entries of each step are left out
        sparse, sparse_h = draft(b["taps"], b["tokens"], b["positions"], b["n_entries"], b["anchor_start"], 2,
                                 b["glimpses"], b["glimpse_pos"], b["glimpse_valid"], has_target)
        _, full_h = draft(b["taps"], b["tokens"], b["positions"], b["n_entries"], b["anchor_start"], 2,
                          b["glimpses"], b["glimpse_pos"], b["glimpse_valid"])
        for s, (full, part) in enumerate(zip(logits, sparse)):
            torch.testing.assert_close(part, full[has_target[:, :, s]])
            # a step runs only where it or a later step has a target: its hidden state is the full
            # run's there, and 0 (not computed) elsewhere
            needed = has_target[:, :, s:].any(-1)
            torch.testing.assert_close(sparse_h[s][needed], full_h[s][needed])
            assert bool((sparse_h[s][~needed] == 0).all()) and not bool(needed.all())
        loss_sparse, parts_sparse = mtp_loss(sparse, b, draft, 0.8)
    torch.testing.assert_close(loss_hidden, loss_logits, rtol=1e-4, atol=1e-6)
    assert np.allclose(parts_hidden, parts_logits, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss_sparse, loss_hidden)
    assert np.allclose(parts_sparse, parts_hidden)

    # a sharpened target (--target-temperature): KL to softmax(logits / T), and at 0 the
    # cross-entropy of the target's argmax, against torch's own divergences; both stores agree
    head = draft.target_head if draft.d2t is None else draft.target_head[draft.d2t]
    for temperature in (0.5, 0.0):
        want = 0.0
        for s, lg in enumerate(logits):
            rows = b["target_row"][:, :, s]
            valid = rows >= 0
            logq = F.log_softmax(lg[valid].float(), dim=-1)
            target_logits = b["final"][rows[valid]] @ head.t()
            if temperature:
                term = F.kl_div(logq, F.log_softmax(target_logits / temperature, dim=-1), log_target=True,
                                reduction="batchmean")
            else:
                term = F.nll_loss(logq, target_logits.argmax(-1))
            want += 0.8 ** s * float(term)
        with torch.no_grad():
            got_hidden, _ = mtp_loss(logits, batches["hidden"], draft, 0.8, temperature)
            got_logits, _ = mtp_loss(logits, batches["logits"], draft, 0.8, temperature)
        assert float(got_hidden) == pytest.approx(want, rel=1e-4)
        torch.testing.assert_close(got_hidden, got_logits, rtol=1e-4, atol=1e-6)
        # a bf16 step's head product: close for a sharpened target, float32 (the same) for its argmax
        with torch.no_grad():
            got_bf16, _ = mtp_loss(logits, batches["hidden"], draft, 0.8, temperature, bf16=True)
        if temperature:
            assert float(got_bf16) == pytest.approx(want, rel=2e-2) and float(got_bf16) != float(got_hidden)
        else:
            assert float(got_bf16) == float(got_hidden)


def test_batched_generation_is_generation_one_by_one(text_target):
    """The data step generates greedy text responses in batches (left-padded): each equals the
    target's own response to its prompt alone, cut at the same place (end of turn or its limit)."""
    prompts = [text_target.prompt_ids(p, None) for p in PROMPTS[:5]]
    limits = [24, 3, 24, 10, 1]
    alone = [text_target.generate(p, None, n) for p, n in zip(prompts, limits)]
    assert text_target.generate_batch(prompts, limits) == alone
    assert len({len(p) for p in prompts}) > 1  # the prompts differ in length: padding is exercised


def test_bad_records_skipped_and_counted(text_target, tmp_path, capsys):
    m = tmp_path / "m.jsonl"
    lines = [json.dumps({"prompt": "The quick brown fox"}),
             "{not json",
             json.dumps({"prompt": ""}),
             json.dumps([1, 2]),
             json.dumps({"video": "missing.mp4", "prompt": "x"}),       # text-only target: no vision tower
             json.dumps({"conversations": [{"from": "gpt", "value": "no question"}]}),
             json.dumps({"conversations": [{"from": "human", "value": "Speculative decoding is"}]}),
             json.dumps({"prompt": "word " * 300})]                     # over-long
    m.write_text("\n".join(lines) + "\n")
    config = DraftConfig.for_target(text_target.shape, glimpses=0)
    opts = DataOptions(max_new_tokens=8, max_len=120)
    files, s = build_cache(text_target, [m], tmp_path / "c", config, opts, progress=False)
    assert (s.total, s.new, s.reused) == (8, 2, 0)
    assert dict(s.bad) == {"invalid JSON": 1, "missing prompt": 1, "record is not a JSON object": 1,
                           "video/images given but the target has no vision tower": 1, "no human turn": 1,
                           "over-long sample": 1}
    text = "\n".join(s.lines())
    assert "6 skipped" in text and "over-long sample" in text
    # resumable: a second run reuses the two files and recounts the bad ones
    files2, s2 = build_cache(text_target, [m], tmp_path / "c", config, opts, progress=False)
    assert files2 == files and (s2.new, s2.reused, sum(s2.bad.values())) == (0, 2, 6)
    # a cache made with other settings is refused
    with pytest.raises(ValueError, match="topk"):
        build_cache(text_target, [m], tmp_path / "c", config, DataOptions(max_new_tokens=8, max_len=120, topk=5),
                    progress=False)


def test_video_sample_glimpses(video_target_dir, tmp_path):
    target = Target(video_target_dir)
    # ivsb_layer 0: HF's hidden_states[1] is its output (hidden_states[L] would be after the final norm)
    config = DraftConfig.for_target(target.shape, ivsb_layer=0, glimpses=3, anchors=4, window=8)
    frames = (np.random.RandomState(0).rand(6, 56, 56, 3) * 255).astype(np.uint8)  # 3 temporal patches x 4 tokens
    np.save(tmp_path / "clip.npy", frames)
    np.save(tmp_path / "broken.npy", frames[0])                                      # one image, not a clip
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in [
        {"video": "clip.npy", "prompt": "Describe the video."},
        {"video": "broken.npy", "prompt": "x"},
        {"video": "gone.npy", "prompt": "x"},
        {"prompt": "text only works too"}]) + "\n")
    media = MediaOptions(max_pixels=56 * 56)  # the frames stay 56x56, as `sparrow run --max-pixels 3136` keeps them
    files, s = build_cache(target, [m], tmp_path / "c", config, DataOptions(max_new_tokens=6, media=media),
                           progress=False)
    assert s.good == 2 and dict(s.bad) == {"unreadable video (VideoInputError)": 1, "missing video file": 1}
    sample = load_sample(files[0])
    ids, visual = sample["ids"].long(), sample["visual"].bool()
    vis_pos = torch.nonzero(visual).flatten()
    assert len(vis_pos) == 12 and int(ids[vis_pos[0] - 1]) == target.config["vision_start_token_id"]
    # independent reference: HF hidden_states[ivsb_layer + 1] at the visual positions, pooled 4/4/4
    visual_inputs = target.visual_inputs(frames, media)
    with torch.no_grad():
        ref = target.model(input_ids=ids[None], output_hidden_states=True,
                           **target._model_kwargs(ids[None], visual_inputs))
    states = ref.hidden_states[config.ivsb_layer + 1][0][vis_pos]
    expect = torch.stack([states[0:4].mean(0), states[4:8].mean(0), states[8:12].mean(0)])
    torch.testing.assert_close(sample["glimpses"], expect, rtol=1e-4, atol=1e-5)
    # M-RoPE: each glimpse sits at the temporal position of its segment's first visual token
    assert sample["glimpse_pos"].tolist() == sample["positions"][vis_pos[[0, 4, 8]]].tolist()
    assert len(set(sample["glimpse_pos"].tolist())) == 3
    # anchors start at the first draft entry after the video
    text_pos = torch.nonzero(~visual).flatten()
    assert sample["anchor_start"] == int((text_pos < vis_pos[-1]).sum())
    # text positions after the video continue from the M-RoPE max, not the sequence index
    after = int(vis_pos[-1]) + 1
    assert int(sample["positions"][after]) < after


def new_draft(config: DraftConfig, target: Target) -> SparrowDraft:
    model = SparrowDraft(config)
    model.set_target_weights(*target.embed_and_head())
    init_from_target(model, target)
    return model


def test_loss_falls_trained_beats_untrained_and_resume_is_exact(text_target, text_features, tmp_path):
    config, files = text_features
    train_files, held_out = files[:9], [load_sample(f) for f in files[9:]]
    opts = TrainOptions(steps=24, lr=3e-3, warmup_steps=3, mtp_steps=2, batch_size=1, grad_accum=2,
                        position_jitter=8, seed=3, eval_depth=3, progress=False)
    untrained = evaluate(new_draft(config, text_target), held_out, depth=3)
    full = train(new_draft(config, text_target), train_files, held_out, opts, tmp_path / "a", log=lambda s: None)
    first, last = np.mean(full.losses[:3]), np.mean(full.losses[-3:])
    assert last < 0.7 * first, (first, last)  # the loss is a KL: 0 for a perfect draft
    assert full.eval["mean_accepted_length"] > untrained.mean_accepted_length + 0.2, \
        (full.eval, untrained.mean_accepted_length)
    assert (tmp_path / "a" / "model.safetensors").exists()
    # interrupted after 12 steps, then resumed from the checkpoint: the same losses, bit for bit
    part = train(new_draft(config, text_target), train_files, [], opts, tmp_path / "b", stop_after=12,
                 log=lambda s: None)
    assert len(part.losses) == 12
    rest = train(new_draft(config, text_target), train_files, [], opts, tmp_path / "b", log=lambda s: None)
    assert rest.losses == full.losses
    a = load_draft(tmp_path / "a").state_dict()
    b = load_draft(tmp_path / "b").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_loss_fraction_trains_a_share_of_the_chains_and_resumes_exactly(text_target, text_features, tmp_path):
    """--loss-fraction: a dropped entry keeps its tokens, taps and position (it is still a key) but
    loses every target of its chain; a kept one keeps them all. The draw is part of the run's
    determinism: an interrupted run resumes to the same losses."""
    from sparrow_py.train.data import sample_to_rows

    config, files = text_features
    kept = total = 0
    for i, f in enumerate(files):
        s = load_sample(f)
        full = sample_to_rows(s, 2)
        part = sample_to_rows(s, 2, 0, 0.5, torch.Generator().manual_seed(i))
        for k in full:
            if k != "target_row":
                torch.testing.assert_close(part[k], full[k], rtol=0, atol=0)
        trained = (full["target_row"] >= 0).any(-1)
        keep = (part["target_row"] >= 0).any(-1)
        assert bool((part["target_row"][keep] == full["target_row"][keep]).all())
        assert bool((part["target_row"][~keep] == -1).all())
        kept += int(keep.sum())
        total += int(trained.sum())
    assert 0.3 * total < kept < 0.7 * total, (kept, total)

    # the trainer's forward on such a batch: the kept chains' logits and hidden states are the full
    # run's; a dropped entry's step 0 is not computed past its key and value (its h is 0)
    from sparrow_py.train.data import collate

    draft = new_draft(config, text_target)
    b = collate([sample_to_rows(load_sample(f), 2, 0, 0.5, torch.Generator().manual_seed(i))
                 for i, f in enumerate(files[:3])])
    args = (b["taps"], b["tokens"], b["positions"], b["n_entries"], b["anchor_start"], 2, b["glimpses"],
            b["glimpse_pos"], b["glimpse_valid"])
    with torch.no_grad():
        full_logits, full_h = draft(*args)
        part_logits, part_h = draft(*args, b["target_row"] >= 0)
    for st in range(3):
        has = b["target_row"][:, :, st] >= 0
        torch.testing.assert_close(part_logits[st], full_logits[st][has])
        needed = (b["target_row"][:, :, st:] >= 0).any(-1)
        torch.testing.assert_close(part_h[st][needed], full_h[st][needed])
        assert bool((part_h[st][~needed] == 0).all())
    dropped = (b["target_row"] < 0).all(-1) & (torch.arange(b["taps"].shape[1]) < b["n_entries"][:, None])
    assert bool(dropped.any())
    # however small the share, every sample keeps a chain (a batch always has a loss)
    for i, f in enumerate(files):
        assert bool((sample_to_rows(load_sample(f), 2, 0, 1e-6, torch.Generator().manual_seed(i))["target_row"] >= 0).any())

    train_files = files[:9]
    opts = TrainOptions(steps=12, lr=3e-3, warmup_steps=3, mtp_steps=2, batch_size=2, loss_fraction=0.5, seed=3,
                        progress=False)
    whole = train(new_draft(config, text_target), train_files, [], opts, tmp_path / "a", log=lambda s: None)
    train(new_draft(config, text_target), train_files, [], opts, tmp_path / "b", stop_after=5, log=lambda s: None)
    rest = train(new_draft(config, text_target), train_files, [], opts, tmp_path / "b", log=lambda s: None)
    assert rest.losses == whole.losses
    every = train(new_draft(config, text_target), train_files, [], TrainOptions(**{**opts.__dict__, "loss_fraction": 1.0}),
                  tmp_path / "c", log=lambda s: None)
    assert every.losses[0] != whole.losses[0]  # the fraction took effect from the first step


def test_evaluation_accounting(text_target, text_features):
    """Every generated token after the first is produced by exactly one simulated target forward."""
    config, files = text_features
    samples = [load_sample(f) for f in files[:3]]
    stats = evaluate(new_draft(config, text_target), samples, depth=3)
    assert stats.tokens == sum(len(s["ids"]) - s["prompt_len"] - 1 for s in samples)
    assert 1.0 <= stats.mean_accepted_length <= 4.0
    # a depth is attempted only after the one before it was accepted (chains near the end are shorter)
    assert all(stats.attempted[d + 1] <= stats.accepted[d] for d in range(2))
    assert stats.forwards + sum(stats.accepted) - len(samples) <= stats.tokens <= stats.forwards + sum(stats.accepted)


@pytest.mark.parametrize("draft_vocab,outtype,layers", [(0, "f32", 1), (40, "f32", 1), (0, "f16", 1), (40, "f16", 3)])
def test_export_gguf_round_trip(text_target, tmp_path, draft_vocab, outtype, layers):
    from sparrow_py.convert import convert

    config = DraftConfig.for_target(text_target.shape, glimpses=4, anchors=8, window=32, draft_vocab_size=draft_vocab,
                                    num_layers=layers)
    model = new_draft(config, text_target)
    if draft_vocab:
        with torch.no_grad():
            model.d2t.copy_(torch.arange(0, 2 * draft_vocab, 2))
    save_draft(model, tmp_path / "draft")
    out = tmp_path / "draft.gguf"
    convert(tmp_path / "draft", out, outtype, progress=False)
    r = gguf.GGUFReader(str(out))

    def field(name):
        f = r.fields[name]
        return f.contents()

    assert field("general.architecture") == "sparrow-draft"
    H, L = config.hidden_size, config.target_num_layers
    expect_keys = {"sparrow-draft.target.architecture": "qwen2", "sparrow-draft.target.block_count": L,
                   "sparrow-draft.embedding_length": H, "sparrow-draft.vocab_size": config.vocab_size,
                   "sparrow-draft.draft_vocab_size": draft_vocab or config.vocab_size,
                   "sparrow-draft.taps": config.taps, "sparrow-draft.ivsb_layer": config.ivsb_layer,
                   "sparrow-draft.glimpses": 4, "sparrow-draft.anchors": 8, "sparrow-draft.window": 32,
                   "sparrow-draft.attention.head_count": 4, "sparrow-draft.attention.head_count_kv": 2,
                   "sparrow-draft.rope.freq_base": 1e6, "sparrow-draft.block_count": layers}
    for k, v in expect_keys.items():
        assert field(k) == v, k
    tensors = {t.name: t for t in r.tensors}
    names = {"fc.weight": "fc.weight", "blk.0.attn_norm.weight": "embed_norm.weight",
             "blk.0.attn_norm_2.weight": "hidden_norm.weight", "blk.0.attn_q.weight": "q_proj.weight",
             "blk.0.attn_k.weight": "k_proj.weight", "blk.0.attn_v.weight": "v_proj.weight",
             "blk.0.attn_output.weight": "o_proj.weight", "blk.0.ffn_norm.weight": "ffn_norm.weight",
             "blk.0.ffn_gate.weight": "gate_proj.weight", "blk.0.ffn_up.weight": "up_proj.weight",
             "blk.0.ffn_down.weight": "down_proj.weight", "output_norm.weight": "output_norm.weight",
             "glimpse_proj.weight": "glimpse_proj.weight"}
    if draft_vocab:
        names.update({"output.weight": "lm_head.weight", "d2t": "d2t"})
    for i in range(1, layers):  # the layers above the first, llama.cpp's per-block names
        names.update({f"blk.{i}.attn_norm.weight": f"layers.{i}.attn_norm.weight",
                      f"blk.{i}.attn_q.weight": f"layers.{i}.q_proj.weight",
                      f"blk.{i}.attn_k.weight": f"layers.{i}.k_proj.weight",
                      f"blk.{i}.attn_v.weight": f"layers.{i}.v_proj.weight",
                      f"blk.{i}.attn_output.weight": f"layers.{i}.o_proj.weight",
                      f"blk.{i}.ffn_norm.weight": f"layers.{i}.ffn_norm.weight",
                      f"blk.{i}.ffn_gate.weight": f"layers.{i}.gate_proj.weight",
                      f"blk.{i}.ffn_up.weight": f"layers.{i}.up_proj.weight",
                      f"blk.{i}.ffn_down.weight": f"layers.{i}.down_proj.weight"})
    assert set(tensors) == set(names)
    state = model.state_dict()
    for gname, tname in names.items():
        t, ref = tensors[gname], state[tname]
        assert tuple(reversed([int(x) for x in t.shape])) == tuple(ref.shape), gname  # GGUF lists ne reversed
        data = np.asarray(t.data).reshape(ref.shape)
        if tname == "d2t":
            assert t.tensor_type == gguf.GGMLQuantizationType.I64
            assert data.tolist() == ref.tolist()
        elif ref.ndim == 1 or outtype == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(data, ref.numpy())
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(data, ref.numpy().astype(np.float16))


def test_to_gguf_command_line_converts_a_draft(text_target, tmp_path):
    config = DraftConfig.for_target(text_target.shape, glimpses=2)
    save_draft(new_draft(config, text_target), tmp_path / "my-draft")
    out = tmp_path / "my-draft.gguf"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "convert" / "to_gguf.py"), str(tmp_path / "my-draft"),
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "sparrow-draft"


def test_draft_that_does_not_fit_is_refused(text_target, tiny_llama_dir, tmp_path):
    config = DraftConfig.for_target(text_target.shape, glimpses=0)
    save_draft(new_draft(config, text_target), tmp_path / "d")
    with pytest.raises(DraftConfigError, match="architecture llama.*hidden size 72"):
        load_draft(tmp_path / "d", Target(tiny_llama_dir))
    from sparrow_py.cli import main
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert main(["eval-draft", "--target", str(tiny_llama_dir), "--draft", str(tmp_path / "d"),
                 "--data", str(m)]) == 1


def test_cli_train_then_eval(tiny_qwen2_dir, tmp_path, capsys, retain_freed_memory_calls):
    from sparrow_py.cli import main

    m = tmp_path / "train.jsonl"
    m.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4]) + "{broken\n")
    h = tmp_path / "heldout.jsonl"
    h.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[4:6]))
    out = tmp_path / "drafts" / "my-draft"
    for bad in ("0", "1.5"):
        assert main(["train", "--target", str(tiny_qwen2_dir), "--data", str(m), "--out", str(out),
                     "--loss-fraction", bad]) == 1
        assert "--loss-fraction must be above 0 and at most 1" in capsys.readouterr().err
    rc = main(["train", "--target", str(tiny_qwen2_dir), "--data", str(m), "--out", str(out), "--steps", "4",
               "--mtp-steps", "1", "--glimpses", "0", "--window", "16", "--anchors", "4", "--max-new-tokens", "12",
               "--draft-vocab", "64", "--quiet", "--eval-data", str(h), "--loss-fraction", "0.5"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert retain_freed_memory_calls == [True]  # its steps' large tensors reuse memory (trainer.py)
    assert "1 skipped" in text and "invalid JSON" in text and "mean accepted length" in text
    assert DraftConfig.load(out).draft_vocab_size == 64
    rc = main(["eval-draft", "--target", str(tiny_qwen2_dir), "--draft", str(out), "--data", str(h),
               "--max-new-tokens", "12", "--depth", "3"])
    text = capsys.readouterr().out
    assert rc == 0 and "mean accepted length" in text and "acceptance by depth" in text


def test_cli_train_init_from_keeps_the_draft_and_its_vocabulary(tiny_qwen2_dir, tmp_path, capsys):
    """--init-from starts from an exported draft: at learning rate 0 the result is that draft bit for
    bit, d2t included, although the new data's own top tokens would give another vocabulary; a
    draft of other settings is refused with the setting named."""
    from safetensors.torch import load_file

    from sparrow_py.cli import main
    from sparrow_py.train.trainer import choose_draft_vocab

    first, more = tmp_path / "first.jsonl", tmp_path / "more.jsonl"
    first.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    more.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[3:8]))
    common = ["train", "--target", str(tiny_qwen2_dir), "--mtp-steps", "1", "--glimpses", "0", "--window", "16",
              "--anchors", "4", "--max-new-tokens", "12", "--draft-vocab", "48", "--quiet"]
    assert main([*common, "--data", str(first), "--out", str(tmp_path / "a"), "--steps", "3", "--lr", "3e-3"]) == 0
    assert main([*common, "--data", str(more), "--out", str(tmp_path / "b"), "--steps", "2", "--lr", "0",
                 "--init-from", str(tmp_path / "a")]) == 0
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    files = sorted((tmp_path / "b" / "features").rglob("*.safetensors"))
    own = choose_draft_vocab(files, DraftConfig.load(tmp_path / "b").vocab_size, 48)
    assert not torch.equal(own, a["d2t"])  # the test can tell a kept vocabulary from a recomputed one
    capsys.readouterr()
    assert main([*common[:-3], "--draft-vocab", "32", "--quiet", "--data", str(more), "--out", str(tmp_path / "c"),
                 "--steps", "1", "--init-from", str(tmp_path / "a")]) == 1
    assert "draft_vocab_size 48 (the flags give 32)" in capsys.readouterr().err
    assert main([*common, "--data", str(more), "--out", str(tmp_path / "c"), "--steps", "1",
                 "--init-from", str(tmp_path / "nowhere")]) == 1
    assert "--init-from" in capsys.readouterr().err


def small_train_args(target_dir, tmp_path) -> list[str]:
    """`sparrow train` on three prompts of a tiny target, short answers, one shared feature cache."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    return ["train", "--target", str(target_dir), "--mtp-steps", "1", "--glimpses", "0", "--window", "16",
            "--anchors", "4", "--max-new-tokens", "12", "--draft-vocab", "48", "--quiet", "--data", str(data),
            "--cache-dir", str(tmp_path / "features")]


def test_cli_train_init_from_widens_the_ffn(tiny_qwen2_dir, tmp_path, capsys):
    """--draft-ffn with --init-from: the draft's weights in the first units, zero down_proj columns
    for the new ones (learning rate 0 keeps what the widening made); without the flag a widened
    draft goes on at its own width; narrowing is refused."""
    from safetensors.torch import load_file

    from sparrow_py.cli import main

    common = small_train_args(tiny_qwen2_dir, tmp_path)
    assert main([*common, "--out", str(tmp_path / "a"), "--steps", "2", "--lr", "3e-3"]) == 0
    n = DraftConfig.load(tmp_path / "a").intermediate_size
    assert main([*common, "--out", str(tmp_path / "b"), "--steps", "1", "--lr", "0", "--draft-ffn", str(2 * n),
                 "--init-from", str(tmp_path / "a")]) == 0
    assert DraftConfig.load(tmp_path / "b").intermediate_size == 2 * n
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    for k in a:
        if k in ("gate_proj.weight", "up_proj.weight"):
            assert torch.equal(b[k][:n], a[k]) and b[k][n:].abs().sum() > 0, k
        elif k == "down_proj.weight":
            assert torch.equal(b[k][:, :n], a[k]) and not b[k][:, n:].any()
        else:
            assert torch.equal(a[k], b[k]), k
    assert main([*common, "--out", str(tmp_path / "c"), "--steps", "1", "--init-from", str(tmp_path / "b")]) == 0
    assert DraftConfig.load(tmp_path / "c").intermediate_size == 2 * n
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "d"), "--steps", "1", "--draft-ffn", str(n),
                 "--init-from", str(tmp_path / "b")]) == 1
    assert "widened, not narrowed" in capsys.readouterr().err


def test_cli_train_init_from_deepens_the_draft(tiny_qwen2_dir, tmp_path, capsys):
    """--draft-layers with --init-from: the draft's weights kept, a layer on top with zero o_proj and
    down_proj (learning rate 0 keeps what deepening made); fewer layers are refused."""
    from safetensors.torch import load_file

    from sparrow_py.cli import main

    common = small_train_args(tiny_qwen2_dir, tmp_path)
    assert main([*common, "--out", str(tmp_path / "a"), "--steps", "2", "--lr", "3e-3"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--steps", "1", "--lr", "0", "--draft-layers", "2",
                 "--init-from", str(tmp_path / "a")]) == 0
    assert DraftConfig.load(tmp_path / "b").num_layers == 2
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(b) - set(a) == {f"layers.1.{n}.weight" for n in ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "ffn_norm", "gate_proj", "up_proj", "down_proj")}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not b["layers.1.o_proj.weight"].any() and not b["layers.1.down_proj.weight"].any()
    assert b["layers.1.q_proj.weight"].abs().sum() > 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "c"), "--steps", "1", "--draft-layers", "1",
                 "--init-from", str(tmp_path / "b")]) == 1
    assert "deepened, not cut" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "c"), "--steps", "1", "--draft-layers", "0"]) == 1
    assert "--draft-layers must be at least 1" in capsys.readouterr().err


def test_target_without_chat_template(tiny_qwen2_dir, tmp_path, capsys):
    """A clear error that names the fix (it was a transformers traceback), and --raw-prompts."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_qwen2_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(DraftConfigError, match="no chat template.*--raw-prompts"):
        Target(bare)
    raw = Target(bare, raw_prompts=True)
    assert raw.prompt_ids("the red circle", None) == raw.tokenizer("the red circle")["input_ids"]
    from sparrow_py.cli import main
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"prompt": "the red circle"}) + "\n")
    args = ["train", "--target", str(bare), "--data", str(m), "--out", str(tmp_path / "d"), "--steps", "1",
            "--mtp-steps", "1", "--glimpses", "0", "--max-new-tokens", "4", "--quiet"]
    assert main(args) == 1
    assert "no chat template" in capsys.readouterr().err
    assert main(args + ["--raw-prompts"]) == 0
    meta = json.loads((tmp_path / "d" / "features" / "meta.json").read_text())
    assert meta["prompts"] == "raw"


def test_cli_help_documents_every_option(tmp_path):
    # cwd away from the checkout: its sparrow_py has no compiled runtime, the installed one has
    for cmd in ("train", "eval-draft"):
        r = subprocess.run([sys.executable, "-c", f"import sys; from sparrow_py.cli import main; "
                            f"main(['{cmd}', '--help'])"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0
        assert "--target" in r.stdout
    # no torch at import time of the command
    r = subprocess.run([sys.executable, "-c", "import sys, sparrow_py.cli; assert 'torch' not in sys.modules"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_ddp_on_two_cpu_processes_equals_gradient_accumulation(tiny_qwen2_dir, tmp_path):
    """torchrun with 2 processes (gloo on the CPU) and batch 1 per process averages the two
    shards' gradients: the same update as one process accumulating the same two samples
    (batch 1, --grad-accum 2), which takes the same files in the same order."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    m = tmp_path / "train.jsonl"
    m.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:6]))
    common = ["train", "--target", str(tiny_qwen2_dir), "--data", str(m), "--steps", "6", "--batch-size", "1",
              "--mtp-steps", "2", "--glimpses", "0", "--window", "16", "--anchors", "4", "--max-new-tokens", "12",
              "--lr", "3e-3", "--seed", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "sparrow_py.cli", *common, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "sparrow_py.cli", *common, "--grad-accum", "2",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(str(tmp_path / "ddp" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert a.keys() == b.keys()
    init = new_draft(DraftConfig.load(tmp_path / "one"), Target(tiny_qwen2_dir)).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(b[k], init[k]) for k in b if k in init)  # both trained
    la = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)["losses"]
    lb = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["losses"]
    np.testing.assert_allclose(la, lb, rtol=1e-4)


def test_bf16_autocast_trains(text_target, text_features, tmp_path):
    """--bf16 on (what CUDA runs by default) works on the CPU too: the loss falls like float32's,
    and it is not float32's (autocast really ran in bfloat16)."""
    config, files = text_features
    losses = {}
    for bf16 in (False, True):
        opts = TrainOptions(steps=16, lr=3e-3, warmup_steps=2, mtp_steps=2, batch_size=2, seed=5, bf16=bf16,
                            progress=False)
        result = train(new_draft(config, text_target), files, [], opts, tmp_path / f"bf16-{bf16}", log=lambda s: None)
        losses[bf16] = result.losses
    f32, bf = np.array(losses[False]), np.array(losses[True])
    assert bf[-3:].mean() < 0.7 * bf[:3].mean()
    assert not np.array_equal(f32, bf)
    assert abs(bf[-3:].mean() - f32[-3:].mean()) < 0.2 * f32[:3].mean()


def test_bf16_on_a_cpu_without_bf16_units_warns(text_target, text_features, tmp_path, monkeypatch):
    """bf16 autocast that the CPU must emulate is slow (25x float32's step on an AVX2 EPYC): the
    run says so and trains on; with hardware bf16 (or float32) nothing is said."""
    from sparrow_py.train import trainer

    config, files = text_features
    for has_bf16, bf16, warned in ((False, True, True), (True, True, False), (False, False, False)):
        monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: has_bf16)
        lines = []
        opts = TrainOptions(steps=1, mtp_steps=1, batch_size=1, bf16=bf16, progress=False)
        result = train(new_draft(config, text_target), files, [], opts, tmp_path / f"{has_bf16}-{bf16}", log=lines.append)
        assert len(result.losses) == 1
        assert any("bf16" in line and "--bf16 off" in line for line in lines) == warned, lines


def test_bf16_by_default_where_the_hardware_computes_it(text_target, text_features, tmp_path, monkeypatch):
    """TrainOptions.bf16 None (`--bf16 auto`) trains in bf16 on a CPU with bf16 units (twice as fast
    as float32 on a Zen 5) and in float32 on one without: the same losses as the explicit choice."""
    from sparrow_py.train import trainer

    config, files = text_features

    def losses(bf16, has_bf16):
        monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: has_bf16)
        opts = TrainOptions(steps=3, lr=3e-3, warmup_steps=1, mtp_steps=1, batch_size=2, seed=3, bf16=bf16,
                            progress=False)
        out = tmp_path / f"{bf16}-{has_bf16}"
        return train(new_draft(config, text_target), files, [], opts, out, log=lambda s: None).losses

    f32, bf = losses(False, True), losses(True, True)
    assert f32 != bf
    assert losses(None, True) == bf
    assert losses(None, False) == f32


def test_training_reuses_freed_memory_instead_of_faulting_it_in_again(tmp_path):
    """retain_freed_memory (called by `sparrow train`): a freed 64 MB tensor's memory serves the
    next one, so touching it takes no page faults; glibc's default (a fresh mmap per block over
    32 MB) faults every 4 KiB page in again. A subprocess each: the setting is process-wide."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("retain_freed_memory applies to glibc only")
    probe = """
import resource, sys, torch
from sparrow_py.train.trainer import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
faults = []
for _ in range(6):  # the heap settles within 2-3 allocations (posix_memalign asks for a little more than a hole)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MB, written
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del t
print(faults[-1])
"""
    pages = 64 * 2**20 // 4096
    faults = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], check=True, capture_output=True,
                                       text=True, cwd=tmp_path).stdout) for mode in ("default", "retain")}
    assert faults["default"] > pages // 2, faults
    assert faults["retain"] < pages // 16, faults
