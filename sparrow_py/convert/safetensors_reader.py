"""A small streaming reader of Hugging Face .safetensors checkpoints (no torch, no safetensors).

File layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the byte after the header),
an optional "__metadata__" entry, then the raw little-endian data. We memory-map the data, so a
tensor is read from disk only when it is loaded, one at a time.

A checkpoint is either one model.safetensors or shards listed by model.safetensors.index.json
({"weight_map": {tensor name: shard file}}).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConvertError

INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype -> (numpy dtype of the stored words, bytes per element)
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to f32 on load: bf16 is the top half of an f32
}

# A header larger than this is not a real checkpoint (the format itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: F32, F16, BF16
    shape: tuple[int, ...]
    file: Path


class SafetensorsFile:
    """One .safetensors file: its header, and its data memory-mapped on first use."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise ConvertError(f"{path}: not a safetensors file (shorter than 8 bytes)")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > _MAX_HEADER_BYTES:
                    raise ConvertError(f"{path}: not a safetensors file (header length {header_len})")
                header = json.loads(f.read(header_len))
        except OSError as e:
            raise ConvertError(f"{path}: cannot read: {e.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConvertError(f"{path}: not a safetensors file (header is not JSON)") from None

        self._data_start = 8 + header_len
        data_len = path.stat().st_size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            if dtype in _DTYPES:
                expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
                if end - begin != expected or not 0 <= begin <= end <= data_len:
                    raise ConvertError(f"{path}: tensor {name!r} has inconsistent data offsets (file truncated?)")
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        dtype, shape, _, _ = self._entries[name]
        return TensorInfo(name, dtype, shape, self.path)

    def load_f32(self, name: str) -> np.ndarray:
        """The tensor as a fresh float32 array (f16 and bf16 widen exactly)."""
        dtype, shape, begin, end = self._entries[name]
        if dtype not in _DTYPES:
            raise ConvertError(f"{self.path}: tensor {name!r} has dtype {dtype}; only F32, F16 and BF16 are supported")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
        words = self._mmap[begin:end].view(_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            return (words.astype(np.uint32) << 16).view(np.float32)
        return words.astype(np.float32)  # copies: the result never aliases the mapped file

    def close(self) -> None:
        self._mmap = None  # numpy unmaps when the last view is gone


class Checkpoint:
    """All safetensors weights of a Hugging Face model folder, sharded or not."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        index_path = model_dir / INDEX_NAME
        if index_path.is_file():
            shard_of = self._read_index(index_path)
            shard_names = sorted(set(shard_of.values()))
        else:
            # same rule as llama.cpp: the parts are the model*.safetensors files
            shard_names = sorted(p.name for p in model_dir.glob("model*.safetensors"))
            shard_of = None
            if not shard_names:
                raise ConvertError(f"{model_dir}: no model*.safetensors weights found "
                                   "(pytorch_model.bin checkpoints are not supported)")

        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        for shard in shard_names:
            path = model_dir / shard
            if not path.is_file():
                raise ConvertError(f"{path}: shard listed in {INDEX_NAME} is missing")
            st = self._files[shard] = SafetensorsFile(path)
            for name in st.names():
                if shard_of is not None and shard_of.get(name) != shard:
                    raise ConvertError(f"{path}: tensor {name!r} is not listed for this shard in {INDEX_NAME}")
                if name in self._where:
                    raise ConvertError(f"{path}: tensor {name!r} is stored twice")
                self._where[name] = st
        if shard_of is not None:
            for name, shard in shard_of.items():
                if name not in self._where:
                    raise ConvertError(f"{model_dir / shard}: tensor {name!r} listed in {INDEX_NAME} is missing")

    @staticmethod
    def _read_index(index_path: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, json.JSONDecodeError) as e:
            raise ConvertError(f"{index_path}: cannot read: {e}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index_path}: no 'weight_map'")
        return weight_map

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._where[name].info(name)

    def load_f32(self, name: str) -> np.ndarray:
        return self._where[name].load_f32(name)

    def close(self) -> None:
        for st in self._files.values():
            st.close()
