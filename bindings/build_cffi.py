"""Generate the cffi (API mode) extension source for sparrow_py from runtime/include/sparrow.h.

The declarations are taken from the header itself, between SPARROW_CDEF_BEGIN and
SPARROW_CDEF_END, so the Python bindings cannot drift from the C API: a change to the header
changes the bindings at the next build, and a header cffi cannot parse fails the build.

usage: python bindings/build_cffi.py path/to/sparrow.h out.c
"""
import re
import sys

import cffi


def cdef_from_header(header_text: str) -> str:
    # the markers are comment lines of their own (the header's prose mentions them too)
    begin = header_text.index("\n/* SPARROW_CDEF_BEGIN")
    begin = header_text.index("\n", begin + 1) + 1
    end = header_text.index("\n/* SPARROW_CDEF_END */", begin)
    body = header_text[begin:end]
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)  # comments
    lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith("#")]
    body = "\n".join(lines).replace("SPARROW_API ", "")
    for required in ("sparrow_model_load", "sparrow_generate_next", "SPARROW_OK"):
        if required not in body:
            raise SystemExit(f"build_cffi: '{required}' is missing from the cdef block of the header")
    return body


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    header_path, out_path = sys.argv[1], sys.argv[2]
    with open(header_path, encoding="utf-8") as f:
        cdef = cdef_from_header(f.read())
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source("sparrow_py._sparrow_cffi", '#include "sparrow.h"\n')
    ffi.emit_c_code(out_path)


if __name__ == "__main__":
    main()
