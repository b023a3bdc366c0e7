"""Reading a model folder's preprocessor settings (preprocessor_config.json and friends)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: the processors' defaults when a folder says nothing.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_preprocessor_config(model_dir: str | Path | None, *names: str) -> dict[str, Any]:
    """The first of `names` that exists in model_dir, parsed; {} when none does (or no folder)."""
    if model_dir is None:
        return {}
    for name in names:
        path = Path(model_dir) / name
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e})") from None
    return {}
