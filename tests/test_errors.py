"""Bad input gives a clear SparrowError and the process survives.

Malformed files are opened in a child process, so that a crash (rather than an error) fails the
test instead of taking pytest down with it.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import sparrow_py as sp
from sparrow_py.convert import convert

from gguf_edit import copy_gguf


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_qwen2_dir):
    path = tmp_path_factory.mktemp("err") / "tiny-qwen2-q8_0.gguf"
    convert(tiny_qwen2_dir, path, outtype="q8_0", progress=False)
    return path


def expect_error(status, fragment, fn, *args, **kwargs):
    with pytest.raises(sp.SparrowError) as info:
        fn(*args, **kwargs)
    assert info.value.status == status, str(info.value)
    assert fragment in str(info.value)
    return info.value


def test_copy_gguf_roundtrip_loads(model_path, tmp_path):
    """The rewriting helper itself produces a working file (so the failures below are real)."""
    copy = copy_gguf(model_path, tmp_path / "copy.gguf")
    with sp.Engine(str(copy), n_threads=1) as e:
        out = "".join(e.generate("Sparrow", max_tokens=4))
    with sp.Engine(str(model_path), n_threads=1) as e:
        assert out == "".join(e.generate("Sparrow", max_tokens=4))


def test_malformed_files_in_child_process(model_path, tmp_path):
    data = model_path.read_bytes()
    rng = np.random.default_rng(0)
    cases = {"empty.gguf": b"", "garbage.gguf": rng.bytes(4096), "magic-only.gguf": b"GGUF",
             "header-garbage.gguf": data[:8] + rng.bytes(2048)}
    for frac in (0.001, 0.01, 0.1, 0.5, 0.9, 0.999):
        cases[f"truncated-{frac}.gguf"] = data[: int(len(data) * frac)]
    header_end = 4096  # flips in the metadata and tensor index, where parsing decisions are made
    for i in range(40):
        b = bytearray(data)
        for _ in range(1 + i % 4):
            b[int(rng.integers(0, min(header_end, len(b))))] ^= 1 << int(rng.integers(0, 8))
        cases[f"flipped-{i}.gguf"] = bytes(b)
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)

    script = textwrap.dedent("""
        import sys, glob
        import sparrow_py as sp
        loaded = failed = 0
        for path in sorted(glob.glob(sys.argv[1] + "/*.gguf")):
            try:
                with sp.Engine(path, n_threads=1, n_ctx=64) as e:
                    "".join(e.generate("Sparrow", max_tokens=2))
                loaded += 1
            except sp.SparrowError as exc:
                assert str(exc), path
                failed += 1
        print(f"loaded={loaded} failed={failed}")
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # not the checkout, whose sparrow_py has no compiled part
    assert proc.returncode == 0, proc.stderr
    loaded, failed = [int(x.split("=")[1]) for x in proc.stdout.split()]
    assert loaded + failed == len(cases)
    assert failed >= 10  # at least every empty/garbage/truncated file is refused


@pytest.mark.parametrize("name", ["empty", "truncated", "garbage"])
def test_malformed_file_messages(model_path, tmp_path, name):
    data = {"empty": b"", "truncated": model_path.read_bytes()[:1000], "garbage": b"\x00" * 100}[name]
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    err = expect_error("SPARROW_ERR_FORMAT", str(path), sp.Engine, str(path))
    assert len(str(err).splitlines()) == 1


def test_missing_file_and_directory(tmp_path):
    expect_error("SPARROW_ERR_IO", "not found", sp.Engine, str(tmp_path / "nope.gguf"))
    expect_error("SPARROW_ERR_IO", "not a regular file", sp.Engine, str(tmp_path))


def test_unknown_architecture(model_path, tmp_path):
    path = copy_gguf(model_path, tmp_path / "arch.gguf", replace_kv={"general.architecture": "mamba9"})
    expect_error("SPARROW_ERR_UNSUPPORTED", "architecture 'mamba9'", sp.Engine, str(path))


def test_missing_tensor(model_path, tmp_path):
    path = copy_gguf(model_path, tmp_path / "missing.gguf", drop_tensors={"blk.1.ffn_up.weight"})
    expect_error("SPARROW_ERR_FORMAT", "missing tensor 'blk.1.ffn_up.weight'", sp.Engine, str(path))


def test_wrong_shape(model_path, tmp_path):
    path = copy_gguf(model_path, tmp_path / "shape.gguf",
                     replace_tensors={"blk.0.attn_norm.weight": np.ones(32, dtype=np.float32)})
    expect_error("SPARROW_ERR_FORMAT", "blk.0.attn_norm.weight", sp.Engine, str(path))


def test_bad_hyperparameter(model_path, tmp_path):
    path = copy_gguf(model_path, tmp_path / "heads.gguf", replace_kv={"qwen2.attention.head_count_kv": 3})
    expect_error("SPARROW_ERR_FORMAT", "head_count", sp.Engine, str(path))


