"""Streaming generation: sampling distributions, seeds, stop strings, prompt caching, chat."""
from __future__ import annotations

import numpy as np
import pytest

import sparrow_py as sp
from sparrow_py.convert import convert

from gguf_edit import copy_gguf


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_qwen2_dir):
    path = tmp_path_factory.mktemp("gen") / "tiny-qwen2-f32.gguf"
    convert(tiny_qwen2_dir, path, outtype="f32", progress=False)
    return path


@pytest.fixture(scope="module")
def engine(model_path):
    with sp.Engine(str(model_path), n_ctx=256, n_threads=1, kv_type="f32") as e:
        yield e


@pytest.fixture(scope="module")
def peaked_engine(model_path, tmp_path_factory):
    """The model with its final norm scaled up: a random model's logits are nearly flat, which
    would let a wrong sampler pass; scaled, they spread over several units."""
    import gguf

    reader = gguf.GGUFReader(str(model_path))
    weight = next(np.array(t.data) for t in reader.tensors if t.name == "output_norm.weight")
    path = copy_gguf(model_path, tmp_path_factory.mktemp("peaked") / "peaked.gguf",
                     replace_tensors={"output_norm.weight": (weight * 25.0).astype(np.float32)})
    with sp.Engine(str(path), n_ctx=256, n_threads=1, kv_type="f32") as e:
        yield e


PROMPT = "Sparrow drafts tokens"


