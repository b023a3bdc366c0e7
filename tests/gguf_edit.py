"""Test helper: rewrite a GGUF with gguf-py (llama.cpp's own reader and writer)."""
from __future__ import annotations

import numpy as np


def copy_gguf(src, dst, *, drop_tensors=(), replace_kv=None, replace_tensors=None, raw_types=None):
    """Rewrite a GGUF with gguf-py, optionally dropping tensors, changing metadata values or
    replacing tensor data (to make structurally valid files with wrong content). raw_types gives
    the ggml type of replacement data that is already quantized bytes."""
    import gguf

    replace_kv = replace_kv or {}
    replace_tensors = replace_tensors or {}
    r = gguf.GGUFReader(str(src))
    arch = replace_kv.get("general.architecture", r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, replace_kv.get(name, field.contents()), vtype, sub_type=sub)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        if t.name in replace_tensors:
            raw_type = (raw_types or {}).get(t.name)
            w.add_tensor(t.name, replace_tensors[t.name], raw_dtype=raw_type)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
