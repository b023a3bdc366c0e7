"""The one exception type the runtime's errors surface as in Python."""


class SparrowError(RuntimeError):
    """An error reported by the Sparrow runtime (or a misuse of the Python API).

    ``status`` is the C API's status name, e.g. ``"SPARROW_ERR_FORMAT"``.
    """

    def __init__(self, message: str, status: str = "SPARROW_ERR_INVALID_ARGUMENT"):
        super().__init__(message)
        self.status = status