def reference_distribution(logits, temperature, top_k, top_p, min_p):
    """transformers' warper semantics, in float64: temperature, then top-k, top-p, min-p."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.ones_like(x, dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        sorted_p = p[order]
        cum = np.cumsum(sorted_p)
        n = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix reaching top_p
        drop = order[n:]
        p[drop] = 0.0
        p /= p.sum()
    if min_p > 0.0:
        p[p < min_p * p.max()] = 0.0
        p /= p.sum()
    return p


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.7, top_k=20, top_p=1.0, min_p=0.0),
    dict(temperature=1.3, top_k=0, top_p=0.8, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3),
    dict(temperature=2.0, top_k=50, top_p=0.9, min_p=0.05),
])
def test_sampling_matches_reference_distribution(peaked_engine, params):
    engine = peaked_engine
    prompt = engine.tokenize(PROMPT)
    engine.kv_truncate(0)
    logits = engine.decode(prompt)[-1]
    expected = reference_distribution(logits, **params)
    n = 3000
    counts = np.zeros(engine.n_vocab)
    for seed in range(1, n + 1):
        "".join(engine.generate(prompt, max_tokens=1, seed=seed, ignore_eos=True, **params))
        counts[engine.last_tokens[0]] += 1
    assert counts[expected == 0].sum() == 0  # never a token the filters removed
    # chi-square goodness of fit; bins expecting fewer than 5 samples are pooled
    exp_counts = expected * n
    big = exp_counts >= 5
    obs = np.append(counts[big], counts[~big & (expected > 0)].sum())
    exp = np.append(exp_counts[big], exp_counts[~big & (expected > 0)].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    # about the 1e-5 upper tail for these df: a sampler off by a few percent fails clearly
    assert chi2 < df + 4.5 * np.sqrt(2 * df) + 10, f"chi2 {chi2:.1f} for {df} degrees of freedom"


def test_seeds_reproduce(engine):
    a = "".join(engine.generate(PROMPT, max_tokens=30, temperature=1.0, seed=42, ignore_eos=True))
    b = "".join(engine.generate(PROMPT, max_tokens=30, temperature=1.0, seed=42, ignore_eos=True))
    c = "".join(engine.generate(PROMPT, max_tokens=30, temperature=1.0, seed=43, ignore_eos=True))
    assert a == b
    assert a != c


def test_stop_strings(engine):
    full = "".join(engine.generate(PROMPT, max_tokens=40, ignore_eos=True))
    assert len(full) > 20
    stop = full[12:15]
    cut = full.find(stop)
    text = "".join(engine.generate(PROMPT, max_tokens=40, stop=[stop, "\x00never"], ignore_eos=True))
    assert text == full[:cut]
    assert engine.last_finish_reason == "stop"
    # a stop string that never occurs changes nothing
    assert "".join(engine.generate(PROMPT, max_tokens=40, stop=["\x01"], ignore_eos=True)) == full
    assert engine.last_finish_reason == "length"


def test_max_tokens_and_eos(engine):
    "".join(engine.generate(PROMPT, max_tokens=5, ignore_eos=True))
    assert engine.last_stats["n_generated"] == 5 and engine.last_finish_reason == "length"
    "".join(engine.generate(PROMPT, max_tokens=0))
    assert engine.last_stats["n_generated"] == 0 and engine.last_finish_reason == "length"
    assert engine.is_eog(engine.eos_token)


def test_prompt_cache_reuse_gives_identical_output(engine, model_path):
    first = "".join(engine.generate(PROMPT, max_tokens=10, ignore_eos=True))
    longer = PROMPT + first + " and the target"
    reused = "".join(engine.generate(longer, max_tokens=20, ignore_eos=True))
    stats = engine.last_stats
    assert stats["n_prompt_cached"] > 0
    with sp.Engine(str(model_path), n_ctx=256, n_threads=1, kv_type="f32") as fresh:
        assert "".join(fresh.generate(longer, max_tokens=20, ignore_eos=True)) == reused
        assert fresh.last_stats["n_prompt_cached"] == 0


def test_chat_template_matches_transformers(engine, tiny_qwen2_dir):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    messages = [{"role": "system", "content": "You caption videos."},
                {"role": "user", "content": "What happens in the clip?"}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert engine.apply_chat_template(messages) == want
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    assert engine.tokenize(want, add_special=False) == list(ids)
    text = "".join(engine.chat(messages, max_tokens=8, ignore_eos=True))
    assert engine.last_stats["n_prompt"] == len(ids)
    assert isinstance(text, str)


def test_streaming_yields_incrementally(engine):
    pieces = list(engine.generate(PROMPT, max_tokens=20, ignore_eos=True))
    assert len(pieces) >= 10  # one piece per token, not one blob at the end


def test_profile_times_every_op_and_changes_nothing(model_path, tmp_path):
    """SPARROW_PROFILE=1 wraps the backend in one that times each op: the tokens are the same as
    without it, and its table adds up: each forward pass runs every layer's output projection
    once and the head once; the prompt's pass runs its layers at the prompt's rows and the head on
    its last row alone, so at 1 row a call the head has one call more than n_layer's share."""
    import json
    import os
    import re
    import subprocess
    import sys

    import gguf

    code = ("import json, sparrow_py as sp\n"
            f"with sp.Engine({str(model_path)!r}, n_ctx=128, n_threads=2) as e:\n"
            "    ids = e.tokenize('Sparrow drafts tokens', add_special=False)\n"
            "    ''.join(e.generate(ids, max_tokens=7, ignore_eos=True))\n"
            "    print(json.dumps(list(e.last_tokens)))\n")
    runs = {}
    for profile in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env={**os.environ, "SPARROW_PROFILE": profile})
        assert r.returncode == 0, r.stderr
        runs[profile] = (json.loads(r.stdout), r.stderr)
    assert runs["0"][0] == runs["1"][0] and len(runs["0"][0]) == 7
    assert "sparrow profile" not in runs["0"][1]
    table = runs["1"][1]
    header = re.search(r"sparrow profile \((\w+) backend, (\d+) threads\)", table)
    assert header and header[1] == (os.environ.get("SPARROW_BACKEND") or "cpu")
    one_row = table.split("1 row(s) a call")[1].split(" row(s) a call")[0]
    calls = {m[1]: int(m[2]) for m in re.finditer(r"^ {4}(\S.*?\S) +(\d+) calls", one_row, re.M)}
    reader = gguf.GGUFReader(str(model_path))
    n_layer = int(reader.fields["qwen2.block_count"].contents())
    head = calls.get("matmul output.weight", calls.get("matmul token_embd.weight"))
    assert head == 7  # the prompt's last row, then 6 single-token forwards
    assert calls["matmul attn_output.weight"] == n_layer * (head - 1)
