"""A tiny target trained briefly on a structured synthetic task, so that drafting it is learnable.

A random tiny model's greedy output is noise: a draft can only learn to guess it by memorising.
Here the target (the tiny Qwen2 of conftest: 2 layers, hidden 64) is first trained with torch
on templated answers, so its greedy responses follow rules a draft can pick up from the target's
hidden states: the prompt names a phrasing (STYLES) and two words, and the answer is that
phrasing's template with the two words filled in, each word mentioned twice.

    prompt   "jump fox dog"
    answer   "The quick fox jumps over the lazy dog, then the dog sees the fox."

Used by tests/test_train_synthetic.py and bench/ablate_draft.py (which puts tests/ on sys.path).
"""
from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

NOUNS = ["fox", "dog", "frames", "patches", "target", "token", "video", "model"]
STYLES = {
    "jump": "The quick {a} jumps over the lazy {b}, then the {b} sees the {a}.",
    "draft": "Every {a} drafts one {b} and the target verifies the {a} in one pass.",
    "order": "The {a} is before the {b}; the {b} is after the {a}.",
}


def all_prompts() -> list[str]:
    """Every prompt of the task (3 styles x 8 x 7 ordered word pairs = 168), in a fixed order."""
    return [f"{style} {a} {b}" for style in STYLES for a, b in itertools.permutations(NOUNS, 2)]


def answer(prompt: str) -> str:
    style, a, b = prompt.split()
    return STYLES[style].format(a=a, b=b)


def split_prompts(n_train: int, n_held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint draft-training and held-out prompts (the target itself saw all of them)."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    assert n_train + n_held_out <= len(prompts)
    return prompts[:n_train], prompts[n_train:n_train + n_held_out]


def write_manifest(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    return path


@dataclass
class TargetTraining:
    steps: int
    seconds: float
    final_loss: float          # mean CE over answer tokens of the last 10 steps
    greedy_exact: float        # fraction of all prompts whose greedy answer is exactly the template


def train_synthetic_target(out: Path, tokenizer_dir: Path, *, steps: int = 300, batch_size: int = 32,
                           lr: float = 3e-3, seed: int = 0, num_layers: int = 2) -> tuple[Path, TargetTraining]:
    """Train the tiny Qwen2 on (chat prompt, templated answer + <|im_end|>) with teacher forcing,
    loss on the answer only, and save it (with the tokenizer) to `out`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from conftest import _lm_sizes, _save_model

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = Qwen2Config(**_lm_sizes(num_hidden_layers=num_layers), rope_theta=1e6, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    eos = tok.eos_token_id

    def prompt_ids(p: str) -> list[int]:
        # exactly what sparrow_py.train.target.Target.prompt_ids builds for a text-only record
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    prompts = all_prompts()
    encoded = []
    for p in prompts:
        ids_p = prompt_ids(p)
        ids_a = tok(answer(p), add_special_tokens=False)["input_ids"] + [eos]
        encoded.append((ids_p, ids_a))
    width = max(len(a) + len(b) for a, b in encoded)
    inputs = torch.full((len(encoded), width), eos, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (ids_p, ids_a) in enumerate(encoded):
        seq = ids_p + ids_a
        inputs[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(ids_p):len(seq)] = torch.tensor(ids_a)  # the model learns to answer, not to ask
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:  # short warmup, then linear decay: converges in few steps
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (1.0 - 0.9 * step / steps)
        idx = torch.randint(0, len(encoded), (batch_size,), generator=gen)
        loss = model(input_ids=inputs[idx], labels=labels[idx]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    model.eval()
    exact = 0
    with torch.no_grad():
        for ids_p, ids_a in encoded:
            x = torch.tensor([ids_p])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=len(ids_a) + 2, do_sample=False,
                               eos_token_id=eos, pad_token_id=eos)[0, len(ids_p):].tolist()
            exact += y == ids_a
    _save_model(model, out, tokenizer_dir)
    return out, TargetTraining(steps=steps, seconds=seconds, final_loss=sum(losses[-10:]) / 10,
                               greedy_exact=exact / len(encoded))
