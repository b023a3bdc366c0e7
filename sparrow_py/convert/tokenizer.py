"""tokenizer.json (+ tokenizer_config.json, config.json) -> tokenizer.* GGUF keys.

Byte-level BPE only ("gpt2" in llama.cpp's words), which covers Qwen2/2.5(-VL) and Llama 3. The
rules follow llama.cpp's convert_hf_to_gguf.py (get_vocab_base, _set_vocab_gpt2) and gguf-py's
SpecialVocab, but read the JSON files directly instead of going through transformers:

- tokens: ids 0..vocab_size-1 from the BPE vocab plus the added tokens; ids with no token (the
  embedding matrix is often padded, e.g. Qwen2.5 to 151936) become "[PAD{id}]", type UNUSED.
- token types: NORMAL for vocab tokens; an added token is CONTROL when flagged special or when it
  looks special ("<|...|>" and a few others), otherwise USER_DEFINED.
- tokenizer.ggml.pre: llama.cpp picks it by hashing the tokenization of a probe text; we pick it
  from the pre-tokenizer itself (its split regex and steps), which needs no tokenizer library and
  names exactly what the runtime must implement. Unknown pre-tokenizers are refused.
- special token ids / add_*_token / chat template: as SpecialVocab, from tokenizer_config.json,
  the post-processor's template, then config.json's *_token_id.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConvertError
from .names import (PRE_GPT2, PRE_LLAMA3, PRE_QWEN2, PRE_SMOLLM, SPECIAL_TOKEN_TYPES,
                    TokenType)

logger = logging.getLogger("sparrow.convert")

# The split regexes of the pre-tokenizers we know, exactly as they appear in tokenizer.json.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# A pre-tokenizer reduced to its steps: ("split", regex) | ("bytelevel", use_regex) | ("digits", individual).
# ByteLevel with use_regex=true applies GPT-2's own split regex before mapping bytes.
_PRE_TOKENIZERS: dict[tuple[tuple[str, Any], ...], str] = {
    (("split", QWEN2_REGEX), ("bytelevel", False)): PRE_QWEN2,
    (("split", LLAMA3_REGEX), ("bytelevel", False)): PRE_LLAMA3,
    (("bytelevel", True),): PRE_GPT2,
    (("digits", True), ("bytelevel", True)): PRE_SMOLLM,
}


@dataclass
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # role ("bos", "eos", ...) -> id
    add_special: dict[str, bool] = field(default_factory=dict)  # role -> add_{role}_token
    chat_template: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: invalid JSON ({e})") from None


def _pre_tokenizer_steps(node: dict[str, Any] | None, path: Path) -> tuple[tuple[str, Any], ...]:
    if node is None:
        return ()
    kind = node.get("type")
    if kind == "Sequence":
        return tuple(step for sub in node.get("pretokenizers", []) for step in _pre_tokenizer_steps(sub, path))
    if kind == "Split":
        pattern = node.get("pattern", {})
        return (("split", pattern.get("Regex", pattern.get("String"))),)
    if kind == "ByteLevel":
        return (("bytelevel", bool(node.get("use_regex", True))),)
    if kind == "Digits":
        return (("digits", bool(node.get("individual_digits", False))),)
    raise ConvertError(f"{path}: unsupported pre-tokenizer step {kind!r}")


def detect_pre_tokenizer(tokenizer_json: dict[str, Any], path: Path) -> str:
    """tokenizer.ggml.pre for a tokenizer.json, or ConvertError naming the unknown pattern."""
    steps = _pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"), path)
    if (pre := _PRE_TOKENIZERS.get(steps)) is not None:
        return pre
    regexes = [arg for kind, arg in steps if kind == "split"]
    if regexes:  # shown as written in tokenizer.json, kept on one line
        what = "split regex '" + regexes[0].replace("\n", "\\n").replace("\r", "\\r") + "'"
    else:
        what = f"pre-tokenizer steps {list(steps)}"
    raise ConvertError(f"{path}: unknown pre-tokenizer ({what}); "
                       f"known: {', '.join(sorted(set(_PRE_TOKENIZERS.values())))}")


def token_looks_special(text: str) -> bool:
    """Added tokens some models forget to flag special (llama.cpp's does_token_look_special)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))  # deepseek's fullwidth bars
            or (text.startswith("<unused") and text.endswith(">")))


def _merges(model: dict[str, Any], path: Path) -> list[str]:
    merges = model.get("merges") or []
    if not merges or isinstance(merges[0], str):
        return list(merges)
    # transformers >= 4.45 stores pairs; GGUF stores "left right", so a literal space inside a
    # piece is written as its byte-level stand-in U+0120 like gguf-py does.
    if isinstance(merges[0], list) and len(merges[0]) == 2:
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    raise ConvertError(f"{path}: unknown merges format")


