"""Several continuations decoded together in one runtime context (sparrow_batch.seq_ids), for the
data step: the target's answers (runtime_target.py) and the prompts it writes itself
(prompts.py). Each prompt is a sequence of its own, so a step of all of them reads the weights
once, and each gets the logits it would get decoded alone. No torch."""

from __future__ import annotations

from typing import Callable, Sequence


def continue_together(engine, prompts: Sequence[Sequence[int]], limits: Sequence[int],
                      pick: Callable[[object], int]) -> list[tuple[list[int], bool]]:
    """For each prompt (tokens, ended): pick(logits row) chooses each next token; a continuation
    ends at an end-of-generation token (not kept; ended True) or after limits[i] tokens. All of
    them must fit the context together; its cache is emptied before and after."""
    engine.kv_truncate(0)
    tokens, seqs, outputs = [], [], []
    for i, p in enumerate(prompts):
        tokens += p
        seqs += [i] * len(p)
        outputs += [False] * (len(p) - 1) + [True]
    logits = engine.decode(tokens, outputs=outputs, seq_ids=seqs)
    out: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    live = list(range(len(prompts)))  # the sequences whose logits are the rows of `logits`, in order
    while live:
        feed = []
        for row, i in enumerate(live):
            if len(out[i]) >= limits[i]:
                continue
            t = pick(logits[row])
            if engine.is_eog(t):
                ended[i] = True
                continue
            out[i].append(t)
            if len(out[i]) < limits[i]:
                feed.append((i, t))
        live = [i for i, _ in feed]
        if feed:
            logits = engine.decode([t for _, t in feed], outputs=[True] * len(feed), seq_ids=live)
    engine.kv_truncate(0)
    return list(zip(out, ended))
