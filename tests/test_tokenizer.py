"""The runtime's tokenizer against Hugging Face tokenizers, and llama.cpp's vocab test vectors."""
from __future__ import annotations

import json
import lzma
import shutil
import tarfile
from pathlib import Path

import pytest

import sparrow_py as sp
from sparrow_py.convert import convert

tokenizers = pytest.importorskip("tokenizers")

DATA = Path(__file__).parent / "data"

CORPUS = [
    "",
    " ",
    "Hello world",
    "Hello, world! How are you?",
    "I'll say DON'T, you've we're they'd it's I'M",
    "  leading and trailing spaces  ",
    "runs    of     spaces\tand\t\ttabs\n\nand\r\nnewlines\n",
    "naïve café Größe Ça — déjà vu",
    "e\u0301 a\u0300 decomposed accents (NFC makes them one code point)",
    "emoji 🦜🐦‍⬛ 👩‍👩‍👧 🇫🇷 ✨",
    "東京と北京。中文、日本語、한국어",
    "digits 1 12 123 1234 12345 3.14159 1,000,000",
    "code: def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nWhat is in the video?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "mixed\u00a0nbsp\u2009thin\u3000ideographic spaces",
    "ﬁ ligature ＡＢＣ fullwidth",
    "!!! ??? ... --- ___ ***",
    "a" * 300,
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ",
]


@pytest.fixture(scope="module")
def qwen2_vocab(tmp_path_factory, qwen2_tokenizer_dir):
    """The real Qwen2 tokenizer converted to a vocab-only GGUF by our converter."""
    model_dir = tmp_path_factory.mktemp("q2v") / "qwen2"
    shutil.copytree(qwen2_tokenizer_dir, model_dir)
    config = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "tie_word_embeddings": True}
    (model_dir / "config.json").write_text(json.dumps(config))
    out = model_dir / "vocab.gguf"
    convert(model_dir, out, vocab_only=True, progress=False)
    return out


def hf_ids(tokenizer_json: Path, text: str) -> list[int]:
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    return tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", CORPUS)
def test_qwen2_encode_matches_hf(qwen2_vocab, qwen2_tokenizer_dir, text):
    with sp.Engine(str(qwen2_vocab), vocab_only=True) as e:
        ours = e.tokenize(text, add_special=False, parse_special=True)
    assert ours == hf_ids(qwen2_tokenizer_dir / "tokenizer.json", text)


def test_qwen2_long_text_and_roundtrip(qwen2_vocab, qwen2_tokenizer_dir):
    text = "\n".join(CORPUS) * 20
    with sp.Engine(str(qwen2_vocab), vocab_only=True) as e:
        ids = e.tokenize(text, add_special=False)
        assert ids == hf_ids(qwen2_tokenizer_dir / "tokenizer.json", text)
        # decoding gives the NFC-normalized text back (as HF's decode does)
        hf = tokenizers.Tokenizer.from_file(str(qwen2_tokenizer_dir / "tokenizer.json"))
        assert e.detokenize(ids, special=True) == hf.decode(ids, skip_special_tokens=False)


def test_special_tokens_parsed_or_not(qwen2_vocab):
    with sp.Engine(str(qwen2_vocab), vocab_only=True) as e:
        text = "<|im_start|>user"
        parsed = e.tokenize(text, add_special=False, parse_special=True)
        literal = e.tokenize(text, add_special=False, parse_special=False)
        assert parsed[0] == 151644  # <|im_start|> in Qwen2's vocabulary
        assert 151644 not in literal and len(literal) > len(parsed)
        assert e.detokenize(literal) == text
        assert e.detokenize(parsed, special=False) == "user"
        assert e.detokenize(parsed, special=True) == text


def test_tiny_tokenizer_matches_hf(tiny_qwen2_dir, tmp_path):
    path = tmp_path / "tiny.gguf"
    convert(tiny_qwen2_dir, path, vocab_only=True, progress=False)
    with sp.Engine(str(path), vocab_only=True) as e:
        for text in CORPUS:
            assert e.tokenize(text, add_special=False) == hf_ids(tiny_qwen2_dir / "tokenizer.json", text), text


def test_streamed_pieces_are_valid_utf8(tiny_qwen2_dir, tmp_path):
    """Every piece the C API hands out decodes as UTF-8 on its own, although tokens cut
    characters and a random model emits byte tokens in any order."""
    from sparrow_py._native import ffi, lib

    path = tmp_path / "tiny.gguf"
    convert(tiny_qwen2_dir, path, outtype="f32", progress=False)
    with sp.Engine(str(path), n_threads=1) as e:
        ids = e.tokenize("東京 🦜 café", add_special=False)
        pieces = [e.detokenize_bytes([t]) for t in ids]
        assert any(not _is_valid_utf8(p) for p in pieces)  # the tokens do cut characters
        buf = ffi.new("char[]", 256)
        size, finish = ffi.new("size_t *"), ffi.new("int32_t *")
        n_pieces = 0
        for seed in range(1, 6):
            e.generate(ids, max_tokens=80, temperature=2.0, seed=seed, ignore_eos=True)
            finish[0] = 0
            while finish[0] == 0:
                assert lib.sparrow_generate_next(e._ctx, buf, 256, size, finish, ffi.NULL) == 0
                raw = ffi.unpack(buf, size[0])
                assert _is_valid_utf8(raw), raw
                n_pieces += 1
        assert n_pieces >= 5 * 80


def _is_valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _llamacpp_vectors(name: str, tmp_path: Path):
    with tarfile.open(DATA / "vocab.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    root = next(tmp_path.rglob(f"{name}.gguf")).parent
    inputs = (root / f"{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (root / f"{name}.gguf.out").read_text(encoding="utf-8").strip("\n").split("\n")
    return root / f"{name}.gguf", inputs, outputs


@pytest.mark.parametrize("name", ["ggml-vocab-qwen2", "ggml-vocab-llama-bpe", "ggml-vocab-gpt-2"])
def test_llamacpp_vocab_files_load_and_pass_vectors(name, tmp_path):
    """Vocab-only GGUFs written by llama.cpp's converter load, and encode as llama.cpp's tests say."""
    path, inputs, outputs = _llamacpp_vectors(name, tmp_path)
    if inputs and inputs[-1].endswith("\n__ggml_vocab_test__\n"):
        inputs[-1] = inputs[-1][: -len("\n__ggml_vocab_test__\n")]
    with sp.Engine(str(path), vocab_only=True) as e:
        n = min(len(inputs), len(outputs))
        assert n > 20
        for text, expected in zip(inputs[:n], outputs[:n]):
            want = [int(x) for x in expected.split()]
            assert e.tokenize(text, add_special=False, parse_special=False) == want, repr(text)
