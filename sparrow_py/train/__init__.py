"""Sparrow draft training (needs torch + transformers: `pip install sparrow-vidllm[train]`).

    model.py     the spec v1 draft module (SparrowDraft), DraftConfig, the VATA rule, DraftCache
    target.py    the HF target with hooks: taps, ivsb outputs, position ids, logits; video inputs
    data.py      manifests -> self-distilled samples -> compact feature cache; batching
    trainer.py   MTP loss, AdamW + warmup/cosine, accumulation, checkpoints/resume, DDP
    evaluate.py  mean accepted length / acceptance by depth by simulated greedy chain drafting
    export.py    model.safetensors + config.json (convert/to_gguf.py makes the GGUF)
    cli.py       `sparrow train` and `sparrow eval-draft`

The algorithm and every decision the spec leaves open: docs/draft.md. Importing this package
imports torch; sparrow_py itself never does.
"""

__all__ = ["DraftCache", "DraftConfig", "DraftConfigError", "SparrowDraft", "pool_glimpses", "vata_visible"]


def __getattr__(name):
    # lazily, so `sparrow_py.train.cli` (imported by the `sparrow` command) does not import torch
    if name in __all__:
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module 'sparrow_py.train' has no attribute {name!r}")
