"""Prompts written by the target itself, for self-distillation where no prompt corpus is at hand.

Magpie's observation: an instruction-tuned model given its chat template up to the start of a
user turn, and nothing else, writes a plausible user request. Sampled many times (temperature
~1) that gives a varied set of prompts in the model's own domain, from the target's GGUF alone,
with the runtime (no torch): `sparrow make-prompts`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

_MARK = "\u0001SPARROW_USER\u0001"


def user_turn_prefix(engine) -> list[int]:
    """Token ids of the model's chat template up to where a user message's text starts."""
    try:
        text = engine.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=False)
    except Exception as e:  # noqa: BLE001 - any template failure means: no chat template to use
        raise ValueError(f"the model has no usable chat template ({e})") from None
    if _MARK not in text:
        raise ValueError("the model's chat template does not place the user's message")
    return engine.tokenize(text.split(_MARK)[0], add_special=False)


def magpie_prompts(engine, n: int, seed: int = 0, max_tokens: int = 96, temperature: float = 1.0,
                   top_p: float = 0.95, min_chars: int = 12) -> Iterator[str]:
    """Up to n distinct user prompts the model writes itself. Drafts that run past max_tokens
    (no end of turn) or are shorter than min_chars are dropped; gives up after 4 n tries."""
    prefix = user_turn_prefix(engine)
    seen: set[str] = set()
    for i in range(4 * n):
        if len(seen) >= n:
            return
        text = "".join(engine.generate(prefix, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                       seed=seed * 1_000_003 + i, speculative="none"))
        prompt = text.strip()
        if engine.last_finish_reason != "eog" or len(prompt) < min_chars or prompt in seen:
            continue
        seen.add(prompt)
        yield prompt


def write_prompts(model: str | Path, out: str | Path, n: int, seed: int = 0, threads: int | None = None,
                  max_tokens: int = 96, temperature: float = 1.0, top_p: float = 0.95, progress: bool = True) -> int:
    """`sparrow make-prompts`: n prompts as JSONL records {"prompt": ...}; returns how many."""
    import sparrow_py as sp

    out = Path(out)
    with sp.Engine(str(model), n_ctx=max_tokens + 512, n_threads=threads or 0) as engine:
        out.parent.mkdir(parents=True, exist_ok=True)
        bar = None
        if progress:
            try:
                from tqdm import tqdm
                bar = tqdm(total=n, desc="prompts", unit="prompt", dynamic_ncols=True)
            except ImportError:
                bar = None
        written = 0
        with open(out, "w", encoding="utf-8") as f:
            for prompt in magpie_prompts(engine, n, seed=seed, max_tokens=max_tokens, temperature=temperature,
                                         top_p=top_p):
                f.write(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n")
                written += 1
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    return written