def test_vocab_only(model_path, tmp_path, tiny_qwen2_dir):
    vocab = tmp_path / "vocab.gguf"
    convert(tiny_qwen2_dir, vocab, vocab_only=True, progress=False)
    expect_error("SPARROW_ERR_INVALID_ARGUMENT", "vocab_only", sp.Engine, str(vocab))
    with sp.Engine(str(vocab), vocab_only=True) as v, sp.Engine(str(model_path), n_threads=1) as full:
        text = "Sparrow drafts, the target verifies."
        assert v.tokenize(text) == full.tokenize(text)
        expect_error("SPARROW_ERR_STATE", "vocab-only", v.generate, text)


def test_prompt_longer_than_context(model_path):
    with sp.Engine(str(model_path), n_ctx=16, n_threads=1) as e:
        long_prompt = list(range(1, 40))
        expect_error("SPARROW_ERR_CONTEXT_FULL", "context", e.generate, long_prompt)
        expect_error("SPARROW_ERR_CONTEXT_FULL", "do not fit", e.decode, long_prompt)
        # the engine still works afterwards
        assert len("".join(e.generate([1, 2, 3], max_tokens=3))) >= 0
        assert e.last_stats["n_generated"] == 3


def test_generation_stops_when_context_is_full(model_path):
    with sp.Engine(str(model_path), n_ctx=16, n_threads=1) as e:
        "".join(e.generate([1, 2, 3, 4], max_tokens=100, ignore_eos=True))
        assert e.last_finish_reason == "context"
        assert e.last_stats["n_generated"] == 16 - 4 + 1


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-1.0), dict(temperature=math.nan), dict(temperature=math.inf), dict(top_k=-1),
    dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=2.0), dict(seed=-5),
])
def test_invalid_sampling_values(model_path, kwargs):
    with sp.Engine(str(model_path), n_threads=1) as e:
        with pytest.raises(sp.SparrowError):
            e.generate("Sparrow", max_tokens=2, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(n_threads=-1), dict(n_ctx=-5), dict(n_batch=0), dict(kv_type="q4"),
                                    dict(n_threads=1.5)])
def test_invalid_engine_parameters(model_path, kwargs):
    with pytest.raises(sp.SparrowError):
        sp.Engine(str(model_path), **kwargs)


def test_backend_keyword(model_path, monkeypatch):
    """backend= reaches the model load and the context: an unknown name is refused naming the
    backends there are; a name given overrides $SPARROW_BACKEND; ref runs the model as cpu does
    (within float noise: ref does not quantize the activations of a q8_0 matmul)."""
    expect_error("SPARROW_ERR_INVALID_ARGUMENT", "(it has: cpu, ref)", sp.Engine, str(model_path), backend="no-such")
    expect_error("SPARROW_ERR_INVALID_ARGUMENT", "backend must be", sp.Engine, str(model_path), backend=3)
    ids = [1, 5, 9, 14, 3, 7]
    logits = {}
    monkeypatch.setenv("SPARROW_BACKEND", "no-such")
    expect_error("SPARROW_ERR_INVALID_ARGUMENT", "no-such", sp.Engine, str(model_path))
    for name in ("cpu", "ref"):
        with sp.Engine(str(model_path), n_threads=1, backend=name) as e:
            assert e.backend == name
            logits[name] = e.decode(ids)[-1]
            with e.share() as other:  # a shared context runs on the same backend
                assert other.backend == name
                assert np.array_equal(other.decode(ids)[-1], logits[name])
    rel = np.abs(logits["ref"] - logits["cpu"]).max() / np.abs(logits["cpu"]).max()
    assert 0 < rel < 2e-2, rel


def test_bad_tokens_and_positions(model_path):
    with sp.Engine(str(model_path), n_threads=1) as e:
        expect_error("SPARROW_ERR_INVALID_ARGUMENT", "outside the vocabulary", e.decode, [e.n_vocab])
        expect_error("SPARROW_ERR_INVALID_ARGUMENT", "outside the vocabulary", e.decode, [-1])
        expect_error("SPARROW_ERR_INVALID_ARGUMENT", "outside the vocabulary", e.generate, [1, 10**6])
        expect_error("SPARROW_ERR_INVALID_ARGUMENT", "empty", e.generate, [])
        expect_error("SPARROW_ERR_INVALID_ARGUMENT", "n_keep", e.kv_truncate, 5)
        expect_error("SPARROW_ERR_INVALID_ARGUMENT", "capture layer", e.set_capture_layers, [99])
        with pytest.raises(sp.SparrowError):
            e.detokenize([e.n_vocab + 5])


