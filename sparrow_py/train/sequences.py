"""Several continuations decoded together in one runtime context (sparrow_batch.seq_ids), for the
data step: the target's answers (runtime_target.py) and the prompts it writes itself
(prompts.py). Each prompt is a sequence of its own, so a step of all of them reads the weights
once, and each gets the logits it would get decoded alone. No torch."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np


def continue_together(engine, prompts: Sequence[Sequence[int]], limits: Sequence[int],
                      pick: Callable[[object], int], capture_slots: int = 0, end_token: int = -1
                      ) -> list[tuple[list[int], bool, Optional[list[np.ndarray]]]]:
    """For each prompt (tokens, ended, hidden): pick(logits row) chooses each next token; a
    continuation ends at an end-of-generation token (not kept; ended True) or after limits[i]
    tokens. All of them must fit the context together; its cache is emptied before and after.

    With capture_slots (the number of layers given to the engine's set_capture_layers), the
    hidden states captured at every row are kept, so that nothing has to run the sequence again
    to featurize it: hidden is, per capture slot, an array [n, n_embd] over the n positions of
    prompt + tokens + [end_token if ended]. The position after the last decoded one (the final
    token, or end_token: what a caller stores for an ended continuation) is fed once more,
    without logits, for its rows. Without, hidden is None."""
    capture = capture_slots > 0
    engine.kv_truncate(0)
    tokens, seqs, outputs = [], [], []
    for i, p in enumerate(prompts):
        tokens += p
        seqs += [i] * len(p)
        outputs += [False] * (len(p) - 1) + [True]
    rows: list[list[list[np.ndarray]]] = [[[] for _ in range(capture_slots)] for _ in prompts]

    def decode(toks: list[int], outs: list[bool], ids: list[int]):
        logits = engine.decode(toks, outputs=outs, seq_ids=ids, capture_all=capture)
        if capture:
            seq_of_row = np.asarray(ids)
            for slot in range(capture_slots):
                h = engine.hidden(slot)
                for i in set(ids):
                    rows[i][slot].append(h[seq_of_row == i])
        return logits

    logits = decode(tokens, outputs, seqs)
    out: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    live = list(range(len(prompts)))  # the sequences whose logits are the rows of `logits`, in order
    while live:
        feed, last = [], []  # last: a finished sequence's final position, fed for its hidden states only
        for row, i in enumerate(live):
            if len(out[i]) >= limits[i]:
                continue
            t = pick(logits[row])
            if engine.is_eog(t):
                ended[i] = True
                if capture:
                    last.append((i, end_token))
                continue
            out[i].append(t)
            if len(out[i]) < limits[i]:
                feed.append((i, t))
            elif capture:
                last.append((i, t))
        live = [i for i, _ in feed]
        if feed or last:
            both = feed + last
            logits = decode([t for _, t in both], [True] * len(feed) + [False] * len(last), [i for i, _ in both])
    engine.kv_truncate(0)
    hidden = [[np.concatenate(slot) for slot in r] if capture else None for r in rows]
    return list(zip(out, ended, hidden))
