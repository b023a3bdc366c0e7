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

from .sequences import continue_together

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
                   top_p: float = 0.95, min_chars: int = 12, batch: int = 16) -> Iterator[str]:
    """Up to n distinct user prompts the model writes itself. Drafts that run past max_tokens
    (no end of turn) or are shorter than min_chars are dropped; gives up after 4 n tries.

    `batch` drafts are written together, each a sequence of its own in one context (seq_ids), so
    a step of all of them reads the weights once (2.7x the prompts per second of one at a time
    for SmolLM2-135M at q4_1, 2 threads); as many as the context holds."""
    import numpy as np

    prefix = user_turn_prefix(engine)
    per_draft = len(prefix) + max_tokens
    if per_draft > engine.n_ctx:
        raise ValueError(f"a draft of {max_tokens} tokens after the {len(prefix)}-token header does not fit the "
                         f"context ({engine.n_ctx})")
    batch = max(1, min(batch, engine.n_ctx // per_draft))
    rng = np.random.default_rng([seed, 0x4D414750])
    seen: set[str] = set()
    tries = 0
    while len(seen) < n and tries < 4 * n:
        b = min(batch, 4 * n - tries)
        tries += b
        drafts = continue_together(engine, [prefix] * b, [max_tokens] * b,
                                   lambda row: sample_top_p(row, temperature, top_p, rng))
        for tokens, ended, _ in drafts:
            prompt = engine.detokenize(tokens).strip()
            if not ended or len(prompt) < min_chars or prompt in seen:
                continue
            seen.add(prompt)
            yield prompt
            if len(seen) >= n:
                return


def sample_top_p(logits, temperature: float, top_p: float, rng, candidates: int = 1024) -> int:
    """A token from softmax(logits / temperature) cut to its top-p nucleus (the most probable
    tokens whose probabilities reach top_p together, the one that crosses included) and
    renormalized (temperature 0: the most probable). Only the `candidates` most probable are
    sorted unless they hold too little."""
    import numpy as np

    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p >= 1.0:
        return int(rng.choice(len(p), p=p))
    top = np.argpartition(-p, candidates)[:candidates] if candidates < len(p) else np.arange(len(p))
    if p[top].sum() < top_p:
        top = np.arange(len(p))
    order = top[np.argsort(-p[top], kind="stable")]
    keep = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    nucleus = order[:keep]
    return int(rng.choice(nucleus, p=p[nucleus] / p[nucleus].sum()))


def write_prompts(model: str | Path, out: str | Path, n: int, seed: int = 0, threads: int | None = None,
                  max_tokens: int = 96, temperature: float = 1.0, top_p: float = 0.95, progress: bool = True) -> int:
    """`sparrow make-prompts`: n prompts as JSONL records {"prompt": ...}; returns how many."""
    import sparrow_py as sp

    out = Path(out)
    # room for 16 drafts written together (magpie_prompts)
    with sp.Engine(str(model), n_ctx=16 * (max_tokens + 64), n_threads=threads or 0) as engine:
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
