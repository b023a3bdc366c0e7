"""Sparrow vs llama.cpp on the same GGUF files, side by side in one process (issue 6).

    python bench/compare_llamacpp.py [--types f16 q8_0 q4_0 q4_k] [--pairs 5] [--threads 2]
                                     [--llama-venv ~/.cache/sparrow/llama-cpp-venv] [--no-1.5b]

Models are random-weight files with Qwen2.5 shapes, written once into --cache (bench/.cache) by
bench_lm.py's writer: f16, q8_0 and q4_0 with Qwen2.5-0.5B shapes; q4_k (random valid blocks)
and a second q4_0 with Qwen2.5-1.5B shapes (0.5B's hidden size, 896, is not a whole number of
256-element k-quant blocks, so a 0.5B q4_K file would be mostly llama.cpp's fallback types).

For every file both engines run alternately, --pairs times (who goes first alternates too):
  decode   one token at a time after a --context token prompt
  batch k  k tokens in one forward pass on top of that prompt, logits for all k (a speculative
           verify batch), rolled back after each measurement; k = 2, 4, 8, 16
  prefill  --prefill tokens (512) into an empty cache, logits for the last
Printed: tokens/s of each engine (median [min, max] over the pairs), the ratio Sparrow /
llama.cpp of the medians, time(batch k) / time(1 token) for each engine, and the weight bytes
a decode step reads per second against the copy bandwidth measured in the same run.

llama.cpp comes from llama-cpp-python built from source in its own virtual environment: it is an
optional benchmark dependency, never imported by the runtime or tests. Its site-packages are
appended to sys.path (it only needs ctypes). If it is missing, build it once (about 15 minutes
on 2 cores) with --build-llama, or by hand:

    python -m venv ~/.cache/sparrow/llama-cpp-venv
    CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="$CFLAGS" \\
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \\
      -DLLAMA_BUILD_EXAMPLES=OFF" ~/.cache/sparrow/llama-cpp-venv/bin/pip install \\
      --no-binary llama-cpp-python llama-cpp-python==0.3.36

AMX is compiled out: on the virtual machines here the CPU reports AMX but the kernel does not
grant its register state, and llama.cpp's AMX q8_0 / q4_0 kernels die on the first tileloadd
(SIGILL). Sparrow has no AMX code either, so both engines use AVX-512 VNNI.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# numpy's BLAS threads would otherwise spin on the same 2 cores as the engines under test
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_lm import SHAPES as SHAPES_0_5B  # noqa: E402
from bench_lm import ensure_model  # noqa: E402

SHAPES_1_5B = dict(hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960, vocab=151936, ctx=32768, rope_base=1_000_000.0)
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # CFLAGS/CXXFLAGS: see the docstring
LLAMA_CMAKE_ARGS = ("-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF "
                    "-DLLAMA_BUILD_EXAMPLES=OFF")
BATCHES = (2, 4, 8, 16)


# ---- llama.cpp side ---------------------------------------------------------------------------

def import_llama_cpp(venv: Path, build: bool):
    def site_packages():
        return glob.glob(str(venv / "lib" / "python3*" / "site-packages"))

    def have():
        return any(Path(p, "llama_cpp", "__init__.py").exists() for p in site_packages())

    if not have():
        if not build:
            sys.exit(f"llama-cpp-python not found in {venv}.\nBuild it once (~15 min) with --build-llama, or:\n"
                     f"  python -m venv {venv}\n"
                     f"  CFLAGS=\"{LLAMA_NO_AMX}\" CXXFLAGS=\"{LLAMA_NO_AMX}\" CMAKE_ARGS=\"{LLAMA_CMAKE_ARGS}\" {venv}/bin/pip install --no-binary llama-cpp-python "
                     f"llama-cpp-python=={LLAMA_CPP_VERSION}")
        print(f"building llama-cpp-python {LLAMA_CPP_VERSION} from source in {venv} (about 15 minutes) ...",
              file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
        env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE_ARGS, CFLAGS=LLAMA_NO_AMX, CXXFLAGS=LLAMA_NO_AMX)
        subprocess.check_call([str(venv / "bin" / "pip"), "install", "--no-binary", "llama-cpp-python",
                               f"llama-cpp-python=={LLAMA_CPP_VERSION}"], env=env)
    for p in site_packages():
        if p not in sys.path:
            sys.path.append(p)  # after ours: numpy etc. stay the main environment's
    import llama_cpp

    return llama_cpp


class LlamaRunner:
    """llama.cpp through llama-cpp-python's low-level API: one context, one sequence, explicit
    batches (so a verify batch asks for logits of every row, as Sparrow's does)."""

    name = "llama.cpp"

    def __init__(self, lc, path: Path, n_ctx: int, n_threads: int, n_batch: int):
        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, user: None)  # keep a reference
        lc.llama_log_set(self._quiet, None)
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp cannot create a context")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.n_past = 0

    def decode(self, tokens, all_logits: bool) -> np.ndarray:
        b, n = self.batch, len(tokens)
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (all_logits or i == n - 1) else 0
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.n_past += n
        n_out = n if all_logits else 1
        # copied out, as Sparrow's Engine.decode does
        return np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(n_out * self.n_vocab,)).copy()

    def truncate(self, n_keep: int) -> None:
        self.lc.llama_memory_seq_rm(self.mem, 0, n_keep, -1)
        self.n_past = n_keep

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


