"""The installed C library: what `cmake --install build --prefix P` lays out, and apps built against it.

One Release build of the runtime (SPARROW_BUILD_TESTS=OFF) is installed into a temporary prefix;
runtime/tools/example.c is then built against that prefix only, through find_package(Sparrow) and
through pkg-config (shared, and static with --static), exactly as README's C section shows, and each
binary must print what the Python Engine generates for the same prompt on the demo's target model.
The first test pays for the build (about half a minute on two cores); the rest take a second or less.

Needs cmake, cc, pkg-config and readelf on PATH; a missing one fails the tests (.ci/run installs
pkg-config where the machine lacks it).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_C = REPO / "runtime" / "tools" / "example.c"
MODEL = REPO / "sparrow_py" / "demo" / "data" / "target.gguf"
PROMPT = "<|im_start|>user\nWhat happens in this clip?<|im_end|>\n<|im_start|>assistant\n"
EXAMPLE_MAX_TOKENS = 16  # example.c's params.max_tokens

# README's C section shows these verbatim (test_readme_shows_these_builds holds it to that).
INSTALL_COMMAND = "cmake --install build --prefix $HOME/.local"
CONSUMER_CMAKELISTS = """\
cmake_minimum_required(VERSION 3.18)
project(example C)
find_package(Sparrow REQUIRED)
add_executable(example example.c)
target_link_libraries(example PRIVATE Sparrow::sparrow)
"""
PKG_CONFIG_BUILD = "cc example.c $(pkg-config --cflags --libs sparrow) -o example"
PKG_CONFIG_STATIC_BUILD = "cc example.c $(pkg-config --static --cflags --libs sparrow) -static -o example-static"


def header_version() -> tuple[int, int, int]:
    text = (REPO / "runtime" / "include" / "sparrow.h").read_text()
    parts = [re.search(rf"^#define SPARROW_VERSION_{p} +(\d+)$", text, re.M) for p in ("MAJOR", "MINOR", "PATCH")]
    assert all(parts), "sparrow.h lacks a '#define SPARROW_VERSION_MAJOR/MINOR/PATCH N' line"
    return tuple(int(m.group(1)) for m in parts)


def soversion() -> str:
    # cmake/install.cmake: major.minor before 1.0, the major alone after
    major, minor, _ = header_version()
    return f"0.{minor}" if major == 0 else str(major)


def clean_env(**extra: str) -> dict:
    """The environment without anything that could find a Sparrow other than the one installed here."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "PKG_CONFIG_PATH", "CMAKE_PREFIX_PATH", "CPATH", "LIBRARY_PATH")}
    env.update(extra)
    return env


