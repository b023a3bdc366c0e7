"""Fuzz the GGUF loader with atheris (libFuzzer's engine) for a bounded number of runs.

Every input must either load or raise SparrowError; a crash, a sanitizer report or any other
exception ends the fuzzer with a non-zero status and fails the test. The C++ side of the same
property (every truncation and thousands of corruptions, under ASan/UBSan) is tests/cpp/test_gguf.cpp.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

atheris = pytest.importorskip("atheris")

SEED_MODEL = Path(__file__).parent / "data" / "tiny-qwen2.gguf"
RUNS = 20000

FUZZ_SCRIPT = textwrap.dedent("""
    import os, sys
    import atheris
    with atheris.instrument_imports():
        import sparrow_py as sp

    scratch = sys.argv[1]

    def one_input(data: bytes) -> None:
        with open(scratch, "wb") as f:
            f.write(data)
        try:
            with sp.Engine(scratch, n_ctx=8, n_threads=1) as e:
                e.decode([0])
        except sp.SparrowError as exc:
            assert str(exc)

    atheris.Setup(sys.argv[:1] + sys.argv[2:], one_input)
    atheris.Fuzz()
""")


def test_fuzz_gguf_loader(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "seed.gguf").write_bytes(SEED_MODEL.read_bytes())
    (corpus / "header.gguf").write_bytes(SEED_MODEL.read_bytes()[:4096])
    cmd = [sys.executable, "-c", FUZZ_SCRIPT, str(tmp_path / "input.gguf"), f"-runs={RUNS}", "-seed=1",
           "-max_len=120000", "-rss_limit_mb=4096", str(corpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {RUNS} runs" in proc.stderr