# ---- Sparrow side -----------------------------------------------------------------------------

class SparrowRunner:
    name = "sparrow"

    def __init__(self, path: Path, n_ctx: int, n_threads: int, n_batch: int):
        import sparrow_py as sp

        self.engine = sp.Engine(str(path), n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch)

    def decode(self, tokens, all_logits: bool) -> np.ndarray:
        return self.engine.decode(tokens, outputs=[True] * len(tokens) if all_logits else None)

    def truncate(self, n_keep: int) -> None:
        self.engine.kv_truncate(n_keep)

    def close(self) -> None:
        self.engine.close()


# ---- measurement ------------------------------------------------------------------------------

def measure(runner, rng, n_context: int, n_prefill: int, n_decode: int, batch_repeats: int) -> dict:
    """Seconds for: one decode step (mean over n_decode), each batch size (median over
    batch_repeats), and the prefill."""
    out = {}
    runner.truncate(0)
    runner.decode(rng.integers(0, 90, size=n_context).tolist(), all_logits=False)
    runner.decode([1], all_logits=False)  # warm-up step (first touch of the decode path)
    runner.truncate(n_context)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        runner.decode([int(rng.integers(0, 90))], all_logits=False)
    out[1] = (time.perf_counter() - t0) / n_decode
    runner.truncate(n_context)
    for k in BATCHES:
        times = []
        for _ in range(batch_repeats):
            tokens = rng.integers(0, 90, size=k).tolist()
            t0 = time.perf_counter()
            runner.decode(tokens, all_logits=True)
            times.append(time.perf_counter() - t0)
            runner.truncate(n_context)
        out[k] = statistics.median(times)
    runner.truncate(0)
    prompt = rng.integers(0, 90, size=n_prefill).tolist()
    t0 = time.perf_counter()
    runner.decode(prompt, all_logits=False)
    out["prefill"] = time.perf_counter() - t0
    runner.truncate(0)
    return out


def copy_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a large numpy copy, counting the bytes read (the copy also writes as many)."""
    src = np.ones(mb << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return src.nbytes / best / 1e9


def weight_bytes(path: Path) -> int:
    """Bytes a decode step reads: every matrix once (token_embd doubles as the output matrix
    when there is no output.weight; its single get_rows row is negligible)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight" or
               not any(u.name == "output.weight" for u in r.tensors))


