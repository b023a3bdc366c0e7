"""Access to the compiled runtime: the cffi module built from sparrow.h, and status checks."""
from sparrow_py.errors import SparrowError

try:
    from sparrow_py._sparrow_cffi import ffi, lib
except ImportError as exc:  # a source checkout without the compiled extension
    raise ImportError(
        "the Sparrow runtime is not built: install the package with `pip install .` "
        f"({exc})"
    ) from exc

__all__ = ["ffi", "lib", "check", "backend_name", "OwnsHandles"]


def check(status: int, what: str = "") -> None:
    """Raise SparrowError with the runtime's message if status is not SPARROW_OK."""
    if status != lib.SPARROW_OK:
        message = ffi.string(lib.sparrow_last_error()).decode("utf-8", "replace")
        name = ffi.string(lib.sparrow_status_name(status)).decode()
        raise SparrowError(f"{what}: {message}" if what else message, name)


def backend_name(name):
    """A backend argument (a name such as "cpu" or "ref", or None: $SPARROW_BACKEND, else "cpu") as
    the char * a params struct takes (NULL for None); the caller keeps it alive during the call.
    The runtime refuses a name that is not a backend; this refuses what is not a name."""
    if name is None:
        return ffi.NULL
    if not isinstance(name, str):
        raise SparrowError(f"backend must be a backend's name or None, not {name!r}")
    return ffi.new("char[]", name.encode())


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
