"""The command lines as a user runs them: convert/to_gguf.py, then `sparrow run`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sparrow_py as sp

REPO = Path(__file__).resolve().parent.parent


def run(args, cwd, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, **kw)


def test_convert_then_run(tiny_qwen2_dir, tmp_path):
    out = tmp_path / "tiny.gguf"
    conv = run([sys.executable, str(REPO / "convert" / "to_gguf.py"), str(tiny_qwen2_dir), "--outtype", "q8_0",
                "-o", str(out), "--quiet"], cwd=tmp_path)
    assert conv.returncode == 0, conv.stderr
    prompt = "Sparrow drafts"
    res = run([sys.executable, "-m", "sparrow_py.cli", "run", "-m", str(out), "-p", prompt, "-n", "12", "-t", "2"],
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with sp.Engine(str(out), n_threads=1) as e:
        expected = "".join(e.generate(prompt, max_tokens=12))
    assert res.stdout == prompt + expected + "\n"
    assert "decode:" in res.stderr and "tokens/s" in res.stderr


def test_run_help_and_errors(tmp_path):
    res = run([sys.executable, "-m", "sparrow_py.cli", "run", "--help"], cwd=tmp_path)
    assert res.returncode == 0 and "--n-predict" in res.stdout and "--top-p" in res.stdout
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    res = run([sys.executable, "-m", "sparrow_py.cli", "run", "-m", str(bad), "-p", "x"], cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.startswith("sparrow: error:") and len(res.stderr.strip().splitlines()) == 1


def test_run_with_a_draft(tiny_qwen2_dir, tmp_path):
    from draft_util import make_draft

    model = tmp_path / "tiny.gguf"
    sp_convert = run([sys.executable, str(REPO / "convert" / "to_gguf.py"), str(tiny_qwen2_dir), "--outtype", "f32",
                      "-o", str(model), "--quiet"], cwd=tmp_path)
    assert sp_convert.returncode == 0, sp_convert.stderr
    draft = make_draft(tiny_qwen2_dir, tmp_path / "draft")
    args = [sys.executable, "-m", "sparrow_py.cli", "run", "-m", str(model), "-p", "Sparrow drafts", "-n", "16", "-t", "1"]
    plain = run(args, cwd=tmp_path)
    spec = run(args + ["--draft", str(draft), "--n-draft", "3"], cwd=tmp_path)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "mean accepted length" in spec.stderr
    cut = run(args + ["--draft", str(draft), "--n-draft", "3", "--draft-p-min", "0.5"], cwd=tmp_path)
    assert cut.returncode == 0 and cut.stdout == plain.stdout, cut.stderr
    bad = run(args + ["--draft", str(draft), "--draft-p-min", "2"], cwd=tmp_path)
    assert bad.returncode != 0 and "draft_p_min" in bad.stderr
