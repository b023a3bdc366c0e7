"""Held-out evaluation: greedy chain drafting simulated against the target's greedy responses.

For a cached sample (prompt + the target's GREEDY response), the draft runs exactly as the
runtime would: step() over the prompt's text entries, then cycles of
    draft d_1..d_k from the last committed entry (its own hidden state after the first),
    "verify": d_i is accepted while it equals the target's greedy token (ids[c + i]),
    commit the a accepted tokens + the bonus token with the target's real features.
Each cycle is one target forward producing a + 1 tokens, so
    mean accepted length = generated tokens / target forwards   (the bonus token counts),
as Sparrow reports it. Acceptance by depth d = accepted / attempted drafts at depth d (attempted
only when depths < d were all accepted). The first response token comes from the prefill, not
a verify forward, and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model import DraftCache, SparrowDraft


@dataclass
class AcceptanceStats:
    depth: int
    tokens: int = 0
    forwards: int = 0
    attempted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.attempted = self.attempted or [0] * self.depth
        self.accepted = self.accepted or [0] * self.depth

    @property
    def mean_accepted_length(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def acceptance_by_depth(self) -> list[float]:
        return [a / n if n else 0.0 for a, n in zip(self.accepted, self.attempted)]

    def add(self, other: "AcceptanceStats") -> None:
        self.tokens += other.tokens
        self.forwards += other.forwards
        for d in range(self.depth):
            self.attempted[d] += other.attempted[d]
            self.accepted[d] += other.accepted[d]

    def lines(self) -> list[str]:
        rates = " ".join(f"{r:.3f}" for r in self.acceptance_by_depth())
        return [f"mean accepted length {self.mean_accepted_length:.3f} ({self.tokens} tokens / {self.forwards} "
                f"target forwards, depth {self.depth})", f"acceptance by depth: {rates}"]


@torch.no_grad()
def simulate_sample(model: SparrowDraft, sample: dict, depth: int) -> AcceptanceStats:
    c = model.config
    dev = model.fc.weight.device
    stats = AcceptanceStats(depth)
    ids = sample["ids"].long().tolist()
    N, P = len(ids), sample["prompt_len"]
    visual = sample["visual"].bool()
    positions = sample["positions"].long()
    text_pos = torch.nonzero(~visual).flatten().tolist()
    entries = [t for t in text_pos if t < N - 1]
    taps = sample["taps"].float().to(dev)
    g_all = model.fuse_taps(taps)
    cache = DraftCache(c, sample["anchor_start"])
    model.add_glimpses(cache, sample["glimpses"].float().to(dev), sample["glimpse_pos"].long().to(dev))

    n_done = 0   # entries committed
    cur = P      # ids[cur] is the newest known token; target features exist for positions < cur

    def commit_until(last_pos: int):
        nonlocal n_done
        out = None
        while n_done < len(entries) and entries[n_done] <= last_pos:
            t = entries[n_done]
            out = model.step(cache, ids[t + 1], g_all[n_done], int(positions[t]), speculative=False)
            n_done += 1
        return out

    while cur < N - 1:
        logits, h = commit_until(cur - 1)
        k = min(depth, N - 1 - cur)
        a = 0
        pos = int(positions[cur - 1])
        for d in range(k):
            tok = int(model.to_target_ids(logits.argmax()))
            stats.attempted[d] += 1
            if tok != ids[cur + 1 + d]:
                break
            stats.accepted[d] += 1
            a += 1
            if d + 1 < k:
                logits, h = model.step(cache, tok, h, pos + d + 1, speculative=True)
        cache.drop_speculative()
        stats.forwards += 1
        # a accepted + the bonus token, except that the reference response may end first
        stats.tokens += min(a + 1, N - 1 - cur)
        cur += a + 1
    return stats


def evaluate(model: SparrowDraft, samples: list[dict], depth: int) -> AcceptanceStats:
    was_training = model.training
    model.eval()
    total = AcceptanceStats(depth)
    for s in samples:
        total.add(simulate_sample(model, s, depth))
    model.train(was_training)
    return total
