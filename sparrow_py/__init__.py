"""Sparrow: lossless speculative decoding for video LLMs, as a llama.cpp-style runtime.

    import sparrow_py as sp
    with sp.Engine("model.gguf", n_threads=2) as engine:
        for piece in engine.generate("The capital of France is", max_tokens=32):
            print(piece, end="", flush=True)

Importing this package loads only the runtime (cffi + numpy); the converter
(sparrow_py.convert) and training code import their heavier dependencies on use.
"""
from sparrow_py.errors import SparrowError

__all__ = ["Engine", "Media", "MEDIA_TOKEN", "DraftSession", "VisionEncoder", "SparrowError", "system_info",
           "__version__"]
__version__ = "0.1.0"


def system_info() -> str:
    """The runtime's build and CPU: backends, the SIMD level its kernels use, threads available."""
    from sparrow_py._native import ffi, lib

    return ffi.string(lib.sparrow_system_info()).decode()


def __getattr__(name):
    # The Engine needs the compiled extension; import it on first use so that the pure-Python
    # parts (the converter) work from a source checkout too.
    if name in ("Engine", "Media", "MEDIA_TOKEN"):
        from sparrow_py import engine

        return getattr(engine, name)
    if name == "DraftSession":
        from sparrow_py.draft_session import DraftSession

        return DraftSession
    if name == "VisionEncoder":
        from sparrow_py.vision import VisionEncoder

        return VisionEncoder
    raise AttributeError(f"module 'sparrow_py' has no attribute {name!r}")
