"""Sparrow vs llama.cpp on the same GGUF files, side by side in one process, per core.

    python bench/compare_llamacpp.py [--types f16 bf16 q8_0 q4_0 q4_1 q4_k q5_k q6_k] [--threads 1 2]
                                     [--pairs 3] [--llama-venv ~/.cache/sparrow/llama-cpp-venv]

Models are random-weight files written once into --cache (bench/.cache) by bench_lm.py's writer:
f16, bf16, q8_0, q4_0 and q4_1 with Qwen2.5-0.5B shapes; the k-quants (random valid blocks) with
a hidden size of 1024 (0.5B's 896 is not a whole number of 256-element blocks): Qwen3-0.6B's
sizes in a qwen2 file. --big adds Qwen2.5-1.5B-shaped q4_0 and q4_k files.

For every file and thread count both engines run alternately, --pairs times (who goes first
alternates too):
  decode   one token at a time after a --context token prompt
  batch k  k tokens in one forward pass on top of that prompt, logits for all k (a speculative
           verify batch), rolled back after each measurement; k = 2, 4, 8, 16
  prefill  --prefill tokens (512) into an empty cache, logits for the last
Printed first: the CPU model, the SIMD level Sparrow chose, and the streaming read bandwidth at
each thread count (bench/read_bandwidth.c, compiled here with the system's cc and -march=native;
numpy's max over a 1 GiB buffer when there is no compiler). Then per thread count a table of
ratios Sparrow / llama.cpp (tokens/s medians over the pairs), one cell per measurement, and the
tokens/s behind them; for decode, the weight bytes read per second as a share of the read
bandwidth (decode reads every weight once per token).

llama.cpp comes from llama-cpp-python built from source in its own virtual environment: it is an
optional benchmark dependency, never imported by the runtime or tests. Its site-packages are
appended to sys.path (it only needs ctypes). If it is missing, build it once (about 15 minutes
on 2 cores) with --build-llama, or by hand:

    python -m venv ~/.cache/sparrow/llama-cpp-venv
    CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="$CFLAGS" \\
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \\
      -DLLAMA_BUILD_EXAMPLES=OFF" ~/.cache/sparrow/llama-cpp-venv/bin/pip install --no-cache-dir \\
      --no-binary llama-cpp-python llama-cpp-python==0.3.36

AMX is compiled out: on the virtual machines here the CPU reports AMX but the kernel does not
grant its register state, and llama.cpp's AMX q8_0 / q4_0 kernels die on the first tileloadd
(SIGILL). Sparrow has no AMX code either, so both engines use AVX-512 VNNI.

The AVX2 path on an AVX-512 machine: a second llama.cpp built without AVX-512 (CMAKE_ARGS with
-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
-DGGML_AVX512=OFF, into its own venv; --no-cache-dir, or pip reuses the first wheel) against
Sparrow capped with SPARROW_SIMD=avx2:

    SPARROW_SIMD=avx2 python bench/compare_llamacpp.py --llama-venv ~/.cache/sparrow/llama-cpp-avx2-venv
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

SHAPES_H1024 = dict(hidden=1024, layers=28, heads=16, kv_heads=8, ffn=3072, vocab=151936, ctx=32768, rope_base=1_000_000.0)
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


def cpu_model() -> str:
    """"AMD EPYC (family 25, model 17, L1d 32 KiB)", as bench/bench_util.h's cpu_model prints it:
    virtual machines often hide the model name's number; family and model tell Zen 4 from Zen 5."""
    name, details = None, []
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        name = fields.get("model name")
        labels = (("cpu family", "family"), ("model", "model"))
        details += [f"{label} {fields[key]}" for key, label in labels if key in fields]
    except OSError:
        pass
    # the L1 data cache, from the kernel's list of core 0's caches
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "1" and (index / "type").read_text().strip() == "Data":
                details.append(f"L1d {(index / 'size').read_text().strip().replace('K', ' KiB')}")
                break
        except OSError:
            pass
    if name is None:
        import platform

        name = platform.processor() or platform.machine()
    return f"{name} ({', '.join(details)})" if details else name


def read_bandwidth(threads: int, cache: Path) -> tuple[float, str]:
    """GB/s of streaming reads with `threads` threads, and how it was measured."""
    src = Path(__file__).parent / "read_bandwidth.c"
    exe = cache / "read_bandwidth"
    try:
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(["cc", "-O2", "-march=native", "-pthread", str(src), "-o", str(exe)], check=True,
                           capture_output=True)
        out = subprocess.run([str(exe), str(threads)], check=True, capture_output=True, text=True).stdout
        return float(out.strip()), "read_bandwidth.c"
    except (OSError, subprocess.CalledProcessError):
        import threading

        buf = np.ones(1 << 30, dtype=np.uint8)
        parts = np.array_split(buf, threads)
        best = 0.0
        for _ in range(5):
            ts = [threading.Thread(target=np.max, args=(part,)) for part in parts]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
        return best, "numpy max (no C compiler)"


