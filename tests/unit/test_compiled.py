"""The compiled form and the pure form are the same code: the .pxd declarations match the source.

The hot modules (``fastproxy.compiled.COMPILED``) are compiled by Cython from their ``.py`` with the
types of their ``.pxd``. An attribute added to a class in the ``.py`` but not declared in the
``.pxd`` works in the pure form and raises AttributeError in the compiled one; these tests catch
that in either form, so nobody needs the compiled build to see the drift.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re

import msgspec
import pytest

from fastproxy import compiled

ROOT = pathlib.Path(compiled.__file__).resolve().parent.parent
_CLASS = re.compile(r"^cdef class (\w+)(?:\([\w.]+\))?:")
_ATTRIBUTE = re.compile(r"^\s+cdef (?:public |readonly )?[\w.]+ (\w+)\s*$")
_METHOD = re.compile(r"^\s+cpdef (?:[\w.]+ )?(\w+)\(")


def declarations(name: str) -> dict[str, tuple[set[str], set[str]]]:
    """``{class: (attributes, cpdef methods)}`` as the module's .pxd declares them."""
    classes: dict[str, tuple[set[str], set[str]]] = {}
    current: str | None = None
    pxd = (ROOT / name.replace(".", "/")).with_suffix(".pxd")
    for line in pxd.read_text().splitlines():
        if match := _CLASS.match(line):
            current = match.group(1)
            classes[current] = (set(), set())
        elif not line.startswith((" ", "\t")):
            current = None
        elif current is not None:
            if match := _ATTRIBUTE.match(line):
                classes[current][0].add(match.group(1))
            elif match := _METHOD.match(line):
                classes[current][1].add(match.group(1))
    return classes


def pure_module(name: str):  # type: ignore[no-untyped-def]
    """The module loaded from its .py whatever form the package runs in."""
    path = (ROOT / name.replace(".", "/")).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(name + "_pure_copy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", compiled.COMPILED)
def test_every_slot_is_declared_and_every_declaration_is_a_slot(name: str) -> None:
    module = pure_module(name)
    declared = declarations(name)
    assert declared, f"{name}.pxd declares no class"
    for class_name, (attributes, methods) in declared.items():
        cls = getattr(module, class_name)
        slots = set(cls.__dict__.get("__slots__", ()))
        assert slots == attributes, (
            f"{name}.{class_name}: __slots__ and .pxd differ: only in .py {sorted(slots - attributes)}, "
            f"only in .pxd {sorted(attributes - slots)}"
        )
        missing = sorted(m for m in methods if not callable(cls.__dict__.get(m)))
        assert not missing, f"{name}.{class_name}: .pxd declares cpdef methods the class lacks: {missing}"


@pytest.mark.parametrize("name", compiled.COMPILED)
def test_every_class_with_slots_is_an_extension_type(name: str) -> None:
    """A class with __slots__ in a compiled module is declared in the .pxd (else it is compiled as a
    plain Python class: slower, and with a base the .pxd cannot see)."""
    module = pure_module(name)
    declared = declarations(name)
    for attr, value in vars(module).items():
        if isinstance(value, type) and value.__module__ == module.__name__ and "__slots__" in value.__dict__:
            if not value.__dict__["__slots__"] or issubclass(value, msgspec.Struct):
                continue  # a marker class with no state (END's type), or a msgspec record
            assert attr in declared, f"{name}.{attr} has __slots__ but no `cdef class` in the .pxd"


def test_the_form_is_the_one_asked_for() -> None:
    """`make test` runs the suite twice and says which form each run must be in."""
    expected = os.environ.get("FASTPROXY_EXPECT_FORM")
    if not expected:
        pytest.skip("FASTPROXY_EXPECT_FORM not set (make test sets it: compiled, then pure)")
    assert set(compiled.form().values()) == {expected}, compiled.form()


def _fake_package(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A package root holding every compiled module as a one-line .py beside an (empty) extension."""
    package = tmp_path / "fastproxy"
    package.mkdir()
    for name in compiled.COMPILED:
        stem = name.split(".")[1]
        (package / f"{stem}.py").write_text("X = 1\n")
        (package / f"{stem}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(compiled, "_PACKAGE_ROOT", tmp_path)
    monkeypatch.setattr(compiled, "STAMP_FILE", package / "compiled-sources.txt")
    return package


def test_a_stale_extension_is_detected(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An extension whose recorded source hash differs from the source beside it is stale."""
    package = _fake_package(tmp_path, monkeypatch)
    assert compiled.stale() == list(compiled.COMPILED)  # no stamp at all
    compiled.write_stamp()
    assert compiled.stale() == []
    (package / "proxy.py").write_text("X = 2\n")
    assert compiled.stale() == ["fastproxy.proxy"]


def test_a_changed_vendored_c_source_makes_its_module_stale(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """exchange links llhttp's C sources: a different llhttp.c beside it is a different build."""
    _fake_package(tmp_path, monkeypatch)
    sources = compiled.C_SOURCES["fastproxy.exchange"]
    assert sources, "exchange is built with llhttp's C sources"
    for source in sources:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_text("/* llhttp */\n")
    compiled.write_stamp()
    assert compiled.stale() == []
    (tmp_path / sources[0]).write_text("/* llhttp, patched */\n")
    assert compiled.stale() == ["fastproxy.exchange"]
    (tmp_path / sources[0]).unlink()  # an installed wheel without the C sources: stale, not a crash
    assert compiled.stale() == ["fastproxy.exchange"]


def test_the_vendored_llhttp_is_the_one_httptools_carries() -> None:
    """Both forms parse with the same llhttp: the vendored header's version is httptools'."""
    header = (ROOT / compiled.C_INCLUDE_DIRS[0] / "llhttp.h").read_text()
    version = ".".join(
        re.search(rf"#define LLHTTP_VERSION_{part} (\d+)", header).group(1)  # type: ignore[union-attr]
        for part in ("MAJOR", "MINOR", "PATCH")
    )
    assert version == "9.4.3"
    import httptools

    assert httptools.__version__.startswith("0.9."), "upgrade fastproxy/vendor/llhttp with httptools"
