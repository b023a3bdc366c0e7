"""Tree batches (speculative verification) and KV compaction against plain sequential decoding."""
from __future__ import annotations

import numpy as np
import pytest

import sparrow_py as sp
from sparrow_py.convert import convert


@pytest.fixture(scope="module", params=["tiny_qwen2_dir", "tiny_llama_dir", "tiny_qwen2vl_dir"])
def engine(request, tmp_path_factory):
    src = request.getfixturevalue(request.param)
    path = tmp_path_factory.mktemp("tree") / f"{request.param}.gguf"
    convert(src, path, outtype="f32", progress=False)
    with sp.Engine(str(path), n_ctx=128, n_threads=2, kv_type="f32", n_batch=32) as e:
        yield e


def random_tree(n: int, rng) -> list[int]:
    parents = [-1]
    for i in range(1, n):
        parents.append(int(rng.integers(-1, i)) if rng.random() < 0.15 else int(rng.integers(0, i)))
    return parents


def path_to(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_tree_logits_equal_sequential_paths(engine):
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, engine.n_vocab, size=9).tolist()
    parents = random_tree(20, rng)
    tokens = rng.integers(0, engine.n_vocab, size=20).tolist()
    engine.kv_truncate(0)
    engine.decode(prefix)
    tree_logits = engine.decode(tokens, outputs=[True] * 20, parents=parents)
    assert engine.kv_size == len(prefix) + 20
    for node in range(20):
        engine.kv_truncate(len(prefix))
        path = path_to(parents, node)
        seq_logits = engine.decode([tokens[i] for i in path])[-1]
        engine.kv_truncate(len(prefix) + 0)
        assert rel_err(tree_logits[node], seq_logits) < 1e-5, node


def test_compacting_the_accepted_path_equals_fresh_prefill(engine):
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, engine.n_vocab, size=7).tolist()
    parents = random_tree(16, rng)
    tokens = rng.integers(0, engine.n_vocab, size=16).tolist()
    depths = [len(path_to(parents, i)) for i in range(16)]
    accepted = path_to(parents, int(np.argmax(depths)))
    assert len(accepted) >= 3  # a real path, not just a root
    nxt = int(rng.integers(0, engine.n_vocab))

    engine.kv_truncate(0)
    engine.decode(prefix)
    engine.decode(tokens, outputs=[True] * 16, parents=parents)
    engine.kv_compact(len(prefix), [len(prefix) + i for i in accepted])
    assert engine.kv_size == len(prefix) + len(accepted)
    after = engine.decode([nxt])[-1]

    engine.kv_truncate(0)
    fresh = engine.decode(prefix + [tokens[i] for i in accepted] + [nxt])[-1]
    assert rel_err(after, fresh) < 1e-5


def test_bad_trees_are_refused(engine):
    engine.kv_truncate(0)
    for parents in ([0, -1], [-1, 1], [-1, -2]):
        with pytest.raises(sp.SparrowError, match="parent"):
            engine.decode([1, 2], parents=parents)
    with pytest.raises(sp.SparrowError, match="fit in one forward pass"):
        engine.decode(list(range(40)), parents=[-1] + list(range(39)))
    with pytest.raises(sp.SparrowError, match="rows must increase"):
        engine.decode([1, 2, 3])
        engine.kv_compact(1, [2, 1])
    assert engine.kv_size == 3  # a refused call changes nothing
