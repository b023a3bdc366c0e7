"""Rebuild tests/data/tiny-qwen2.gguf, the model the C tests (ctest) run against.

    python scripts/make_test_model.py

It is the pytest fixture model (tests/conftest.py: tiny Qwen2, random weights with seed 0, the
tiny byte-level BPE tokenizer) converted to q8_0 by our converter. It is committed because the C
tests must run without Python, torch or transformers.
"""
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import _train_tiny_tokenizer, build_tiny_qwen2  # noqa: E402

from sparrow_py.convert import convert  # noqa: E402


def main() -> None:
    out = REPO / "tests" / "data" / "tiny-qwen2.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer"
        _train_tiny_tokenizer(tok)
        model = build_tiny_qwen2(Path(tmp) / "tiny-qwen2", tok)
        convert(model, out, outtype="q8_0", progress=False)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
