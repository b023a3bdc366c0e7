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


def write_eagle3(sparrow_draft_gguf, out_path, *, extra_keys=None, taps=None):
    """A G = 0, W = 0 spec-v1 draft rewritten as llama.cpp writes an EAGLE-3 draft (arch eagle3):
    the same tensors, metadata under eagle3.* (target_layers, target_hidden_size), q/k rows
    permuted as llama.cpp's converter permutes Llama's for its NORM RoPE, and no tokenizer
    beyond the model type (llama.cpp needs one to load; a real file carries the target's)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(sparrow_draft_gguf))
    meta = {k[len("sparrow-draft."):]: f.contents() for k, f in r.fields.items() if k.startswith("sparrow-draft.")}
    assert meta["glimpses"] == 0 and meta["window"] == 0 and meta["anchors"] == 0, "eagle3 has no glimpses or VATA"
    n_head, n_head_kv = meta["attention.head_count"], meta["attention.head_count_kv"]

    def permute(w, heads):  # HF (NEOX halves) -> llama.cpp's interleaved pairs, per head
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(out_path), "eagle3")
    w.add_block_count(1)
    w.add_context_length(4096)  # required by llama.cpp's loader, unused by ours
    w.add_embedding_length(meta["embedding_length"])
    w.add_feed_forward_length(meta["feed_forward_length"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(meta["attention.layer_norm_rms_epsilon"])
    w.add_rope_freq_base(meta["rope.freq_base"])
    w.add_vocab_size(meta["vocab_size"])
    w.add_array("eagle3.target_layers", list(taps if taps is not None else meta["taps"]))
    w.add_uint32("eagle3.target_hidden_size", meta["target.embedding_length"])
    w.add_tokenizer_model("none")
    for key, value in (extra_keys or {}).items():
        w.add_bool(key, value) if isinstance(value, bool) else w.add_uint32(key, value)
    for t in r.tensors:
        if t.name == "glimpse_proj.weight":  # exported even for G = 0; eagle3 has none
            continue
        data = np.array(t.data)
        if t.name == "blk.0.attn_q.weight":
            data = permute(data, n_head)
        elif t.name == "blk.0.attn_k.weight":
            data = permute(data, n_head_kv)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