def run(cmd, cwd: Path, env: dict | None = None, shell: bool = False) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env if env is not None else clean_env(), shell=shell,
                          executable="/bin/bash" if shell else None, capture_output=True, text=True)
    assert proc.returncode == 0, (f"{cmd} failed with exit code {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def dynamic_section(binary: Path) -> str:
    return run(["readelf", "-d", str(binary)], cwd=binary.parent)


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    missing = [tool for tool in ("cmake", "cc", "pkg-config", "readelf") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found on PATH: the install-layout tests build C programs "
                    "with them (pkg-config on Debian: apt-get install -y pkg-config)")
    root = tmp_path_factory.mktemp("install")
    build, prefix = root / "build", root / "prefix"
    run(["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         "-DSPARROW_BUILD_TESTS=OFF"], cwd=root)
    run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], cwd=root)
    run(["cmake", "--install", str(build), "--prefix", str(prefix)], cwd=root)
    return prefix


@pytest.fixture(scope="module")
def expected_output() -> str:
    """What example.c prints: the Python Engine's greedy continuation, then a newline."""
    import sparrow_py as sp

    with sp.Engine(str(MODEL)) as engine:
        text = "".join(engine.generate(PROMPT, max_tokens=EXAMPLE_MAX_TOKENS))
    assert text.strip(), "the demo target generated nothing: the comparison would prove little"
    return text + "\n"


def consumer_dir(tmp_path: Path) -> Path:
    shutil.copy(EXAMPLE_C, tmp_path / "example.c")
    return tmp_path


def test_layout(prefix):
    lib = prefix / "lib"
    major, minor, patch = header_version()
    for path in ("include/sparrow.h", "lib/libsparrow.a", "lib/pkgconfig/sparrow.pc",
                 "lib/cmake/Sparrow/SparrowConfig.cmake", "lib/cmake/Sparrow/SparrowConfigVersion.cmake",
                 "lib/cmake/Sparrow/SparrowTargets.cmake", "bin/sparrow-cli"):
        assert (prefix / path).is_file(), f"{path} is not installed"
    # apps link libsparrow.so and record the soname, which names the ABI version
    real = lib / f"libsparrow.so.{major}.{minor}.{patch}"
    assert real.is_file() and not real.is_symlink()
    assert os.readlink(lib / "libsparrow.so") == f"libsparrow.so.{soversion()}"
    assert os.readlink(lib / f"libsparrow.so.{soversion()}") == real.name
    assert f"Library soname: [libsparrow.so.{soversion()}]" in dynamic_section(real)
    # the public header alone, as in the source tree: internals stay out of the include dir
    assert sorted(p.name for p in (prefix / "include").iterdir()) == ["sparrow.h"]
    assert (prefix / "include" / "sparrow.h").read_bytes() == (REPO / "runtime/include/sparrow.h").read_bytes()


def test_cli_runs_from_prefix(prefix, expected_output):
    # no LD_LIBRARY_PATH: the installed CLI finds the installed library through its RUNPATH
    cli = prefix / "bin" / "sparrow-cli"
    dyn = dynamic_section(cli)
    assert f"Shared library: [libsparrow.so.{soversion()}]" in dyn
    assert "Library runpath: [$ORIGIN/../lib]" in dyn
    out = run([str(cli), "-m", str(MODEL), "-p", PROMPT, "-n", str(EXAMPLE_MAX_TOKENS), "-t", "2"], cwd=prefix)
    assert out == PROMPT + expected_output  # the CLI echoes the prompt


def test_find_package(prefix, expected_output, tmp_path):
    src = consumer_dir(tmp_path)
    (src / "CMakeLists.txt").write_text(CONSUMER_CMAKELISTS)
    run(["cmake", "-S", ".", "-B", "build", f"-DCMAKE_PREFIX_PATH={prefix}"], cwd=src)
    run(["cmake", "--build", "build"], cwd=src)
    exe = src / "build" / "example"
    dyn = dynamic_section(exe)
    assert f"Shared library: [libsparrow.so.{soversion()}]" in dyn
    runpath = next((line for line in dyn.splitlines() if "Library runpath" in line), "")
    assert str(prefix / "lib") in runpath  # CMake's RUNPATH points at the installed library
    assert run([str(exe), str(MODEL), PROMPT], cwd=src) == expected_output


def test_find_package_static(prefix, expected_output, tmp_path):
    # Sparrow::sparrow_static from a project that enables CXX (the library's C++ runtime links in)
    src = consumer_dir(tmp_path)
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(example C CXX)\nfind_package(Sparrow REQUIRED)\n"
        "add_executable(example example.c)\ntarget_link_libraries(example PRIVATE Sparrow::sparrow_static)\n")
    run(["cmake", "-S", ".", "-B", "build", f"-DCMAKE_PREFIX_PATH={prefix}"], cwd=src)
    run(["cmake", "--build", "build"], cwd=src)
    exe = src / "build" / "example"
    assert "libsparrow" not in dynamic_section(exe)
    assert run([str(exe), str(MODEL), PROMPT], cwd=src) == expected_output


