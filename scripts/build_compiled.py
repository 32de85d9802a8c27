"""Compile the data path's hot modules from their Python source with Cython (pure-Python mode).

Theory of operation
-------------------
The modules named in ``COMPILED`` are plain Python files; each may have a ``.pxd`` beside it that
declares its classes as extension types (attribute types, which methods are ``cpdef``), as aiohttp
does for its websocket reader. Cython compiles the same ``.py`` source into an extension module
placed next to it (``--inplace``), which Python's import system prefers over the ``.py``. Nothing
else changes: setting ``FASTPROXY_PURE=1`` makes ``fastproxy/__init__.py`` load the ``.py`` files
instead, so the pure form stays a working, tested fallback.

Usage: ``python scripts/build_compiled.py [--clean]`` (``make compiled``). Rebuilds only what changed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["FASTPROXY_PURE"] = "1"  # importing the package must not judge the extensions being rebuilt

from fastproxy.compiled import (  # noqa: E402  (the one list)
    C_INCLUDE_DIRS,
    C_SOURCES,
    COMPILED,
    STAMP_FILE,
    write_stamp,
)

DIRECTIVES = {
    "language_level": 3,
    "annotation_typing": False,  # the .pxd alone gives C types; annotations stay for mypy
    "boundscheck": False,
    "wraparound": True,  # the source is Python: negative indexes mean what they mean there
    "initializedcheck": False,
    "cdivision": False,  # Python semantics for / and % on ints
    "embedsignature": True,
    "binding": True,  # methods keep their Python signatures (pytest, inspect, monkeypatching)
}


def clean() -> None:
    for name in COMPILED:
        base = ROOT / name.replace(".", "/")
        for path in base.parent.glob(base.name + ".*.so"):
            path.unlink()
        base.with_suffix(".c").unlink(missing_ok=True)
    STAMP_FILE.unlink(missing_ok=True)


def build() -> None:
    from fastproxy.compiled import extensions_present, stale

    if len(extensions_present()) == len(COMPILED) and not stale():
        print(f"compiled form up to date: {', '.join(COMPILED)}")
        return
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    extensions = [
        Extension(name, [str((ROOT / name.replace(".", "/")).with_suffix(".py").relative_to(ROOT)),
                         *C_SOURCES.get(name, ())],
                  include_dirs=list(C_INCLUDE_DIRS), extra_compile_args=["-O2"])
        for name in COMPILED
    ]  # fmt: skip
    os.chdir(ROOT)
    modules = cythonize(extensions, compiler_directives=DIRECTIVES, quiet=True, nthreads=2)
    dist = Distribution({"name": "fastproxy-compiled", "ext_modules": modules, "packages": []})
    dist.script_args = ["build_ext", "--inplace", "--parallel", "2"]
    dist.parse_command_line()
    dist.run_commands()
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    write_stamp()
    print(f"compiled: {', '.join(COMPILED)}")


if __name__ == "__main__":
    if "--clean" in sys.argv[1:]:
        clean()
    else:
        build()
