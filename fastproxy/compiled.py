"""Which hot modules may be compiled, and the switch that keeps the pure-Python form.

Theory of operation
-------------------
``scripts/build_compiled.py`` compiles the modules in ``COMPILED`` from their own ``.py`` source
with Cython and places each extension module beside its source; Python's import system prefers the
extension. ``FASTPROXY_PURE=1`` in the environment installs ``PureSourceFinder`` first on
``sys.meta_path`` (from ``fastproxy/__init__.py``, before any of them is imported), which loads those
modules from their ``.py`` files instead: the same code, interpreted, for tests and debugging.
An extension built from other source than the ``.py``/``.pxd`` now beside it is never loaded: the
build records each module's source hash (its .py, .pxd and any C sources it links, ``C_SOURCES``:
llhttp for exchange) in ``STAMP_FILE``, and ``stale()`` (checked in
``fastproxy/__init__.py`` at import, ~0.1 ms) compares them; any difference means the pure form,
with a warning that says to run ``make compiled``. An edited source can therefore not be shadowed
by an old binary. ``form()`` says which form each module was loaded in, ``describe()`` says it in one
phrase (the router logs it at start; ``fastproxy --version`` prints it), so an operator, a benchmark
or a test can tell what ran.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import pathlib
import sys
from types import ModuleType

# The modules compiled by scripts/build_compiled.py, each from its .py (and .pxd, if any).
COMPILED = (
    "fastproxy.exchange",
    "fastproxy.metrics",
    "fastproxy.snapshot",
    "fastproxy.slots",
    "fastproxy.routerbase",
    "fastproxy.proxy",
    "fastproxy.affinity",
    "fastproxy.llm",
)

# C sources compiled into a module beside its .py (part of its source hash: a changed C file makes
# the extension stale), and the include directories every module is compiled with (a .pxd that
# cimports exchange's declarations includes llhttp.h). Paths relative to the package root.
_LLHTTP = "fastproxy/vendor/llhttp"
C_SOURCES: dict[str, tuple[str, ...]] = {
    "fastproxy.exchange": (f"{_LLHTTP}/src/llhttp.c", f"{_LLHTTP}/src/api.c", f"{_LLHTTP}/src/http.c"),
}
C_INCLUDE_DIRS: tuple[str, ...] = (f"{_LLHTTP}/include",)

PURE_ENV = "FASTPROXY_PURE"
_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent
STAMP_FILE = pathlib.Path(__file__).resolve().parent / "compiled-sources.txt"


def source_hash(name: str) -> str:
    """The hash of a compiled module's source: its .py, its .pxd (if any) and its C sources (if any;
    those missing are skipped, and the hash then differs from the build's: stale, not a crash)."""
    base = _PACKAGE_ROOT / name.replace(".", "/")
    digest = hashlib.sha256()
    paths = [base.with_suffix(".py"), base.with_suffix(".pxd")]
    paths += [_PACKAGE_ROOT / source for source in C_SOURCES.get(name, ())]
    for path in paths:
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def write_stamp() -> None:
    STAMP_FILE.write_text("".join(f"{name} {source_hash(name)}\n" for name in COMPILED))


def extensions_present() -> list[str]:
    found = []
    for name in COMPILED:
        base = _PACKAGE_ROOT / name.replace(".", "/")
        if any(base.parent.glob(base.name + ".*.so")):
            found.append(name)
    return found


def stale() -> list[str]:
    """Compiled modules whose extension was built from a different source than the one here."""
    present = extensions_present()
    if not present:
        return []
    try:
        recorded = dict(line.split() for line in STAMP_FILE.read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return present
    return [name for name in present if recorded.get(name) != source_hash(name)]


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


class PureSourceFinder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' ``.py`` source, so the extension beside it is not loaded."""

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None):  # type: ignore[no-untyped-def]
        if fullname not in COMPILED:
            return None
        source = (_PACKAGE_ROOT / fullname.replace(".", "/")).with_suffix(".py")
        loader = importlib.machinery.SourceFileLoader(fullname, str(source))
        return importlib.util.spec_from_file_location(fullname, source, loader=loader)


def install_pure_finder() -> None:
    if not any(isinstance(finder, PureSourceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, PureSourceFinder())


def is_compiled(module: ModuleType) -> bool:
    return not (getattr(module, "__file__", "") or "").endswith(".py")


def form() -> dict[str, str]:
    """``{module: "compiled" | "pure"}`` for every module in COMPILED (importing them)."""
    import importlib

    return {name: "compiled" if is_compiled(importlib.import_module(name)) else "pure" for name in COMPILED}


def describe() -> str:
    """The data path's form in one phrase, e.g. ``data path compiled`` (imports COMPILED)."""
    forms = form()
    if all(f == "compiled" for f in forms.values()):
        return "data path compiled"
    compiled = [name for name, f in forms.items() if f == "compiled"]
    if pure_requested():
        why = f"{PURE_ENV}=1"
    elif stale():
        why = "the compiled modules are stale: make compiled"
    elif not extensions_present():
        why = "not built: make compiled"
    else:
        why = "partly built: make compiled"
    return f"data path pure Python ({why})" + (f", compiled: {', '.join(compiled)}" if compiled else "")
