"""The runtime's language models against transformers on tiny random checkpoints.

Each model is converted with our converter at several output types and run through the Engine;
transformers (float32, eager attention) is the reference for logits, hidden states and greedy
generation.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparrow_py as sp
from sparrow_py.convert import convert

MODELS = ["tiny_qwen2_dir", "tiny_llama_dir", "tiny_qwen2vl_dir", "tiny_qwen25vl_dir"]
PROMPT_LEN = 24


def load_hf(model_dir):
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    if arch.startswith("Qwen2_5_VL"):
        from transformers import Qwen2_5_VLForConditionalGeneration as cls
    elif arch.startswith("Qwen2VL"):
        from transformers import Qwen2VLForConditionalGeneration as cls
    else:
        cls = AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def converted(tmp_path_factory, request):
    """converted(fixture_name, outtype) -> path of the GGUF (made once per session)."""
    cache = {}
    out_dir = tmp_path_factory.mktemp("gguf")

    def get(fixture_name: str, outtype: str):
        key = (fixture_name, outtype)
        if key not in cache:
            src = request.getfixturevalue(fixture_name)
            path = out_dir / f"{fixture_name}-{outtype}.gguf"
            convert(src, path, outtype=outtype, progress=False)
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_models(request):
    cache = {}

    def get(fixture_name: str):
        if fixture_name not in cache:
            cache[fixture_name] = load_hf(request.getfixturevalue(fixture_name))
        return cache[fixture_name]

    return get


def prompt_ids(n_vocab: int, n: int = PROMPT_LEN, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_vocab, size=n).tolist()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def engine_logits(path, ids, kv_type="f32") -> np.ndarray:
    with sp.Engine(str(path), n_ctx=256, n_threads=2, kv_type=kv_type, n_batch=64) as e:
        return e.decode(ids, outputs=[True] * len(ids))


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("model", MODELS)
def test_f32_logits_match_transformers(model, converted, hf_models):
    hf = hf_models(model)
    ids = prompt_ids(hf.config.get_text_config().vocab_size)
    ref = hf_logits(hf, ids)
    ours = engine_logits(converted(model, "f32"), ids)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("model", ["tiny_qwen2_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_half_precision_logits(model, outtype, converted, hf_models):
    hf = hf_models(model)
    ids = prompt_ids(hf.config.vocab_size)
    ref = hf_logits(hf, ids)
    ours = engine_logits(converted(model, outtype), ids, kv_type="f16")
    assert rel_err(ours, ref) < 1e-2


def softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def agreement_and_kl(ours, ref):
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    p, q = softmax(ref.astype(np.float64)), softmax(ours.astype(np.float64))
    kl = float((p * (np.log(p) - np.log(q))).sum(-1).mean())
    return top1, kl


@pytest.mark.parametrize("model", ["tiny_qwen2_dir", "tiny_llama_dir"])
def test_quantized_logits(model, converted, hf_models, capsys):
    hf = hf_models(model)
    n_vocab = hf.config.vocab_size
    # many positions so that a 0.99 agreement bound means something
    ids = prompt_ids(n_vocab, n=200, seed=1)
    ref = hf_logits(hf, ids)
    top1, kl = agreement_and_kl(engine_logits(converted(model, "q8_0"), ids, kv_type="f16"), ref)
    with capsys.disabled():
        print(f"\n{model} q8_0: top-1 agreement {top1:.3f}, KL {kl:.2e}")
    assert top1 >= 0.99
    assert kl < 1e-3
    for outtype in ("q4_0", "q4_1"):
        t, k = agreement_and_kl(engine_logits(converted(model, outtype), ids, kv_type="f16"), ref)
        with capsys.disabled():
            print(f"{model} {outtype}: top-1 agreement {t:.3f}, KL {k:.2e}")
        assert t > 0.5  # 4-bit random weights still track the reference; values are reported


@pytest.mark.parametrize("model", ["tiny_qwen2_dir", "tiny_llama_dir", "tiny_qwen2vl_dir"])
def test_greedy_generation_matches_transformers(model, converted, hf_models):
    hf = hf_models(model)
    ids = prompt_ids(hf.config.get_text_config().vocab_size, n=8, seed=2)
    # reference: plain greedy loop over full forwards (no cache involved)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(64):
            logits = hf(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(logits.argmax()))
    expected = seq[len(ids):]
    with sp.Engine(str(converted(model, "f32")), n_ctx=256, n_threads=2, kv_type="f32") as e:
        got = []
        prompt = list(ids)
        # through the streaming API: collect the tokens it samples via decode of its own output
        for _ in e.generate(prompt, max_tokens=64, ignore_eos=True):
            pass
        assert e.last_stats["n_generated"] == 64
        # the same tokens, one decode at a time through the low-level API
        e.kv_truncate(0)
        logits = e.decode(prompt)
        for _ in range(64):
            tok = int(logits[-1].argmax())
            got.append(tok)
            logits = e.decode([tok])
    assert got == expected


def test_generate_stream_equals_greedy_tokens(converted, hf_models):
    """The text generate() streams is the detokenized greedy token sequence."""
    path = converted("tiny_qwen2_dir", "f32")
    with sp.Engine(str(path), n_ctx=256, n_threads=2, kv_type="f32") as e:
        prompt = prompt_ids(e.n_vocab, n=8, seed=3)
        text = "".join(e.generate(prompt, max_tokens=40, ignore_eos=True))
        e.kv_truncate(0)
        logits = e.decode(prompt)
        toks = []
        for _ in range(40):
            toks.append(int(logits[-1].argmax()))
            logits = e.decode([toks[-1]])
        assert text == e.detokenize(toks)


@pytest.mark.parametrize("model", ["tiny_qwen2_dir", "tiny_llama_dir"])
def test_batched_prefill_equals_token_by_token(model, converted):
    path = converted(model, "f32")
    with sp.Engine(str(path), n_ctx=256, n_threads=2, kv_type="f32", n_batch=7) as e:
        ids = prompt_ids(e.n_vocab, n=30, seed=4)
        batched = e.decode(ids, outputs=[True] * len(ids))  # chunks of 7
        e.kv_truncate(0)
        single = np.concatenate([e.decode([t]) for t in ids])
        assert rel_err(batched, single) < 1e-5
        # roll back 10 tokens and feed different ones: equals a fresh run of that sequence
        e.kv_truncate(20)
        alt = prompt_ids(e.n_vocab, n=10, seed=5)
        after_rollback = e.decode(alt, outputs=[True] * 10)
        e.kv_truncate(0)
        fresh = e.decode(ids[:20] + alt, outputs=[True] * 30)[20:]
        assert rel_err(after_rollback, fresh) < 1e-5
        assert e.kv_size == 30


def test_hidden_state_capture_matches_transformers(converted, hf_models):
    hf = hf_models("tiny_qwen2_dir")
    ids = prompt_ids(hf.config.vocab_size, n=12, seed=6)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states
    with sp.Engine(str(converted("tiny_qwen2_dir", "f32")), n_ctx=64, n_threads=2, kv_type="f32") as e:
        layers = [0, 1]
        e.set_capture_layers(layers)
        outputs = [i % 3 == 0 for i in range(len(ids))]
        e.decode(ids, outputs=outputs)
        rows = [i for i, o in enumerate(outputs) if o]
        for slot, layer in enumerate(layers):
            ours = e.hidden(slot)
            want = ref[layer][0, rows].numpy()  # HF: hidden_states[l] is the input of layer l
            assert rel_err(ours, want) < 1e-4
        # capture_all: every token's states, logits of the last token only
        e.kv_truncate(0)
        logits = e.decode(ids, capture_all=True)
        assert logits.shape[0] == 1
        for slot, layer in enumerate(layers):
            assert e.hidden(slot).shape[0] == len(ids)
            assert rel_err(e.hidden(slot), ref[layer][0].numpy()) < 1e-4


def test_explicit_positions(converted, hf_models):
    """Positions given explicitly equal the implicit consecutive ones."""
    path = converted("tiny_qwen2_dir", "f32")
    with sp.Engine(str(path), n_ctx=64, n_threads=2, kv_type="f32") as e:
        ids = prompt_ids(e.n_vocab, n=10, seed=7)
        implicit = e.decode(ids, outputs=[True] * 10)
        e.kv_truncate(0)
        explicit = e.decode(ids, positions=list(range(10)), outputs=[True] * 10)
        assert np.array_equal(implicit, explicit)


@pytest.mark.parametrize("outtype,threads,backend", [("q8_0", 1, "cpu"), ("q8_0", 2, "cpu"), ("f32", 2, "cpu"),
                                                     ("q8_0", 2, "ref")])
def test_several_sequences_in_one_batch(outtype, threads, backend, converted):
    """Sequences decoded together (seq_ids) get the logits each gets decoded alone, bit for bit,
    on quantized weights, at any thread count and on either backend: three prompts fed in
    batches that mix and split them (and are cut into chunks), then greedy steps of all three
    in one batch each."""
    path = converted("tiny_qwen2_dir", outtype)
    steps = 6
    with sp.Engine(str(path), n_ctx=256, n_threads=threads, n_batch=16, backend=backend) as e:
        prompts = [prompt_ids(e.n_vocab, n=n, seed=20 + n) for n in (13, 7, 21)]
        alone = []  # per sequence: the logits of each prompt row, then of each greedy step
        for p in prompts:
            e.kv_truncate(0)
            rows = [e.decode(p, outputs=[True] * len(p))]
            for _ in range(steps):
                rows.append(e.decode([int(np.argmax(rows[-1][-1]))]))
            alone.append(np.concatenate(rows))

        e.kv_truncate(0)
        together: list[list[np.ndarray]] = [[] for _ in prompts]

        def feed(parts):  # [(sequence, tokens)], in this order in the batch
            tokens = [t for _, ts in parts for t in ts]
            seqs = [s for s, ts in parts for _ in ts]
            for s, row in zip(seqs, e.decode(tokens, outputs=[True] * len(tokens), seq_ids=seqs)):
                together[s].append(row)

        feed([(0, prompts[0]), (2, prompts[2][:4])])
        feed([(2, prompts[2][4:9]), (1, prompts[1]), (2, prompts[2][9:])])  # 24 tokens: two chunks
        for _ in range(steps):
            feed([(s, [int(np.argmax(together[s][-1]))]) for s in (2, 0, 1)])
        for s in range(len(prompts)):
            assert np.array_equal(np.stack(together[s]), alone[s]), f"sequence {s} differs from its run alone"
        assert e.kv_size == sum(len(p) + steps for p in prompts)


def test_generation_keeps_only_sequence_zero(converted):
    """A generation after a batch of several sequences reuses the cached rows of sequence 0 that
    match its prompt and drops the others: its output equals a fresh context's."""
    path = converted("tiny_qwen2_dir", "q8_0")
    with sp.Engine(str(path), n_ctx=256, n_threads=2) as e:
        p = prompt_ids(e.n_vocab, n=12, seed=30)
        "".join(e.generate(p, max_tokens=10, ignore_eos=True))
        want = list(e.last_tokens)
        e.kv_truncate(0)
        e.decode(p[:8] + p[:5], seq_ids=[0] * 8 + [1] * 5)
        "".join(e.generate(p, max_tokens=10, ignore_eos=True))
        assert list(e.last_tokens) == want
        assert e.last_stats["n_prompt_cached"] == 8