def test_find_package_version_rule(prefix, tmp_path):
    """find_package(Sparrow X.Y) accepts this minor version only, as the soname does before 1.0."""
    major, minor, patch = header_version()
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(probe C)\nfind_package(Sparrow ${WANT} REQUIRED)\n"
        "message(STATUS \"found Sparrow ${Sparrow_VERSION}\")\n")

    def configure(want: str) -> subprocess.CompletedProcess:
        shutil.rmtree(tmp_path / "build", ignore_errors=True)
        return subprocess.run(["cmake", "-S", ".", "-B", "build", f"-DCMAKE_PREFIX_PATH={prefix}", f"-DWANT={want}"],
                              cwd=tmp_path, env=clean_env(), capture_output=True, text=True)

    ok = configure(f"{major}.{minor}")
    assert ok.returncode == 0, ok.stderr
    assert f"found Sparrow {major}.{minor}.{patch}" in ok.stdout
    refused = [f"{major}.{minor + 1}"]  # newer than installed
    if major == 0 and minor > 0:
        refused.append(f"0.{minor - 1}")  # an older 0.x: another ABI
    for want in refused:
        assert configure(want).returncode != 0, f"find_package(Sparrow {want}) accepted {major}.{minor}.{patch}"


def test_pkg_config_shared(prefix, expected_output, tmp_path):
    src = consumer_dir(tmp_path)
    env = clean_env(PKG_CONFIG_PATH=str(prefix / "lib" / "pkgconfig"))
    assert run(["pkg-config", "--modversion", "sparrow"], cwd=src, env=env).strip() == "%d.%d.%d" % header_version()
    run(PKG_CONFIG_BUILD, cwd=src, env=env, shell=True)
    exe = src / "example"
    assert f"Shared library: [libsparrow.so.{soversion()}]" in dynamic_section(exe)
    # plain cc records no RUNPATH: the loader is told where the prefix's library is
    out = run([str(exe), str(MODEL), PROMPT], cwd=src, env=clean_env(LD_LIBRARY_PATH=str(prefix / "lib")))
    assert out == expected_output


def test_pkg_config_static(prefix, expected_output, tmp_path):
    # --static adds Libs.private (the C++ runtime, libm, threads) that libsparrow.a needs from cc
    src = consumer_dir(tmp_path)
    run(PKG_CONFIG_STATIC_BUILD, cwd=src, env=clean_env(PKG_CONFIG_PATH=str(prefix / "lib" / "pkgconfig")),
        shell=True)
    exe = src / "example-static"
    assert "There is no dynamic section" in dynamic_section(exe)
    assert run([str(exe), str(MODEL), PROMPT], cwd=src) == expected_output


def test_version_macros_match_library(prefix, tmp_path):
    (tmp_path / "version.c").write_text(
        '#include "sparrow.h"\n#include <stdio.h>\n'
        "int main(void) {\n"
        '    printf("%d.%d.%d %s %s\\n", SPARROW_VERSION_MAJOR, SPARROW_VERSION_MINOR, SPARROW_VERSION_PATCH,\n'
        "           SPARROW_VERSION_STRING, sparrow_version());\n"
        "    return 0;\n}\n")
    env = clean_env(PKG_CONFIG_PATH=str(prefix / "lib" / "pkgconfig"))
    run("cc version.c $(pkg-config --cflags --libs sparrow) -o version", cwd=tmp_path, env=env, shell=True)
    out = run([str(tmp_path / "version")], cwd=tmp_path, env=clean_env(LD_LIBRARY_PATH=str(prefix / "lib")))
    version = "%d.%d.%d" % header_version()
    assert out.split() == [version, version, version]


def test_versions_agree():
    """sparrow.h holds the version; pyproject.toml and sparrow_py repeat it and must not drift."""
    import sparrow_py
    from sparrow_py._native import ffi, lib

    version = "%d.%d.%d" % header_version()
    pyproject = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert pyproject and pyproject.group(1) == version, "pyproject.toml's version differs from sparrow.h's"
    assert sparrow_py.__version__ == version
    assert ffi.string(lib.sparrow_version()).decode() == version  # the library inside the Python package


def test_readme_shows_these_builds():
    readme = (REPO / "README.md").read_text()
    for snippet in (INSTALL_COMMAND, CONSUMER_CMAKELISTS, PKG_CONFIG_BUILD, PKG_CONFIG_STATIC_BUILD):
        assert snippet in readme, f"README's C section no longer shows:\n{snippet}"
