"""Access to the compiled runtime: the cffi module built from sparrow.h, and status checks."""
from sparrow_py.errors import SparrowError

try:
    from sparrow_py._sparrow_cffi import ffi, lib
except ImportError as exc:  # a source checkout without the compiled extension
    raise ImportError(
        "the Sparrow runtime is not built: install the package with `pip install .` "
        f"({exc})"
    ) from exc

__all__ = ["ffi", "lib", "check", "OwnsHandles"]


def check(status: int, what: str = "") -> None:
    """Raise SparrowError with the runtime's message if status is not SPARROW_OK."""
    if status != lib.SPARROW_OK:
        message = ffi.string(lib.sparrow_last_error()).decode("utf-8", "replace")
        name = ffi.string(lib.sparrow_status_name(status)).decode()
        raise SparrowError(f"{what}: {message}" if what else message, name)


class OwnsHandles:
    """Base of the objects that own runtime handles: close() releases them; a with-block, and
    garbage collection as a last resort, call it."""

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
