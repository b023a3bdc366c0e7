"""Writing a GGUF whose tensors are streamed: at most one tensor in memory, no half-written file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import gguf
import numpy as np


def write_streamed(w: gguf.GGUFWriter, outfile: Path, tensor_data: Iterable[np.ndarray]) -> None:
    """Write w (metadata and tensor infos already added) to outfile: header, metadata, tensor
    index, then each array of tensor_data in the order of the infos. The file is written next to
    outfile and renamed at the end, so a failed run (or an exception from tensor_data) leaves no
    half-written GGUF behind."""
    partial = outfile.with_name(outfile.name + ".part")
    try:
        w.write_header_to_file(path=partial)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for data in tensor_data:
            w.write_tensor_data(data)
        w.close()
        os.replace(partial, outfile)
    except BaseException:
        w.close()
        partial.unlink(missing_ok=True)
        raise
