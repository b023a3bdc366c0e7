"""Semantic fuzzing: valid GGUFs whose values are wrong.

The container parser is fuzzed elsewhere (test_fuzz_gguf.py); here every numeric metadata value
of an LM, a draft and a vision file (head counts, lengths, layer lists, rope settings, epsilons,
vocabulary sizes, special token ids ...) is replaced in turn by 0, 1, 3, 2^31-1, twice or one more than itself, the
type's largest value, and for floats also -1, NaN, infinity and 1e30. Each file is then used in its
role (the demo's target, draft and vision file for the other two) to generate text and video
captions with plain, chain and tree decoding, all in one child process: each case must load and
run, or fail with a SparrowError; a crash fails the test with the case that caused it.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sparrow_py as sp

from gguf_edit import copy_gguf

DEMO = Path(sp.__file__).parent / "demo" / "data"


def mutations(src):
    import gguf

    vt = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(src))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or (name.startswith("tokenizer.") and not name.endswith("_token_id")):
            continue  # (the vocabulary itself is fuzzed by test_fuzz_gguf and test_tokenizer; its special ids here)
        kind, value = field.types[0], field.contents()
        if kind in (vt.UINT32, vt.INT32, vt.UINT64, vt.INT64):
            top = {vt.UINT32: 2**32 - 1, vt.INT32: -1, vt.UINT64: 2**64 - 1, vt.INT64: -1}[kind]
            values = [0, 1, 3, 2**31 - 1, value * 2, value + 1, top]
        elif kind == vt.FLOAT32:
            values = [0.0, -1.0, float("nan"), float("inf"), 1e30]
        elif kind == vt.ARRAY and field.types[-1] in (vt.INT32, vt.UINT32):
            values = [[], [0] * len(value), [v * 2 for v in value], value[:-1], value + [1], [10**6] * len(value)]
        else:
            continue
        for i, v in enumerate(values):
            yield name, i, v


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("semantic")
    made = []
    for role, src in (("lm", DEMO / "target.gguf"), ("draft", DEMO / "draft.gguf"), ("mmproj", DEMO / "mmproj.gguf")):
        for name, i, v in mutations(src):
            path = out / f"{role}--{name}--{i}.gguf"
            try:
                copy_gguf(src, path, replace_kv={name: v})
            except (OverflowError, ValueError, TypeError):  # a value gguf-py cannot write as that type
                path.unlink(missing_ok=True)
                continue
            made.append(path)
    return out, made


RUNNER = textwrap.dedent("""
    import sys, glob
    from pathlib import Path
    import numpy as np
    import sparrow_py as sp
    demo = Path(sp.__file__).parent / "demo" / "data"
    prompt = "<|im_start|>user\\nWhat happens?<|im_end|>\\n<|im_start|>assistant\\n"
    frames = np.random.default_rng(0).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    for path in sorted(glob.glob(sys.argv[1] + "/*.gguf")):
        role = Path(path).name.split("--")[0]
        files = {"lm": demo / "target.gguf", "draft": demo / "draft.gguf", "mmproj": demo / "mmproj.gguf"}
        files[role] = path
        print("CASE", Path(path).name, flush=True)  # the last one printed is the culprit of a crash
        try:
            with sp.Engine(str(files["lm"]), draft=str(files["draft"]), mmproj=str(files["mmproj"]), n_ctx=512,
                           n_threads=2) as e:
                for mode in ("none", "chain", "tree"):
                    "".join(e.generate(prompt, max_tokens=6, speculative=mode, add_special=False))
                    "".join(e.generate("What happens?", video=frames, max_tokens=6, speculative=mode))
            print("RESULT ok", flush=True)
        except sp.SparrowError as exc:
            assert str(exc) and exc.status.startswith("SPARROW_ERR_"), path
            print("RESULT error", exc.status, str(exc).replace("\\n", " "), flush=True)
""")


def test_wrong_metadata_values_give_errors_or_runs(cases):
    folder, made = cases
    assert len(made) > 200
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(folder)], capture_output=True, text=True, timeout=1200,
                          cwd=folder)  # not the checkout: its sparrow_py has no compiled part
    lines = proc.stdout.splitlines()
    last_case = next((line for line in reversed(lines) if line.startswith("CASE")), "none")
    assert proc.returncode == 0, f"crashed at {last_case}: {proc.stderr[-2000:]}"
    results = {}
    for case, result in zip(lines[0::2], lines[1::2]):
        assert case.startswith("CASE") and result.startswith("RESULT"), (case, result)
        results[case.split()[1]] = result
    assert len(results) == len(made)
    errors = sum(r.startswith("RESULT error") for r in results.values())
    assert errors > len(made) // 2, "most wrong values must be refused"

    # values that would run to garbage rather than fail, refused since this test found them
    for name in ("draft--sparrow-draft.attention.value_length--0.gguf",      # 0: not the key length
                 "draft--sparrow-draft.attention.value_length--4.gguf",      # twice the key length
                 "draft--sparrow-draft.attention.layer_norm_rms_epsilon--3.gguf",  # infinity
                 "draft--sparrow-draft.rope.freq_base--3.gguf",              # infinity
                 "lm--qwen2vl.rope.freq_base--3.gguf"):
        assert results[name].startswith("RESULT error"), (name, results[name])