def fmt_stat(values, digits=1) -> str:
    return f"{statistics.median(values):8.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def run_file(label: str, path: Path, lc, args, bandwidth: float) -> list[str]:
    n_ctx = max(args.prefill, args.context + max(BATCHES) + 8) + 16
    n_batch = max(args.prefill, max(BATCHES), args.context)
    runners = [SparrowRunner(path, n_ctx, args.threads, n_batch), LlamaRunner(lc, path, n_ctx, args.threads, n_batch)]
    results = {r.name: [] for r in runners}
    rng = np.random.default_rng(0)
    try:
        for p in range(args.pairs):
            order = runners if p % 2 == 0 else runners[::-1]
            for r in order:
                results[r.name].append(measure(r, rng, args.context, args.prefill, args.decode, args.batch_repeats))
            print(f"  {label}: pair {p + 1}/{args.pairs} done", file=sys.stderr)
    finally:
        for r in runners:
            r.close()

    wb = weight_bytes(path)
    rows = []
    keys = [1, *BATCHES, "prefill"]
    for key in keys:
        n_tok = 1 if key == 1 else (args.prefill if key == "prefill" else key)
        tps = {name: [n_tok / m[key] for m in ms] for name, ms in results.items()}
        ratio = statistics.median(tps["sparrow"]) / statistics.median(tps["llama.cpp"])
        what = "decode" if key == 1 else ("prefill " + str(args.prefill) if key == "prefill" else f"batch {key}")
        extra = ""
        if key == 1:
            gbs = {name: wb * statistics.median(v) / 1e9 for name, v in tps.items()}
            extra = (f"weights {gbs['sparrow']:.1f} / {gbs['llama.cpp']:.1f} GB/s "
                     f"({100 * gbs['sparrow'] / bandwidth:.0f}% / {100 * gbs['llama.cpp'] / bandwidth:.0f}% of copy)")
        elif key != "prefill":
            rel = {name: statistics.median([m[key] for m in ms]) / statistics.median([m[1] for m in ms])
                   for name, ms in results.items()}
            extra = f"t(k)/t(1) {rel['sparrow']:.2f} / {rel['llama.cpp']:.2f}"
        rows.append(f"{label:18} {what:12} {fmt_stat(tps['sparrow']):>26} {fmt_stat(tps['llama.cpp']):>26} "
                    f"{ratio:6.2f}  {extra}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0", "q4_k"],
                    help="f16 q8_0 q4_0 q4_1 (0.5B shapes); q4_k (1.5B shapes)")
    ap.add_argument("--no-1.5b", dest="big", action="store_false", help="skip the Qwen2.5-1.5B-shaped q4_0 row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=5, help="alternating runs of both engines (>= 5 for the issue)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--context", type=int, default=128, help="prompt before decode / batch measurements")
    ap.add_argument("--decode", type=int, default=16, help="decode steps averaged per measurement")
    ap.add_argument("--batch-repeats", type=int, default=3, help="repeats per batch size (median) per measurement")
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    ap.add_argument("--llama-venv", type=Path, default=Path.home() / ".cache" / "sparrow" / "llama-cpp-venv",
                    help="virtual environment holding llama-cpp-python (default %(default)s)")
    ap.add_argument("--build-llama", action="store_true", help="build llama-cpp-python into --llama-venv if missing")
    args = ap.parse_args()

    lc = import_llama_cpp(args.llama_venv.expanduser(), args.build_llama)
    import sparrow_py as sp

    args.cache.mkdir(parents=True, exist_ok=True)
    files = []
    for t in args.types:
        if t == "q4_k":
            files.append(("1.5B q4_k", ensure_model(args.cache, "q4_k", "random-qwen2-1.5b", SHAPES_1_5B)))
        else:
            files.append((f"0.5B {t}", ensure_model(args.cache, t, "random-qwen2-0.5b", SHAPES_0_5B)))
    if args.big:
        files.append(("1.5B q4_0", ensure_model(args.cache, "q4_0", "random-qwen2-1.5b", SHAPES_1_5B)))

    bw = [copy_bandwidth()]
    lines = []
    for label, path in files:
        lines += run_file(label, path, lc, args, bw[0])
    bw.append(copy_bandwidth())
    bandwidth = statistics.median(bw)

    print(f"# sparrow {sp.__version__} ({args.threads} threads) vs llama.cpp (llama-cpp-python {lc.__version__}) | "
          f"random weights | {args.pairs} alternating pairs, median [min, max] | copy bandwidth "
          f"{min(bw):.1f}-{max(bw):.1f} GB/s (bytes read per s)")
    print(f"# decode after a {args.context}-token prompt; batch k = k tokens in one pass with k logit rows "
          f"on that prompt; ratio = sparrow / llama.cpp")
    print(f"{'model':18} {'what':12} {'sparrow tok/s':>26} {'llama.cpp tok/s':>26} {'ratio':>6}  notes (sparrow / llama.cpp)")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
