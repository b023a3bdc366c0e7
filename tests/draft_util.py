"""Test helper: a Sparrow draft for a tiny target, exported and converted like a trained one."""
from __future__ import annotations

from sparrow_py.convert import convert


def make_draft(target_dir, out_dir, *, window=256, anchors=32, seed=0, scale=0.02, **kw):
    import torch

    from sparrow_py.train.export import save_draft
    from sparrow_py.train.model import DraftConfig, SparrowDraft
    from sparrow_py.train.target import target_shape

    config = DraftConfig.for_target(target_shape(target_dir), window=window, anchors=anchors, **kw)
    draft = SparrowDraft(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            else:  # norm weights: not all ones, so that a swapped norm shows
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    save_draft(draft, out_dir)
    path = out_dir.parent / (out_dir.name + ".gguf")  # next to the exported folder
    convert(out_dir, path, outtype="f32", progress=False)
    return path