def weight_bytes(path: Path) -> int:
    """Bytes a decode step reads: every matrix once (token_embd doubles as the output matrix
    when there is no output.weight; its single get_rows row is negligible)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight" or
               not any(u.name == "output.weight" for u in r.tensors))


def fmt_stat(values, digits=1) -> str:
    return f"{statistics.median(values):8.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


KEYS = [1, *BATCHES, "prefill"]


def key_name(key, args) -> str:
    return "decode" if key == 1 else (f"prefill {args.prefill}" if key == "prefill" else f"batch {key}")


def run_file(path: Path, lc, args, threads: int) -> dict:
    """tokens/s per engine and measurement key, over the pairs."""
    n_ctx = max(args.prefill, args.context + max(BATCHES) + 8) + 16
    n_batch = max(args.prefill, max(BATCHES), args.context)
    runners = [SparrowRunner(path, n_ctx, threads, n_batch), LlamaRunner(lc, path, n_ctx, threads, n_batch)]
    results = {r.name: [] for r in runners}
    rng = np.random.default_rng(0)
    try:
        for p in range(args.pairs):
            order = runners if p % 2 == 0 else runners[::-1]
            for r in order:
                results[r.name].append(measure(r, rng, args.context, args.prefill, args.decode, args.batch_repeats))
            print(f"  {path.name}, {threads} thread(s): pair {p + 1}/{args.pairs} done", file=sys.stderr)
    finally:
        for r in runners:
            r.close()
    tps = {}
    for name, ms in results.items():
        for key in KEYS:
            n_tok = 1 if key == 1 else (args.prefill if key == "prefill" else key)
            tps[(name, key)] = [n_tok / m[key] for m in ms]
    return tps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="*", default=["f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"],
                    help="f16 bf16 q8_0 q4_0 q4_1 (0.5B shapes); q4_k q5_k q6_k (hidden 1024)")
    ap.add_argument("--big", action="store_true", help="also Qwen2.5-1.5B-shaped q4_0 and q4_k files")
    ap.add_argument("--gguf", type=Path, nargs="+", default=[], help="also these GGUF files (real models)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pairs", type=int, default=3, help="alternating runs of both engines per file and thread count")
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
        if t in ("q4_k", "q5_k", "q6_k"):
            files.append((f"0.6B {t}", ensure_model(args.cache, t, "random-qwen2-h1024", SHAPES_H1024)))
        else:
            files.append((f"0.5B {t}", ensure_model(args.cache, t, "random-qwen2-0.5b", SHAPES_0_5B)))
    if args.big:
        for t in ("q4_0", "q4_k"):
            files.append((f"1.5B {t}", ensure_model(args.cache, t, "random-qwen2-1.5b", SHAPES_1_5B)))
    files += [(path.stem[:18], path) for path in args.gguf]

    bandwidth = {th: read_bandwidth(th, args.cache) for th in args.threads}
    tables = {th: [] for th in args.threads}
    for th in args.threads:
        for label, path in files:
            tables[th].append((label, path, run_file(path, lc, args, th)))
    after = {th: read_bandwidth(th, args.cache)[0] for th in args.threads}

    try:
        llama_info = lc.llama_print_system_info().decode().strip()
    except Exception:  # noqa: BLE001 - informational only
        llama_info = "?"
    print(f"# CPU: {cpu_model()} ({os.cpu_count()} logical CPUs here)")
    print(f"# sparrow {sp.__version__}: {sp.system_info()}")
    print(f"# llama.cpp (llama-cpp-python {lc.__version__}): {llama_info}")
    for th in args.threads:
        gbs, how = bandwidth[th]
        print(f"# streaming read bandwidth, {th} thread(s): {gbs:.1f} GB/s before, {after[th]:.1f} after ({how})")
    print(f"# {'random weights' if not args.gguf else 'random weights and ' + ', '.join(p.name for p in args.gguf)}; "
          f"{args.pairs} alternating pairs per file and thread count; decode after a "
          f"{args.context}-token prompt; batch k = k tokens in one pass with k logit rows on that prompt")
    cols = [key_name(k, args) for k in KEYS]
    for th in args.threads:
        read = 0.5 * (bandwidth[th][0] + after[th])
        print(f"\n## {th} thread(s): ratio sparrow / llama.cpp of median tokens/s")
        print(f"| model | {' | '.join(cols)} | decode weights GB/s (% of read) |")
        print("|---" * (len(cols) + 2) + "|")
        for label, path, tps in tables[th]:
            cells = []
            for k in KEYS:
                ratio = statistics.median(tps[("sparrow", k)]) / statistics.median(tps[("llama.cpp", k)])
                cells.append(f"{ratio:.2f}")
            wb = weight_bytes(path)
            g = {n: wb * statistics.median(tps[(n, 1)]) / 1e9 for n in ("sparrow", "llama.cpp")}
            cells.append(f"{g['sparrow']:.1f} ({100 * g['sparrow'] / read:.0f}%) / {g['llama.cpp']:.1f} "
                         f"({100 * g['llama.cpp'] / read:.0f}%)")
            print(f"| {label} | {' | '.join(cells)} |")
        print(f"\ntokens/s, sparrow / llama.cpp, median [min, max] over the pairs ({th} thread(s)):")
        for label, path, tps in tables[th]:
            for k in KEYS:
                print(f"  {label:10} {key_name(k, args):12} {fmt_stat(tps[('sparrow', k)]):>26} "
                      f"{fmt_stat(tps[('llama.cpp', k)]):>26}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
