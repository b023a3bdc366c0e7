"""Sparrow: lossless speculative decoding for video LLMs, as a llama.cpp-style runtime.

    import sparrow_py as sp
    with sp.Engine("model.gguf", n_threads=2) as engine:
        for piece in engine.generate("The capital of France is", max_tokens=32):
            print(piece, end="", flush=True)

Importing this package loads only the runtime (cffi + numpy); the converter
(sparrow_py.convert) and training code import their heavier dependencies on use.
"""
from sparrow_py.errors import SparrowError

__all__ = ["Engine", "SparrowError", "__version__"]
__version__ = "0.1.0"


def __getattr__(name):
    # The Engine needs the compiled extension; import it on first use so that the pure-Python
    # parts (the converter) work from a source checkout too.
    if name == "Engine":
        from sparrow_py.engine import Engine

        return Engine
    raise AttributeError(f"module 'sparrow_py' has no attribute {name!r}")