def _separate_chat_template(model_dir: Path) -> Any:
    """Newer transformers save the template next to tokenizer_config.json instead of inside it."""
    if (jinja := model_dir / "chat_template.jinja").is_file():
        return jinja.read_text(encoding="utf-8")
    if (js := model_dir / "chat_template.json").is_file():
        return _read_json(js).get("chat_template")
    return None


def _special_tokens(model_dir: Path, tok: dict[str, Any], tok_config: dict[str, Any] | None,
                    config: dict[str, Any], vocab: Vocab, n_vocab: int) -> None:
    """Fill special_ids / add_special / chat_template like gguf-py's SpecialVocab."""
    tok_config = dict(tok_config or {})
    added = tok.get("added_tokens", [])
    role_types = list(SPECIAL_TOKEN_TYPES)

    bos, eos = tok_config.get("bos_token"), tok_config.get("eos_token")
    if not bos and tok_config.get("cls_token"):
        tok_config["bos_token"] = bos = tok_config["cls_token"]
    if not eos and tok_config.get("sep_token"):
        tok_config["eos_token"] = eos = tok_config["sep_token"]

    # The post-processor's template says which specials wrap a single sequence.
    post = tok.get("post_processor") or {}
    for proc in post.get("processors", [post]):
        if proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single", [])
        if len(single) > 1:
            if first := single[0].get("SpecialToken", {}).get("id"):
                if not tok_config:
                    bos = first
                vocab.add_special["bos"] = first in (bos, tok_config.get("cls_token"))
            if last := single[-1].get("SpecialToken", {}).get("id"):
                if not tok_config:
                    eos = last
                elif last != eos:
                    # the template ends turns with another token: the configured EOS becomes EOT
                    role_types.append("eot")
                    tok_config["eot_token"] = eos
                    tok_config["eos_token"] = eos = last
                vocab.add_special["eos"] = last == eos

    if tok_config:
        template = tok_config.get("chat_template", _separate_chat_template(model_dir))
        if isinstance(template, str):
            vocab.chat_template = template
        elif template is not None:
            logger.warning("ignoring a chat_template that is not a single string")

    def set_id(role: str, tid: Any) -> None:
        if not isinstance(tid, int) or role in vocab.special_ids:
            return
        if not 0 <= tid < n_vocab:
            logger.warning(f"special token {role} id {tid} is outside the vocabulary (size {n_vocab}); skipped")
            return
        vocab.special_ids[role] = tid

    for role in role_types:
        if isinstance(flag := tok_config.get(f"add_{role}_token"), bool):
            vocab.add_special[role] = flag
        entry = tok_config.get(f"{role}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str):
            set_id(role, next((a.get("id") for a in added if a.get("content") == content), None))
    # config.json (or its text_config) names ids the tokenizer files may not
    for role in role_types:
        tid = config.get(f"{role}_token_id")
        if tid is None:
            tid = (config.get("text_config") or {}).get(f"{role}_token_id")
        set_id(role, tid)


def load_vocab(model_dir: Path, config: dict[str, Any], n_vocab: int | None) -> Vocab:
    """Read the tokenizer of a Hugging Face model folder. n_vocab: rows of the embedding matrix
    (config vocab_size); the token list is padded up to it."""
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ConvertError(f"{model_dir}: tokenizer.json not found (only fast byte-level BPE tokenizers are supported)")
    tok = _read_json(tok_path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConvertError(f"{tok_path}: tokenizer model {model.get('type')!r} is not a byte-level BPE")
    pre = detect_pre_tokenizer(tok, tok_path)

    config_path = model_dir / "tokenizer_config.json"
    tok_config = _read_json(config_path) if config_path.is_file() else None

    reverse: dict[int, str] = {tid: text for text, tid in model.get("vocab", {}).items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for tid, a in added.items():
        reverse[tid] = a["content"]
    if not reverse:
        raise ConvertError(f"{tok_path}: empty vocabulary")
    if n_vocab is None:
        n_vocab = len(reverse)
    if (top := max(reverse)) >= n_vocab:
        raise ConvertError(f"{tok_path}: token id {top} does not fit vocab_size {n_vocab} of config.json")

    tokens: list[str] = []
    types: list[int] = []
    for tid in range(n_vocab):
        text = reverse.get(tid)
        if text is None:
            tokens.append(f"[PAD{tid}]")
            types.append(TokenType.UNUSED)
        elif tid in added:
            # Added tokens are stored as their text (the runtime matches them before BPE). llama.cpp
            # re-encodes non-normalized ones through the tokenizer, which for a ByteLevel decoder
            # gives the text back unchanged, so no round trip is needed here.
            if added[tid].get("special") or token_looks_special(text):
                types.append(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")  # pre-normalize SentencePiece-style spaces
                types.append(TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(TokenType.NORMAL)

    vocab = Vocab(tokens=tokens, token_types=types, merges=_merges(model, tok_path), pre=pre)
    if not vocab.merges:
        raise ConvertError(f"{tok_path}: BPE tokenizer without merges")
    _special_tokens(model_dir, tok, tok_config, config, vocab, n_vocab)
    return vocab
