"""Access to the compiled runtime: the cffi module built from sparrow.h, and status checks."""
from sparrow_py.errors import SparrowError

try:
    from sparrow_py._sparrow_cffi import ffi, lib
except ImportError as exc:  # a source checkout without the compiled extension
    raise ImportError(
        "the Sparrow runtime is not built: install the package with `pip install .` "
        f"({exc})"
    ) from exc

__all__ = ["ffi", "lib", "check"]


def check(status: int, what: str = "") -> None:
    """Raise SparrowError with the runtime's message if status is not SPARROW_OK."""
    if status != lib.SPARROW_OK:
        message = ffi.string(lib.sparrow_last_error()).decode("utf-8", "replace")
        name = ffi.string(lib.sparrow_status_name(status)).decode()
        raise SparrowError(f"{what}: {message}" if what else message, name)
