"""A trained draft on disk: model.safetensors + config.json (what convert/to_gguf.py reads).

Tensors are the draft's own parameters under their torch names (fc.weight, q_proj.weight, ...,
glimpse_proj.weight, and lm_head.weight + d2t for a reduced vocabulary). The target's embedding
and LM head are not stored: the draft shares them with the target it was trained for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import DraftConfig, SparrowDraft


def draft_state(model: SparrowDraft) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_draft(model: SparrowDraft, folder: str | Path, extra: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in draft_state(model).items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", **(extra or {})})
    model.config.save(folder)
    return folder


def load_draft(folder: str | Path, target=None) -> SparrowDraft:
    """Load an exported draft; with a Target, check it fits and attach its embedding and head."""
    from safetensors.torch import load_file

    config = DraftConfig.load(folder)
    model = SparrowDraft(config)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    if target is not None:
        config.check_fits(target.shape)
        model.set_target_weights(*target.embed_and_head())
    return model
