"""The converter's one error type."""


class ConvertError(Exception):
    """A checkpoint the converter refuses: unsupported, inconsistent or incomplete.

    The message is one line that names the offending file, tensor or setting; the command line
    prints it on stderr and exits non-zero, without a traceback.
    """