def test_several_sequences_bad_input(converted):
    path = converted("tiny_qwen2_dir", "f32")
    with sp.Engine(str(path), n_ctx=64, n_threads=2) as e:
        with pytest.raises(sp.SparrowError, match="sequence ids are >= 0"):
            e.decode([1, 2], seq_ids=[0, -1])
        with pytest.raises(sp.SparrowError, match="one entry per token"):
            e.decode([1, 2], seq_ids=[0])
        with pytest.raises(sp.SparrowError, match="token tree"):
            e.decode([1, 2], parents=[-1, 0], seq_ids=[0, 0])
        e.decode([1, 2, 3], seq_ids=[0, 1, 1])
        with pytest.raises(sp.SparrowError, match="token tree"):  # the cache holds two sequences
            e.decode([4, 5], parents=[-1, 0])
        assert e.kv_size == 3


@pytest.fixture(scope="module")
def tiny_llama3_scaled_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Llama with Llama 3.1 rope scaling: the converter writes rope_freqs.weight."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=336, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    out = tmp_path_factory.mktemp("llama3") / "tiny-llama3"
    LlamaForCausalLM(config).eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_tokenizer_dir / name, out / name)
    return out


def test_llama3_rope_scaling_matches_transformers(tiny_llama3_scaled_dir, tmp_path):
    hf = load_hf(tiny_llama3_scaled_dir)
    path = tmp_path / "llama3.gguf"
    convert(tiny_llama3_scaled_dir, path, outtype="f32", progress=False)
    ids = prompt_ids(336, n=150, seed=8)  # long enough for the scaled low frequencies to matter
    ref = hf_logits(hf, ids)
    assert rel_err(engine_logits(path, ids), ref) < 1e-4