def test_use_after_close(model_path):
    e = sp.Engine(str(model_path), n_threads=1)
    stream = e.generate("Sparrow", max_tokens=50, ignore_eos=True)
    next(stream)
    e.close()
    e.close()  # twice is fine
    for call in (lambda: e.tokenize("x"), lambda: e.generate("x"), lambda: e.decode([1]), lambda: e.n_ctx,
                 lambda: next(stream)):
        with pytest.raises(sp.SparrowError) as info:
            call()
        assert info.value.status == "SPARROW_ERR_STATE"


def test_generate_next_without_begin_and_after_finish(model_path):
    """The C state machine refuses sparrow_generate_next when no generation is running."""
    from sparrow_py._native import ffi, lib

    with sp.Engine(str(model_path), n_threads=1) as e:
        buf = ffi.new("char[]", 256)
        size, finish = ffi.new("size_t *"), ffi.new("int32_t *")
        assert lib.sparrow_generate_next(e._ctx, buf, 256, size, finish, ffi.NULL) == lib.SPARROW_ERR_STATE
        "".join(e.generate("Sparrow", max_tokens=2))
        assert lib.sparrow_generate_next(e._ctx, buf, 256, size, finish, ffi.NULL) == lib.SPARROW_ERR_STATE
        assert b"sparrow_generate_begin" in ffi.string(lib.sparrow_last_error())
        # a buffer under the documented minimum is refused, not overrun
        e.generate("Sparrow", max_tokens=2)
        assert lib.sparrow_generate_next(e._ctx, buf, 16, size, finish, ffi.NULL) == lib.SPARROW_ERR_INVALID_ARGUMENT


def test_null_handles_via_c_api():
    from sparrow_py._native import ffi, lib

    out = ffi.new("sparrow_model **")
    assert lib.sparrow_model_load(ffi.NULL, lib.sparrow_model_default_params(), out) == lib.SPARROW_ERR_INVALID_ARGUMENT
    assert lib.sparrow_model_load(b"x", lib.sparrow_model_default_params(), ffi.NULL) == lib.SPARROW_ERR_INVALID_ARGUMENT
    n = ffi.new("int32_t *")
    assert lib.sparrow_tokenize(ffi.NULL, b"x", 1, True, True, ffi.NULL, 0, n) == lib.SPARROW_ERR_INVALID_ARGUMENT
    assert lib.sparrow_decode(ffi.NULL, ffi.new("sparrow_batch *")[0]) == lib.SPARROW_ERR_INVALID_ARGUMENT
    lib.sparrow_model_free(ffi.NULL)
    lib.sparrow_context_free(ffi.NULL)


def test_abort_and_progress_callbacks(model_path):
    calls = []
    with sp.Engine(str(model_path), n_threads=1, progress=lambda f: calls.append(f)) as e:
        assert "".join(e.generate("Sparrow", max_tokens=2)) is not None
    assert calls and calls[-1] == 1.0 and all(0.0 <= c <= 1.0 for c in calls)
    expect_error("SPARROW_ERR_ABORTED", "cancelled", sp.Engine, str(model_path), progress=lambda f: False)


def test_abort_callback_stops_a_forward_and_keeps_the_context_usable(model_path):
    """sparrow_context_params.abort_callback: a forward pass that is asked to stop returns
    SPARROW_ERR_ABORTED, keeps what completed, and the context works afterwards."""
    from sparrow_py._native import ffi, lib

    model = ffi.new("sparrow_model **")
    assert lib.sparrow_model_load(str(model_path).encode(), lib.sparrow_model_default_params(), model) == lib.SPARROW_OK
    state = {"abort": True, "calls": 0}

    def should_abort(_user_data):
        state["calls"] += 1
        return state["abort"]

    callback = ffi.callback("bool(void *)", should_abort)
    params = lib.sparrow_context_default_params()
    params.n_threads = 1
    params.n_batch = 4
    params.abort_callback = callback
    ctx = ffi.new("sparrow_context **")
    assert lib.sparrow_context_init(model[0], params, ctx) == lib.SPARROW_OK
    try:
        tokens = ffi.new("sparrow_token[]", list(range(1, 11)))
        batch = ffi.new("sparrow_batch *")
        batch.tokens = tokens
        batch.n_tokens = 10
        assert lib.sparrow_decode(ctx[0], batch[0]) == lib.SPARROW_ERR_ABORTED
        assert b"abort" in ffi.string(lib.sparrow_last_error())
        assert state["calls"] >= 1
        assert lib.sparrow_kv_size(ctx[0]) == 0  # the first chunk was aborted: nothing kept
        state["abort"] = False
        assert lib.sparrow_decode(ctx[0], batch[0]) == lib.SPARROW_OK
        assert lib.sparrow_kv_size(ctx[0]) == 10
    finally:
        lib.sparrow_context_free(ctx[0])
        lib.sparrow_model_free(model[0])
