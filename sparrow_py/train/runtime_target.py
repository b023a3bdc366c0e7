"""The target's text side run by Sparrow's own runtime, for the data step of training.

Self-distillation needs the target's responses and one forward over each sample. On a CPU,
transformers generates a few tokens a second for a 135M model; the runtime generates from the
target's GGUF at its own speed (the same quantized model the draft will serve) and gives the
features of the sample in one pass: the inputs of the tap layers at every position (captured as
the speculative loop captures them) and the next-token logits.

RuntimeTarget wraps the Hugging Face Target (which still provides the chat template, the shape,
the embeddings and head the draft shares, and everything visual): samples without video or
images take the runtime path, others the HF path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .sequences import continue_together


class RuntimeTarget:
    def __init__(self, hf_target, gguf_path: str | Path, n_ctx: int = 4096, n_threads: int | None = None):
        import sparrow_py as sp

        self.hf = hf_target
        self.gguf = Path(gguf_path)
        self.engine = sp.Engine(str(self.gguf), n_ctx=n_ctx, n_threads=n_threads or 0, n_batch=512)
        if self.engine.n_layer != hf_target.shape.num_layers or self.engine.n_embd != hf_target.shape.hidden_size:
            raise ValueError(f"{self.gguf} ({self.engine.n_layer} layers, hidden {self.engine.n_embd}) is not the "
                             f"target in {hf_target.dir}")
        self._capture: list[int] | None = None

    # the HF target's attributes (dir, shape, config, is_vlm, tokenizer, ...)
    def __getattr__(self, name: str) -> Any:
        return getattr(self.hf, name)

    def prompt_ids(self, prompt, visual):
        return self.hf.prompt_ids(prompt, visual)

    def generate(self, ids: list[int], visual, max_new_tokens: int, sample: bool = False, temperature: float = 1.0,
                 seed: int = 0) -> list[int]:
        if visual is not None:
            return self.hf.generate(ids, visual, max_new_tokens, sample=sample, temperature=temperature, seed=seed)
        if len(ids) + max_new_tokens > self.engine.n_ctx:
            max_new_tokens = self.engine.n_ctx - len(ids)
        kw = dict(temperature=temperature, seed=seed) if sample else dict(temperature=0.0)
        for _ in self.engine.generate(ids, max_tokens=max_new_tokens, speculative="none", **kw):
            pass
        # the HF path stops after the end-of-turn token and keeps it: so does this
        tokens = list(self.engine.last_tokens)
        if self.engine.last_finish_reason == "eog":
            tokens.append(self.hf.tokenizer.eos_token_id)
        return tokens

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
        """Greedy responses of several text prompts, decoded together: each prompt is a sequence
        of its own in one context (seq_ids), so a step of all of them reads the weights once. A
        token's logits do not depend on the batch around it, so each response is the one
        generate() gives for its prompt alone. Prompts go in groups whose sequences fit the
        context together."""
        return [r for r, _ in self._generate_batch(prompts, max_new_tokens, None)]

    def generate_batch_features(self, prompts: list[list[int]], max_new_tokens: list[int], taps: list[int],
                                ivsb_layer: int) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        """generate_batch, and each sample's features (as features(prompt + response), without
        logits) captured while it was generated: the forward over the whole sample that
        features() would run again is not needed (it was a third of the data step's time)."""
        return self._generate_batch(prompts, max_new_tokens, self._capture_layers(taps, ivsb_layer))

    def _generate_batch(self, prompts, max_new_tokens, capture: list[int] | None):
        e = self.engine
        limits = [max(0, min(n, e.n_ctx - len(p))) for p, n in zip(prompts, max_new_tokens)]
        # with features, the final position is fed once more: one more row per sequence
        extra = 1 if capture else 0
        out: list = [None] * len(prompts)
        group: list[int] = []
        used = 0
        for i, p in enumerate(prompts):
            need = len(p) + limits[i] + extra
            if group and used + need > e.n_ctx:
                self._generate_group(prompts, limits, group, out, capture)
                group, used = [], 0
            group.append(i)
            used += need
        if group:
            self._generate_group(prompts, limits, group, out, capture)
        return out

    def _generate_group(self, prompts: list[list[int]], limits: list[int], group: list[int], out: list,
                        capture: list[int] | None) -> None:
        eos = self.hf.tokenizer.eos_token_id
        done = continue_together(self.engine, [prompts[i] for i in group], [limits[i] for i in group],
                                 lambda row: int(np.argmax(row)), capture_slots=len(capture or []), end_token=eos)
        for i, (tokens, ended, hidden) in zip(group, done):
            response = tokens + [eos] * ended  # as generate() reports an end-of-turn stop
            out[i] = (response, None if hidden is None else self._features(prompts[i] + response, hidden, len(capture) - 2))

    def _capture_layers(self, taps: list[int], ivsb_layer: int) -> list[int]:
        """The engine captures the tap layers' inputs, the ivsb layer's output and the final hidden
        state (L: before the norm)."""
        layers = list(taps) + [ivsb_layer + 1, self.hf.shape.num_layers]
        if layers != self._capture:
            self.engine.set_capture_layers(layers)
            self._capture = layers
        return layers

    def _features(self, ids: list[int], hidden: list[np.ndarray], n_taps: int) -> dict[str, torch.Tensor]:
        n = len(ids)
        return {
            "ids": torch.tensor(ids),
            "positions": torch.arange(n),
            "visual": torch.zeros(n, dtype=torch.bool),
            "taps": torch.from_numpy(np.concatenate(hidden[:n_taps], axis=-1)),
            "ivsb": torch.from_numpy(hidden[n_taps]),
            "final": self.hf.final_norm(torch.from_numpy(hidden[-1])),
        }

    def features(self, ids: list[int], visual, taps: list[int], ivsb_layer: int,
                 with_logits: bool = True) -> dict[str, torch.Tensor]:
        if visual is not None:
            return self.hf.features(ids, visual, taps, ivsb_layer, with_logits)
        layers = self._capture_layers(taps, ivsb_layer)
        self.engine.kv_truncate(0)
        # the head over every row only when the logits are kept (store="logits")
        if with_logits:
            logits = self.engine.decode(ids, outputs=[True] * len(ids))
        else:
            self.engine.decode(ids, capture_all=True)
        hidden = [self.engine.hidden(k) for k in range(len(layers))]
        self.engine.kv_truncate(0)
        f = self._features(ids, hidden, len(taps))
        if with_logits:
            f["logits"] = torch.from_numpy(logits)
        return f
